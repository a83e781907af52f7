"""Files another local user, or a hostile certificate, could use against sakeystate.

The bundle directory: temporaries are created exclusively under random names
and stale ones of other users are left alone; a directory others can write to
(world-writable, even sticky) is refused with a message naming it; a rewrite
keeps the file's owner when none is configured; ``preflight`` finds every such
problem without writing, in the words a write would fail with.
adopt: CA certificates and certificates cryptography cannot read are
rejections, never offered as keys, never a traceback.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import tracemalloc
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from sakeystate import bundle
from sakeystate.errors import BundleError
from sakeystate.state import BundleConfig

from conftest import Env
from support import T0, EtcdServer, free_port, kid, make_cert, private_key, run_cli

AT = "2026-11-22T10:00:00Z"
HOST = "ctrl1001.example.org"
NOBODY = 65534  # another user: the files it plants must never be used or removed
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="chown to another user needs root"
)


def converged_once(env: Env, **bundle_settings: str) -> str:
    """A cluster whose bundle was written once; returns the trusted kid."""
    key_id = env.publish(private_key("ec256", 80), HOST)
    env.state([key_id], bundle={"path": str(env.bundle), **bundle_settings})
    assert env.cli("converge", "--at", AT).code == 0
    return key_id


def add_a_key(env: Env, first: str, **bundle_settings: str) -> None:
    """Trust a second key, so the next converge rewrites the bundle."""
    second = env.publish(private_key("ec256", 81), "ctrl1002.example.org")
    env.state([first, second], bundle={"path": str(env.bundle), **bundle_settings})


# --- temporary files ---------------------------------------------------------------------


@needs_root
def test_a_planted_temporary_is_neither_used_nor_removed(env: Env) -> None:
    """Revision 1 opened ``.<bundle>.tmp-<pid>`` with O_TRUNC, so another user could own it."""
    first = converged_once(env)
    add_a_key(env, first)
    planted = env.tmp / f".{env.bundle.name}.tmp-{os.getpid()}"
    planted.write_bytes(b"attacker's file\n")
    os.chown(planted, NOBODY, NOBODY)
    planted.chmod(0o666)

    assert env.cli("converge", "--at", AT).code == 0
    assert planted.read_bytes() == b"attacker's file\n"
    assert env.bundle.stat().st_uid != NOBODY and env.bundle.stat().st_ino != planted.stat().st_ino
    assert b"PUBLIC KEY" in env.bundle.read_bytes()


def test_a_stale_temporary_of_our_own_is_removed(env: Env) -> None:
    first = converged_once(env)
    stale = env.tmp / f".{env.bundle.name}.tmp-0123456789abcdef"
    stale.write_bytes(b"left by a killed run")
    add_a_key(env, first)
    assert env.cli("converge", "--at", AT).code == 0
    assert not stale.exists()
    assert not [p for p in env.tmp.iterdir() if ".tmp-" in p.name]


# --- directories others can write to ----------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775, 0o1770], ids=lambda m: f"{m:04o}")
def test_a_directory_others_can_write_is_refused_naming_it(env: Env, mode: int) -> None:
    shared = env.tmp / "shared"
    shared.mkdir()
    shared.chmod(mode)
    target = shared / "sa-certs.pem"
    env.state([env.publish(private_key("ec256", 80), HOST)], bundle={"path": str(target)})

    result = env.cli("converge", "--at", AT)
    assert result.code == 1
    expected = (
        f"bundle directory {shared} is writable by group or others (mode {mode:04o}); "
        f"refusing to write there, another user could replace what sakeystate writes "
        f"(bundle.path {target})"
    )
    assert f"sakeystate: error: {expected}\n" in result.err
    assert list(shared.iterdir()) == []  # not even the lock
    assert bundle.preflight(BundleConfig(path=str(target))) == [expected]


def test_a_world_writable_jwks_directory_is_refused(env: Env) -> None:
    shared = env.tmp / "jwks"
    shared.mkdir()
    shared.chmod(0o1777)
    jwks = shared / "sa-jwks.json"
    env.state(
        [env.publish(private_key("ec256", 80), HOST)],
        bundle={"path": str(env.bundle), "jwks_path": str(jwks)},
    )
    result = env.cli("converge", "--at", AT)
    assert result.code == 1
    assert f"JWKS directory {shared} is writable by group or others (mode 1777)" in result.err
    assert f"(bundle.jwks_path {jwks})" in result.err
    assert not jwks.exists()


# --- owner and group ----------------------------------------------------------------------


@needs_root
def test_a_rewrite_keeps_the_owner_and_group_when_none_is_configured(env: Env) -> None:
    first = converged_once(env, mode="0640")
    os.chown(env.bundle, NOBODY, NOBODY)
    add_a_key(env, first, mode="0640")

    assert env.cli("converge", "--at", AT).code == 0
    st = env.bundle.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
    assert env.bundle.read_bytes().count(b"BEGIN PUBLIC KEY") == 2


# --- preflight: the same words as the write ------------------------------------------------


def _write_error(config: BundleConfig) -> str:
    """What a converge's writes raise, in the order a converge performs them."""
    with pytest.raises(BundleError) as failure, bundle.locked(config, 1):
        bundle.write(config, b"content\n")
        if config.jwks_path:
            bundle.write(config, b"{}\n", config.jwks_path)
    return str(failure.value)


