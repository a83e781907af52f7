"""Key identity and acceptance: PEM parsing, the kid, accepted key types.

Pure: bytes in, values out, and every byte is hostile: no exception but
``KeyRejected`` (or ``ValueError`` from the small text helpers) leaves this module.
The kid is exactly what kube-apiserver puts in the ``kid`` header of the tokens
it signs: base64url (no padding) of the SHA-256 of the DER-encoded
SubjectPublicKeyInfo.

Two readers, on purpose:

- etcd values and ``--cert`` files are sakeystate's own format and are read
  strictly (``parse_value``, ``parse_key_file``): headers, one leaf, its
  intermediates, nothing else.
- the bundle is read exactly as kube-apiserver reads ``--service-account-key-file``
  (``parse_pem_bundle``): a port of Go's ``encoding/pem.Decode`` and of
  ``k8s.io/client-go/util/keyutil.ParsePublicKeysPEM``, so "in the bundle now"
  means what the apiserver verifies, not what a stricter reader would see.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from sakeystate.errors import KeyRejected

# Imported once here, not per call: a function-level import costs ~40 us per parsed
# value, 0.4 s of a 10,000-key converge.
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# A hostile certificate (a zero or negative serial) would print a Python warning, with
# this file's path, on every run; its rejection or acceptance is the message instead.
warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=__name__)

KID_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_HEX_FINGERPRINT_RE = re.compile(r"^sha256:([0-9a-fA-F:]+)$")
# An etcd value is a header, a certificate and a few intermediates; anything this
# large is not that.
MAX_VALUE_BYTES = 64 * 1024
MAX_INTERMEDIATES = 8
# "Host: " and a 253-character name fit with room to spare.
MAX_HEADER_LINE = 300
_PEM_BEGIN_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_PEM_BLOCK_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n[A-Za-z0-9+/=\r\n]*-----END \1-----\r?\n?"
)
_ACCEPTED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
MIN_RSA_BITS = 2048
HEADER_NAMES = ("Host", "Published")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$", re.ASCII)
_FQDN_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+$", re.ASCII)
# C0 controls, DEL and C1 controls: never allowed in a header line.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))$",
    re.ASCII,
)
_NOT_ACCEPTED = (
    "keys are not accepted (kube-apiserver verifies RSA >= 2048 bits and ECDSA P-256/P-384/P-521)"
)
_PRIVATE = "contains a private key; only certificates and public keys are accepted"


# --- times ---------------------------------------------------------------------------------

UTC_MAX = datetime.max.replace(tzinfo=UTC)
UTC_MIN = datetime.min.replace(tzinfo=UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with a Z, the one time format sakeystate writes (4-digit years)."""
    if moment.utcoffset() != timedelta(0):
        try:
            moment = moment.astimezone(UTC)
        except OverflowError:
            moment = UTC_MAX if moment.year > 1 else UTC_MIN
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}Z"
    )


def parse_time(text: str) -> datetime:
    """Strict RFC 3339 (``T``/``Z`` in either case, or a space) as UTC; ValueError otherwise.

    Python's ``fromisoformat`` accepts ISO week dates, missing offsets and more;
    none of those are RFC 3339, so they are refused here. A moment that is not
    representable in UTC (year 1 east of Greenwich) is refused, never overflowed.
    """
    match = _RFC3339_RE.match(text)
    if match is None:
        raise ValueError(f"{text[:60]!r} is not RFC 3339; use a time such as 2026-11-22T10:00:00Z")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    micro = int((match.group(7) or "0").ljust(6, "0")[:6])
    if match.group(8):
        zone = UTC
    else:
        hours, minutes = int(match.group(10)), int(match.group(11))
        if hours > 23 or minutes > 59:
            raise ValueError(f"{text[:60]!r} has an invalid UTC offset")
        offset = timedelta(hours=hours, minutes=minutes)
        zone = timezone(-offset if match.group(9) == "-" else offset)
    if second == 60:
        raise ValueError(f"{text[:60]!r} is a leap second; use :59")
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=zone).astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text[:60]!r} is out of range") from None


