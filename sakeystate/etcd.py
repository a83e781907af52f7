"""The only code that talks to etcd.

A run reads the whole prefix once (paginated, pinned to one revision), and
writes only through transactions whose compares are the revisions it read.
Each operation has one deadline, the configured timeout, shared by every
endpoint it tries: an etcd without quorum makes a run fail within the timeout,
not a multiple of it. Passwords are read from their file and never printed.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import etcd3
import etcd3.watch
import grpc
from etcd3 import etcdrpc

from sakeystate.errors import EtcdError
from sakeystate.model import Delete, EtcdEntry, EtcdObservation, EtcdOp, Guard, Put
from sakeystate.state import EtcdConfig

T = TypeVar("T")


class _Six:
    """python3-etcd3 0.13.0's watch thread tells its callbacks that the stream broke
    through ``six.itervalues``, but never imports ``six``: the thread dies with a
    NameError and a watch whose member went away silently stops delivering. This
    one function is all it uses."""

    @staticmethod
    def itervalues(mapping: dict[Any, Any]) -> Any:
        return iter(mapping.values())


if not hasattr(etcd3.watch, "six"):
    etcd3.watch.six = _Six
# Keys per range page. A page larger than the gRPC message limit is halved and
# retried, so values of any size still read; a no-op check of up to this many
# keys is exactly one range request.
PAGE_SIZE = 2000
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# etcd's default --max-txn-ops.
MAX_TXN_OPS = 128
# etcd's default --max-request-bytes is 1.5 MiB; a transaction's keys and values
# stay under this, leaving room for the compares and the request's framing.
MAX_TXN_BYTES = 1024 * 1024
_RETRY_ON_NEXT_ENDPOINT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Pause between rounds over all endpoints when none of them could answer.
RETRY_PAUSE = 0.1


def prefix_range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@dataclass(frozen=True)
class _Endpoint:
    url: str
    host: str
    port: int
    secure: bool


def _parse_endpoint(url: str) -> _Endpoint:
    """``http(s)://host:port``; an IPv6 address keeps its brackets in the gRPC target."""
    shape = f"etcd endpoint {url!r} is not http(s)://host:port"
    parts = urlsplit(url)
    try:
        port = parts.port  # raises ValueError for a port that is not 0-65535
    except ValueError:
        raise EtcdError(f"{shape}: the port is not a number from 1 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port:
        raise EtcdError(shape)
    if parts.username is not None or parts.password is not None:
        raise EtcdError(f"{shape}: credentials go in etcd.auth, never in the URL")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return _Endpoint(url.rstrip("/"), host, port, parts.scheme == "https")


class EtcdStore:
    """A session with one etcd cluster: read the prefix, apply guarded transactions."""

    def __init__(self, config: EtcdConfig, page_size: int = PAGE_SIZE) -> None:
        self.config = config
        self.page_size = page_size
        self.endpoints = [_parse_endpoint(url) for url in config.endpoints]
        self._clients: dict[str, Any] = {}
        self._password: str | None = None
        self.requests = 0
        if config.username and config.password_file:
            self._password = _read_password(config.password_file)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _client(self, endpoint: _Endpoint, timeout: float) -> Any:
        client = self._clients.get(endpoint.url)
        if client is None:
            if endpoint.secure and not self.config.ca_file:
                raise EtcdError(f"{endpoint.url}: https endpoint needs etcd.tls.ca_file")
            try:
                client = etcd3.client(
                    host=endpoint.host,
                    port=endpoint.port,
                    ca_cert=self.config.ca_file if endpoint.secure else None,
                    cert_key=self.config.key_file if endpoint.secure else None,
                    cert_cert=self.config.cert_file if endpoint.secure else None,
                    timeout=timeout,
                    user=self.config.username if self._password is not None else None,
                    password=self._password,
                    grpc_options=[
                        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                        ("grpc.enable_retries", 0),
                    ],
                )
            except OSError as exc:
                raise EtcdError(
                    f"{endpoint.url}: cannot read TLS file {exc.filename}: {exc.strerror}"
                ) from None
            self._clients[endpoint.url] = client
        return client

    def _call(self, what: str, operation: Callable[[Any, float], T]) -> T:
        """Run ``operation(client, deadline)`` on the first endpoint that answers in time.

        Endpoints are tried in turn, round after round, until the deadline: while a
        member is down the others may answer "leader changed" or "no leader" for the
        second or so an election takes, and that must not fail a converge that has
        time left. Within a round each endpoint gets an equal share of the time
        left, the last one all of it, so a member that hangs (stopped, stalled
        disk, cut off from its peers) cannot use up the whole deadline when the
        others could answer. Retrying a transaction is safe: it is guarded, so one
        that did apply before its answer was lost fails its compare and the caller
        re-reads.
        """
        deadline = time.monotonic() + self.config.timeout
        failures: dict[str, str] = {}
        while True:
            for position, endpoint in enumerate(self.endpoints):
                now = time.monotonic()
                if now >= deadline:
                    failures.setdefault(endpoint.url, "not tried, time was up")
                    continue
                share = now + (deadline - now) / (len(self.endpoints) - position)
                try:
                    client = self._client(endpoint, max(0.001, share - now))
                    result = operation(client, share)
                except _Expired:
                    self._drop(endpoint)
                    failures[endpoint.url] = "timed out (between requests)"
                    continue
                except grpc.RpcError as exc:
                    code, details = exc.code(), (exc.details() or "").strip()
                    self._drop(endpoint)
                    if "context deadline exceeded" in details:
                        # A member without quorum gives up with our own deadline and
                        # says so as UNKNOWN: that is a timeout, not a refusal.
                        code = grpc.StatusCode.DEADLINE_EXCEEDED
                    if code in _RETRY_ON_NEXT_ENDPOINT:
                        label = (
                            "timed out"
                            if code == grpc.StatusCode.DEADLINE_EXCEEDED
                            else "unavailable"
                        )
                        failures[endpoint.url] = f"{label} ({_short(details)})"
                        continue
                    raise EtcdError(
                        f"{what} refused by {endpoint.url}: {code.name}: {_short(details)}"
                    ) from None
                if position:
                    # Ask the member that answered first next time: a hung member
                    # then costs its share once per run, not once per request.
                    self.endpoints.insert(0, self.endpoints.pop(position))
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(RETRY_PAUSE, remaining))
        raise EtcdError(
            f"{what} failed within the {self.config.timeout:g}s timeout: "
            + "; ".join(f"{url}: {why}" for url, why in failures.items())
        )

    def _drop(self, endpoint: _Endpoint) -> None:
        client = self._clients.pop(endpoint.url, None)
        if client is not None:
            client.close()

    def _rpc(self, client: Any, stub: str, method: str, request: Any, deadline: float) -> Any:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Expired()
        self.requests += 1
        call = getattr(getattr(client, stub), method)
        # The auth token travels as plain metadata: gRPC refuses call credentials on a
        # plain-http channel, and the token metadata works on both kinds.
        return call(request, remaining, metadata=client.metadata)

    def read(self, prefix: str) -> EtcdObservation:
        """Every key under ``prefix`` at one revision, page by page."""
        start_key = prefix.encode()
        end_key = prefix_range_end(start_key)

        def operation(client: Any, deadline: float) -> EtcdObservation:
            entries: list[EtcdEntry] = []
            revision = 0
            start = start_key
            limit = self.page_size
            while True:
                request = etcdrpc.RangeRequest(
                    key=start, range_end=end_key, limit=limit, revision=revision
                )
                try:
                    response = self._rpc(client, "kvstub", "Range", request, deadline)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and limit > 1:
                        limit = max(1, limit // 2)
                        continue
                    raise
                if revision == 0:
                    revision = response.header.revision
                for kv in response.kvs:
                    entries.append(
                        EtcdEntry(
                            key=kv.key.decode("utf-8", "backslashreplace"),
                            value=kv.value,
                            mod_revision=kv.mod_revision,
                            create_revision=kv.create_revision,
                        )
                    )
                if not response.more or not response.kvs:
                    return EtcdObservation(prefix, revision, tuple(entries))
                start = response.kvs[-1].key + b"\0"

        return self._guarded(f"reading {prefix} from etcd", operation)

    def get(self, key: str) -> EtcdEntry | None:
        def operation(client: Any, deadline: float) -> EtcdEntry | None:
            request = etcdrpc.RangeRequest(key=key.encode())
            response = self._rpc(client, "kvstub", "Range", request, deadline)
            for kv in response.kvs:
                return EtcdEntry(key, kv.value, kv.mod_revision, kv.create_revision)
            return None

        return self._guarded(f"reading {key} from etcd", operation)

    def transaction(self, guards: Iterable[Guard], writes: Iterable[EtcdOp]) -> bool:
        """Apply ``writes`` only if every guard still holds. False: something moved."""
        compare = [
            etcdrpc.Compare(
                key=g.key.encode(),
                result=etcdrpc.Compare.EQUAL,
                target=etcdrpc.Compare.MOD,
                mod_revision=g.mod_revision,
            )
            for g in guards
        ]
        success = [_request_op(op) for op in writes]
        if len(compare) > MAX_TXN_OPS or len(success) > MAX_TXN_OPS:
            raise EtcdError(
                f"transaction of {len(success)} writes exceeds {MAX_TXN_OPS} operations"
            )
        request = etcdrpc.TxnRequest(compare=compare, success=success, failure=[])

        def operation(client: Any, deadline: float) -> bool:
            return bool(self._rpc(client, "kvstub", "Txn", request, deadline).succeeded)

        return self._guarded("writing to etcd", operation)

    def _guarded(self, what: str, operation: Callable[[Any, float], T]) -> T:
        try:
            return self._call(what, operation)
        except _Expired:
            raise EtcdError(
                f"{what}: no answer within the {self.config.timeout:g}s timeout"
            ) from None


class _Expired(Exception):
    pass


def _request_op(op: EtcdOp) -> Any:
    if isinstance(op, Put):
        return etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(key=op.key.encode(), value=op.value)
        )
    assert isinstance(op, Delete)
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=op.key.encode()))


