"""The bundle is read exactly as kube-apiserver reads it: a differential test against Go.

tests/go/keyload is keyutil.ParsePublicKeysPEM (the code behind
--service-account-key-file) on Go's real encoding/pem and crypto/x509. It is
built once per session; every generated bundle is written to a file and the Go
program runs once over all of them. Without Go the test skips, except under
$CI, where a missing Go toolchain fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sakeystate.keys import parse_pem_bundle

from support import REPO, make_cert, make_chained_cert, pem_to_der, private_key, public_pem

EXAMPLES = 300


@pytest.fixture(scope="session")
def keyload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go program, built once per session."""
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI"):
            pytest.fail("go is not installed; CI must run the Go differential test (golang-go)")
        pytest.skip("go is not installed (apt-get install golang-go); CI runs this test")
    out = tmp_path_factory.mktemp("keyload") / "keyload"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(tmp_path_factory.getbasetemp() / "gocache"))
    subprocess.run(
        [go, "build", "-o", str(out), "."],
        cwd=REPO / "tests" / "go" / "keyload",
        env=env,
        check=True,
        capture_output=True,
    )
    return out


def go_kids(keyload: Path, files: list[Path]) -> dict[str, list[str]]:
    result = subprocess.run(
        [str(keyload), *map(str, files)], capture_output=True, check=True, timeout=120
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def ours(data: bytes) -> list[str]:
    return [k.kid for k in parse_pem_bundle(data)[0]]


def _private(key: Any, fmt: serialization.PrivateFormat) -> bytes:
    return pem_to_der(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    length = bytes([size]) if size < 0x80 else bytes([0x82]) + size.to_bytes(2, "big")
    return bytes([tag]) + length + content


def compressed_point_spki(key: Any) -> bytes:
    """A P-256 SubjectPublicKeyInfo with a compressed point (Go's x509 rejects it)."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    algorithm = _der(0x30, bytes.fromhex("06072a8648ce3d020106082a8648ce3d030107"))
    return _der(0x30, algorithm + _der(0x03, b"\x00" + point))


def rsa_spki_without_null(key: Any) -> bytes:
    """An RSA SubjectPublicKeyInfo whose AlgorithmIdentifier lacks the NULL (Go rejects it)."""
    pkcs1 = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    algorithm = _der(0x30, bytes.fromhex("06092a864886f70d010101"))
    return _der(0x30, algorithm + _der(0x03, b"\x00" + pkcs1))


@cache
def pool() -> list[tuple[str, bytes]]:
    """(label, DER) of every kind of block a bundle may hold, loadable or not."""
    pkcs8 = serialization.PrivateFormat.PKCS8
    sec1 = serialization.PrivateFormat.TraditionalOpenSSL
    ec256, ec384, ec521 = private_key("ec256", 300), private_key("ec384", 301), private_key("ec521")
    rsa2048, rsa1024 = private_key("rsa2048", 302), private_key("rsa1024", 303)
    ed = private_key("ed25519", 304)
    p224 = ec.generate_private_key(ec.SECP224R1())
    k1 = ec.generate_private_key(ec.SECP256K1())
    ca = make_chained_cert(ec384, "intermediate", ca=True)
    cert = make_chained_cert(ec256, "sa", issuer_key=ec384, issuer_cn="intermediate", ca=False)
    items = [
        ("PUBLIC KEY", pem_to_der(public_pem(ec256))),
        ("PUBLIC KEY", pem_to_der(public_pem(ec521))),
        ("PUBLIC KEY", pem_to_der(public_pem(rsa2048))),
        ("PUBLIC KEY", pem_to_der(public_pem(rsa1024))),
        ("PUBLIC KEY", pem_to_der(public_pem(p224))),
        ("PUBLIC KEY", pem_to_der(public_pem(ed))),
        ("PUBLIC KEY", pem_to_der(public_pem(k1))),
        ("CERTIFICATE", pem_to_der(cert)),
        ("CERTIFICATE", pem_to_der(ca)),
        ("CERTIFICATE", pem_to_der(make_cert(rsa2048, "r.example.org"))),
        ("CERTIFICATE", pem_to_der(make_cert(ed, "e.example.org"))),
        ("CERTIFICATE", pem_to_der(make_cert(k1, "k.example.org"))),
        ("CERTIFICATE", pem_to_der(make_cert(p224, "p.example.org"))),
        ("RSA PUBLIC KEY", pem_to_der(public_pem(rsa2048))),
        (
            "RSA PUBLIC KEY",
            pem_to_der(
                rsa1024.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
                )
            ),
        ),
        ("RSA PRIVATE KEY", _private(rsa1024, sec1)),
        ("PRIVATE KEY", _private(rsa2048, pkcs8)),
        ("EC PRIVATE KEY", _private(ec384, sec1)),
        ("PRIVATE KEY", _private(ec256, pkcs8)),
        ("PRIVATE KEY", _private(ed, pkcs8)),
        ("PUBLIC KEY", compressed_point_spki(ec256)),
        ("PUBLIC KEY", rsa_spki_without_null(rsa2048)),
        ("EC PARAMETERS", bytes.fromhex("06082a8648ce3d030107")),
        ("CERTIFICATE", pem_to_der(cert)[:200]),
        ("GARBAGE", b"\x30\x03\x02\x01\x00"),
        ("CERTIFICATE", b""),
    ]
    return items


LABELS = ["CERTIFICATE", "PUBLIC KEY", "RSA PUBLIC KEY", "X", "PRIVATE KEY", ""]
JUNK = [
    b"",
    b"\n",
    b"# kid host\n",
    b"\n\n# a comment line\n\n",
    b"junk before the next block, no newline ",
    b"-----BEGIN PUBLIC KEY-----\n",
    b"-----END PUBLIC KEY-----\n",
    b"Key: value\n",
    b"\r\n",
    b"\t \n",
]


def _b64(der: bytes) -> bytes:
    import base64

    return base64.b64encode(der)


@st.composite
def block(draw: Callable[..., Any]) -> bytes:
    label, der = draw(st.sampled_from(pool()))
    if draw(st.integers(0, 9)) == 0:
        label = draw(st.sampled_from(LABELS))
    end_label = label if draw(st.integers(0, 19)) else draw(st.sampled_from(LABELS))
    eol = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    after_begin = draw(st.sampled_from([b"", b"", b" ", b"\t", b" \t ", b"x"]))
    after_end = draw(st.sampled_from([b"", b"", b" ", b"\t", b"  ", b"-"]))
    width = draw(st.sampled_from([64, 64, 76, 17, 1000]))
    body = _b64(der)
    if draw(st.integers(0, 9)) == 0 and body:
        body = body.rstrip(b"=")  # broken padding
    lines = [body[i : i + width] for i in range(0, len(body), width)]
    if draw(st.integers(0, 4)) == 0 and lines:
        index = draw(st.integers(0, len(lines) - 1))
        pad = draw(st.sampled_from([b" ", b"\t", b"  \t"]))
        cut = draw(st.integers(0, len(lines[index])))
        lines[index] = lines[index][:cut] + pad + lines[index][cut:]
    headers = b""
    if draw(st.integers(0, 5)) == 0:
        headers = draw(st.sampled_from([b"Proc-Type: 4,ENCRYPTED", b"Comment: x", b"a:b"])) + eol
        if draw(st.booleans()):
            headers += eol
    text = (
        b"-----BEGIN "
        + label.encode()
        + b"-----"
        + after_begin
        + eol
        + headers
        + b"".join(line + eol for line in lines)
        + b"-----END "
        + end_label.encode()
        + b"-----"
        + after_end
        + draw(st.sampled_from([eol, eol, b""]))
    )
    if draw(st.integers(0, 14)) == 0:
        text = text[: draw(st.integers(0, len(text)))]  # truncated
    return text


@st.composite
def bundle(draw: Callable[..., Any]) -> bytes:
    parts = draw(st.lists(st.tuples(st.sampled_from(JUNK), block()), min_size=0, max_size=6))
    if parts and draw(st.integers(0, 4)) == 0:
        parts.append(parts[0])  # a duplicate block
    return b"".join(junk + text for junk, text in parts) + draw(st.sampled_from(JUNK))


def test_generated_bundles_load_exactly_the_keys_go_loads(keyload: Path, tmp_path: Path) -> None:
    """300 generated bundles (EXAMPLES): sakeystate's kids equal Go's, in order, for each.

    Mixes of public keys, certificates, CA certificates, private keys, EC PARAMETERS
    and garbage; trailing spaces/tabs after BEGIN/END, CRLF, whitespace inside the
    base64, headers, junk between blocks, truncated blocks, wrong END labels,
    broken padding, duplicates. One Go run checks them all.
    """
    samples: list[bytes] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(bundle())
    def collect(data: bytes) -> None:
        samples.append(data)

    collect()
    assert len(samples) >= EXAMPLES
    files = []
    for number, data in enumerate(samples):
        path = tmp_path / f"bundle-{number}.pem"
        path.write_bytes(data)
        files.append(path)
    expected = go_kids(keyload, files)
    loaded = 0
    for path, data in zip(files, samples, strict=True):
        want = expected[str(path)]
        assert ours(data) == want, f"{path.name}: {data!r}"
        loaded += len(want)
    assert loaded > EXAMPLES // 2, "the generator must produce bundles Go loads keys from"


# --- fixed regressions -----------------------------------------------------------------------


def _three_keys() -> list[bytes]:
    return [public_pem(private_key("ec256", 310 + i)) for i in range(3)]


REGRESSIONS: dict[str, Callable[[], bytes]] = {
    # Issue finding 4: a space after a BEGIN line hid three keys from the old reader.
    "space-after-begin": lambda: b"".join(
        pem.replace(b"-----\n", b"----- \n", 1) for pem in _three_keys()
    ),
    "tab-after-begin-and-end": lambda: b"".join(
        pem.replace(b"-----\n", b"-----\t\n") for pem in _three_keys()
    ),
    "whitespace-in-base64-line": lambda: b"".join(
        pem.replace(b"\n", b" \t\n", 2)[: len(pem) // 2]
        + b" "
        + pem.replace(b"\n", b" \t\n", 2)[len(pem) // 2 :]
        for pem in _three_keys()
    ),
    "crlf": lambda: b"".join(pem.replace(b"\n", b"\r\n") for pem in _three_keys()),
    "certificate-and-rsa-public-key-label": lambda: (
        make_cert(private_key("ec384", 313), "c.example.org")
        + public_pem(private_key("rsa2048", 314)).replace(b"PUBLIC KEY", b"RSA PUBLIC KEY")
    ),
    # Go finds BEGIN only at the start of the data or of a line: the first key is not loaded.
    "begin-not-at-line-start": lambda: b"x" + b"".join(_three_keys()),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_fixed_regressions_match_go(keyload: Path, tmp_path: Path, name: str) -> None:
    data = REGRESSIONS[name]()
    path = tmp_path / f"{name}.pem"
    path.write_bytes(data)
    want = go_kids(keyload, [path])[str(path)]
    assert ours(data) == want
    assert want, "each regression holds keys Go loads"
