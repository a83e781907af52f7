"""Key identity and acceptance: the kid, fingerprints, accepted and rejected keys."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa

from sakeystate.errors import KeyRejected
from sakeystate.keys import (
    KeyInfo,
    names_of,
    normalize_fingerprint,
    parse_key_file,
    parse_key_pem,
    parse_pem_bundle,
    parse_value,
    render_value,
)

from support import T0, entry_value, kid, make_cert, make_chained_cert, private_key, public_pem


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


# --- chained certificates (R6) ---------------------------------------------------------------


def _cfssl_chain(dns_names: tuple[str, ...] = ()) -> tuple[bytes, bytes, bytes, object]:
    """root -> intermediate -> leaf (CN sa, no SAN by default), as cfssl issues them."""
    root_key, inter_key, leaf_key = (private_key("ec384", 500 + i) for i in range(3))
    root = make_chained_cert(root_key, "root", ca=True)
    inter = make_chained_cert(inter_key, "intermediate", root_key, "root", ca=True)
    leaf = make_chained_cert(
        leaf_key, "sa", inter_key, "intermediate", ca=False, dns_names=dns_names
    )
    return leaf, inter, root, leaf_key


def test_chained_value_keeps_the_leaf_and_its_intermediates_in_order() -> None:
    leaf, inter, root, leaf_key = _cfssl_chain()
    value = parse_value(b"Host: ctrl1.example.org\n" + leaf + inter + root)
    assert value.key.kid == kid(leaf_key)
    assert value.key.certificate_pem == leaf
    assert value.intermediates == (inter, root)
    assert value.key.subject_cn == "sa" and value.key.dns_names == ()
    assert value.key.issuer == "CN=intermediate"
    crlf = (leaf + inter).replace(b"\n", b"\r\n")
    assert parse_key_file(crlf) == (value.key, (inter,))


def test_rendered_chained_value_round_trips_and_openssl_reads_the_leaf() -> None:
    leaf, inter, _root, leaf_key = _cfssl_chain(("ctrl1.example.org",))
    key, chain = parse_key_file(leaf + inter)
    rendered = render_value(key, "ctrl1.example.org", T0, chain)
    assert rendered == b"Host: ctrl1.example.org\nPublished: 2026-11-22T10:00:00Z\n" + leaf + inter
    again = parse_value(rendered)
    assert (again.key, again.host, again.published, again.intermediates) == (
        key,
        "ctrl1.example.org",
        T0,
        (inter,),
    )
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is not installed; CI checks values with the real openssl")
        pytest.skip("openssl is not installed")
    subject = subprocess.run(
        [openssl, "x509", "-noout", "-subject"], input=rendered, capture_output=True, check=True
    ).stdout
    assert b"CN = sa" in subject or b"CN=sa" in subject
    # Valid (checkend 0 exits 0) for the leaf, whose notAfter is T0 + 365 days.
    check = subprocess.run(
        [openssl, "x509", "-noout", "-checkend", "0"], input=rendered, capture_output=True
    )
    assert check.returncode == 0, check.stdout
    assert kid(leaf_key) == key.kid


def test_ca_certificate_is_never_a_service_account_key() -> None:
    _leaf, inter, _root, _key = _cfssl_chain()
    with pytest.raises(KeyRejected, match="is a CA certificate; CA keys are never service-account"):
        parse_value(b"Host: ctrl1.example.org\n" + inter)
    keys, problems = parse_pem_bundle(inter)
    assert [k.kid for k in keys] == [kid(private_key("ec384", 501))]
    assert "a CA certificate" in problems[0]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda leaf, inter, root: leaf + root, "did not issue the certificate before it"),
        (lambda leaf, inter, root: leaf + root + inter, "did not issue the certificate before it"),
        (
            lambda leaf, inter, root: leaf + public_pem(private_key("ec256")),
            "only CERTIFICATE intermediates",
        ),
        (
            lambda leaf, inter, root: public_pem(private_key("ec256")) + inter,
            "a PUBLIC KEY must be alone",
        ),
        (
            lambda leaf, inter, root: leaf + inter * 9,
            "9 intermediates follow the certificate; at most 8",
        ),
        (lambda leaf, inter, root: leaf + b"trailing words\n" + inter, "unexpected text"),
        (
            lambda leaf, inter, root: leaf + inter[: len(inter) // 2],
            "CERTIFICATE PEM block is truncated",
        ),
    ],
    ids=[
        "skips-a-level",
        "wrong-order",
        "public-key-after",
        "public-key-leaf",
        "nine",
        "text",
        "truncated",
    ],
)
def test_bad_chains_are_rejected(build: object, message: str) -> None:
    leaf, inter, root, _key = _cfssl_chain()
    with pytest.raises(KeyRejected, match=message):
        parse_key_file(build(leaf, inter, root))  # type: ignore[operator]


def test_single_block_api_refuses_a_chain_with_a_clear_count() -> None:
    leaf, inter, _root, _key = _cfssl_chain()
    with pytest.raises(KeyRejected, match="2 PEM blocks found; exactly one is allowed"):
        parse_key_pem(leaf + inter)


def test_private_key_after_a_chain_is_rejected_and_never_echoed() -> None:
    leaf, inter, _root, leaf_key = _cfssl_chain()
    secret = leaf_key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(KeyRejected, match="contains a private key") as excinfo:
        parse_value(leaf + inter + secret)
    assert secret.splitlines()[1].decode() not in str(excinfo.value)


# --- names (R7, trust anchors) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cn", "sans", "names"),
    [
        ("sa", (), ()),
        ("Ctrl1.Example.ORG", (), ("ctrl1.example.org",)),
        (
            "sa",
            ("CTRL1.example.org", "ctrl1-sa.example.org"),
            ("ctrl1.example.org", "ctrl1-sa.example.org"),
        ),
        ("ctrl1.example.org", ("ctrl1.example.org",), ("ctrl1.example.org",)),
        ("localhost", (), ()),
        ("not a host.example.org", (), ()),
    ],
)
def test_names_are_dns_sans_plus_a_fully_qualified_cn(
    cn: str, sans: tuple[str, ...], names: tuple[str, ...]
) -> None:
    key = parse_key_pem(make_chained_cert(private_key("ec256", 510), cn, dns_names=sans))
    assert key.subject_cn == cn
    assert names_of(key) == names


def test_public_key_has_no_names_and_no_issuer() -> None:
    key = parse_key_pem(public_pem(private_key("ec256", 511)))
    assert (names_of(key), key.subject_cn, key.issuer, key.certificate_pem) == (
        (),
        None,
        None,
        None,
    )
    assert KeyInfo(key.kid, key.algorithm, key.public_pem) == key


# --- the bundle as kube-apiserver reads it (R10) ----------------------------------------------


def test_space_or_tab_after_begin_and_whitespace_in_base64_hide_no_key() -> None:
    """Issue finding 4: a space after a BEGIN line hid three keys from the old reader."""
    pems = [public_pem(private_key("ec256", 520 + i)) for i in range(3)]
    spaced = pems[0].replace(b"-----\n", b"----- \n", 1)
    tabbed = pems[1].replace(b"-----\n", b"-----\t\n")
    lines = pems[2].split(b"\n")
    lines[1] = lines[1][:10] + b" \t " + lines[1][10:]
    bundle = b"# a comment\n" + spaced + tabbed + b"\n".join(lines)
    keys, problems = parse_pem_bundle(bundle)
    assert [k.kid for k in keys] == [kid(private_key("ec256", 520 + i)) for i in range(3)]
    assert problems == []


def test_bundle_loads_every_block_kube_apiserver_loads_whatever_its_label() -> None:
    rsa_key, ec_key = private_key("rsa2048", 530), private_key("ec256", 531)
    pkcs1 = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pkcs8_ec = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    relabelled = public_pem(ec_key).replace(b"PUBLIC KEY", b"RSA PUBLIC KEY")
    keys, problems = parse_pem_bundle(pkcs1 + relabelled + pkcs8_ec)
    # keyutil takes RSA private keys (PKCS#1/#8) and SEC 1 ECDSA keys, never PKCS#8 ECDSA.
    assert [k.kid for k in keys] == [kid(rsa_key), kid(ec_key)]
    assert (
        problems[0] == f"block 1: a private key; kube-apiserver loads its public key {kid(rsa_key)}"
    )
    assert problems[1] == "block 3 ('PRIVATE KEY'): not a key kube-apiserver loads; skipped"
    for text in problems:
        assert pkcs1.splitlines()[1].decode() not in text


def test_known_blocks_are_not_parsed_again() -> None:
    key = private_key("ec256", 540)
    pem = public_pem(key)
    marker = KeyInfo("k" * 43, "ECDSA-P-256", pem)
    keys, _ = parse_pem_bundle(b"# x\n" + pem + pem.replace(b"\n", b"\r\n"), {pem: marker})
    # The byte-identical block is the known key; the CRLF copy is parsed (same key).
    assert [k.kid for k in keys] == ["k" * 43, kid(key)]