def saturating_add(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta``, or the largest/smallest UTC datetime instead of overflowing."""
    try:
        return moment + delta
    except OverflowError:
        return UTC_MAX if delta > timedelta(0) else UTC_MIN


# --- kids and fingerprints -----------------------------------------------------------------


def _spki_der(public_key: PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _kid_of_der(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def kid_of(public_key: PublicKey) -> str:
    """The Kubernetes kid of a public key."""
    return _kid_of_der(_spki_der(public_key))


def _pem_of_der(der: bytes, label: bytes = b"PUBLIC KEY") -> bytes:
    """PEM of DER, byte for byte as cryptography writes it (64 columns)."""
    body = base64.b64encode(der)
    lines = b"".join(body[i : i + 64] + b"\n" for i in range(0, len(body), 64))
    return b"-----BEGIN " + label + b"-----\n" + lines + b"-----END " + label + b"-----\n"


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


# --- the parsed values ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """A public key, and the facts of its certificate when it came in one.

    Computed once at parse time: the planner and the trust anchors read the
    names of thousands of keys per run.
    """

    kid: str
    algorithm: str
    public_pem: bytes
    certificate_pem: bytes | None = None  # the leaf only
    not_before: datetime | None = None
    not_after: datetime | None = None
    subject_cn: str | None = None  # None unless the subject has exactly one CN
    dns_names: tuple[str, ...] = ()  # DNS SANs, lowercased

    @cached_property
    def issuer(self) -> str | None:
        """The certificate's issuer (RFC 4514), for reports; read on demand, it is rarely used."""
        if self.certificate_pem is None:
            return None
        try:
            return x509.load_pem_x509_certificate(self.certificate_pem).issuer.rfc4514_string()
        except Exception:
            return None


@dataclass(frozen=True)
class EntryValue:
    """A parsed etcd value: optional headers, one key, its certificate's intermediates."""

    key: KeyInfo
    host: str | None = None
    published: datetime | None = None
    intermediates: tuple[bytes, ...] = ()  # CERTIFICATE PEM blocks, leaf's issuer first


def is_host_name(text: str) -> bool:
    """A DNS name: ASCII letters, digits, hyphens and dots, labels <= 63, <= 253 in all."""
    return _HOST_RE.match(text) is not None


def names_of(key: KeyInfo) -> tuple[str, ...]:
    """The host names a certificate is for: its DNS SANs, and its CN when that is an FQDN."""
    cn = key.subject_cn.lower() if key.subject_cn else None
    if cn is None or _FQDN_RE.match(cn) is None or cn in key.dns_names:
        return key.dns_names
    return (*key.dns_names, cn)


# --- acceptance ----------------------------------------------------------------------------


@contextmanager
def _rejecting(what: str) -> Iterator[None]:
    """Turn whatever a parser raises on hostile bytes into one KeyRejected.

    cryptography raises ValueError, TypeError, UnsupportedAlgorithm,
    DuplicateExtension, UnsupportedGeneralNameType... depending on which byte is
    wrong; all of them mean the same thing here. Messages never carry input bytes.
    """
    try:
        yield
    except KeyRejected:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise KeyRejected(f"{what} cannot be parsed: {detail}") from None


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
    raise KeyRejected(f"{kind} {_NOT_ACCEPTED}")


def _algorithm_name(public_key: PublicKey) -> str:
    """``RSA-<bits>`` or ``ECDSA-<curve>``, for any key kube-apiserver may load."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    name = public_key.curve.name
    return f"ECDSA-{_ACCEPTED_CURVES.get(name, 'P-224' if name == 'secp224r1' else name)}"


def _public_key_of(cert: x509.Certificate) -> object:
    """The certificate's key; an algorithm cryptography cannot load is named, not a crash."""
    try:
        return cert.public_key()
    except Exception:
        der = cert.public_bytes(serialization.Encoding.DER)
        raise KeyRejected(f"{_spki_algorithm_of_cert(der)} {_NOT_ACCEPTED}") from None


def _cert_facts(cert: x509.Certificate) -> tuple[bool, str | None, tuple[str, ...]]:
    """(is a CA, subject CN, DNS SANs lowercased) of a parsed certificate."""
    extensions = cert.extensions  # raises on duplicate or malformed extensions
    is_ca = False
    dns: tuple[str, ...] = ()
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints):
            is_ca = value.ca
        elif isinstance(value, x509.SubjectAlternativeName):
            dns = tuple(name.lower() for name in value.get_values_for_type(x509.DNSName))
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if len(cns) == 1 and isinstance(cns[0].value, str) else None
    return is_ca, cn, dns