def _cases(tmp: Path) -> dict[str, BundleConfig]:
    (tmp / "victim").write_text("precious\n")
    (tmp / "link.pem").symlink_to(tmp / "victim")
    (tmp / "dir.pem").mkdir()
    (tmp / "lock-link.pem.lock").symlink_to(tmp / "victim")
    (tmp / "marker-link.pem.reload-pending").symlink_to(tmp / "victim")
    return {
        "missing directory": BundleConfig(path=str(tmp / "nope" / "sa.pem")),
        "symlink": BundleConfig(path=str(tmp / "link.pem")),
        "not a regular file": BundleConfig(path=str(tmp / "dir.pem")),
        "lock is a symlink": BundleConfig(path=str(tmp / "lock-link.pem")),
        "marker is a symlink": BundleConfig(path=str(tmp / "marker-link.pem")),
        "unknown owner": BundleConfig(path=str(tmp / "a.pem"), owner="no-such-user-sakeystate"),
        "unknown group": BundleConfig(path=str(tmp / "b.pem"), group="no-such-group-sakeystate"),
        "jwks in a missing directory": BundleConfig(
            path=str(tmp / "c.pem"), jwks_path=str(tmp / "nope" / "jwks.json")
        ),
    }


WRITE_CASES = [
    "missing directory",
    "symlink",
    "not a regular file",
    "lock is a symlink",
    "unknown owner",
    "unknown group",
    "jwks in a missing directory",
]


