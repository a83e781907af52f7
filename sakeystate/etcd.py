"""The only code that talks to etcd: one client for every call, watches and leases included.

Every call, unary or stream, goes through ``EtcdStore._call``: one deadline (the
configured timeout) shared by every endpoint it tries, endpoint rotation, the auth
token as plain metadata (gRPC refuses call credentials on plain http; metadata works
on both), the token renewed before it goes stale and once more when etcd says it is
invalid, the cluster ID of every response header compared with the first one seen,
and one error mapping: only ``EtcdError`` (and its subclasses) ever leaves this
module, and its message names the operation, the key or prefix, the endpoint and
the etcd user, and for a permission error the grant that is missing.

The channels are built here from grpc and the generated etcd stubs that
python3-etcd3 ships (``etcd3.etcdrpc``); none of that library's client, watch, lock
or lease classes is used: their own failover state, exceptions and call credentials
were where three confirmed defects came from.

A run reads the whole prefix once (paginated, pinned to one revision), and writes
only through transactions whose compares are the revisions it read. Passwords are
read from their file and never printed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
from etcd3 import etcdrpc

from sakeystate.errors import EtcdError, PermissionDenied
from sakeystate.model import Delete, EtcdEntry, EtcdObservation, EtcdOp, Guard, Put
from sakeystate.state import EtcdConfig

T = TypeVar("T")

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
# Pause between rounds over all endpoints when none of them could answer.
RETRY_PAUSE = 0.1
# etcd's simple tokens expire after --auth-token-ttl (default 300 s) without use; a
# token unused for this long, or older than TOKEN_MAX_AGE, is replaced before the
# next call. A server with a shorter TTL answers "invalid auth token": renewed once
# and the call retried. A JWT token is renewed before the expiry it carries.
TOKEN_IDLE = 60.0
TOKEN_MAX_AGE = 240.0
# A watch that heard nothing for WATCH_PROGRESS_IDLE asks its member for a progress
# notification; no answer within WATCH_STALLED means the stream is stalled (a
# member whose TCP connection hangs delivers nothing and says nothing).
WATCH_PROGRESS_IDLE = 2.0
WATCH_STALLED = 3.0

_RETRY_ON_NEXT_ENDPOINT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_INVALID_TOKEN = ("invalid auth token", "auth store is old")
RBAC_DOC = "docs/etcd-rbac.md"
_STATUS = etcdrpc.StatusRequest()


def prefix_range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


class ClusterMismatch(EtcdError):
    """Two endpoints answered with different cluster IDs: two different etcd clusters."""


class WatchCompacted(EtcdError):
    """The revision a watch started from was compacted: read everything again."""


# --- endpoints and connections ---------------------------------------------------------


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


class _Connection:
    """One gRPC channel to one endpoint, with the etcd service stubs on it."""

    def __init__(self, endpoint: _Endpoint, config: EtcdConfig) -> None:
        self.endpoint = endpoint
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),
            # A channel of its own: gRPC's global subchannel pool would hand a new
            # channel the old one's connection, still backing off after a member restart.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        target = f"{endpoint.host}:{endpoint.port}"
        if endpoint.secure:
            if not config.ca_file:
                raise EtcdError(f"{endpoint.url}: https endpoint needs etcd.tls.ca_file")
            url = endpoint.url
            credentials = grpc.ssl_channel_credentials(
                _read_tls(config.ca_file, "etcd.tls.ca_file", url),
                _read_tls(config.key_file, "etcd.tls.key_file", url) if config.key_file else None,
                _read_tls(config.cert_file, "etcd.tls.cert_file", url)
                if config.cert_file
                else None,
            )
            self.channel = grpc.secure_channel(target, credentials, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.kv = etcdrpc.KVStub(self.channel)
        self.watch = etcdrpc.WatchStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)
        self.auth = etcdrpc.AuthStub(self.channel)
        self.maintenance = etcdrpc.MaintenanceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


def _read_tls(path: str, setting: str, url: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise EtcdError(f"{url}: cannot read {setting} {path}: {exc.strerror}") from None


# --- what a call touches, and the grant it needs ---------------------------------------


@dataclass(frozen=True)
class _Access:
    """A key (or a prefix) a call reads or writes: named in errors, mapped to a grant."""

    key: str
    prefix: bool = False
    write: bool = False


def _grant(config: EtcdConfig, access: _Access) -> str:
    """The grant of docs/etcd-rbac.md that covers ``access``."""
    mode = "readwrite" if access.write else "read"
    key = access.key
    lock = config.reload_lock
    if lock and (key == lock + "/" or key.startswith(lock + "/")):
        rest = key[len(lock) + 1 :]
        if access.write and "/" in rest:
            host = rest.split("/", 1)[0]
            return f"readwrite on the prefix {lock}/{host}/ (or on {lock}/)"
        return f"{mode} on the prefix {lock}/"
    for base in (config.prefix, config.status_prefix):
        if key.startswith(base) and key != base:
            rest = key[len(base) :]
            if "/" in rest:
                return f"{mode} on the prefix {base}{rest.split('/', 1)[0]}/"
            return f"{mode} on the key {key}"
    what = "prefix" if access.prefix else "key"
    return f"{mode} on the {what} {key}"


def _named(accesses: Sequence[_Access]) -> str:
    keys = [a.key for a in accesses]
    if len(keys) <= 3:
        return ", ".join(keys)
    return f"{', '.join(keys[:3])} and {len(keys) - 3} more"


# --- the client ------------------------------------------------------------------------


class _Status(Exception):
    """A gRPC status from somewhere other than a unary call (a watch's cancel reason, a
    stream that ended): handled by ``_call`` exactly like an ``RpcError``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.status = code
        self.text = details


