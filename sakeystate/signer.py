"""``sakeystate signer``: restart-free mode, kube-apiserver's ExternalJWTSigner on a socket.

kube-apiserver started with ``--service-account-signing-endpoint=<socket>`` asks this
process for the keys it verifies (FetchKeys) and to sign every token it issues
(Sign). The keys come from the same converge loop as ``watch`` (same plan, same
refusals, same bundle, JWKS and status record; no restart is ever run): each
successful pass hands its plan to ``Signer.passed``, which swaps the served set,
one immutable ``KeySet``, whole. A refused or failed pass calls nothing, so the last
good set keeps being served. kube-apiserver refetches at the refresh hint and at once
on a token whose kid it does not know, so a key-set change needs no restart.

What FetchKeys serves is the plan's effective set (the bundle's keys) plus this
host's own key, the public key of ``signer.private_key_file``, which must be
``own_cert``'s: an apiserver always verifies the tokens it signs. Before the first
pass the last good set is the bundle on disk (the last one a converge wrote); with
no bundle either, FetchKeys answers UNAVAILABLE, and kube-apiserver, which refuses
an empty set, does not start (see docs/signer.md for each answer's consequence).

The private key is read once, from a root-owned file nobody else may read, and
stays in this process: it is never written, logged, exported or returned, and core
dumps are disabled. The socket is the only way in: it is created inside a fresh
private directory with mode 0600 (0660 and ``signer.group``), then renamed into
place, so it is never reachable with looser permissions, and it is refused in a
directory (or under one) that another user could write to.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import grp
import json
import os
import re
import resource
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from sakeystate import bundle, externaljwt
from sakeystate.errors import SakeystateError
from sakeystate.keys import KeyInfo, format_time, kid_of, parse_pem_bundle
from sakeystate.metrics import Metrics, SignerStats
from sakeystate.plan import Plan
from sakeystate.state import DesiredState, SignerConfig

MAX_PRIVATE_KEY_BYTES = 64 * 1024
# A service-account token's claims are well under a kilobyte; this bounds what one
# Sign request can make us parse.
MAX_CLAIMS_BYTES = 256 * 1024
WORKERS = 4
STOP_GRACE = 2.0

_CURVES: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "secp256r1": ("ES256", hashes.SHA256),
    "secp384r1": ("ES384", hashes.SHA384),
    "secp521r1": ("ES512", hashes.SHA512),
}
_BASE64URL = re.compile(r"\A[A-Za-z0-9_-]+\Z")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- the signing key -------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """This host's private key, with the JWS algorithm and kid its type implies."""

    kid: str
    algorithm: str  # RS256, ES256, ES384, ES512
    public_der: bytes
    _private: Any = field(repr=False, compare=False)

    def sign(self, claims: str) -> tuple[str, str]:
        """The token's header and signature segments for its ``claims`` segment."""
        header = _b64url(
            json.dumps(
                {"alg": self.algorithm, "kid": self.kid, "typ": "JWT"}, separators=(",", ":")
            ).encode()
        )
        signing_input = f"{header}.{claims}".encode("ascii")
        key = self._private
        if isinstance(key, rsa.RSAPrivateKey):
            return header, _b64url(key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(_CURVES[key.curve.name][1]())))
        size = (key.curve.key_size + 7) // 8
        return header, _b64url(r.to_bytes(size, "big") + s.to_bytes(size, "big"))


