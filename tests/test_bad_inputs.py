"""The bad-input corpus (tests/bad_inputs/): every case yields its clear message.

Never a traceback, never untrusted data written: a bad state file writes
nothing at all, a bad etcd value is reported and left out of the bundle (and
left alone in etcd), a bad bundle path leaves every file as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec
from cryptography.x509.oid import NameOID

from sakeystate.keys import parse_pem_bundle

from conftest import Env
from support import kid as kid_of
from support import make_cert, private_key, public_pem, run_cli

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
STATE_CASES = sorted((CORPUS / "state").glob("*.yaml"))
ETCD_CASES = yaml.safe_load((CORPUS / "etcd_values.yaml").read_text())
BUNDLE_CASES = yaml.safe_load((CORPUS / "bundle_paths.yaml").read_text())
AT = "2026-11-22T10:00:00Z"
GOOD_HOST = "ctrl0.example.org"
BAD_HOST = "ctrl9.example.org"
# Counted by the tests and printed at the end of the session (run with -s to see it).
TALLY = {"cases": 0, "lost": 0}


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(
        f"\nbad inputs: {TALLY['cases']} cases run "
        f"({len(STATE_CASES)} state files, {len(ETCD_CASES)} etcd values, "
        f"{len(BUNDLE_CASES)} bundle paths); {TALLY['lost']} wrote untrusted data or lost a key"
    )


def test_corpus_is_large_enough() -> None:
    assert len(STATE_CASES) + len(ETCD_CASES) + len(BUNDLE_CASES) >= 40


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text
        assert 'File "' not in text


# --- state files ------------------------------------------------------------------------


def _expand(case: Path, env: Env) -> tuple[bytes, str]:
    raw = case.read_bytes()
    first, _, _ = raw.partition(b"\n")
    assert first.startswith(b"# expect: "), f"{case.name}: first line must be # expect: ..."
    key1, key2 = private_key("ec256", 60), private_key("ec256", 61)
    kid1 = kid_of(key1)
    der = key1.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(der).hexdigest()
    values = {
        b"@ENDPOINT@": env.etcd.url.encode(),
        b"@PREFIX@": env.prefix.encode(),
        b"@BUNDLE@": str(env.bundle).encode(),
        b"@KID1@": kid1.encode(),
        b"@KID2@": kid_of(key2).encode(),
        b"@HEX1@": ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper().encode(),
        b"@KID1BAD@": (kid1[:-1] + "+").encode(),
    }
    for name, value in values.items():
        raw = raw.replace(name, value)
    pad = re.search(rb"^# pad-to: (\d+)$", raw, re.MULTILINE)
    if pad:
        size = int(pad.group(1))
        line = b"# " + b"x" * 78 + b"\n"
        raw += line * ((size - len(raw)) // len(line) + 1)
    expect = first[len(b"# expect: ") :].decode()
    for name, value in values.items():
        expect = expect.replace(name.decode(), value.decode())
    return raw, expect


@pytest.mark.parametrize("case", STATE_CASES, ids=[c.stem for c in STATE_CASES])
def test_bad_state_file_is_refused_with_its_message(env: Env, case: Path) -> None:
    TALLY["cases"] += 1
    content, expect = _expand(case, env)
    env.state_path.write_bytes(content)
    good = private_key("ec256", 60)
    env.publish(good, GOOD_HOST)
    before = env.dump()

    validate = run_cli("validate", str(env.state_path))
    assert validate.code == 1, validate
    assert expect in validate.err, f"{case.name}: {validate.err}"
    assert str(env.state_path) in validate.err  # every error names the file
    _no_traceback(validate.out, validate.err)
    for command in ("converge", "plan", "inspect", "snapshot"):
        result = env.cli(command, "--at", AT)
        assert result.code == 1, (command, result)
        assert expect in result.err, f"{case.name} {command}: {result.err}"
        _no_traceback(result.out, result.err)
    check = env.cli("check")
    assert check.code == 0  # fails open for Puppet's onlyif, loudly
    assert expect in check.err
    # Never echo a secret that was (wrongly) put inline.
    assert "hunter2" not in validate.err + validate.out
    lost = env.bundle.exists() or env.dump() != before
    TALLY["lost"] += lost
    assert not lost, "a refused state file must write nothing"
    assert not list(env.tmp.glob(".*tmp*"))


# --- etcd values ----------------------------------------------------------------------------


def _pkcs(key: Any, fmt: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pem: bytes = key.private_bytes(serialization.Encoding.PEM, fmt, encryption)
    return pem


def _header(host: str = BAD_HOST) -> bytes:
    return f"Host: {host}\nPublished: 2026-11-01T00:00:00Z\n".encode()


_SECRET_MARKERS: list[bytes] = []


def _private(key: Any, fmt: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    pem = _pkcs(key, fmt, password)
    # The base64 body lines of the private key: none may ever appear anywhere.
    _SECRET_MARKERS.extend(line for line in pem.splitlines()[1:-1] if len(line) > 40)
    return pem


def _recipes() -> dict[str, Callable[[], tuple[str | None, bytes]]]:
    """name -> () -> (kid claimed by the key name or None for a custom name, value)."""
    rsa2048 = private_key("rsa2048", 62)
    ec256 = private_key("ec256", 63)
    ed = private_key("ed25519", 64)
    rsa1024 = private_key("rsa1024", 65)
    cert = make_cert(ec256, BAD_HOST)
    pkcs8 = serialization.PrivateFormat.PKCS8
    traditional = serialization.PrivateFormat.TraditionalOpenSSL

    def dsa_value() -> tuple[str, bytes]:
        key = dsa.generate_private_key(key_size=2048)
        return kid_of(key), _header() + public_pem(key)

    def k1() -> tuple[str, bytes]:
        key = ec.generate_private_key(ec.SECP256K1())
        return "A" * 43, _header() + make_cert(key, BAD_HOST)

    lines = cert.splitlines(keepends=True)
    return {
        "garbage": lambda: (kid_of(ec256), b"hello, I am definitely a certificate\n"),
        "empty-value": lambda: (kid_of(ec256), b""),
        "truncated-pem": lambda: (kid_of(ec256), _header() + b"".join(lines[: len(lines) // 2])),
        "truncated-base64": lambda: (
            kid_of(ec256),
            _header() + b"".join(lines[:3] + lines[-1:]),
        ),
        "two-pem-blocks": lambda: (
            kid_of(ec256),
            _header() + cert + make_cert(private_key("ec256", 66), BAD_HOST),
        ),
        "private-key-pkcs1": lambda: (kid_of(rsa2048), _private(rsa2048, traditional)),
        "private-key-sec1": lambda: (kid_of(ec256), _private(ec256, traditional)),
        "private-key-pkcs8": lambda: (kid_of(ec256), _header() + _private(ec256, pkcs8)),
        "private-key-pkcs8-encrypted": lambda: (
            kid_of(rsa2048),
            _private(rsa2048, pkcs8, b"passphrase"),
        ),
        "certificate-followed-by-its-private-key": lambda: (
            kid_of(ec256),
            _header() + cert + _private(ec256, pkcs8),
        ),
        "ed25519-certificate": lambda: (kid_of(ed), _header() + make_cert(ed, BAD_HOST)),
        "ed25519-public-key": lambda: (kid_of(ed), _header() + public_pem(ed)),
        "dsa-public-key": dsa_value,
        "rsa-1024-certificate": lambda: (kid_of(rsa1024), _header() + make_cert(rsa1024, BAD_HOST)),
        "ecdsa-secp256k1-certificate": k1,
        "rsa-public-key-pkcs1-label": lambda: (
            kid_of(rsa2048),
            _header()
            + rsa2048.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
            ),
        ),
        "oversized": lambda: (
            kid_of(ec256),
            _header() + cert + b"\n" * (70 * 1024),
        ),
        "not-utf8": lambda: (kid_of(ec256), b"Host: caf\xe9.example.org\n" + cert),
        "stored-under-another-kid": lambda: (
            kid_of(private_key("ec256", 67)),
            _header() + cert,
        ),
        "unknown-header-line": lambda: (kid_of(ec256), b"X-Trust-Me: yes\n" + cert),
        "published-header-not-rfc3339": lambda: (
            kid_of(ec256),
            b"Host: ctrl9.example.org\nPublished: yesterday\n" + cert,
        ),
        "key-name-not-a-kid-or-host": lambda: (None, _header() + cert),
    }


RECIPES = _recipes()


def test_every_etcd_case_has_a_recipe() -> None:
    assert sorted(RECIPES) == sorted(c["name"] for c in ETCD_CASES)


@pytest.mark.parametrize("case", ETCD_CASES, ids=[c["name"] for c in ETCD_CASES])
def test_bad_etcd_value_is_reported_never_bundled_and_left_alone(
    env: Env, case: dict[str, Any]
) -> None:
    TALLY["cases"] += 1
    good = private_key("ec256", 60)
    good_kid = env.publish(good, GOOD_HOST)
    claimed, value = RECIPES[case["name"]]()
    name = env.prefix + (claimed if claimed is not None else "bad..name")
    env.etcd.put(name, value)
    trusted: list[Any] = [(good_kid, GOOD_HOST)]
    if claimed is not None:
        trusted.append((claimed, BAD_HOST))
    env.state(trusted)
    before = env.dump()

    outputs = []
    for fmt in ("json", "text"):
        result = env.cli("converge", "--at", AT, "--format", fmt)
        assert result.code == 0, result
        _no_traceback(result.out, result.err)
        outputs += [result.out, result.err]
        if fmt == "json":
            report = json.loads(result.out)
            assert any(case["expect"] in w for w in report["warnings"]), report["warnings"]
            assert report["bundle"]["kids_after"] == [good_kid]
        else:
            assert case["expect"] in result.out + result.err
    inspect = env.cli("inspect", "--at", AT)
    assert inspect.code == 0
    outputs += [inspect.out, inspect.err]
    snapshot = env.cli("snapshot", "--at", AT)
    assert snapshot.code == 0
    outputs.append(snapshot.out)

    bundle = env.bundle_bytes() or b""
    keys, problems = parse_pem_bundle(bundle)
    lost = [k.kid for k in keys] != [good_kid] or problems or env.dump() != before
    TALLY["lost"] += bool(lost)
    assert [k.kid for k in keys] == [good_kid]
    assert not problems
    assert env.dump() == before, "a malformed entry is reported, never rewritten or deleted"
    assert b"PRIVATE" not in bundle
    for text in outputs:
        for marker in _SECRET_MARKERS:
            assert marker.decode() not in text
    for marker in _SECRET_MARKERS:
        assert marker not in bundle


def test_a_not_yet_valid_certificate_is_no_bad_input_trust_alone_decides(env: Env) -> None:
    """Certificate dates never keep a key out (R1): kube-apiserver ignores them, and a
    renewal dated seconds ahead of this host's clock must not drop a live key. Trust
    alone decides: pinned, it is bundled; not pinned, it awaits review."""
    TALLY["cases"] += 1
    good_kid = env.publish(private_key("ec256", 60), GOOD_HOST)
    future = datetime(2027, 1, 1, tzinfo=UTC)
    dates = {"not_before": future, "not_after": future + timedelta(days=365)}
    early = private_key("ec256", 63)
    early_kid = env.publish(early, BAD_HOST, **dates)
    stranger_kid = env.publish(private_key("ec256", 70), "ctrl8.example.org", **dates)
    env.state([(good_kid, GOOD_HOST), (early_kid, BAD_HOST)])
    before = env.dump()

    result = env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["bundle"]["kids_after"] == sorted([good_kid, early_kid])
    assert not any(early_kid in w for w in report["warnings"]), report["warnings"]
    assert any(f"untrusted key {stranger_kid}" in w for w in report["warnings"])
    keys, problems = parse_pem_bundle(env.bundle_bytes() or b"")
    assert sorted(k.kid for k in keys) == sorted([good_kid, early_kid]) and not problems
    assert env.dump() == before


# --- bundle paths -------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(size: str) -> Iterator[Path]:
    mountpoint = Path(tempfile.mkdtemp(prefix="sakeystate-tmpfs-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        mountpoint.rmdir()
        reason = f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI runs as root and must test read-only and full disks")
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        mountpoint.rmdir()


@pytest.mark.parametrize("case", BUNDLE_CASES, ids=[c["name"] for c in BUNDLE_CASES])
def test_bad_bundle_path_never_writes_elsewhere(env: Env, case: dict[str, Any]) -> None:
    TALLY["cases"] += 1
    old, new = private_key("ec256", 68), private_key("ec384", 69)
    env.publish(old, GOOD_HOST)
    env.publish(new, BAD_HOST)
    victim = env.tmp / "victim.pem"
    victim.write_bytes(b"precious, owned by someone else\n")
    watched: dict[Path, bytes | None] = {}

    with contextlib.ExitStack() as stack:
        path = env.bundle
        name = case["name"]
        if name == "symlink-to-another-file":
            path.symlink_to(victim)
        elif name == "dangling-symlink":
            path.symlink_to(env.tmp / "created-through-the-link.pem")
        elif name == "directory":
            path.mkdir()
        elif name == "fifo":
            os.mkfifo(path)
        elif name == "missing-parent-directory":
            path = env.tmp / "no-such-dir" / "sa-certs.pem"
        elif name == "parent-is-a-file":
            path = victim / "sa-certs.pem"
        elif name == "lock-file-is-a-symlink":
            Path(str(path) + ".lock").symlink_to(victim)
        elif name in ("read-only-filesystem", "full-filesystem"):
            mountpoint = stack.enter_context(_tmpfs("64k"))
            path = mountpoint / "sa-certs.pem"
        elif name == "existing-bundle-is-garbage":
            path.write_bytes(b"this is not PEM\n")

        trusted = [(kid_of(old), GOOD_HOST), (kid_of(new), BAD_HOST)]
        if name in ("read-only-filesystem", "full-filesystem"):
            # An earlier good run wrote the bundle with one key; now a second is trusted.
            env.state(trusted[:1], bundle={"path": str(path)})
            assert env.cli("converge", "--at", AT).code == 0
            watched[path] = path.read_bytes()
            if name == "read-only-filesystem":
                subprocess.run(["mount", "-o", "remount,ro", str(path.parent)], check=True)
            else:
                filler = path.parent / "filler"
                with contextlib.suppress(OSError), open(filler, "wb") as handle:
                    while True:
                        handle.write(b"\0" * 4096)
                        handle.flush()
        env.state(trusted, bundle={"path": str(path)})
        watched[victim] = victim.read_bytes()
        listing = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else None
        dump = env.dump()

        result = env.cli("converge", "--at", AT)
        assert result.code == case["code"], result
        assert case["expect"] in result.out + result.err, result
        _no_traceback(result.out, result.err)
        assert str(path) in result.err + result.out or case["code"] == 0

        lost = env.dump() != dump
        for watched_path, content in watched.items():
            lost |= watched_path.read_bytes() != content
        if case["code"] == 1 and path.parent.is_dir():
            now = sorted(p.name for p in path.parent.iterdir())
            lost |= [n for n in now if "tmp" in n] != [n for n in listing or [] if "tmp" in n]
        TALLY["lost"] += lost
        assert env.dump() == dump
        for watched_path, content in watched.items():
            assert watched_path.read_bytes() == content, watched_path
        if name == "symlink-to-another-file":
            assert path.is_symlink()
        if name == "dangling-symlink":
            assert not (env.tmp / "created-through-the-link.pem").exists()
        if name == "existing-bundle-is-garbage":
            keys, problems = parse_pem_bundle(path.read_bytes())
            assert sorted(k.kid for k in keys) == sorted(k for k, _ in trusted)
            assert not problems


# --- what a writer of the etcd prefix can and cannot do -----------------------------------


def _forged(victim: Any, forger: Any, host: str, not_after: datetime) -> bytes:
    """A certificate for ``victim``'s public key, signed by someone else's key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")]))
        .public_key(victim.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - timedelta(days=30))
        .not_valid_after(not_after)
        .sign(forger, hashes.SHA256())
    )
    return _header(host) + cert.public_bytes(serialization.Encoding.PEM)


