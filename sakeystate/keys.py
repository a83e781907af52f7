"""Key identity and acceptance: PEM parsing, the kid, accepted key types.

Pure: bytes in, values out. The kid is exactly what kube-apiserver puts in the
``kid`` header of the tokens it signs: base64url (no padding) of the SHA-256 of
the DER-encoded SubjectPublicKeyInfo.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sakeystate.errors import KeyRejected

# Imported once here, not per call: a function-level import costs ~40 us per parsed
# value, 0.4 s of a 10,000-key converge.
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

KID_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_HEX_FINGERPRINT_RE = re.compile(r"^sha256:([0-9a-fA-F:]+)$")
# An etcd value is a header and one certificate; anything this large is not that.
MAX_VALUE_BYTES = 64 * 1024
_PEM_BEGIN_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_PEM_BLOCK_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n[A-Za-z0-9+/=\r\n]*-----END \1-----\r?\n?"
)
_ACCEPTED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
MIN_RSA_BITS = 2048
HEADER_NAMES = ("Host", "Published")


def _spki_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _kid_of_der(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def kid_of(public_key: PublicKey) -> str:
    """The Kubernetes kid of a public key."""
    return _kid_of_der(_spki_der(public_key))


def _pem_of_der(der: bytes) -> bytes:
    """``PUBLIC KEY`` PEM of SPKI DER, byte for byte as cryptography writes it (64 columns)."""
    body = base64.b64encode(der)
    lines = b"".join(body[i : i + 64] + b"\n" for i in range(0, len(body), 64))
    return b"-----BEGIN PUBLIC KEY-----\n" + lines + b"-----END PUBLIC KEY-----\n"


def normalize_fingerprint(text: str) -> str:
    """A kid, or ``sha256:<64 hex>`` (colons allowed, any case), as a kid.

    Raises ValueError naming what would be valid.
    """
    if KID_RE.match(text):
        return text
    match = _HEX_FINGERPRINT_RE.match(text)
    if match:
        hexdigits = match.group(1).replace(":", "")
        if len(hexdigits) == 64:
            return base64.urlsafe_b64encode(bytes.fromhex(hexdigits)).rstrip(b"=").decode("ascii")
    raise ValueError(
        f"{text!r} is not a fingerprint: expected a kid (43 base64url characters) "
        "or sha256:<64 hex digits>"
    )


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with a Z, the one time format sakeystate writes."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """RFC 3339 with an explicit offset; raises ValueError otherwise."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; use RFC 3339 such as 2026-11-22T10:00:00Z")
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class KeyInfo:
    """An accepted public key, and its certificate's validity when it came in one."""

    kid: str
    algorithm: str
    public_pem: bytes
    certificate_pem: bytes | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None


@dataclass(frozen=True)
class EntryValue:
    """A parsed etcd value: optional headers and one key."""

    key: KeyInfo
    host: str | None = None
    published: datetime | None = None
    intermediates: tuple[bytes, ...] = ()  # CERTIFICATE blocks stored after the leaf


def _check_accepted(public_key: object) -> tuple[PublicKey, str]:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyRejected(
                f"RSA key of {public_key.key_size} bits is too short "
                f"(kube-apiserver needs at least {MIN_RSA_BITS})"
            )
        return public_key, f"RSA-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = _ACCEPTED_CURVES.get(public_key.curve.name)
        if curve is None:
            raise KeyRejected(
                f"ECDSA curve {public_key.curve.name} is not accepted (use P-256, P-384 or P-521)"
            )
        return public_key, f"ECDSA-{curve}"
    kind = type(public_key).__name__.replace("PublicKey", "").lstrip("_") or "unknown"
    raise KeyRejected(
        f"{kind} keys are not accepted (kube-apiserver verifies RSA >= 2048 bits "
        "and ECDSA P-256/P-384/P-521)"
    )


def _one_pem_block(pem: bytes) -> tuple[str, bytes]:
    whole = _PEM_BLOCK_RE.fullmatch(pem.strip() + b"\n")
    if whole is not None and whole.group(1) in (b"CERTIFICATE", b"PUBLIC KEY"):
        # The usual value: exactly one well-formed block and nothing else.
        return whole.group(1).decode("ascii"), whole.group(0)
    labels = [m.group(1).decode("ascii") for m in _PEM_BEGIN_RE.finditer(pem)]
    if any("PRIVATE KEY" in label for label in labels):
        # Say what it is, never echo it: the bytes stay where they are.
        raise KeyRejected("contains a private key; only certificates and public keys are accepted")
    if not labels:
        raise KeyRejected("no PEM block found (expected CERTIFICATE or PUBLIC KEY)")
    if len(labels) > 1:
        raise KeyRejected(f"{len(labels)} PEM blocks found; exactly one is allowed")
    label = labels[0]
    if label not in ("CERTIFICATE", "PUBLIC KEY"):
        raise KeyRejected(
            f"PEM block {label!r} is not accepted (expected CERTIFICATE or PUBLIC KEY)"
        )
    block = _PEM_BLOCK_RE.search(pem)
    if block is None:
        raise KeyRejected(f"{label} PEM block is truncated or malformed")
    rest = (pem[: block.start()] + pem[block.end() :]).strip()
    if rest:
        raise KeyRejected("unexpected text around the PEM block")
    return label, block.group(0)


