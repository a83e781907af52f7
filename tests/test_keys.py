"""Key identity and acceptance: the kid, fingerprints, accepted and rejected keys."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa

from sakeystate.errors import KeyRejected
from sakeystate.keys import normalize_fingerprint, parse_key_pem, parse_pem_bundle, parse_value

from support import T0, entry_value, kid, make_cert, private_key, public_pem


@pytest.mark.parametrize("kind", ["ec256", "ec384", "ec521", "rsa2048"])
def test_kid_matches_openssl_computation(kind: str) -> None:
    """The kid is base64url(sha256(DER SPKI)) exactly as an independent openssl pipeline says."""
    key = private_key(kind)
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"],
        input=public_pem(key),
        capture_output=True,
        check=True,
    ).stdout
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-binary"], input=der, capture_output=True, check=True
    ).stdout
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert parse_key_pem(public_pem(key)).kid == expected
    assert parse_key_pem(make_cert(key, "h.example.org")).kid == expected
    assert kid(key) == expected


def test_sha256_fingerprint_forms_map_to_the_kid() -> None:
    key = private_key("ec256")
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hexdigest = hashlib.sha256(der).hexdigest()
    with_colons = ":".join(hexdigest[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(f"sha256:{hexdigest}") == kid(key)
    assert normalize_fingerprint(f"sha256:{with_colons}") == kid(key)
    assert normalize_fingerprint(kid(key)) == kid(key)


@pytest.mark.parametrize("bad", ["", "sha256:abc", "sha1:" + "a" * 40, "x" * 42, "!" * 43])
def test_invalid_fingerprints_are_refused_with_what_is_valid(bad: str) -> None:
    with pytest.raises(ValueError, match="43 base64url characters"):
        normalize_fingerprint(bad)


@pytest.mark.parametrize(
    ("kind", "message"),
    [("ed25519", "Ed25519 keys are not accepted"), ("rsa1024", "1024 bits is too short")],
)
def test_unaccepted_key_types_are_rejected(kind: str, message: str) -> None:
    key = private_key(kind)
    for pem in (public_pem(key), make_cert(key, "h.example.org")):
        with pytest.raises(KeyRejected, match=message):
            parse_key_pem(pem)


def test_dsa_is_rejected() -> None:
    key = dsa.generate_private_key(key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyRejected, match="DSA keys are not accepted"):
        parse_key_pem(pem)


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_private_keys_are_rejected_without_echoing_them(fmt: serialization.PrivateFormat) -> None:
    pem = private_key("ec256").private_bytes(
        serialization.Encoding.PEM, fmt, serialization.NoEncryption()
    )
    with pytest.raises(KeyRejected) as excinfo:
        parse_value(b"Host: a.example.org\n" + pem)
    assert "private key" in str(excinfo.value)
    body = pem.decode().splitlines()[1]
    assert body not in str(excinfo.value)


def test_value_headers_and_certificate_dates_are_parsed() -> None:
    key = private_key("ec521")
    value = parse_value(entry_value(key, "ctrl1001.example.org", T0))
    assert value.host == "ctrl1001.example.org"
    assert value.published == T0
    assert value.key.kid == kid(key)
    assert value.key.not_after == T0 + timedelta(days=365)
    assert value.key.algorithm == "ECDSA-P-521"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"garbage", "no PEM block"),
        (b"\xff\xfe" + b"x" * 10, "not UTF-8"),
        (b"X" * (64 * 1024 + 1), "over the 65536-byte limit"),
        (b"Colour: blue\n-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n", "header"),
    ],
)
def test_malformed_values_are_rejected(value: bytes, message: str) -> None:
    with pytest.raises(KeyRejected, match=message):
        parse_value(value)


def test_an_unrelated_second_certificate_and_truncated_pem_are_rejected() -> None:
    """Revision 1 refused any second block; now only a real intermediate may follow (R6)."""
    cert = make_cert(private_key("ec256"), "a.example.org")
    with pytest.raises(
        KeyRejected, match="is not a CA certificate, so it cannot be an intermediate"
    ):
        parse_value(cert + cert)
    with pytest.raises(KeyRejected, match=r"truncated|malformed"):
        parse_value(cert[: len(cert) // 2])


def test_legacy_bundle_of_certificates_loads_what_kube_apiserver_loads() -> None:
    """An RSA-1024 certificate is a key kube-apiserver verifies with: it is in the bundle (R10)."""
    a, b = private_key("ec256"), private_key("rsa1024")
    keys, problems = parse_pem_bundle(make_cert(a, "a.example.org") + make_cert(b, "b.example.org"))
    assert [k.kid for k in keys] == [kid(a), kid(b)]
    assert [k.algorithm for k in keys] == ["ECDSA-P-256", "RSA-1024"]
    assert problems == [
        "block 2: RSA key of 1024 bits is too short (kube-apiserver needs at least 2048); "
        "kube-apiserver loads it anyway"
    ]


@pytest.mark.parametrize("kind", ["ec256", "ec384", "ec521", "rsa2048"])
def test_bundle_pem_is_byte_identical_to_cryptography_encoding(kind: str) -> None:
    key = private_key(kind)
    for pem in (public_pem(key), make_cert(key, "h.example.org")):
        assert parse_key_pem(pem).public_pem == public_pem(key)