def test_etcd_writer_cannot_add_or_remove_trust_and_mass_removal_is_refused(env: Env) -> None:
    """An etcd writer can publish anything, but only reviewed kids are ever bundled, and it
    can remove nothing: a trusted key whose entry is overwritten, deleted or re-dated as
    long expired stays in the bundle (R1, R9). Removals come from the state file only,
    and more than max_removals of them at once are refused.
    """
    TALLY["cases"] += 1
    keys = [private_key("ec256", 120 + i) for i in range(4)]
    hosts = [f"ctrl{i}.example.org" for i in range(4)]
    kids = [kid_of(k) for k in keys]
    for key, host in zip(keys, hosts, strict=True):
        env.publish(key, host)
    env.state(list(zip(kids, hosts, strict=True)), bundle={"reload": ["true"]})
    assert env.cli("converge", "--at", AT).code == 0
    before_bundle = env.bundle_bytes()

    # Add trust: a new key under its own kid, and under a trusted kid (poisoning).
    intruder = private_key("ec256", 130)
    env.etcd.put(env.prefix + kid_of(intruder), _header() + make_cert(intruder, BAD_HOST))
    env.etcd.put(env.key(hosts[0], kids[0]), _header() + make_cert(intruder, BAD_HOST))
    result = env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert any("possible poisoning" in w for w in report["warnings"])
    assert any("add it to trusted after review" in w for w in report["warnings"])
    # The poisoned kid is no longer served by etcd: it stays in the bundle, reported (R9).
    assert report["bundle"]["kids_after"] == sorted(kids)
    assert report["actions"] == []
    assert any(
        f"trusted key {kids[0]}" in w and "kept in the bundle" in w for w in report["warnings"]
    )
    assert env.bundle_bytes() == before_bundle
    env.publish(keys[0], hosts[0])
    assert env.cli("converge", "--at", AT).code == 0
    assert env.bundle_bytes() == before_bundle

    # Delete one trusted entry, re-date two trusted keys' certificates as long expired.
    forger = private_key("ec256", 131)
    env.etcd.client.delete(env.key(hosts[1], kids[1]))
    for key, host in list(zip(keys, hosts, strict=True))[2:]:
        env.etcd.put(
            env.key(host, kid_of(key)), _forged(key, forger, host, datetime(2026, 1, 1, tzinfo=UTC))
        )
    dump = env.dump()
    result = env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["actions"] == [] and report["bundle"]["kids_after"] == sorted(kids)
    assert any(
        f"trusted key {kids[1]}" in w and "kept in the bundle" in w for w in report["warnings"]
    )
    for index in (2, 3):
        assert f"current key {kids[index]} expired 2026-01-01T00:00:00Z: the key is kept" in (
            result.err
        )
    assert env.bundle_bytes() == before_bundle
    assert env.dump() == dump

    # Three revocations at once: more than max_removals, refused, nothing written.
    env.state(
        list(zip(kids, hosts, strict=True))[3:],
        revoked=[{"fingerprint": k, "reason": "test"} for k in kids[:3]],
    )
    result = env.cli("converge", "--at", AT)
    assert result.code == 1
    assert "the plan removes 3 keys" in result.err
    assert "more than retention.max_removals (2)" in result.err
    assert env.bundle_bytes() == before_bundle
    assert env.dump() == dump
    TALLY["lost"] += env.bundle_bytes() != before_bundle or env.dump() != dump