def _request_bytes(guards: Iterable[Guard], writes: Iterable[EtcdOp]) -> int:
    """What a transaction's keys and values add to its request size."""
    size = sum(len(g.key.encode()) for g in guards)
    for op in writes:
        size += len(op.key.encode()) + (len(op.value) if isinstance(op, Put) else 0)
    return size


def batches(
    items: list[tuple[tuple[Guard, ...], tuple[EtcdOp, ...]]],
) -> list[tuple[list[Guard], list[EtcdOp]]]:
    """Pack guarded writes into transactions within etcd's operation and size limits.

    An item (one action's guards and writes) is never split: its writes are
    guarded together. One item larger than the limits alone gets a transaction
    of its own, which etcd may then refuse with a clear error.
    """
    out: list[tuple[list[Guard], list[EtcdOp]]] = []
    guards: list[Guard] = []
    writes: list[EtcdOp] = []
    size = 0
    for item_guards, item_writes in items:
        item_size = _request_bytes(item_guards, item_writes)
        if (guards or writes) and (
            len(guards) + len(item_guards) > MAX_TXN_OPS
            or len(writes) + len(item_writes) > MAX_TXN_OPS
            or size + item_size > MAX_TXN_BYTES
        ):
            out.append((guards, writes))
            guards, writes, size = [], [], 0
        guards += item_guards
        writes += item_writes
        size += item_size
    if guards or writes:
        out.append((guards, writes))
    return out