class _Expired(Exception):
    """The call's share of the deadline ran out before a request could be sent."""


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, _Status):
        return exc.status, exc.text
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        details = exc.details() if hasattr(exc, "details") else ""
        return code or grpc.StatusCode.UNKNOWN, (details or "").strip()
    # A closed channel, a broken stream: the connection is unusable, try the next one.
    return grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}"


class EtcdStore:
    """A session with one etcd cluster: reads, guarded transactions, leases, watches.

    Not thread-safe: a background thread (a lease's keepalive) gets a store of its own.
    Creating a store never fails: a bad endpoint or an unreadable password file is
    reported by the first call, as an EtcdError like any other etcd failure, so that a
    caller (``watch`` after a state-file edit) handles it where it handles the rest.
    """

    def __init__(
        self, config: EtcdConfig, page_size: int = PAGE_SIZE, max_read: int = MAX_READ_BYTES
    ) -> None:
        self.config = config
        self.page_size = page_size
        self.max_read = max_read
        self.endpoints: list[_Endpoint] = []
        self._problem: EtcdError | None = None
        try:
            self.endpoints = [_parse_endpoint(url) for url in config.endpoints]
        except EtcdError as exc:
            self._problem = exc
        self._connections: dict[str, _Connection] = {}
        self._password: str | None = None
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._token_used = 0.0
        # (cluster ID, the endpoint that first said so); endpoints whose ID matched.
        self._cluster: tuple[int, str] | None = None
        self._agreed: set[str] = set()
        self._cluster_checked = False
        self._cert_user: str | None = None
        # Unary data requests sent (Range, Txn, lease calls), for tests and the benchmark.
        self.requests = 0
        # The revision of the latest read of each prefix: where a watch starts.
        self.revisions: dict[str, int] = {}

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- who we are ----------------------------------------------------------------

    @property
    def _password_auth(self) -> bool:
        return bool(self.config.username and self.config.password_file)

    @property
    def user(self) -> str | None:
        """The etcd user calls run as: the configured username, or the common name of the
        TLS client certificate (etcd's --client-cert-auth user), or None without auth."""
        if self._password_auth:
            return self.config.username
        if self.config.cert_file and any(e.secure for e in self.endpoints):
            if self._cert_user is None:
                self._cert_user = _certificate_user(self.config.cert_file)
            return self._cert_user
        return None

    def _as_user(self) -> str:
        user = self.user
        return f" as etcd user {user!r}" if user else ""

    # --- connections and the token -------------------------------------------------

    def _connection(self, endpoint: _Endpoint) -> _Connection:
        connection = self._connections.get(endpoint.url)
        if connection is None:
            connection = _Connection(endpoint, self.config)
            self._connections[endpoint.url] = connection
        return connection

    def _drop(self, endpoint: _Endpoint) -> None:
        connection = self._connections.pop(endpoint.url, None)
        if connection is not None:
            connection.close()

    def demote(self, endpoint: _Endpoint) -> None:
        """Ask ``endpoint`` last from now on, on a new connection (it stalled)."""
        self._drop(endpoint)
        if endpoint in self.endpoints and len(self.endpoints) > 1:
            self.endpoints.remove(endpoint)
            self.endpoints.append(endpoint)

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("token", self._token),) if self._token else None

    def _authorize(self, connection: _Connection, deadline: float) -> None:
        """A fresh auth token before a call, when password auth is configured."""
        if not self._password_auth:
            return
        if self._token is not None and not self._token_stale():
            return
        if self.config.username == "self":
            raise EtcdError(
                "etcd.auth.username is self, but this host's name is unknown: pass --host "
                "or set host in the state file"
            )
        if self._password is None:
            assert self.config.password_file is not None
            self._password = _read_password(self.config.password_file)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Expired()
        request = etcdrpc.AuthenticateRequest(name=self.config.username, password=self._password)
        try:
            response = connection.auth.Authenticate(request, timeout=remaining)
        except grpc.RpcError as exc:
            code, details = _status_of(exc)
            if code in _RETRY_ON_NEXT_ENDPOINT or "deadline exceeded" in details:
                raise
            raise EtcdError(
                f"authenticating to etcd at {connection.endpoint.url} as etcd user "
                f"{self.config.username!r} refused: {code.name}: {_short(details)}"
            ) from None
        self._note(response.header, connection.endpoint)
        now = time.monotonic()
        self._token = str(response.token)
        self._token_used = now
        self._token_renew_at = now + _token_lifetime(self._token)

    def _token_stale(self) -> bool:
        now = time.monotonic()
        return now >= self._token_renew_at or now - self._token_used >= TOKEN_IDLE

    # --- the cluster ID --------------------------------------------------------------

    def _note(self, header: Any, endpoint: _Endpoint) -> None:
        """Compare a response header's cluster ID with the first one this session saw."""
        cluster_id = int(getattr(header, "cluster_id", 0) or 0)
        if not cluster_id:
            return
        if self._cluster is None:
            self._cluster = (cluster_id, endpoint.url)
            self._agreed.add(endpoint.url)
            return
        known, first = self._cluster
        if cluster_id != known:
            raise ClusterMismatch(
                f"the etcd endpoints belong to two different clusters: {first} is cluster "
                f"{known:x}, {endpoint.url} is cluster {cluster_id:x}; etcd.endpoints must "
                "list members of one cluster"
            )
        self._agreed.add(endpoint.url)

    def check_cluster(self) -> None:
        """Ask every endpoint not yet heard from for its cluster ID (once per session).

        Long-lived sessions (watch, wait, the lock) call this when they start; a one-shot
        run compares the response headers it gets anyway, at no extra cost. The
        endpoints are asked at once (gRPC futures), so a hung one costs one timeout; an
        endpoint that does not answer now is compared when it first answers.
        """
        if self._cluster_checked or self._problem is not None:
            return
        self._cluster_checked = True
        if self._password_auth and self.endpoints:
            # etcd 3.6 answers Status only with a valid token.
            with contextlib.suppress(Exception):
                deadline = time.monotonic() + self.config.timeout
                self._authorize(self._connection(self.endpoints[0]), deadline)
        asked = []
        for endpoint in self.endpoints:
            if endpoint.url in self._agreed:
                continue
            try:
                status = self._connection(endpoint).maintenance.Status
                call = status.future(
                    _STATUS, timeout=self.config.timeout, metadata=self._metadata()
                )
            except Exception:  # a TLS file that cannot be read: the next call says so
                continue
            asked.append((endpoint, call))
        for endpoint, call in asked:
            try:
                response = call.result()
            except Exception:  # not answering now (or refusing us): compared when it
                self._drop(endpoint)  # first answers a call, which reports its refusal
                continue
            self._note(response.header, endpoint)

    # --- calls -----------------------------------------------------------------------

    def _call(
        self,
        what: str,
        operation: Callable[[_Connection, float], T],
        accesses: Sequence[_Access] = (),
        timeout: float | None = None,
        write: bool = False,
    ) -> T:
        """Run ``operation(connection, deadline)`` on the first endpoint that answers in time.

        Endpoints are tried in turn, round after round, until the deadline: while a
        member is down the others may answer "leader changed" or "no leader" for the
        second or so an election takes, and that must not fail a converge that has
        time left. Within a round each endpoint gets an equal share of the time
        left, the last one all of it, so a member that hangs (stopped, stalled
        disk, cut off from its peers) cannot use up the whole deadline when the
        others could answer. Retrying a transaction is safe: it is guarded, so one
        that did apply before its answer was lost fails its compare and the caller
        re-reads. An invalid auth token is renewed and the call retried once.
        """
        if self._problem is not None:
            raise EtcdError(str(self._problem))
        limit = self.config.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        failures: dict[str, str] = {}
        renewed = False
        while True:
            position = 0
            while position < len(self.endpoints):
                endpoint = self.endpoints[position]
                now = time.monotonic()
                if now >= deadline:
                    failures.setdefault(endpoint.url, "not tried, time was up")
                    position += 1
                    continue
                share = now + (deadline - now) / (len(self.endpoints) - position)
                try:
                    connection = self._connection(endpoint)
                    self._authorize(connection, share)
                    if write and self._cluster is not None and endpoint.url not in self._agreed:
                        # Never write to a member of another cluster: ask it first.
                        self._rpc(connection, "maintenance", "Status", _STATUS, share)
                    result = operation(connection, share)
                except (EtcdError, _Expired) as exc:
                    if isinstance(exc, EtcdError):
                        raise
                    self._drop(endpoint)
                    failures[endpoint.url] = "timed out (between requests)"
                    position += 1
                    continue
                except Exception as exc:
                    code, details = _status_of(exc)
                    if self._password_auth and not renewed and _invalid_token(code, details):
                        renewed = True
                        self._token = None
                        continue  # the same endpoint, with a new token
                    if "context deadline exceeded" in details:
                        # A member without quorum gives up with our own deadline and
                        # says so as UNKNOWN: that is a timeout, not a refusal.
                        code = grpc.StatusCode.DEADLINE_EXCEEDED
                    if code in _RETRY_ON_NEXT_ENDPOINT or "too many requests" in details:
                        self._drop(endpoint)
                        label = (
                            "timed out"
                            if code == grpc.StatusCode.DEADLINE_EXCEEDED
                            else "unavailable"
                        )
                        failures[endpoint.url] = f"{label} ({_short(details)})"
                        position += 1
                        continue
                    raise self._refusal(what, endpoint, code, details, accesses) from None
                # etcd's simple tokens live on for their TTL after each use.
                self._token_used = time.monotonic()
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
            f"{what} failed within the {limit:g}s timeout: "
            + "; ".join(f"{url}: {why}" for url, why in failures.items())
        )

    def _refusal(
        self,
        what: str,
        endpoint: _Endpoint,
        code: grpc.StatusCode,
        details: str,
        accesses: Sequence[_Access],
    ) -> EtcdError:
        text = f"{what} refused by {endpoint.url}{self._as_user()}: {code.name}: {_short(details)}"
        if code == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details:
            grants = list(dict.fromkeys(_grant(self.config, a) for a in accesses))
            if grants:
                who = "that user" if self.user else "the etcd user"
                text += f"; {who} needs {' and '.join(grants)} (see {RBAC_DOC})"
            return PermissionDenied(text)
        if "user name is empty" in details:
            text += (
                "; this etcd has authentication enabled: set etcd.auth (username and "
                "password_file) or a TLS client certificate"
            )
        if _invalid_token(code, details):
            text += "; a new auth token was refused too"
        return EtcdError(text)

    def _rpc(
        self, connection: _Connection, stub: str, method: str, request: Any, deadline: float
    ) -> Any:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Expired()
        self.requests += 1
        call = getattr(getattr(connection, stub), method)
        response = call(request, timeout=remaining, metadata=self._metadata())
        self._note(response.header, connection.endpoint)
        return response

    def _guarded(
        self,
        what: str,
        operation: Callable[[_Connection, float], T],
        accesses: Sequence[_Access] = (),
        timeout: float | None = None,
        write: bool = False,
    ) -> T:
        try:
            return self._call(what, operation, accesses, timeout, write)
        except _Expired:
            raise EtcdError(
                f"{what}: no answer within the {self.config.timeout:g}s timeout"
            ) from None

    # --- reads and writes ------------------------------------------------------------

    def read(self, prefix: str) -> EtcdObservation:
        """Every key under ``prefix`` at one revision, page by page."""
        start_key = prefix.encode()
        end_key = prefix_range_end(start_key)

        def operation(connection: _Connection, deadline: float) -> EtcdObservation:
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
                    response = self._rpc(connection, "kv", "Range", request, deadline)
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

        observed = self._guarded(
            f"reading {prefix} from etcd", operation, [_Access(prefix, prefix=True)]
        )
        self.revisions[prefix] = observed.revision
        return observed

    def get(self, key: str) -> EtcdEntry | None:
        def operation(connection: _Connection, deadline: float) -> EtcdEntry | None:
            request = etcdrpc.RangeRequest(key=key.encode())
            response = self._rpc(connection, "kv", "Range", request, deadline)
            for kv in response.kvs:
                return EtcdEntry(key, kv.value, kv.mod_revision, kv.create_revision)
            return None

        return self._guarded(f"reading {key} from etcd", operation, [_Access(key)])

    def transaction(self, guards: Iterable[Guard], writes: Iterable[EtcdOp]) -> bool:
        """Apply ``writes`` only if every guard still holds. False: something moved."""
        guards, writes = list(guards), list(writes)
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
        written = {op.key for op in writes}
        accesses = [_Access(op.key, write=True) for op in writes] + [
            _Access(g.key) for g in guards if g.key not in written
        ]

        def operation(connection: _Connection, deadline: float) -> bool:
            return bool(self._rpc(connection, "kv", "Txn", request, deadline).succeeded)

        what = f"writing {_named(accesses)} to etcd" if accesses else "writing to etcd"
        return self._guarded(what, operation, accesses, write=True)

    # --- leases ----------------------------------------------------------------------

    def grant_lease(self, ttl: int, what: str) -> int:
        """A new lease of ``ttl`` seconds; its ID."""
        request = etcdrpc.LeaseGrantRequest(TTL=ttl)

        def operation(connection: _Connection, deadline: float) -> int:
            response = self._rpc(connection, "lease", "LeaseGrant", request, deadline)
            if response.error:
                raise _Status(grpc.StatusCode.UNKNOWN, str(response.error))
            return int(response.ID)

        return self._guarded(f"{what}: granting a lease", operation, write=True)

    def keepalive(self, lease: int, what: str, timeout: float | None = None) -> int:
        """Refresh ``lease``; its remaining TTL (0: it expired or was revoked)."""
        request = etcdrpc.LeaseKeepAliveRequest(ID=lease)

        def operation(connection: _Connection, deadline: float) -> int:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Expired()
            self.requests += 1
            call = connection.lease.LeaseKeepAlive(
                iter([request]), timeout=remaining, metadata=self._metadata()
            )
            try:
                for response in call:
                    self._note(response.header, connection.endpoint)
                    return int(response.TTL)
            finally:
                call.cancel()
            raise _Status(grpc.StatusCode.UNAVAILABLE, "the keepalive stream ended unanswered")

        return self._guarded(f"{what}: refreshing lease {lease:x}", operation, timeout=timeout)

    def revoke_lease(self, lease: int, what: str) -> None:
        """Revoke ``lease`` (etcd deletes every key attached to it); a lease that is
        already gone is no error."""
        request = etcdrpc.LeaseRevokeRequest(ID=lease)

        def operation(connection: _Connection, deadline: float) -> None:
            try:
                self._rpc(connection, "lease", "LeaseRevoke", request, deadline)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        self._guarded(f"{what}: revoking lease {lease:x}", operation)

    def put_leased(self, key: str, value: bytes, lease: int, what: str) -> int:
        """Put ``key`` attached to ``lease``; the revision of the put."""
        request = etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease)

        def operation(connection: _Connection, deadline: float) -> int:
            return int(self._rpc(connection, "kv", "Put", request, deadline).header.revision)

        return self._guarded(
            f"{what}: writing {key}", operation, [_Access(key, write=True)], write=True
        )

    def txn(self, what: str, request: Any, accesses: Sequence[_Access]) -> Any:
        """A raw transaction (the lock's recipe); its response."""

        def operation(connection: _Connection, deadline: float) -> Any:
            return self._rpc(connection, "kv", "Txn", request, deadline)

        return self._guarded(what, operation, accesses, write=True)


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


