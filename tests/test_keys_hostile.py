"""Hostile certificates and values (R11): every public function of keys.py refuses, never crashes.

Fixed cases build the certificates that crashed revision 1 or that cryptography
cannot represent (patched DER: unknown curves and algorithms, duplicate
extensions). The property tests feed 400 random byte strings, 400 bit-flipped
certificates (as values, files and bundles) and 300 random header blocks, and
accept no exception but KeyRejected.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sakeystate.errors import KeyRejected
from sakeystate.keys import (
    MAX_VALUE_BYTES,
    format_time,
    parse_key_file,
    parse_pem_bundle,
    parse_time,
    parse_value,
    saturating_add,
)

from support import (
    der_children,
    der_element,
    der_to_pem,
    kid,
    make_chained_cert,
    pem_to_der,
    private_key,
)

P256_OID = bytes.fromhex("06082a8648ce3d030107")
P384_OID = bytes.fromhex("06052b81040022")
RSA_OID = bytes.fromhex("06092a864886f70d010101")


def _cert_der(kind: str = "ec256", **kwargs: object) -> bytes:
    key = private_key(kind, 400)
    return pem_to_der(make_chained_cert(key, "ctrl1.example.org", **kwargs))  # type: ignore[arg-type]


def _patched(der: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and der.count(old) == 1
    return der.replace(old, new)


def _value(der: bytes) -> bytes:
    return b"Host: ctrl1.example.org\n" + der_to_pem(der)


# --- dates ---------------------------------------------------------------------------------


def test_rfc5280_no_expiry_and_ancient_not_before_parse_and_format() -> None:
    """notAfter 99991231235959Z (RFC 5280's "no expiry") crashed every host in revision 1."""
    key = private_key("ec256", 401)
    forever = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    ancient = datetime(1, 1, 1, tzinfo=UTC)
    cert = make_chained_cert(key, "ctrl1.example.org", not_after=forever)
    builder_cert = pem_to_der(cert)
    value = parse_value(b"Host: ctrl1.example.org\n" + cert)
    assert value.key.not_after == forever
    assert format_time(value.key.not_after) == "9999-12-31T23:59:59Z"
    assert saturating_add(forever, timedelta(days=365)) == datetime.max.replace(tzinfo=UTC)
    assert saturating_add(ancient, -timedelta(days=1)) == datetime.min.replace(tzinfo=UTC)
    assert format_time(ancient) == "0001-01-01T00:00:00Z"
    keys, problems = parse_pem_bundle(der_to_pem(builder_cert))
    assert [k.kid for k in keys] == [kid(key)] and not problems


@pytest.mark.parametrize(
    "text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"], ids=["min", "max"]
)
def test_published_times_beyond_utc_are_refused_not_overflowed(text: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_time(text)
    cert = make_chained_cert(private_key("ec256", 402), "ctrl1.example.org")
    with pytest.raises(KeyRejected, match="out of range"):
        parse_value(f"Host: ctrl1.example.org\nPublished: {text}\n".encode() + cert)


# --- algorithms and extensions cryptography cannot represent --------------------------------


@pytest.mark.parametrize(
    ("kind", "old", "new", "name"),
    [
        ("ec256", P256_OID, bytes.fromhex("06082a811ccf5501822d"), "SM2"),
        ("ec384", P384_OID, bytes.fromhex("06052b81040010"), "sect283k1"),
        ("ec256", P256_OID, bytes.fromhex("06082b0601040182ff7f"), "1.3.6.1.4.1.49151"),
        ("rsa2048", RSA_OID, bytes.fromhex("06092a864886f70d01017f"), "1.2.840.113549.1.1.127"),
    ],
    ids=["sm2-curve", "sect283k1", "unknown-curve", "unknown-algorithm"],
)
def test_unsupported_algorithms_are_rejections_naming_them(
    kind: str, old: bytes, new: bytes, name: str
) -> None:
    der = _patched(_cert_der(kind), old, new)
    with pytest.raises(KeyRejected, match=name.replace(".", r"\.")):
        parse_value(_value(der))
    with pytest.raises(KeyRejected, match="not accepted"):
        parse_key_file(der_to_pem(der))
    keys, problems = parse_pem_bundle(der_to_pem(der))
    assert keys == [] and problems == [
        "block 1 ('CERTIFICATE'): not a key kube-apiserver loads; skipped"
    ]


def test_gost_certificate_from_openssl_is_rejected_when_openssl_can_make_one() -> None:
    """A real GOST key, when this openssl has the engine; else the patched OIDs cover it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is not installed; CI checks values with the real openssl")
        pytest.skip("openssl is not installed")
    made = subprocess.run(
        [openssl, "genpkey", "-algorithm", "gost2012_256", "-pkeyopt", "paramset:A"],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip("this openssl has no GOST engine (the patched-OID cases cover the algorithm)")
    key = made.stdout
    cert = subprocess.run(
        [openssl, "req", "-new", "-x509", "-key", "/dev/stdin", "-subj", "/CN=g", "-days", "1"],
        input=key,
        capture_output=True,
        check=True,
    ).stdout
    with pytest.raises(KeyRejected, match="GOST"):
        parse_value(b"Host: g.example.org\n" + cert)


def _with_duplicate_san(der: bytes) -> bytes:
    """The certificate with its SAN extension twice (cryptography cannot build that)."""
    _tag, (tbs, algorithm, signature) = der_children(der)
    tbs_tag, fields = der_children(tbs)
    explicit_tag, (extensions,) = der_children(fields[-1])
    ext_tag, items = der_children(extensions)
    san = [e for e in items if bytes.fromhex("0603551d11") in e]
    assert len(san) == 1
    doubled = der_element(ext_tag, b"".join([*items, san[0]]))
    new_tbs = der_element(tbs_tag, b"".join([*fields[:-1], der_element(explicit_tag, doubled)]))
    return der_element(0x30, new_tbs + algorithm + signature)


def test_duplicate_san_extension_is_a_rejection() -> None:
    der = _with_duplicate_san(_cert_der(dns_names=("ctrl1.example.org",)))
    with pytest.raises(KeyRejected, match="cannot be parsed"):
        parse_value(_value(der))
    keys, problems = parse_pem_bundle(der_to_pem(der))
    assert keys == [] and len(problems) == 1


# --- headers -------------------------------------------------------------------------------

CERT = make_chained_cert(private_key("ec256", 403), "ctrl1.example.org")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"Host: ctrl1.example.org\x1b[2J\n", "control character"),
        (b"Host: ctrl\x7f.example.org\n", "control character"),
        (b"Host: caf\xc2\x85.example.org\n", "control character"),
        (b"Host: ctrl1.example.org\rPublished: 2026-11-01T00:00:00Z\n", "control character"),
        (b"Host: under_score.example.org\n", "not a DNS name"),
        (b"Host: " + b"a" * 64 + b".example.org\n", "not a DNS name"),
        (b"Host: " + b"a." * 127 + b"org\n", "not a DNS name"),
        (b"Host: -ctrl.example.org\n", "not a DNS name"),
        (b"Host: ctrl1.example.org/../../etc\n", "not a DNS name"),
        (b"Host: " + b"x" * 400 + b"\n", "at most 300"),
        (b"Published: 2026-W47-1\n", "not RFC 3339"),
        (b"Published: 2026-11-22\n", "not RFC 3339"),
        (b"Published: 2026-11-22T10:00:00\n", "not RFC 3339"),
    ],
)
def test_hostile_headers_are_rejected(header: bytes, message: str) -> None:
    with pytest.raises(KeyRejected, match=message):
        parse_value(header + CERT)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22T10:00:00Z", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        ("2026-11-22t10:00:00z", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        ("2026-11-22 11:30:00+01:30", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        ("2026-11-22T10:00:00.123456789Z", datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_rfc3339_forms_are_accepted(text: str, expected: datetime) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2026-W47-1T10:00:00Z",
        "2026-326T10:00:00Z",
        "20261122T100000Z",
        "2026-11-22T10:00Z",
        "2026-11-22T10:00:00",
        "2026-11-22T10:00:00+0100",
        "2026-11-22T10:00:00+24:00",
        "2026-02-30T10:00:00Z",
        "2026-11-22T23:59:60Z",
        " 2026-11-22T10:00:00Z",
        "２０２６-11-22T10:00:00Z",
    ],
)
def test_non_rfc3339_times_raise_value_error_only(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


# --- properties ----------------------------------------------------------------------------


def _property(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def _only_rejections(data: bytes) -> None:
    for parse in (parse_value, parse_key_file):
        with contextlib.suppress(KeyRejected):
            parse(data)
    parse_pem_bundle(data)  # never raises: a bundle block Go skips is a note


@_property(400)
@given(st.binary(max_size=4096))
def test_random_bytes_only_ever_raise_key_rejected(data: bytes) -> None:
    """400 examples."""
    _only_rejections(data)
    _only_rejections(b"-----BEGIN CERTIFICATE-----\n" + data + b"\n-----END CERTIFICATE-----\n")


LEAVES = [
    _cert_der("ec256", dns_names=("ctrl1.example.org",), ca=False),
    _cert_der("rsa2048"),
    _cert_der("ec521", not_after=datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
]


@_property(400)
@given(st.sampled_from(LEAVES), st.lists(st.integers(0, 10**6), min_size=1, max_size=4))
def test_bit_flipped_certificates_only_ever_raise_key_rejected(
    der: bytes, flips: list[int]
) -> None:
    """400 examples: 1-4 bit flips anywhere in a certificate, as value, file and bundle."""
    mutated = bytearray(der)
    for flip in flips:
        mutated[(flip // 8) % len(mutated)] ^= 1 << (flip % 8)
    pem = der_to_pem(bytes(mutated))
    _only_rejections(pem)
    _only_rejections(b"Host: ctrl1.example.org\n" + pem + der_to_pem(LEAVES[0]))


HEADER_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=80)


@_property(300)
@given(
    st.lists(st.tuples(st.sampled_from(["Host", "Published", "X", ""]), HEADER_TEXT), max_size=4)
)
def test_random_headers_only_ever_raise_key_rejected(headers: list[tuple[str, str]]) -> None:
    """300 examples: random header names and values before a valid certificate."""
    text = "".join(f"{name}:{value}\n" for name, value in headers).encode()
    try:
        value = parse_value(text + CERT)
    except KeyRejected:
        return
    assert len(text + CERT) <= MAX_VALUE_BYTES
    assert value.host is None or value.host.isascii()


def test_bundle_of_many_unterminated_begin_lines_is_read_in_linear_time() -> None:
    """Go's older pem.Decode rescans to the end per BEGIN (quadratic): this would take hours.

    Not a timing assertion: a quadratic reader makes this test hang instead of pass.
    """
    begin = b"-----BEGIN A-----\n"
    assert parse_pem_bundle(begin * 200_000) == ([], ["no PEM block found"])
    keys, problems = parse_pem_bundle(begin * 200_000 + b"-----END A-----\n")
    assert keys == [] and problems == ["block 1 ('A'): not a key kube-apiserver loads; skipped"]
    headed = b"-----BEGIN A-----\nk: v\n" * 100_000 + b"\n-----END B-----\n" + CERT
    keys, _problems = parse_pem_bundle(headed)
    assert [k.kid for k in keys] == [kid(private_key("ec256", 403))]


def test_oversized_key_file_is_refused_before_parsing() -> None:
    with pytest.raises(KeyRejected, match="over the 65536-byte limit"):
        parse_key_file(CERT + b"\n" * MAX_VALUE_BYTES)


def test_format_time_saturates_instead_of_overflowing_and_writes_four_digit_years() -> None:
    west = timezone(-timedelta(hours=1))
    east = timezone(timedelta(hours=1))
    assert format_time(datetime(9999, 12, 31, 23, 30, tzinfo=west)) == "9999-12-31T23:59:59Z"
    assert format_time(datetime(1, 1, 1, 0, 30, tzinfo=east)) == "0001-01-01T00:00:00Z"
    assert format_time(datetime(999, 2, 3, 4, 5, 6, tzinfo=UTC)) == "0999-02-03T04:05:06Z"