@pytest.mark.parametrize("case", WRITE_CASES)
def test_preflight_predicts_the_write_failure_word_for_word(tmp_path: Path, case: str) -> None:
    config = _cases(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    problems = bundle.preflight(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # wrote nothing
    assert problems, case
    assert _write_error(config) == problems[0]
    assert (tmp_path / "victim").read_text() == "precious\n"


def test_preflight_lists_every_problem_and_the_marker(tmp_path: Path) -> None:
    cases = _cases(tmp_path)
    marker = cases["marker is a symlink"]
    assert bundle.preflight(marker) == [
        f"reload marker {marker.path}.reload-pending is a symlink; refusing to follow it"
    ]
    several = BundleConfig(
        path=str(tmp_path / "link.pem"),
        owner="no-such-user-sakeystate",
        group="no-such-group-sakeystate",
    )
    assert bundle.preflight(several) == [
        f"bundle {tmp_path / 'link.pem'} is a symlink; refusing to follow it",
        "bundle.owner 'no-such-user-sakeystate' is not a user on this host",
        "bundle.group 'no-such-group-sakeystate' is not a group on this host",
    ]
    assert bundle.preflight(BundleConfig(path=str(tmp_path / "fine.pem"))) == []


# --- adopt: certificates that are not service-account keys ---------------------------------


def _ca_cert(key: object) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(days=1))
        .not_valid_after(T0 + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _duplicate_san_cert(key: object) -> bytes:
    """A certificate with two subjectAltName extensions (cryptography will not build one).

    Built with a SAN and an unknown extension holding the same bytes, whose OID
    2.5.29.99 is then renamed to 2.5.29.17 (same length, so the DER stays well
    formed; the signature no longer verifies, which parsing does not check).
    """
    san = x509.SubjectAlternativeName([x509.DNSName(HOST)])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(days=1))
        .not_valid_after(T0 + timedelta(days=365))
        .add_extension(san, critical=False)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), san.public_bytes()),
            critical=False,
        )
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    assert der.count(b"\x06\x03\x55\x1d\x63") == 1
    der = der.replace(b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x11")
    with pytest.raises(x509.DuplicateExtension):
        _ = x509.load_der_x509_certificate(der).extensions
    body = base64.b64encode(der)
    lines = b"".join(body[i : i + 64] + b"\n" for i in range(0, len(body), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"-----END CERTIFICATE-----\n"


def _adopt(env: Env, *args: str) -> tuple[int, dict[str, object], str]:
    result = run_cli(
        "adopt", "--endpoint", env.etcd.url, "--prefix", env.prefix, "--cluster", "c",
        "--at", AT, "--bundle-path", str(env.bundle), *args,
    )  # fmt: skip
    assert "Traceback" not in result.err
    return result.code, (yaml.safe_load(result.out) if result.code == 0 else {}), result.err


def test_adopt_never_offers_a_ca_certificate(env: Env) -> None:
    good = private_key("ec256", 82)
    ca = private_key("ec384", 83)
    env.publish(good, HOST)
    env.etcd.put(env.prefix + kid(ca), f"Host: {HOST}\n".encode() + _ca_cert(ca))
    env.bundle.write_bytes(make_cert(good, HOST) + _ca_cert(ca))

    from_bundle = ("--from-bundle", str(env.bundle))
    for source in ((), from_bundle, ("--no-etcd", *from_bundle)):
        code, data, err = _adopt(env, *source)
        assert code == 0, err
        assert [t["fingerprint"] for t in data["trusted"]] == [kid(good)]  # type: ignore[index]
        assert kid(ca) not in yaml.safe_dump(data)
        assert ("CA certificate" in err and "CA keys are never service-account keys" in err) or (
            "a CA certificate (basicConstraints" in err
        )


def test_adopt_rejects_a_certificate_with_a_duplicate_extension(env: Env) -> None:
    good = private_key("ec256", 82)
    odd = private_key("ec256", 84)
    env.publish(good, HOST)
    env.etcd.put(env.prefix + kid(odd), f"Host: {HOST}\n".encode() + _duplicate_san_cert(odd))
    env.bundle.write_bytes(make_cert(good, HOST) + _duplicate_san_cert(odd))

    for source in ((), ("--no-etcd", "--from-bundle", str(env.bundle))):
        code, data, err = _adopt(env, *source)
        assert code == 0, err
        assert [t["fingerprint"] for t in data["trusted"]] == [kid(good)]  # type: ignore[index]
        # etcd's value is parsed and rejected by name; in a bundle, Go's x509 (and so
        # kube-apiserver) skips the block, and adopt says so.
        expect = "not a key kube-apiserver loads" if source else "Duplicate 2.5.29.17 extension"
        assert expect in err


# --- snapshots ------------------------------------------------------------------------------


def _private_forms() -> dict[str, tuple[bytes, str]]:
    """Private keys as people paste them, without a PEM header: (value, a secret substring)."""
    enc, fmt = serialization.Encoding, serialization.PrivateFormat
    ec_key, rsa_key, wrapped, encrypted, in_header = (
        private_key("ec256", 90),
        private_key("rsa2048", 91),
        private_key("ec384", 92),
        private_key("ec256", 93),
        private_key("ec256", 94),
    )
    none = serialization.NoEncryption()
    pkcs8 = base64.b64encode(ec_key.private_bytes(enc.DER, fmt.PKCS8, none))
    pkcs1 = base64.b64encode(rsa_key.private_bytes(enc.DER, fmt.TraditionalOpenSSL, none))
    body = base64.b64encode(wrapped.private_bytes(enc.DER, fmt.PKCS8, none))
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64)) + b"\n"
    secret = encrypted.private_bytes(
        enc.DER, fmt.PKCS8, serialization.BestAvailableEncryption(b"hunter2")
    )
    sealed = base64.urlsafe_b64encode(secret).rstrip(b"=")
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key))
    host_blob = base64.b64encode(in_header.private_bytes(enc.DER, fmt.PKCS8, none))
    return {
        "ctrl2001.example.org": (pkcs8 + b"\n", pkcs8[20:68].decode()),
        "ctrl2002.example.org": (pkcs1, pkcs1[20:68].decode()),
        "ctrl2003.example.org": (lines, lines[70:110].decode()),
        "ctrl2004.example.org": (sealed, sealed[20:68].decode()),
        "ctrl2005.example.org": (json.dumps({"keys": [jwk]}).encode(), jwk["d"]),
        kid(in_header): (
            b"Host: " + host_blob + b"\n" + make_cert(in_header, HOST),
            host_blob[20:68].decode(),
        ),
    }