def _certificate_user(path: str) -> str:
    """The common name of the client certificate: the user etcd's --client-cert-auth
    sees. Only for messages; a certificate that cannot be read is named by its path."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        with open(path, "rb") as handle:
            certificate = x509.load_pem_x509_certificate(handle.read())
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (OSError, ValueError):
        return f"the certificate {path}"
    return str(names[0].value) if names else f"the certificate {path}"


def _is_jwt(token: str) -> bool:
    return token.count(".") == 2


def _token_lifetime(token: str) -> float:
    """Seconds until a new token is replaced: before the ``exp`` a JWT token carries
    (by a fifth of its lifetime), else ``TOKEN_MAX_AGE``."""
    if not _is_jwt(token):
        return TOKEN_MAX_AGE
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        left = float(claims["exp"]) - time.time()
        lifetime = float(claims["exp"]) - float(claims.get("iat", time.time()))
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        return TOKEN_MAX_AGE
    return max(0.5, min(TOKEN_MAX_AGE, left - max(1.0, lifetime / 5)))


def _invalid_token(code: grpc.StatusCode, details: str) -> bool:
    return code == grpc.StatusCode.UNAUTHENTICATED or any(s in details for s in _INVALID_TOKEN)


def _short(details: str) -> str:
    return details.splitlines()[0][:200] if details else "no details"


# --- watches -----------------------------------------------------------------------------


class _Ended:
    """What the reader thread puts last: the stream's error, or None when it just ended."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