def parse_key_pem(pem: bytes) -> KeyInfo:
    """Exactly one CERTIFICATE or PUBLIC KEY block of an accepted key type."""
    label, block = _one_pem_block(pem)
    try:
        if label == "CERTIFICATE":
            cert = x509.load_pem_x509_certificate(block)
            public_key, algorithm = _check_accepted(cert.public_key())
            der = _spki_der(public_key)
            return KeyInfo(
                kid=_kid_of_der(der),
                algorithm=algorithm,
                public_pem=_pem_of_der(der),
                # The block as read: it parsed as exactly this certificate.
                certificate_pem=block,
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
            )
        public_key, algorithm = _check_accepted(serialization.load_pem_public_key(block))
    except KeyRejected:
        raise
    except (ValueError, TypeError) as exc:
        raise KeyRejected(f"{label} cannot be parsed: {exc}") from None
    der = _spki_der(public_key)
    return KeyInfo(kid=_kid_of_der(der), algorithm=algorithm, public_pem=_pem_of_der(der))


def parse_key_file(pem: bytes) -> tuple[KeyInfo, tuple[bytes, ...]]:
    """A leaf (CERTIFICATE or PUBLIC KEY) and the intermediates stored after it."""
    return parse_key_pem(pem), ()


def names_of(key: KeyInfo) -> tuple[str, ...]:
    """The host names a certificate gives: DNS SANs, or a fully qualified CN."""
    if key.certificate_pem is None:
        return ()
    cert = x509.load_pem_x509_certificate(key.certificate_pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower() for n in sans.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    cns = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    if cns and "." in str(cns[0].value):
        names.append(str(cns[0].value).lower())
    return tuple(dict.fromkeys(names))


def parse_value(data: bytes) -> EntryValue:
    """An etcd value: ``Host:``/``Published:`` header lines, then one PEM block."""
    if len(data) > MAX_VALUE_BYTES:
        raise KeyRejected(f"value is {len(data)} bytes, over the {MAX_VALUE_BYTES}-byte limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyRejected("value is not UTF-8 text") from None
    start = data.find(b"-----BEGIN")
    if start < 0:
        if "PRIVATE KEY" in text:
            raise KeyRejected(
                "contains a private key; only certificates and public keys are accepted"
            )
        raise KeyRejected("no PEM block found (expected CERTIFICATE or PUBLIC KEY)")
    headers: dict[str, str] = {}
    for line in data[:start].decode("utf-8").splitlines():
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep or name not in HEADER_NAMES:
            raise KeyRejected(f"unexpected header line {line[:60]!r} (allowed: Host, Published)")
        if name in headers:
            raise KeyRejected(f"header {name} appears twice")
        headers[name] = value.strip()
    published = None
    if "Published" in headers:
        try:
            published = parse_time(headers["Published"])
        except ValueError:
            raise KeyRejected(
                f"Published header {headers['Published'][:40]!r} is not RFC 3339"
            ) from None
    key = parse_key_pem(data[start:])
    return EntryValue(key=key, host=headers.get("Host") or None, published=published)


def render_value(
    key: KeyInfo,
    host: str | None,
    published: datetime | None,
    intermediates: tuple[bytes, ...] = (),
) -> bytes:
    """The etcd value for a key: headers, the certificate (or public key) PEM, then the
    certificate's intermediates, so ``openssl x509`` still reads the leaf."""
    lines = []
    if host:
        lines.append(f"Host: {host}\n")
    if published is not None:
        lines.append(f"Published: {format_time(published)}\n")
    body = key.certificate_pem if key.certificate_pem is not None else key.public_pem
    return "".join(lines).encode("ascii") + body + b"".join(intermediates)


def saturating_add(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta``, or the last (first) representable moment instead of overflowing:
    a certificate's notAfter of 9999-12-31 plus a grace is "never"."""
    try:
        return moment + delta
    except OverflowError:
        return (datetime.max if delta > timedelta(0) else datetime.min).replace(tzinfo=UTC)


def parse_pem_bundle(
    data: bytes, known: Mapping[bytes, KeyInfo] | None = None
) -> tuple[list[KeyInfo], list[str]]:
    """Every key of a PEM bundle (certificates or public keys) and the problems found.

    Used for the bundle on disk, which the old watcher filled with certificates
    and sakeystate fills with public keys. ``known`` maps PEM blocks to what
    ``parse_key_pem`` returns for them; those blocks are not parsed again.
    """
    keys: list[KeyInfo] = []
    problems: list[str] = []
    known = known or {}
    for number, match in enumerate(_PEM_BLOCK_RE.finditer(data), start=1):
        block = match.group(0)
        seen = known.get(block)
        if seen is not None:
            keys.append(seen)
            continue
        try:
            keys.append(parse_key_pem(block))
        except KeyRejected as exc:
            problems.append(f"block {number}: {exc}")
    if not keys and data.strip() and not problems:
        problems.append("no PEM block found")
    return keys, problems