def test_snapshot_never_copies_private_key_material_in_any_form(env: Env) -> None:
    """Redaction matched the text "PRIVATE KEY": headerless base64 and JWKs with "d" leaked."""
    key_id = env.publish(private_key("ec256", 95), HOST)
    env.state([key_id])
    forms = _private_forms()
    for name, (value, _secret) in forms.items():
        env.etcd.put(env.prefix + name, value)
    assert env.cli("converge", "--at", AT).code == 0

    snap = env.cli("snapshot", "--at", AT)
    assert snap.code == 0, snap.err
    for name, (_value, secret) in forms.items():
        assert secret not in snap.out, name
    skipped = {e["key"]: e.get("skipped") for e in json.loads(snap.out)["entries"]}
    assert all(skipped[env.prefix + name] for name in forms)
    assert skipped[env.key(HOST, key_id)] is None  # public material is copied

    snapshot = env.tmp / "snap.json"
    snapshot.write_text(snap.out)
    for fmt in ("json", "text"):
        live = env.cli("plan", "--at", AT, "--format", fmt)
        offline = env.cli("plan", "--at", AT, "--format", fmt, "--observed", str(snapshot))
        if fmt == "json":
            # The value with a key in its Host header parsed live; offline it is redacted.
            drop = env.prefix + kid(private_key("ec256", 94))
            live_keys = [k for k in json.loads(live.out)["keys"] if k.get("etcd_key") != drop]
            offline_keys = [k for k in json.loads(offline.out)["keys"] if k.get("etcd_key") != drop]
            assert offline_keys == live_keys
        assert offline.code == live.code == 0


def test_snapshot_of_oversized_values_records_their_size_without_copying(env: Env) -> None:
    key_id = env.publish(private_key("ec256", 96), HOST)
    env.state([key_id])
    for number in range(20):
        env.etcd.put(env.prefix + f"ctrl3{number:03d}.example.org", b"y" * (1024 * 1024))
    snap = env.cli("snapshot", "--at", AT)
    assert snap.code == 0, snap.err
    assert len(snap.out) < 64 * 1024
    big = [e for e in json.loads(snap.out)["entries"] if e.get("skipped") == "too-large"]
    assert len(big) == 20 and {e["size"] for e in big} == {1024 * 1024}
    assert not any("value" in e or "value_base64" in e for e in big)

    snapshot = env.tmp / "snap.json"
    snapshot.write_text(snap.out)
    live = env.cli("plan", "--at", AT, "--format", "json")
    offline = env.cli("plan", "--at", AT, "--format", "json", "--observed", str(snapshot))
    assert (offline.code, offline.out, offline.err) == (live.code, live.out, live.err)