def _requests(pending: queue.Queue[Any]) -> Iterator[Any]:
    """The request side of a watch stream: whatever is queued, until None."""
    while True:
        item = pending.get()
        if item is None:
            return
        yield item


def _read_stream(call: Any, into: queue.Queue[Any]) -> None:
    try:
        for response in call:
            into.put(response)
        into.put(_Ended(None))
    except Exception as exc:  # the stream's RpcError, or a channel closed under it
        into.put(_Ended(exc))


class _WatchStream:
    """One ``Watch`` stream on one endpoint, its responses read by a daemon thread.

    Cancelling the call (``close``) never waits for the stream: a stalled member cannot
    block it. Nothing but the reader thread touches the gRPC iterator.
    """

    def __init__(self, connection: _Connection, metadata: Any, creates: list[Any]) -> None:
        self.connection = connection
        self.pending: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        for create in creates:
            self.pending.put(etcdrpc.WatchRequest(create_request=create))
        self.call = connection.watch.Watch(_requests(self.pending), metadata=metadata)
        self.reader = threading.Thread(
            target=_read_stream, args=(self.call, self.responses), daemon=True, name="etcd-watch"
        )
        self.reader.start()

    def progress(self) -> None:
        self.pending.put(etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest()))

    def close(self) -> None:
        self.pending.put(None)
        with contextlib.suppress(Exception):
            self.call.cancel()