def _cert_key_info(
    cert: x509.Certificate,
    block: bytes,
    public_key: PublicKey,
    facts: tuple[bool, str | None, tuple[str, ...]],
) -> KeyInfo:
    """A certificate's key and facts (from ``_cert_facts``); ``block`` is its PEM."""
    _is_ca, cn, dns = facts
    spki = _spki_der(public_key)
    return KeyInfo(
        kid=_kid_of_der(spki),
        algorithm=_algorithm_name(public_key),
        public_pem=_pem_of_der(spki),
        certificate_pem=block,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        subject_cn=cn,
        dns_names=dns,
    )


def _leaf_info(cert: x509.Certificate, block: bytes) -> KeyInfo:
    """An accepted leaf certificate (never a CA) as a KeyInfo; ``block`` is its PEM."""
    public_key, _algorithm = _check_accepted(_public_key_of(cert))
    facts = _cert_facts(cert)
    if facts[0]:
        raise KeyRejected(
            f"certificate {_subject_of(cert)} is a CA certificate; "
            "CA keys are never service-account keys"
        )
    return _cert_key_info(cert, block, public_key, facts)


def _subject_of(cert: x509.Certificate) -> str:
    """The subject of a certificate for messages (escaped by repr, capped)."""
    return repr(cert.subject.rfc4514_string()[:80])


# --- values and --cert files: sakeystate's own strict format --------------------------------


def _pem_blocks(pem: bytes) -> list[tuple[str, bytes]]:
    """The (label, block) sequence of a value's PEM part; nothing else may be there."""
    whole = _PEM_BLOCK_RE.fullmatch(pem.strip() + b"\n")
    if whole is not None and whole.group(1) in (b"CERTIFICATE", b"PUBLIC KEY"):
        # The usual value: exactly one well-formed block and nothing else.
        return [(whole.group(1).decode("ascii"), whole.group(0))]
    labels = [m.group(1).decode("ascii") for m in _PEM_BEGIN_RE.finditer(pem)]
    if b"PRIVATE KEY" in pem:
        # Say what it is, never echo it: the bytes stay where they are.
        raise KeyRejected(_PRIVATE)
    if not labels:
        raise KeyRejected("no PEM block found (expected CERTIFICATE or PUBLIC KEY)")
    blocks: list[tuple[str, bytes]] = []
    position = 0
    for match in _PEM_BLOCK_RE.finditer(pem):
        if pem[position : match.start()].strip():
            raise KeyRejected("unexpected text around the PEM blocks")
        blocks.append((match.group(1).decode("ascii"), match.group(0)))
        position = match.end()
    if len(blocks) != len(labels):
        label = labels[len(blocks)] if len(blocks) < len(labels) else labels[-1]
        raise KeyRejected(f"{label} PEM block is truncated or malformed")
    if pem[position:].strip():
        raise KeyRejected("unexpected text around the PEM blocks")
    return blocks


def _canonical(block: bytes) -> bytes:
    """A block with LF line ends and a final newline, as stored and compared."""
    return block.replace(b"\r\n", b"\n").rstrip(b"\n") + b"\n"


def _load_certificate(block: bytes, what: str) -> x509.Certificate:
    with _rejecting(what):
        return x509.load_pem_x509_certificate(block)