def test_snapshot_memory_does_not_grow_with_oversized_values() -> None:
    from sakeystate.model import EtcdEntry, EtcdObservation
    from sakeystate.snapshot import to_json

    values = tuple(
        EtcdEntry(f"/p/ctrl{n}.example.org", bytes([n]) * (1400 * 1024), n + 1) for n in range(30)
    )
    observed = EtcdObservation("/p/", 99, values)
    tracemalloc.start()
    try:
        text = to_json(observed, "c", T0)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak} bytes traced to snapshot 42 MB of oversized values"
    assert len(text) < 16 * 1024


def _snapshot_with(env: Env, entries: str, revision: str = "5") -> Path:
    path = env.tmp / "hostile-snapshot.json"
    path.write_text(
        f'{{"version": 1, "cluster": "test", "prefix": "{env.prefix}", '
        f'"revision": {revision}, "taken_at": "{AT}", "entries": {entries}}}'
    )
    return path


HOSTILE_SNAPSHOTS = {
    "nested 100k deep": ("[" * 100_000 + "]" * 100_000, "5", "nested too deeply"),
    "mod_revision 1e400": ('[{"key": "/k", "value": "x", "mod_revision": 1e400}]', "5", "'inf'"),
    "mod_revision a float": ('[{"key": "/k", "value": "x", "mod_revision": 1.5}]', "5", "1.5"),
    "mod_revision a string": ('[{"key": "/k", "value": "x", "mod_revision": "7"}]', "5", "'7'"),
    "mod_revision negative": ('[{"key": "/k", "value": "x", "mod_revision": -1}]', "5", "-1"),
    "revision true": ("[]", "true", "revision 'True'"),
    "revision huge": ("[]", "9" * 30, "revision"),
    "key not a string": ('[{"key": 7, "value": "x", "mod_revision": 1}]', "5", "key"),
    "entry not an object": ("[7]", "5", "an entry is not a JSON object"),
    "entries not a list": ('{"a": 1}', "5", "entries is not a list"),
    "skipped size absurd": (
        '[{"key": "/k", "skipped": "too-large", "size": 1e18, "mod_revision": 1}]',
        "5",
        "size",
    ),
    "skipped kind unknown": (
        '[{"key": "/k", "skipped": "other", "size": 3, "mod_revision": 1}]',
        "5",
        "unknown skipped kind",
    ),
    "value base64 invalid": ('[{"key": "/k", "value_base64": "%%", "mod_revision": 1}]', "5", ""),
}


@pytest.mark.parametrize("case", list(HOSTILE_SNAPSHOTS))
def test_a_hostile_snapshot_is_a_clear_error_naming_the_file(env: Env, case: str) -> None:
    entries, revision, expect = HOSTILE_SNAPSHOTS[case]
    env.state([])
    path = _snapshot_with(env, entries, revision)
    for command in ("plan", "inspect"):
        result = env.cli(command, "--at", AT, "--observed", str(path))
        assert result.code == 1, result
        assert f"sakeystate: error: snapshot {path} is not a sakeystate snapshot: " in result.err
        assert expect in result.err and "Traceback" not in result.err