class PrefixWatch:
    """Changes under some prefixes (or exact keys) after a revision, as etcd delivers them.

    One raw ``Watch`` stream on one endpoint, started through ``EtcdStore._call`` (its
    deadline, rotation, token and error mapping): the stream is open once etcd
    answered ``created`` for every range within the deadline. ``wait`` blocks until
    something changed (returns the newest revision seen), the timeout passed (None),
    or the watch failed (EtcdError; WatchCompacted when the revision to continue from
    was compacted): the caller then reads again and starts a new watch.

    A stream that breaks, or goes quiet and does not answer a progress request
    either (a member whose network hangs, or frozen), is resumed on the next endpoint
    from the revision after the last event it delivered, as etcd's own client does;
    only when that fails too, or keeps failing without delivering anything, does
    ``wait`` raise. Each range is watched from one revision before the one asked for
    (its events filtered out here): etcd 3.6 answers no progress request for a watch
    whose start revision is still in the future.
    """

    def __init__(
        self,
        store: EtcdStore,
        prefixes: Iterable[str],
        start_revision: int,
        *,
        exact: bool = False,
        deletes_only: bool = False,
    ) -> None:
        self._store = store
        self._stream: _WatchStream | None = None
        self._early: list[Any] = []
        self._heard = time.monotonic()
        self._asked: float | None = None
        self._keys = list(prefixes)
        self._exact = exact
        self._filters = [etcdrpc.WatchCreateRequest.NOPUT] if deletes_only else []
        # Per range: the first revision not yet delivered; watch IDs -> range.
        self._next = [start_revision for _ in self._keys]
        self._ranges: dict[int, int] = {}
        self._resumes = 0
        self._what = f"watching {', '.join(self._keys)} in etcd"
        self._accesses = [_Access(key, prefix=not exact) for key in self._keys]
        store.check_cluster()
        self._open()

    def _creates(self) -> list[Any]:
        return [
            etcdrpc.WatchCreateRequest(
                key=key.encode(),
                range_end=b"" if self._exact else prefix_range_end(key.encode()),
                start_revision=max(1, self._next[index] - 1),
                filters=self._filters,
            )
            for index, key in enumerate(self._keys)
        ]

    def _open(self) -> None:
        store = self._store
        retried = False
        while True:
            creates = self._creates()
            try:
                store._guarded(self._what, self._starter(creates), self._accesses)
                return
            except WatchCompacted:
                self.close()
                raise
            except EtcdError as exc:
                self.close()
                # etcd 3.4 cancels a watch whose stream carried a stale token with
                # "permission denied": one more try with a new token tells them apart.
                if retried or not store._password_auth or "permission denied" not in str(exc):
                    raise
                retried = True
                store._token = None

    def _starter(self, creates: list[Any]) -> Callable[[_Connection, float], None]:
        return lambda connection, deadline: self._start(connection, deadline, creates)

    def _start(self, connection: _Connection, deadline: float, creates: list[Any]) -> None:
        if self._stream is not None:  # an earlier endpoint's attempt
            self._stream.close()
        stream = self._stream = _WatchStream(connection, self._store._metadata(), creates)
        self._early = []
        self._ranges = {}
        while len(self._ranges) < len(creates):
            remaining = deadline - time.monotonic()
            try:
                item = stream.responses.get(timeout=max(0.0, remaining))
            except queue.Empty:
                stream.close()
                raise _Status(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer to the watch") from None
            if isinstance(item, _Ended):
                stream.close()
                if item.error is not None:
                    raise item.error
                raise _Status(grpc.StatusCode.UNAVAILABLE, "the watch stream ended at once")
            self._store._note(item.header, connection.endpoint)
            if item.canceled:
                stream.close()
                self._cancelled(item)
            if item.created:
                self._ranges[int(item.watch_id)] = len(self._ranges)
            if item.events:
                self._early.append(item)
        self._heard, self._asked = time.monotonic(), None

    def _cancelled(self, item: Any) -> None:
        if item.compact_revision:
            raise WatchCompacted(
                f"etcd compacted the watched revision (now {item.compact_revision})"
            )
        reason = str(item.cancel_reason or "cancelled by etcd")
        if "permission denied" in reason:
            code = grpc.StatusCode.PERMISSION_DENIED
        elif _invalid_token(grpc.StatusCode.OK, reason):
            code = grpc.StatusCode.UNAUTHENTICATED
        else:
            code = grpc.StatusCode.FAILED_PRECONDITION
        raise _Status(code, reason)

    @property
    def endpoint(self) -> str | None:
        return self._stream.connection.endpoint.url if self._stream is not None else None

    def wait(self, timeout: float) -> int | None:
        """The newest revision changed under the prefixes, or None after ``timeout``."""
        if self._stream is None:
            raise EtcdError(f"{self._what}: the watch is closed")
        end = time.monotonic() + max(0.0, timeout)
        newest = 0
        while True:
            item = self._next_response(end if not newest else None)
            if item is None:
                return newest or None
            self._heard, self._asked = time.monotonic(), None
            newest = max(newest, self._handle(item))

    def _next_response(self, end: float | None) -> Any:
        """The next response: waiting until ``end``, or (None) only what is there now."""
        assert self._stream is not None
        if self._early:
            return self._early.pop(0)
        if end is None:
            try:
                return self._stream.responses.get_nowait()
            except queue.Empty:
                return None
        while True:
            now = time.monotonic()
            if self._check_progress(now):
                continue  # resumed on another endpoint
            assert self._stream is not None
            try:
                return self._stream.responses.get(timeout=max(0.0, min(end - now, 0.5)))
            except queue.Empty:
                if time.monotonic() >= end:
                    return None

    def _handle(self, item: Any) -> int:
        """The revision of an event response (0 for anything else); raises on failure."""
        assert self._stream is not None
        endpoint = self._stream.connection.endpoint
        if isinstance(item, _Ended):
            if item.error is None:
                why = f"{endpoint.url} ended the watch stream"
            else:
                code, details = _status_of(item.error)
                why = f"the stream from {endpoint.url} failed: {code.name} ({_short(details)})"
            self._resume(why)
            return 0
        try:
            self._store._note(item.header, endpoint)
        except ClusterMismatch:
            self.close()
            raise
        if item.canceled:
            self.close()
            try:
                self._cancelled(item)
            except _Status as exc:
                raise EtcdError(f"{self._what}: cancelled by {endpoint.url}: {exc.text}") from None
        index = self._ranges.get(int(item.watch_id))
        if index is None or not item.events:
            return 0
        fresh = [e for e in item.events if e.kv.mod_revision >= self._next[index]]
        if not fresh:
            return 0
        self._next[index] = int(fresh[-1].kv.mod_revision) + 1
        self._resumes = 0
        return int(item.header.revision)

    def _resume(self, why: str) -> None:
        """Continue on the next endpoint from the first revision not yet delivered; a
        watch that keeps failing without delivering anything is given up (EtcdError)."""
        assert self._stream is not None
        endpoint = self._stream.connection.endpoint
        self.close()
        self._store.demote(endpoint)
        self._resumes += 1
        if self._resumes > len(self._store.endpoints):
            raise EtcdError(f"{self._what}: {why}")
        self._open()

    def _check_progress(self, now: float) -> bool:
        """Ask a quiet stream for progress; resume elsewhere when it does not answer.
        True when the stream was replaced."""
        assert self._stream is not None
        if self._asked is None:
            if now - self._heard >= WATCH_PROGRESS_IDLE:
                self._stream.progress()
                self._asked = now
            return False
        if now - self._asked < WATCH_STALLED:
            return False
        url = self._stream.connection.endpoint.url
        self._resume(f"{url} did not answer for {now - self._heard:.0f}s (stalled)")
        return True

    def alive(self, timeout: float = 2.0) -> bool:
        """Whether the stream is open and its member answers and has a leader (a member
        cut off from quorum keeps the stream open and delivers nothing)."""
        if self._stream is None or not self._stream.reader.is_alive():
            return False
        store, connection = self._store, self._stream.connection
        deadline = time.monotonic() + timeout
        for _attempt in range(2):
            try:
                store._authorize(connection, deadline)
                response = connection.maintenance.Status(
                    _STATUS,
                    timeout=max(0.001, deadline - time.monotonic()),
                    metadata=store._metadata(),
                )
            except Exception as exc:  # an RpcError, or the channel was closed under it
                code, details = _status_of(exc)
                if store._password_auth and _invalid_token(code, details):
                    store._token = None  # etcd 3.6 wants a valid token for Status
                    continue
                return False
            return bool(response.leader)
        return False

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> PrefixWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- leases --------------------------------------------------------------------------------

# A lease whose refresh failed is tried again this often until its TTL ran out.
LEASE_RETRY = 0.5


class Lease:
    """A lease kept alive by a background thread on its own connection.

    The first refresh comes a third of the TTL after the grant, the next a third of the
    TTL etcd answered after each success; a failed refresh is retried every
    ``LEASE_RETRY``. ``lost`` is set when etcd answers TTL 0 (expired or revoked) or
    when no refresh succeeded for the whole TTL (counted from before the last
    successful request was sent, so etcd never holds it longer than we think). Each
    refresh is one LeaseKeepAlive round trip: no writes to the key-value store.
    """

    def __init__(self, config: EtcdConfig, ttl: int, what: str) -> None:
        self.ttl = ttl
        self.what = what
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._store = EtcdStore(config)
        started = time.monotonic()
        try:
            self.id = self._store.grant_lease(ttl, what)
        except BaseException:
            self._store.close()
            raise
        self._refreshed = started
        self._thread = threading.Thread(target=self._run, daemon=True, name="etcd-lease")
        self._thread.start()

    def _run(self) -> None:
        delay = self.ttl / 3
        while not self._stop.wait(delay):
            sent = time.monotonic()
            left = self.ttl - (sent - self._refreshed)
            if left <= 0:
                self.lost.set()
                return
            try:
                ttl = self._store.keepalive(self.id, self.what, timeout=min(left, self.ttl / 3))
            except EtcdError:
                delay = min(LEASE_RETRY, max(0.0, left - (time.monotonic() - sent)))
                continue
            if ttl <= 0:
                self.lost.set()
                return
            self._refreshed = sent
            delay = ttl / 3

    def revoke(self) -> None:
        """Stop refreshing and revoke the lease; never raises (an unreachable etcd lets
        it expire within the TTL instead)."""
        self._stop.set()
        self._thread.join()
        with self._store as store, contextlib.suppress(EtcdError):
            store.revoke_lease(self.id, self.what)


# --- the reload lock -----------------------------------------------------------------------

# A holder killed with SIGKILL frees the reload lock this many seconds later (lease
# expiry); a live holder refreshes its lease three times per TTL.
LOCK_TTL = 10
# A waiter re-reads the queue at least this often, even if its watch is silent.
LOCK_POLL = 2.0


@dataclass(frozen=True)
class LockWaiter:
    """One entry of the reload lock's queue, in arrival order (the first holds it)."""

    key: str
    host: str
    holder: str  # the value: "<holder> <token> <since>"
    create_revision: int
    lease: int

    @property
    def since(self) -> datetime | None:
        """When it queued, in its own clock's words (for `status` and metrics)."""
        stamp = self.holder.rsplit(" ", 1)[-1]
        try:
            return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            return None


def _waiter(kv: Any, directory: str) -> LockWaiter:
    key = kv.key.decode("utf-8", "backslashreplace")
    host = key[len(directory) :].split("/", 1)[0] if key.startswith(directory) else ""
    return LockWaiter(
        key,
        host,
        kv.value.decode("utf-8", "replace")[:300],
        int(kv.create_revision),
        int(kv.lease),
    )


def lock_queue(store: EtcdStore, key: str) -> list[LockWaiter]:
    """The reload lock's waiters in arrival order; the first one holds the lock."""
    directory = key + "/"
    request = etcdrpc.RangeRequest(
        key=directory.encode(),
        range_end=prefix_range_end(directory.encode()),
        sort_target=etcdrpc.RangeRequest.CREATE,
        sort_order=etcdrpc.RangeRequest.ASCEND,
    )

    def operation(connection: _Connection, deadline: float) -> Any:
        return store._rpc(connection, "kv", "Range", request, deadline)

    response = store._guarded(
        f"reading the reload lock queue {directory}",
        operation,
        [_Access(directory, prefix=True)],
    )
    return [_waiter(kv, directory) for kv in response.kvs]


class ReloadLock:
    """The cluster-wide reload lock, fair: waiters take it in arrival order.

    etcd's own mutex recipe (clientv3/concurrency): each waiter puts a key
    ``<key>/<host>/<lease hex>`` attached to its lease; the holder is the key with the
    lowest create revision; each waiter watches only the deletion of the key queued
    just before its own. Per-host keys let etcd RBAC give each host readwrite on
    ``<key>/<host>/`` and read on ``<key>/`` only, so that no host can delete (or
    write) another host's place in the queue. What a host with compromised
    credentials can still do: hold the lock as long as it likes when its turn comes
    (keep its lease alive, or put a key with no lease at all), which stalls every
    other host's restart (never a token: restarts stay owed) and is visible as the
    holder and its wait time; and queue itself again and again, each time at the end.

    A holder written by sakeystate 0.2 (a single key exactly at ``<key>``) is waited
    for too, when the grants let us read it.

    The lease is kept alive from the moment the waiter queued, by its own thread and
    connection; ``lost`` is set when etcd says the lease is gone (TTL 0) or no refresh
    succeeded for the whole TTL: the holder must then assume another host may hold
    the lock. A holder killed with SIGKILL stops refreshing, and etcd deletes its key
    when the lease expires, ``ttl`` seconds later.
    """

    def __init__(
        self,
        store: EtcdStore,
        key: str,
        holder: str,
        ttl: int = LOCK_TTL,
        host: str | None = None,
    ) -> None:
        self.store = store
        self.key = key.rstrip("/")
        self.ttl = ttl
        self.holder = holder
        raw = host or (holder.split()[0] if holder.split() else "unknown")
        self.host = raw.replace("/", "_") or "unknown"
        self.value = b""
        self.waited: float | None = None  # seconds the last acquire waited
        self._lease: Lease | None = None
        self._my_key: str | None = None
        self._my_revision = 0
        self._read_legacy = True
        self._seen_revision = 0
        self._acquired = False
        self._never = threading.Event()

    @property
    def lost(self) -> threading.Event:
        """Set once the lease of a held (or queued) lock is gone."""
        return self._lease.lost if self._lease is not None else self._never

    def held(self) -> bool:
        """Whether this process holds the lock and its lease is still known alive."""
        return self._acquired and self._lease is not None and not self._lease.lost.is_set()

    def current_holder(self) -> LockWaiter | None:
        """Who holds the lock now (the first waiter), or None when it is free."""
        waiters = lock_queue(self.store, self.key)
        return waiters[0] if waiters else None

    def acquire(self, timeout: float) -> None:
        """Take the lock within ``timeout`` seconds, or raise EtcdError naming the holder
        and this host's place in the queue (its key is then removed)."""
        started = time.monotonic()
        deadline = started + timeout
        try:
            self._enqueue()
            while True:
                ahead, legacy = self._ahead()
                if ahead is None or self.lost.is_set():  # the lease was lost while waiting
                    self._drop_lease()
                    self._enqueue()
                    continue
                if not ahead and legacy is None:
                    self._acquired = True
                    self.waited = time.monotonic() - started
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    self.waited = time.monotonic() - started
                    raise self._gave_up(ahead, legacy, timeout)
                target = ahead[-1].key if ahead else self.key
                self._wait_deleted(target, min(left, LOCK_POLL))
        except BaseException:
            self.release()
            raise

    def _enqueue(self) -> None:
        self._lease = Lease(self.store.config, self.ttl, f"the reload lock {self.key}")
        self._my_key = f"{self.key}/{self.host}/{self._lease.id:x}"
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.value = f"{self.holder} {secrets.token_hex(8)} {since}".encode()
        key = self._my_key.encode()
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
                    request_put=etcdrpc.PutRequest(key=key, value=self.value, lease=self._lease.id)
                )
            ],
            failure=[etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))],
        )
        response = self.store.txn(
            f"queueing for the reload lock {self.key}",
            request,
            [_Access(self._my_key, write=True)],
        )
        if response.succeeded:
            self._my_revision = int(response.header.revision)
        else:  # our own put, whose answer was lost: it is ours (the key names our lease)
            self._my_revision = int(response.responses[0].response_range.kvs[0].create_revision)

    def _ahead(self) -> tuple[list[LockWaiter] | None, LockWaiter | None]:
        """The waiters queued before us (None: our own key is gone), and a 0.2 holder."""
        directory = self.key + "/"
        ops = [
            etcdrpc.RequestOp(
                request_range=etcdrpc.RangeRequest(
                    key=directory.encode(),
                    range_end=prefix_range_end(directory.encode()),
                    sort_target=etcdrpc.RangeRequest.CREATE,
                    sort_order=etcdrpc.RangeRequest.ASCEND,
                )
            )
        ]
        accesses = [_Access(directory, prefix=True)]
        if self._read_legacy:
            ops.append(etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=self.key.encode())))
        what = f"reading the reload lock queue {directory}"
        try:
            response = self.store.txn(what, etcdrpc.TxnRequest(success=ops), accesses)
        except EtcdError as exc:
            if not self._read_legacy or "PERMISSION_DENIED" not in str(exc):
                raise
            # Granted <key>/ only (the documented grant): no 0.2 holder can exist there.
            self._read_legacy = False
            return self._ahead()
        waiters = [_waiter(kv, directory) for kv in response.responses[0].response_range.kvs]
        if not any(w.key == self._my_key for w in waiters):
            return None, None
        ahead = [w for w in waiters if w.create_revision < self._my_revision]
        legacy = None
        if self._read_legacy and response.responses[1].response_range.kvs:
            kv = response.responses[1].response_range.kvs[0]
            legacy = LockWaiter(
                self.key,
                "",
                kv.value.decode("utf-8", "replace")[:300],
                kv.create_revision,
                kv.lease,
            )
        self._seen_revision = int(response.header.revision)
        return ahead, legacy

    def _wait_deleted(self, key: str, timeout: float) -> None:
        """Until ``key`` is deleted, at most ``timeout``; a watch that cannot start or
        breaks is no reason to give up, only to look again a little later."""
        try:
            with PrefixWatch(
                self.store, [key], self._seen_revision + 1, exact=True, deletes_only=True
            ) as watch:
                end = time.monotonic() + timeout
                while time.monotonic() < end and not self.lost.is_set():
                    if watch.wait(min(0.5, end - time.monotonic())) is not None:
                        return
        except EtcdError:
            time.sleep(min(timeout, RETRY_PAUSE * 5))

    def _gave_up(
        self, ahead: list[LockWaiter], legacy: LockWaiter | None, timeout: float
    ) -> EtcdError:
        holder = ahead[0] if ahead else legacy
        assert holder is not None
        position = len(ahead) + (1 if legacy is not None else 0) + 1
        # "<holder> <token> <since>": the token means nothing to a reader.
        shown = holder.holder.rsplit(" ", 2)[0] if ahead else holder.holder
        return EtcdError(
            f"the reload lock {self.key} is held by {shown[:200]!r}; this host was number "
            f"{position} in the queue ({position - 1} ahead of it); gave up after {timeout:g}s"
        )

    def _drop_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.revoke()

    def release(self) -> None:
        """Give the lock up (revoking the lease deletes the key). Never raises: when etcd
        cannot be reached now, the lease expires within ``ttl`` seconds anyway."""
        self._acquired = False
        self._drop_lease()
