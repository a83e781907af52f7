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
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
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
# What one read of a prefix may hold: 10,000 keys are ~15 MiB. Far more is an etcd
# writer filling the prefix (700 values of 1.4 MiB made every converge time out);
# it is refused at once with a clear error instead.
MAX_READ_BYTES = 256 * 1024 * 1024
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

    def __init__(
        self, config: EtcdConfig, page_size: int = PAGE_SIZE, max_read: int = MAX_READ_BYTES
    ) -> None:
        self.config = config
        self.page_size = page_size
        self.max_read = max_read
        self.endpoints = [_parse_endpoint(url) for url in config.endpoints]
        self._clients: dict[str, Any] = {}
        self._password: str | None = None
        self.requests = 0
        # The revision of the latest read of each prefix: where a watch starts.
        self.revisions: dict[str, int] = {}
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
            total = 0
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
                total += sum(len(kv.key) + len(kv.value) for kv in response.kvs)
                if total > self.max_read:
                    raise EtcdError(
                        f"etcd holds more than {self.max_read // (1024 * 1024)} MiB under "
                        f"{prefix} ({len(entries) + len(response.kvs)} keys read so far); a "
                        "value over 64 KiB is never a key: find them with `etcdctl get "
                        "--prefix --keys-only` and delete them"
                    )
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

        observed = self._guarded(f"reading {prefix} from etcd", operation)
        self.revisions[prefix] = observed.revision
        return observed

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
            if isinstance(item, grpc.RpcError) and hasattr(item, "code"):
                detail = f"{item.code().name} ({_short(item.details() or '')})"
                raise EtcdError(f"etcd watch failed: {detail}")
            if isinstance(item, BaseException):
                raise EtcdError(f"etcd watch failed: {_short(str(item))}")
            newest = max(newest, int(item.header.revision))
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return newest

    def alive(self, timeout: float = 2.0) -> bool:
        """Whether the member this watch streams from answers and has a leader.

        python3-etcd3's watch stream can go quiet without telling its callbacks (a
        member cut off from quorum keeps the stream open and delivers nothing), so
        a watcher asks now and then; a Status call is not a range read.
        """
        try:
            request = etcdrpc.StatusRequest()
            response = self._client.maintenancestub.Status(
                request, timeout, metadata=self._client.metadata
            )
        except Exception:  # an RpcError, or the channel was closed under the watch
            return False
        return bool(response.leader)

    def close(self) -> None:
        for watch_id in self._ids:
            with contextlib.suppress(Exception):
                self._client.cancel_watch(watch_id)
        self._ids.clear()

    def __enter__(self) -> PrefixWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A holder killed with SIGKILL frees the reload lock this many seconds later (lease
# expiry); a live holder refreshes its lease three times per TTL.
LOCK_TTL = 10
# A waiter re-tries at least this often, even if the watch on the lock key is silent.
LOCK_POLL = 2.0


class ReloadLock:
    """The cluster-wide reload lock: one key whose value is attached to a lease.

    The recipe is python3-etcd3's ``Lock`` (create the key only while it does not
    exist, attached to a lease; a waiter watches for its deletion; release deletes
    it), done here through ``EtcdStore`` so that it shares the store's endpoint
    failover, per-call deadlines and auth metadata, and sits exactly at the
    configured key. The library's own ``Lock`` sends gRPC call credentials, which
    gRPC refuses on a plain-http channel with auth, talks to one endpoint only and
    leaks a lease per failed attempt.

    While the lock is held a thread keeps the lease alive, through its own store
    (a store is not thread-safe). A holder killed with SIGKILL stops refreshing,
    and etcd deletes the key when the lease expires, ``ttl`` seconds later. The
    value names the holder, so a waiter that gives up can say who held it. The
    other side of the same coin: a holder cut off from etcd for longer than the TTL
    loses the lock while its reload still runs; a lease lock cannot prevent that.
    """

    def __init__(self, store: EtcdStore, key: str, holder: str, ttl: int = LOCK_TTL) -> None:
        self.store = store
        self.key = key
        self.ttl = ttl
        self.value = f"{holder} {secrets.token_hex(8)}".encode()
        self._lease: int | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def acquire(self, timeout: float) -> None:
        """Take the lock within ``timeout`` seconds, or raise EtcdError naming the holder."""
        deadline = time.monotonic() + timeout
        self._lease = self._grant()
        granted = time.monotonic()
        try:
            while True:
                if time.monotonic() - granted > self.ttl / 3:
                    self._keepalive(self.store, self._lease)
                    granted = time.monotonic()
                held_by, revision = self._try_create()
                if held_by is None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EtcdError(
                        f"the reload lock {self.key} is held by "
                        f"{held_by.decode('utf-8', 'replace')[:200]!r}; gave up after "
                        f"{timeout:g}s"
                    )
                self._wait_for_release(revision, min(left, LOCK_POLL))
        except BaseException:
            self.release()
            raise
        self._stop.clear()
        self._refresher = threading.Thread(
            target=self._refresh, args=(self._lease,), name="reload-lock-lease", daemon=True
        )
        self._refresher.start()

    def _wait_for_release(self, revision: int, timeout: float) -> None:
        """Until the holder's key changes, at most ``timeout``; a watch that cannot
        start or breaks is no reason to give up, only to try again a little later."""
        try:
            with PrefixWatch(self.store, [self.key], revision + 1) as watch:
                watch.wait(timeout)
        except EtcdError:
            time.sleep(min(timeout, RETRY_PAUSE * 5))

    def release(self) -> None:
        """Give the lock up (revoking the lease deletes the key). Never raises: when
        etcd cannot be reached now, the lease expires within ``ttl`` seconds anyway."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        lease, self._lease = self._lease, None
        if lease is None:
            return
        request = etcdrpc.LeaseRevokeRequest(ID=lease)

        def operation(client: Any, deadline: float) -> None:
            self.store._rpc(client, "leasestub", "LeaseRevoke", request, deadline)

        with contextlib.suppress(EtcdError):
            self.store._guarded(f"releasing the reload lock {self.key}", operation)

    def _grant(self) -> int:
        request = etcdrpc.LeaseGrantRequest(TTL=self.ttl)

        def operation(client: Any, deadline: float) -> int:
            response = self.store._rpc(client, "leasestub", "LeaseGrant", request, deadline)
            return int(response.ID)

        return self.store._guarded(f"taking the reload lock {self.key}", operation)

    def _try_create(self) -> tuple[bytes | None, int]:
        """(None, revision) when the key was created for us, else (its holder, its revision)."""
        assert self._lease is not None
        key = self.key.encode()
        request = etcdrpc.TxnRequest(
            compare=[
                etcdrpc.Compare(
                    key=key,
                    result=etcdrpc.Compare.EQUAL,
                    target=etcdrpc.Compare.CREATE,
                    create_revision=0,
                )
            ],
            success=[
                etcdrpc.RequestOp(
                    request_put=etcdrpc.PutRequest(key=key, value=self.value, lease=self._lease)
                )
            ],
            failure=[etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))],
        )

        def operation(client: Any, deadline: float) -> tuple[bytes | None, int]:
            response = self.store._rpc(client, "kvstub", "Txn", request, deadline)
            if response.succeeded:
                return None, int(response.header.revision)
            kvs = response.responses[0].response_range.kvs
            if not kvs:  # impossible within one transaction; nobody to name: try again
                return b"", int(response.header.revision)
            if kvs[0].value == self.value:  # our own put, whose answer was lost
                return None, int(response.header.revision)
            return bytes(kvs[0].value), int(kvs[0].mod_revision)

        return self.store._guarded(f"taking the reload lock {self.key}", operation)

    @staticmethod
    def _keepalive(store: EtcdStore, lease: int) -> int:
        """Refresh the lease; its remaining TTL (0: it expired, the lock is gone)."""
        request = etcdrpc.LeaseKeepAliveRequest(ID=lease)

        def operation(client: Any, deadline: float) -> int:
            responses = store._rpc(client, "leasestub", "LeaseKeepAlive", iter([request]), deadline)
            for response in responses:
                return int(response.TTL)
            return 0

        return store._guarded("refreshing the reload lock's lease", operation)

    def _refresh(self, lease: int) -> None:
        """Keep the lease alive until released; a failed refresh is retried next tick."""
        config = self.store.config
        with EtcdStore(replace(config, timeout=min(config.timeout, self.ttl / 3))) as store:
            while not self._stop.wait(self.ttl / 3):
                with contextlib.suppress(EtcdError):
                    self._keepalive(store, lease)