def _intermediates(leaf: x509.Certificate, blocks: list[tuple[str, bytes]]) -> tuple[bytes, ...]:
    """The leaf's chain as read: CA certificates, each issuing the one before it."""
    if len(blocks) > MAX_INTERMEDIATES:
        raise KeyRejected(
            f"{len(blocks)} intermediates follow the certificate; at most "
            f"{MAX_INTERMEDIATES} are allowed"
        )
    chain = []
    child = leaf
    for number, (label, block) in enumerate(blocks, start=2):
        if label != "CERTIFICATE":
            raise KeyRejected(
                f"PEM block {number} is {label!r}; only CERTIFICATE intermediates may "
                "follow the certificate"
            )
        cert = _load_certificate(block, f"intermediate certificate {number}")
        with _rejecting(f"intermediate certificate {number}"):
            is_ca = _cert_facts(cert)[0]
            issues_child = cert.subject == child.issuer
        if not is_ca:
            raise KeyRejected(
                f"PEM block {number} ({_subject_of(cert)}) is not a CA certificate, "
                "so it cannot be an intermediate"
            )
        if not issues_child:
            raise KeyRejected(
                f"PEM block {number} ({_subject_of(cert)}) did not issue the "
                "certificate before it; intermediates must follow the leaf in order"
            )
        chain.append(_canonical(block))
        child = cert
    return tuple(chain)


def parse_key_file(pem: bytes) -> tuple[KeyInfo, tuple[bytes, ...]]:
    """One CERTIFICATE or PUBLIC KEY of an accepted type, then the certificate's intermediates.

    The cfssl "leaf + intermediate" file is a value: the leaf first, then the CA
    certificates up the chain. A CA certificate is never the leaf, a private key
    is never anywhere.
    """
    if len(pem) > MAX_VALUE_BYTES:
        raise KeyRejected(f"{len(pem)} bytes, over the {MAX_VALUE_BYTES}-byte limit")
    blocks = _pem_blocks(pem)
    label, block = blocks[0]
    if label not in ("CERTIFICATE", "PUBLIC KEY"):
        raise KeyRejected(
            f"PEM block {label!r} is not accepted (expected CERTIFICATE or PUBLIC KEY)"
        )
    if label == "PUBLIC KEY":
        if len(blocks) > 1:
            raise KeyRejected(
                "a PUBLIC KEY must be alone; only a certificate may be followed by intermediates"
            )
        with _rejecting(label):
            public_key = serialization.load_pem_public_key(block)
        checked, algorithm = _check_accepted(public_key)
        spki = _spki_der(checked)
        return KeyInfo(kid=_kid_of_der(spki), algorithm=algorithm, public_pem=_pem_of_der(spki)), ()
    with _rejecting(label):
        cert = x509.load_pem_x509_certificate(block)
        # The block as read: it parsed as exactly this certificate.
        info = _leaf_info(cert, _canonical(block))
    return info, _intermediates(cert, blocks[1:])


def parse_key_pem(pem: bytes) -> KeyInfo:
    """Exactly one CERTIFICATE or PUBLIC KEY block of an accepted key type."""
    key, intermediates = parse_key_file(pem)
    if intermediates:
        raise KeyRejected(f"{1 + len(intermediates)} PEM blocks found; exactly one is allowed")
    return key