def _read_password(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.read().rstrip("\r\n")
    except OSError as exc:
        raise EtcdError(f"cannot read etcd.auth.password_file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise EtcdError(f"etcd.auth.password_file {path} is not UTF-8 text") from None
    if not password:
        raise EtcdError(f"etcd.auth.password_file {path} is empty")
    return password


def _short(details: str) -> str:
    return details.splitlines()[0][:200] if details else "no details"


class WatchCompacted(EtcdError):
    """The revision a watch started from was compacted: read everything again."""


class PrefixWatch:
    """Changes under some prefixes after a revision, as etcd's watch delivers them.

    One gRPC watch stream per prefix on one endpoint. ``wait`` blocks until
    something changed (returns the newest revision seen), the timeout passed
    (None), or the watch failed (EtcdError; WatchCompacted when the start revision
    was compacted): the caller then reads again and starts a new watch, which is
    how an endpoint that died is replaced.
    """

    def __init__(self, store: EtcdStore, prefixes: Iterable[str], start_revision: int) -> None:
        self._events: queue.Queue[Any] = queue.Queue()
        self._client: Any = None
        self._ids: list[Any] = []

        def operation(client: Any, _deadline: float) -> Any:
            for prefix in prefixes:
                self._ids.append(
                    client.add_watch_prefix_callback(
                        prefix, self._events.put, start_revision=start_revision
                    )
                )
            return client

        try:
            self._client = store._guarded("starting an etcd watch", operation)
        except etcd3.exceptions.Etcd3Exception as exc:
            self.close()
            raise EtcdError(f"starting an etcd watch: {type(exc).__name__}") from None

    def wait(self, timeout: float) -> int | None:
        """The newest revision changed under the prefixes, or None after ``timeout``."""
        try:
            item = self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        newest = 0
        while True:
            if isinstance(item, etcd3.exceptions.RevisionCompactedError):
                raise WatchCompacted(
                    f"etcd compacted the watched revision (now {item.compacted_revision})"
                )
            if isinstance(item, BaseException):
                raise EtcdError(f"etcd watch failed: {_short(str(item))}")
            newest = max(newest, int(item.header.revision))
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return newest

    def close(self) -> None:
        for watch_id in self._ids:
            with contextlib.suppress(Exception):
                self._client.cancel_watch(watch_id)
        self._ids.clear()

    def __enter__(self) -> PrefixWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