def load_signing_key(path: str) -> SigningKey:
    """``signer.private_key_file``: a regular file owned by root that only its owner may
    read, holding an unencrypted PEM RSA (>= 2048 bits) or ECDSA (P-256/384/521) key."""
    what = f"signer.private_key_file {path}"
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise SakeystateError(f"cannot read {what}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SakeystateError(f"{what} is not a regular file")
        if st.st_uid != 0:
            raise SakeystateError(
                f"{what} is owned by uid {st.st_uid}, not root: refusing a signing key "
                "another user controls"
            )
        if st.st_mode & 0o077:
            raise SakeystateError(
                f"{what} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may read "
                "it; chmod 0600 it (and consider the key exposed)"
            )
        data = handle.read(MAX_PRIVATE_KEY_BYTES + 1)
    if len(data) > MAX_PRIVATE_KEY_BYTES:
        raise SakeystateError(f"{what} is larger than {MAX_PRIVATE_KEY_BYTES} bytes")
    try:
        private: Any = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message is not shown: it is about the file's contents.
        raise SakeystateError(
            f"{what}: not an unencrypted PEM private key (RSA or ECDSA)"
        ) from None
    if isinstance(private, rsa.RSAPrivateKey) and private.key_size >= 2048:
        algorithm = "RS256"
    elif isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name in _CURVES:
        algorithm = _CURVES[private.curve.name][0]
    else:
        raise SakeystateError(
            f"{what}: kube-apiserver signs with RSA (2048 bits or more) or ECDSA "
            "P-256/P-384/P-521 keys only"
        )
    public = private.public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey(kid_of(public), algorithm, der, private)


def check_own_key(desired: DesiredState, key: SigningKey) -> None:
    """The private key must be own_cert's: the key this host publishes and its peers trust."""
    from sakeystate.apply import own_key

    own = own_key(desired) if desired.own_cert else None
    if own is None:
        raise SakeystateError(
            "signer mode needs own_cert (this host's service-account certificate): it is "
            "how its peers come to trust the key signer.private_key_file signs with"
        )
    if own.kid != key.kid:
        raise SakeystateError(
            f"signer.private_key_file holds the key {key.kid}, but own_cert "
            f"{desired.own_cert} is {own.kid}: this host would sign tokens with a key it "
            "does not publish; point both at the same key"
        )


# --- the served set ----------------------------------------------------------------------


@dataclass(frozen=True)
class ServedKey:
    kid: str
    der: bytes  # PKIX (SubjectPublicKeyInfo) DER


@dataclass(frozen=True)
class KeySet:
    """What FetchKeys answers: sorted by kid, never empty, and when it last changed."""

    keys: tuple[ServedKey, ...]
    changed_at: datetime
    source: str  # "converged" or "bundle on disk", for the log

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a served key set is never empty")

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(k.kid for k in self.keys)


def _der(info: KeyInfo) -> bytes:
    """The DER inside a key's canonical ``PUBLIC KEY`` block."""
    body = b"".join(line for line in info.public_pem.splitlines() if not line.startswith(b"-"))
    return base64.b64decode(body)


def served_keys(infos: Iterable[KeyInfo], own: SigningKey) -> tuple[ServedKey, ...]:
    """The keys FetchKeys serves: ``infos`` (the effective set) and this host's own."""
    keys = {info.kid: ServedKey(info.kid, _der(info)) for info in infos}
    keys[own.kid] = ServedKey(own.kid, own.public_der)
    return tuple(keys[kid] for kid in sorted(keys))


def plan_keys(plan: Plan, own: SigningKey) -> tuple[ServedKey, ...]:
    """What a successful pass serves: the plan's bundle and this host's own key."""
    return served_keys((b.key for b in plan.bundle_keys), own)


def next_set(
    current: KeySet | None, keys: tuple[ServedKey, ...], at: datetime, source: str
) -> KeySet:
    """``current`` itself when ``keys`` are what it serves (data_timestamp stays: it says
    when the set changed, not when it was last computed), else a new set as of ``at``."""
    if current is not None and current.keys == keys:
        return current
    return KeySet(keys, at, source)


def set_on_disk(desired: DesiredState, own: SigningKey) -> KeySet | None:
    """The last good set before any pass: the bundle a converge last wrote (kube-apiserver's
    reading of it) and this host's own key, as of the file's mtime; None without one."""
    try:
        found = bundle.observe(desired.bundle)
        if found.content is None:
            return None
        changed = os.stat(desired.bundle.path).st_mtime
    except (SakeystateError, OSError):
        return None
    infos, _problems = parse_pem_bundle(found.content)
    if not infos:
        return None
    from datetime import UTC

    return KeySet(served_keys(infos, own), datetime.fromtimestamp(changed, UTC), "bundle on disk")


# --- the service -------------------------------------------------------------------------


def claims_problem(claims: str) -> str | None:
    """Why ``claims`` is not a JWT payload segment (base64url of a JSON object), or None.
    The text itself is never echoed: it comes from the caller."""
    if not claims:
        return "claims is empty"
    if len(claims) > MAX_CLAIMS_BYTES:
        return f"claims is longer than {MAX_CLAIMS_BYTES} bytes"
    if not _BASE64URL.match(claims) or len(claims) % 4 == 1:
        return "claims is not base64url without padding"
    try:
        payload = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return "claims is not base64url of JSON"
    if not isinstance(payload, dict):
        return "claims is not a JSON object"
    return None


@dataclass(frozen=True)
class Limits:
    """What the state says about the answers: FetchKeys' refresh hint and Metadata."""

    refresh_hint: int
    max_token_seconds: int

    @classmethod
    def of(cls, desired: DesiredState, started: SignerConfig) -> Limits:
        config = desired.signer or started
        lifetime = int(desired.retention.max_token_lifetime.total_seconds())
        return cls(config.refresh_hint, lifetime)


class Signer:
    """The ExternalJWTSigner service and what it serves. gRPC threads read ``served`` and
    ``limits``; the converge loop replaces each whole (one reference, swapped atomically)."""

    def __init__(
        self,
        desired: DesiredState,
        config: SignerConfig,
        key: SigningKey,
        stats: SignerStats,
        now: Callable[[], datetime],
        log_format: str = "text",
    ) -> None:
        self.config = config
        self.key = key
        self.stats = stats
        self.now = now
        self.log_format = log_format
        self.host = desired.host
        self.served: KeySet | None = None
        self.limits = Limits.of(desired, config)
        self.warnings: tuple[str, ...] = ()
        self.on_ready: Callable[[], None] | None = None

    # --- the API (gRPC threads) ----------------------------------------------------------

    def handlers(self) -> dict[str, externaljwt.Handler]:
        return {
            externaljwt.SIGN: self.sign,
            externaljwt.FETCH_KEYS: self.fetch_keys,
            externaljwt.METADATA: self.metadata,
        }

    def fetch_keys(self, _request: Any, context: Any) -> Any:
        import grpc

        served, limits = self.served, self.limits
        if served is None:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "no key set yet: no converge has succeeded and there is no bundle on disk",
            )
        assert served is not None
        self.stats.fetched()
        stamp = served.changed_at.timestamp()
        seconds = int(stamp // 1)
        return externaljwt.FetchKeysResponse(
            keys=[externaljwt.Key(key_id=k.kid, key=k.der) for k in served.keys],
            data_timestamp=externaljwt.Timestamp(
                seconds=seconds, nanos=min(int((stamp - seconds) * 1e9), 999_999_999)
            ),
            refresh_hint_seconds=limits.refresh_hint,
        )

    def sign(self, request: Any, context: Any) -> Any:
        import grpc

        problem = claims_problem(request.claims)
        if problem is not None:
            self.stats.signed("refused")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        header, signature = self.key.sign(request.claims)
        self.stats.signed("signed")
        return externaljwt.SignJWTResponse(header=header, signature=signature)

    def metadata(self, _request: Any, _context: Any) -> Any:
        return externaljwt.MetadataResponse(
            max_token_expiration_seconds=self.limits.max_token_seconds
        )

    # --- the converge loop (main thread) ---------------------------------------------------

    def serve(self, keys: KeySet) -> None:
        """Serve ``keys`` from now on (the same value again changes nothing)."""
        old, self.served = self.served, keys
        if keys is old:
            return
        self.stats.served(len(keys.keys), keys.changed_at)
        self.log(
            {"event": "keys", "source": keys.source, "kids": list(keys.kids)},
            f"serving {len(keys.keys)} key(s), {keys.source}: {','.join(keys.kids)}",
        )
        if old is None and self.on_ready is not None:
            self.on_ready()

    def passed(self, plan: Plan, desired: DesiredState) -> None:
        """``Watcher``'s ``on_pass``: a pass succeeded with ``plan``; serve its set."""
        self.limits = Limits.of(desired, self.config)
        self.serve(next_set(self.served, plan_keys(plan, self.key), plan.at, "converged"))
        self._warn(self._drift(plan, desired))

    def _drift(self, plan: Plan, desired: DesiredState) -> tuple[str, ...]:
        """What the state now says that this process, as started, does not do."""
        warnings = []
        current = dict(plan.current).get(self.host or "")
        if current is not None and current != self.key.kid:
            warnings.append(
                f"own_cert is now {current}, but this signer signs with {self.key.kid} "
                "(signer.private_key_file as it was at start): restart the signer"
            )
        if desired.signer is None:
            warnings.append("the state file no longer has a signer section; still serving")
        elif replace(desired.signer, refresh_hint=0) != replace(self.config, refresh_hint=0):
            warnings.append(
                "signer.socket, private_key_file or group changed in the state file: "
                "restart the signer to apply"
            )
        return tuple(warnings)

    def _warn(self, warnings: tuple[str, ...]) -> None:
        if warnings != self.warnings:
            for warning in warnings:
                self.log({"event": "warning", "warning": warning}, f"warning: {warning}")
        self.warnings = warnings

    def log(self, fields: dict[str, Any], text: str) -> None:
        from sakeystate.escape import for_terminal

        if self.log_format == "json":
            line = json.dumps({"version": 1, "at": format_time(self.now()), **fields})
        else:
            line = f"sakeystate signer: {for_terminal(text)}"
        print(line, file=sys.stderr, flush=True)


# --- the socket ----------------------------------------------------------------------------


def _unsafe_directory(directory: str) -> str | None:
    """Why another user could replace what is at ``directory`` (or reroute a path through
    it): group/other-writable without being sticky and root-owned, or owned by another
    user. None when only root (or this user) controls it."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        return f"{directory}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"{directory} is owned by uid {st.st_uid}, neither root nor this user"
    sticky_root = st.st_mode & stat.S_ISVTX and st.st_uid == 0
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_root:
        return f"{directory} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def socket_path_problem(path: str) -> str | None:
    """Why ``signer.socket`` cannot be served safely: every directory on its path (as
    written and resolved) must be controlled by root only, or kube-apiserver could be
    made to connect to another user's socket and trust its keys."""
    directory = os.path.dirname(os.path.normpath(path))
    seen: set[str] = set()
    for start in (directory, os.path.realpath(directory)):
        current = start
        while current not in seen:
            seen.add(current)
            problem = _unsafe_directory(current)
            if problem is not None:
                return f"signer.socket {path}: {problem}; refusing to serve there"
            current = os.path.dirname(current)
    return None


def _existing_socket_problem(path: str) -> str | None:
    """What is at ``path`` already, when it may not be replaced: anything but a stale
    socket of root's (or ours) with nobody listening. Never follows a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"signer.socket {path}: {exc.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"signer.socket {path} exists and is not a socket; refusing to replace it"
    if st.st_uid not in (0, os.geteuid()):
        return f"signer.socket {path} belongs to uid {st.st_uid}; refusing to replace it"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except ConnectionRefusedError:
        return None  # stale: nobody listens
    except OSError as exc:
        return f"signer.socket {path}: cannot tell whether it is in use ({exc.strerror})"
    finally:
        probe.close()
    return f"signer.socket {path} is in use: another signer is serving on it"


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SakeystateError(f"signer.group {name}: no such group") from None


@dataclass
class Listener:
    """The gRPC server on the socket; ``close`` stops it and removes the socket if it is
    still the one we created."""

    server: Any
    path: str
    identity: tuple[int, int]

    def close(self) -> None:
        self.server.stop(STOP_GRACE).wait()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(self.path)


def listen(config: SignerConfig, handlers: dict[str, externaljwt.Handler]) -> Listener:
    """Serve ``handlers`` on ``config.socket``: bound in a fresh private directory beside
    it, given its mode and group there, then renamed over the path (which replaces a
    stale socket atomically and never follows a symlink)."""
    import grpc

    path = os.path.normpath(config.socket)
    for problem in (socket_path_problem(path), _existing_socket_problem(path)):
        if problem is not None:
            raise SakeystateError(problem)
    gid = _group_id(config.group) if config.group else None
    private = tempfile.mkdtemp(prefix=".sakeystate-signer-", dir=os.path.dirname(path))
    bound = os.path.join(private, "socket")
    server = grpc.server(
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="signer"),
        options=[("grpc.max_receive_message_length", MAX_CLAIMS_BYTES + 4096)],
    )
    try:
        server.add_generic_rpc_handlers((externaljwt.generic_handler(handlers),))
        try:
            server.add_insecure_port(f"unix:{bound}")
        except RuntimeError as exc:
            raise SakeystateError(f"signer.socket {path}: cannot listen ({exc})") from None
        if gid is not None:
            os.chown(bound, 0, gid)
        os.chmod(bound, 0o660 if gid is not None else 0o600)
        os.rename(bound, path)
        st = os.lstat(path)
        server.start()
    except OSError as exc:
        server.stop(None)
        raise SakeystateError(f"signer.socket {path}: {exc.strerror}") from None
    except BaseException:
        server.stop(None)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(bound)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return Listener(server, path, (st.st_dev, st.st_ino))


def notify_systemd(message: str) -> None:
    """sd_notify(3) for ``Type=notify``: READY=1 once FetchKeys has a set to serve, so
    that kube-apiserver (ordered after this unit) starts with keys to fetch."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    with sock, contextlib.suppress(OSError):
        sock.sendto(message.encode(), address)


# --- the command ---------------------------------------------------------------------------


def _drop_owed_reload(desired: DesiredState, signer: Signer) -> None:
    """A restart owed from file mode is moot: kube-apiserver reads its keys from this
    signer, and switching it to signer mode is itself a restart."""
    try:
        owed = bundle.observe(desired.bundle).reload_pending
        if owed:
            bundle.clear_reload_pending(desired.bundle)
    except SakeystateError as exc:
        signer.log({"event": "warning", "warning": str(exc)}, f"warning: {exc}")
        return
    if owed:
        signer.log(
            {"event": "reload", "dropped": True},
            "a restart owed from file mode is dropped: kube-apiserver reads its keys from "
            "this signer",
        )


def run(options: Any, desired: DesiredState, metrics: Metrics | None, now: Any) -> int:
    """``sakeystate signer``: ``options`` are ``watch.Options``; returns the exit status."""
    from sakeystate.watch import Watcher

    config = desired.signer
    if config is None:
        raise SakeystateError(
            f"{desired.source}: no signer section: signer mode needs signer.socket and "
            "signer.private_key_file"
        )
    if desired.host is None:
        raise SakeystateError(
            "cannot tell which host this is: pass --host FQDN or set host in the state file"
        )
    # Before the key is read: a crash must never write it into a core file.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    key = load_signing_key(config.private_key_file)
    check_own_key(desired, key)
    stats = SignerStats()
    if metrics is not None:
        metrics.add(stats)
    signer = Signer(desired, config, key, stats, now, options.format)
    signer.on_ready = lambda: notify_systemd("READY=1")
    listener = listen(config, signer.handlers())
    signer.log(
        {"event": "listening", "socket": listener.path, "kid": key.kid, "alg": key.algorithm},
        f"serving kube-apiserver's ExternalJWTSigner on {listener.path}, signing with "
        f"{key.kid} ({key.algorithm})",
    )
    try:
        # Only once the signer serves: a signer that could not start leaves a host in
        # file mode with its owed restart.
        _drop_owed_reload(desired, signer)
        initial = set_on_disk(desired, key)
        if initial is not None:
            signer.serve(initial)
        watcher = Watcher(options, desired, metrics, now, on_pass=signer.passed, restart_free=True)
        return watcher.run()
    finally:
        notify_systemd("STOPPING=1")
        listener.close()