# --- etcd: endpoints and request sizes from the state file -------------------------------------


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_an_ipv6_endpoint_connects(env: Env, tmp_path: Path) -> None:
    """``http://[::1]:2379`` lost its brackets on the way to gRPC and never connected."""
    if not _ipv6_loopback():
        if os.environ.get("CI"):
            pytest.fail("CI must have IPv6 loopback to test [::1] endpoints")
        pytest.skip("no IPv6 loopback on this machine")
    port = free_port()
    both = f"http://127.0.0.1:{port},http://[::1]:{port}"
    server = EtcdServer(str(tmp_path), client_port=port, extra_args=["--listen-client-urls", both])
    server.start()
    try:
        key = private_key("ec256", 97)
        env.state([kid(key)], etcd={"endpoints": [f"http://[::1]:{port}"], "timeout": "5s"})
        publish = env.cli(
            "publish",
            "--cert",
            str(_write(tmp_path / "sa.pem", make_cert(key, HOST))),
            "--host",
            HOST,
        )
        assert publish.code == 0, publish.err
        result = env.cli("converge", "--at", AT, "--format", "json")
        assert result.code == 0, result.err
        assert json.loads(result.out)["bundle"]["kids_after"] == [kid(key)]
    finally:
        server.stop()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://[::1]:70000"])
def test_a_port_out_of_range_is_a_clear_error(env: Env, url: str) -> None:
    """The state file names the field; the endpoint parser (etcd.py) refuses it too."""
    from sakeystate.errors import EtcdError
    from sakeystate.etcd import _parse_endpoint

    with pytest.raises(EtcdError, match="the port is not a number"):
        _parse_endpoint(url)
    env.state([], etcd={"endpoints": [url]})
    for command in ("plan", "converge"):
        result = env.cli(command, "--at", AT) if command == "plan" else env.cli(command)
        assert result.code == 1
        port = url.rsplit(":", 1)[1]
        assert f"etcd.endpoints[0]: port {port} is not 1-65535" in result.err
        assert "Traceback" not in result.err


def _large_cert(key: object, host: str, padding: int) -> bytes:
    """A certificate of about ``padding`` bytes: a legacy value near etcd's size limits."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    filler = x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x00" * padding
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(days=1))
        .not_valid_after(T0 + timedelta(days=365))
        .add_extension(filler, critical=False)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_forty_migrations_of_39_kb_values_go_through(env: Env) -> None:
    """One transaction of 40 x 39 KB puts exceeded etcd's 1.5 MiB request limit (here: one
    host moving 40 keys of its own from the flat layout to its path)."""
    keys = [private_key("ec256", 100 + n) for n in range(40)]
    host = "ctrl4000.example.org"
    for key in keys:
        env.etcd.put(
            env.prefix + kid(key), f"Host: {host}\n".encode() + _large_cert(key, host, 29 * 1024)
        )
    assert min(len(v) for v in env.dump().values()) > 39 * 1000
    env.state([(kid(k), host) for k in keys], host=host)

    result = env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    assert sorted(env.dump()) == sorted(env.key(host, kid(k)) for k in keys)
    assert json.loads(result.out)["bundle"]["kids_after"] == sorted(kid(k) for k in keys)


def test_batches_respect_the_request_size_as_well_as_the_operation_count() -> None:
    from sakeystate.etcd import MAX_TXN_BYTES, MAX_TXN_OPS, batches
    from sakeystate.model import Guard, Put

    items = [((Guard(f"/k{n}", 0),), (Put(f"/k{n}", b"v" * 39_000),)) for n in range(40)]
    packed = batches(items)
    assert [w for _g, ws in packed for w in ws] == [w for _g, ws in items for w in ws]
    assert all(sum(len(w.value) for w in ws) <= MAX_TXN_BYTES for _g, ws in packed)  # type: ignore[union-attr]
    small = [((Guard(f"/k{n}", 0),), (Put(f"/k{n}", b"v"),)) for n in range(300)]
    assert [len(ws) for _g, ws in batches(small)] == [
        MAX_TXN_OPS,
        MAX_TXN_OPS,
        300 - 2 * MAX_TXN_OPS,
    ]