def _parse_headers(text: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw in text.split("\n"):
        line = raw.removesuffix("\r")
        if len(line) > MAX_HEADER_LINE:
            raise KeyRejected(f"header line of {len(line)} characters (at most {MAX_HEADER_LINE})")
        if _CONTROL_RE.search(line):
            raise KeyRejected(f"header line {line[:60]!r} contains a control character")
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        if not sep or name not in HEADER_NAMES:
            raise KeyRejected(f"unexpected header line {line[:60]!r} (allowed: Host, Published)")
        if name in headers:
            raise KeyRejected(f"header {name} appears twice")
        headers[name] = value.strip()
    host = headers.get("Host")
    if host and not is_host_name(host):
        raise KeyRejected(
            f"Host header {host[:60]!r} is not a DNS name "
            "(letters, digits, hyphens and dots; labels <= 63, <= 253 characters)"
        )
    return headers


def _published(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        why = "out of range" if "out of range" in str(exc) else "not RFC 3339"
        raise KeyRejected(f"Published header {text[:40]!r} is {why}") from None


def parse_value(data: bytes) -> EntryValue:
    """An etcd value: ``Host:``/``Published:`` header lines, then the leaf and its chain."""
    if len(data) > MAX_VALUE_BYTES:
        raise KeyRejected(f"value is {len(data)} bytes, over the {MAX_VALUE_BYTES}-byte limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyRejected("value is not UTF-8 text") from None
    start = data.find(b"-----BEGIN")
    if start < 0:
        if "PRIVATE KEY" in text:
            raise KeyRejected(_PRIVATE)
        raise KeyRejected("no PEM block found (expected CERTIFICATE or PUBLIC KEY)")
    headers = _parse_headers(data[:start].decode("utf-8"))
    published = _published(headers["Published"]) if "Published" in headers else None
    key, intermediates = parse_key_file(data[start:])
    return EntryValue(
        key=key,
        host=headers.get("Host") or None,
        published=published,
        intermediates=intermediates,
    )


def render_value(
    key: KeyInfo,
    host: str | None,
    published: datetime | None,
    intermediates: tuple[bytes, ...] = (),
) -> bytes:
    """The etcd value: headers, the certificate (or public key), then its intermediates.

    The leaf comes first so ``openssl x509`` reading the value sees the leaf.
    """
    lines = []
    if host:
        lines.append(f"Host: {host}\n")
    if published is not None:
        lines.append(f"Published: {format_time(published)}\n")
    body = key.certificate_pem if key.certificate_pem is not None else key.public_pem
    return "".join(lines).encode("ascii") + body + b"".join(intermediates)


# --- DER: just enough structure to see what Go's parsers see -------------------------------

_OID_RSA = "1.2.840.113549.1.1.1"
_OID_EC = "1.2.840.10045.2.1"
# The curves Go's crypto/x509 parses (P-224 included); anything else fails in Go.
_GO_CURVES = {
    "1.3.132.0.33": "secp224r1",
    "1.2.840.10045.3.1.7": "secp256r1",
    "1.3.132.0.34": "secp384r1",
    "1.3.132.0.35": "secp521r1",
}
_ALGORITHM_NAMES = {
    "1.3.101.112": "Ed25519",
    "1.3.101.113": "Ed448",
    "1.3.101.110": "X25519",
    "1.3.101.111": "X448",
    "1.2.840.10040.4.1": "DSA",
    "1.2.840.10046.2.1": "DH",
    "1.2.840.113549.1.1.10": "RSA-PSS",
    "1.2.643.2.2.19": "GOST R 34.10-2001",
    "1.2.643.7.1.1.1.1": "GOST R 34.10-2012 (256 bit)",
    "1.2.643.7.1.1.1.2": "GOST R 34.10-2012 (512 bit)",
    "1.2.156.10197.1.301": "SM2",
}
_CURVE_NAMES = {
    "1.3.132.0.10": "secp256k1",
    "1.3.132.0.16": "sect283k1",
    "1.3.132.0.17": "sect283r1",
    "1.3.132.0.36": "sect409k1",
    "1.3.132.0.38": "sect571k1",
    "1.2.156.10197.1.301": "SM2",
    "1.3.36.3.3.2.8.1.1.7": "brainpoolP256r1",
}


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``; ValueError if bad."""
    if pos + 2 > end:
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("unsupported DER tag")
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > end:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > end:
        raise ValueError("truncated DER")
    return tag, start, start + length


@dataclass(frozen=True)
class _Element:
    tag: int
    pos: int  # where its tag byte is
    start: int  # where its content starts
    end: int


def _children(data: bytes, start: int, end: int) -> list[_Element]:
    """The first few elements inside a constructed element's content."""
    out: list[_Element] = []
    while start < end and len(out) < 12:
        tag, content, after = _tlv(data, start, end)
        out.append(_Element(tag, start, content, after))
        start = after
    return out


def _oid(content: bytes) -> str:
    parts: list[int] = []
    value = 0
    for byte in content:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            parts.append(value)
            value = 0
    if not parts:
        return "?"
    head = min(parts[0] // 40, 2)
    return ".".join(str(p) for p in (head, parts[0] - 40 * head, *parts[1:]))


def _cert_spki(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo element of a DER certificate."""
    _tag, start, end = _tlv(der, 0, len(der))
    _tag, tbs_start, tbs_end = _tlv(der, start, end)
    fields = _children(der, tbs_start, tbs_end)
    index = 6 if fields and fields[0].tag == 0xA0 else 5
    if len(fields) <= index or fields[index].tag != 0x30:
        raise ValueError("no SubjectPublicKeyInfo")
    return der[fields[index].pos : fields[index].end]


def _spki_parts(spki: bytes) -> tuple[str, bytes, bytes]:
    """(algorithm OID, parameters element, key BIT STRING content) of an SPKI."""
    tag, start, end = _tlv(spki, 0, len(spki))
    fields = _children(spki, start, end)
    if tag != 0x30 or end != len(spki) or len(fields) != 2:
        raise ValueError("not a SubjectPublicKeyInfo")
    if fields[0].tag != 0x30 or fields[1].tag != 0x03:
        raise ValueError("not a SubjectPublicKeyInfo")
    algorithm = _children(spki, fields[0].start, fields[0].end)
    if not algorithm or algorithm[0].tag != 0x06 or len(algorithm) > 2:
        raise ValueError("bad AlgorithmIdentifier")
    oid = _oid(spki[algorithm[0].start : algorithm[0].end])
    params = spki[algorithm[1].pos : algorithm[1].end] if len(algorithm) == 2 else b""
    return oid, params, spki[fields[1].start : fields[1].end]


def _spki_algorithm_of_cert(der: bytes) -> str:
    """A name for the key algorithm of a certificate, for a rejection message."""
    try:
        oid, params, _bits = _spki_parts(_cert_spki(der))
    except ValueError:
        return "an unknown algorithm's"
    if oid == _OID_EC:
        curve = _oid(params[2:]) if params[:1] == b"\x06" else "explicit parameters"
        return f"ECDSA ({_CURVE_NAMES.get(curve, curve)})"
    if oid == _OID_RSA:
        return "RSA (unparseable)"
    return _ALGORITHM_NAMES.get(oid, f"algorithm {oid}")


# --- the bundle, read as kube-apiserver reads it -------------------------------------------

_BEGIN = b"-----BEGIN "
_END = b"-----END "
_DASHES = b"-----"
# Go's base64.StdEncoding after '\r' and '\n' are dropped: padded, canonical quanta.
_GO_BASE64_RE = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


@dataclass(frozen=True)
class _Block:
    """One block as Go's ``pem.Decode`` returns it, and where it sat in the input."""

    label: bytes
    der: bytes
    start: int  # the B of -----BEGIN
    end: int  # after the END line's newline
    known: KeyInfo | None = None  # the block is byte-identical to this key's PEM


def _get_line(data: bytes, pos: int) -> tuple[bytes, int]:
    """Go's ``getLine``: the line at ``pos`` without CR/LF and trailing spaces/tabs."""
    i = data.find(b"\n", pos)
    if i < 0:
        i = j = len(data)
    else:
        j = i + 1
        if i > pos and data[i - 1] == 0x0D:
            i -= 1
    return data[pos:i].rstrip(b" \t"), j


def _go_base64(body: bytes) -> bytes | None:
    """Go's ``base64.StdEncoding.Decode`` of a PEM body (spaces and tabs already gone)."""
    text = body.translate(None, b"\r\n")
    if _GO_BASE64_RE.fullmatch(text) is None:
        return None
    return binascii.a2b_base64(text)


def _go_pem_decode(
    data: bytes, pos: int, known: Mapping[bytes, KeyInfo] | None = None
) -> _Block | None:
    """A port of Go's ``encoding/pem.Decode`` on ``data[pos:]`` (offsets, no copies).

    BEGIN at the start or after a newline; trailing spaces/tabs after the BEGIN
    and END lines are ignored; ``Key: value`` header lines; spaces, tabs, CR and
    LF inside the base64 are ignored; a block that does not decode is skipped
    and the scan resumes after its header lines. A block byte-identical to a
    ``known`` PEM is returned as that key without decoding its base64 again
    (it is valid base64 by construction).

    Ported from the loop that Go 1.19 (the version tests/go/keyload builds) shares
    with later releases up to 2025's linear rewrite, which picks the same blocks
    for every layout a writer produces.

    Linear time on hostile input, where this version of Go is quadratic: the next
    END is searched once, not once per BEGIN, and a body holding a ``-`` (never
    base64) fails without being decoded. Both shortcuts give Go's result.
    """
    rest = pos
    size = len(data)
    next_end = -2  # the first "\n-----END " at or after the last search start; -1: none
    while True:
        if data.startswith(_BEGIN, rest):
            rest += len(_BEGIN)
        else:
            found = data.find(b"\n" + _BEGIN, rest)
            if found < 0:
                return None
            rest = found + 1 + len(_BEGIN)
        start = rest - len(_BEGIN)
        type_line, rest = _get_line(data, rest)
        if not type_line.endswith(_DASHES):
            continue
        label = type_line[: -len(_DASHES)]
        headers = 0
        while True:
            if rest >= size:
                return None
            line, following = _get_line(data, rest)
            if b":" not in line:
                break
            headers += 1
            rest = following
        if not headers and data.startswith(_END, rest):
            end_index, trailer = rest, rest + len(_END)
        else:
            if next_end == -2 or 0 <= next_end < rest:
                next_end = data.find(b"\n" + _END, rest)
            if next_end < 0:
                return None  # Go tries each later BEGIN and finds no END for any of them
            end_index, trailer = next_end, next_end + 1 + len(_END)
        trailer_end = trailer + len(label) + len(_DASHES)
        if trailer_end > size:
            continue
        if not data.startswith(label, trailer) or not data.startswith(
            _DASHES, trailer_end - len(_DASHES)
        ):
            continue
        if _get_line(data, trailer_end)[0]:
            continue
        # Go: getLine(rest[endIndex+len(pemEnd)-1:]), the rest of the END line.
        block_end = _get_line(data, end_index + len(_END))[1]
        seen = known.get(data[start:block_end]) if known else None
        if seen is not None:
            return _Block(label, b"", start, block_end, seen)
        if data.find(b"-", rest, end_index) >= 0:
            continue
        der = _go_base64(data[rest:end_index].translate(None, b" \t"))
        if der is None:
            continue
        return _Block(label, der, start, block_end)


def _go_pkix_is_rsa_or_ecdsa(spki: bytes) -> bool:
    """What Go's ``ParsePKIXPublicKey`` requires before it returns an RSA or ECDSA key."""
    oid, params, bits = _spki_parts(spki)
    if oid == _OID_RSA:
        return params == b"\x05\x00"
    if oid == _OID_EC:
        # A named curve Go knows, and an uncompressed point (Go rejects compressed ones).
        named = params[:1] == b"\x06" and _oid(params[2:]) in _GO_CURVES
        return named and bits[:2] == b"\x00\x04"
    return False


def _go_private_public_key(der: bytes, second_tag: int) -> PublicKey | None:
    """keyutil's parseRSAPrivateKey and parseECPrivateKey: the public half Go takes.

    PKCS#1 and PKCS#8 are tried for RSA only; for ECDSA only SEC 1 (Go's
    ``ParseECPrivateKey``), so a PKCS#8 ECDSA key is not loaded, as in Go.
    """
    if second_tag == 0x04:  # SEC 1 ECPrivateKey; Go ignores trailing bytes
        end = _tlv(der, 0, len(der))[2]
        private = serialization.load_der_private_key(der[:end], None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            return None
        if private.curve.name not in _GO_CURVES.values():
            return None
        # Go derives the public key from the scalar; the embedded point is ignored.
        value = private.private_numbers().private_value
        return ec.derive_private_key(value, private.curve).public_key()
    if second_tag == 0x30 and _oid(_pkcs8_algorithm(der)) != _OID_RSA:
        return None  # Go's ParsePKCS8PrivateKey knows no RSA-PSS; ECDSA is not RSA
    private = serialization.load_der_private_key(der, None)
    if isinstance(private, rsa.RSAPrivateKey):
        return private.public_key()
    return None


def _pkcs8_algorithm(der: bytes) -> bytes:
    """The algorithm OID content of a PKCS#8 PrivateKeyInfo."""
    _tag, start, end = _tlv(der, 0, len(der))
    algorithm = _children(der, start, end)[1]
    oid = _children(der, algorithm.start, algorithm.end)[0]
    return der[oid.start : oid.end]


def _go_load(der: bytes) -> tuple[PublicKey, x509.Certificate | None, str] | None:
    """The key keyutil.ParsePublicKeysPEM takes from one block's DER, or None if it skips it.

    Returns (public key, certificate if it came in one, what the block was).
    Which parser applies is decided by the DER's shape (the four structures are
    disjoint); cryptography then does the number crunching.
    """
    tag, start, end = _tlv(der, 0, len(der))
    fields = _children(der, start, end)
    if tag != 0x30 or len(fields) < 2:
        return None
    first, second = fields[0].tag, fields[1].tag
    if first == 0x02:
        if end != len(der) and second != 0x04:
            return None
        derived = _go_private_public_key(der, second)
        return (derived, None, "private key") if derived is not None else None
    if end != len(der) or first != 0x30:
        return None
    if len(fields) == 2:
        if not _go_pkix_is_rsa_or_ecdsa(der):
            return None
        spki_key = serialization.load_der_public_key(der)
        return (spki_key, None, "public key") if isinstance(spki_key, PublicKey) else None
    if len(fields) != 3 or not _go_pkix_is_rsa_or_ecdsa(_cert_spki(der)):
        return None
    cert = x509.load_der_x509_certificate(der)
    cert_key = cert.public_key()
    return (cert_key, cert, "certificate") if isinstance(cert_key, PublicKey) else None


def _bundle_key(block: _Block, number: int, problems: list[str]) -> KeyInfo | None:
    """The key kube-apiserver loads from one bundle block, with a note when it is not ours."""
    label = repr(block.label[:40].decode("ascii", "replace"))
    try:
        loaded = _go_load(block.der)
        if loaded is None:
            problems.append(f"block {number} ({label}): not a key kube-apiserver loads; skipped")
            return None
        public, cert, kind = loaded
        if cert is None:
            spki = _spki_der(public)
            info = KeyInfo(_kid_of_der(spki), _algorithm_name(public), _pem_of_der(spki))
        else:
            # Raises on duplicate or malformed extensions, as Go's ParseCertificate fails.
            facts = _cert_facts(cert)
            info = _cert_key_info(cert, _pem_of_der(block.der, b"CERTIFICATE"), public, facts)
            if facts[0]:
                problems.append(
                    f"block {number}: a CA certificate; kube-apiserver loads its key {info.kid}"
                )
    except Exception:
        # keyutil skips a block none of its parsers accepts; so does this port.
        problems.append(f"block {number} ({label}): not a key kube-apiserver loads; skipped")
        return None
    if kind == "private key":
        problems.append(
            f"block {number}: a private key; kube-apiserver loads its public key {info.kid}"
        )
    try:
        _check_accepted(public)
    except KeyRejected as exc:
        problems.append(f"block {number}: {exc}; kube-apiserver loads it anyway")
    return info


def parse_pem_bundle(
    data: bytes, known: Mapping[bytes, KeyInfo] | None = None
) -> tuple[list[KeyInfo], list[str]]:
    """Every key kube-apiserver loads from a bundle, in file order, and notes on the rest.

    Exactly ``keyutil.ParsePublicKeysPEM``: the block label is ignored, and a
    certificate, a CA certificate, a public key or even a private key all yield
    a key (the notes say so). ``known`` maps ``PUBLIC KEY`` PEM blocks to what
    ``parse_key_pem`` returns for them; a block byte-identical to one of them is
    that key and is not parsed again, which keeps a 10,000-key no-op run fast.
    """
    keys: list[KeyInfo] = []
    problems: list[str] = []

    position, number = 0, 0
    while True:
        block = _go_pem_decode(data, position, known)
        if block is None:
            break
        number += 1
        position = block.end
        seen = block.known or _bundle_key(block, number, problems)
        if seen is not None:
            keys.append(seen)
    if not keys and data.strip() and not problems:
        problems.append("no PEM block found")
    return keys, problems
