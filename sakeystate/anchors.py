"""Trust anchors: does a cluster CA certify a key found in etcd for its Host?

Pure: the caller passes the ``ca_file`` bytes, the value's certificate and
intermediates, its ``Host:`` and the time; nothing here reads a file or a clock.

Path validation is cryptography's X.509 verifier (``cryptography.x509.verification``),
never a hand-written chain check. Its web-PKI defaults are relaxed only where a
service-account certificate legitimately differs from a TLS one, and kept
everywhere else:
- the leaf may carry any extended key usage or none (cfssl's
  ``service-account-management`` profile has none; other PKIs reuse client or
  server profiles), and need not carry a SAN (the seed PKI's ``CN=sa`` leaves);
- a CA's EKU, when present, is not held against the leaf's use, for the same reason;
- an authority key identifier is optional on the leaf (older CAs omit it; the
  signature, not the AKI, proves the issuer).
Still enforced by the library: signatures, validity at the verification time of
every certificate in the path, basicConstraints CA with keyCertSign on every
issuer, path length constraints, a leaf that is not a CA, key sizes and
algorithms.

A leaf that chains is then bound to its use (contract, "Trust"): with ``common_name``
its subject CN must be exactly that; without it the leaf's own names (DNS SANs,
or a fully qualified CN) must include the Host.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from sakeystate.errors import SakeystateError

# Anything the parser or verifier may raise for hostile bytes; all become verdicts.
_BAD_INPUT = (
    ValueError,
    TypeError,
    VerificationError,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,  # not a ValueError: hypothesis found it (a version byte of 1)
)
_PEM_LABEL_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_FQDN_RE = re.compile(
    r"(?=.{4,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?",
    re.IGNORECASE,
)
# The verifier names the certificate it stopped at; the reason already says which.
_ENCOUNTERED_RE = re.compile(r" \(encountered processing <Certificate\(.*\)>\)$", re.DOTALL)

_LEAF_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None
)


@dataclass(frozen=True)
class Anchor:
    """One ``trust_anchors`` entry, with its ``ca_file`` already read."""

    name: str
    ca_pems: bytes
    hosts: tuple[str, ...]
    common_name: str | None = None
    # How far a leaf's notBefore may be ahead of this host's clock: a renewal issued
    # seconds ago on a machine whose clock runs a little ahead is still valid now.
    clock_skew: timedelta = timedelta(minutes=5)


@dataclass(frozen=True)
class Verdict:
    """Whether an anchor certifies a value, and the sentence that says why (or why not)."""

    trusted: bool
    reason: str
    issuer: str | None = None


def load_roots(ca_pem: bytes, source: str) -> list[x509.Certificate]:
    """The certificates of a ``ca_file``; raises SakeystateError naming ``source``.

    A CA file holds certificates only: a private key in it is refused outright
    (it must not be read, let alone copied), as is any other PEM block.
    """
    labels = {match.group(1) for match in _PEM_LABEL_RE.finditer(ca_pem)}
    if any(b"PRIVATE KEY" in label for label in labels):
        raise SakeystateError(f"{source}: contains a private key; a CA file holds certificates")
    others = sorted(label.decode("ascii") for label in labels - {b"CERTIFICATE"})
    if others:
        raise SakeystateError(
            f"{source}: holds a {others[0]} PEM block; a CA file holds only CERTIFICATE blocks"
        )
    if not labels:
        raise SakeystateError(f"{source}: no CERTIFICATE PEM block found")
    try:
        return x509.load_pem_x509_certificates(ca_pem)
    except _BAD_INPUT as exc:
        raise SakeystateError(f"{source}: a certificate cannot be parsed: {exc}") from None


@lru_cache(maxsize=64)
def _store(ca_pems: bytes, name: str) -> Store:
    """Each anchor's roots are parsed once per process, not once per key."""
    return Store(load_roots(ca_pems, f"trust anchor {name}: ca_file"))


@lru_cache(maxsize=256)
def _verifier(ca_pems: bytes, name: str, moment: datetime) -> ClientVerifier:
    """Most keys of one plan share a verification time (``at``): one verifier for them."""
    return (
        PolicyBuilder()
        .store(_store(ca_pems, name))
        .time(moment)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_LEAF_POLICY)
        .build_client_verifier()
    )


@lru_cache(maxsize=64)
def _host_set(hosts: tuple[str, ...]) -> frozenset[str]:
    """An anchor's hosts, lower-cased once (DNS names are case-insensitive)."""
    return frozenset(name.lower() for name in hosts)


def _display_name(name: x509.Name) -> str:
    """A CA as people name it: its CN, else the whole distinguished name."""
    common_names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) == 1 and isinstance(common_names[0].value, str):
        return common_names[0].value
    return name.rfc4514_string()


def _issuer_text(cert: x509.Certificate) -> str:
    """The issuer a certificate claims, quoted, for a reason it failed."""
    try:
        return repr(cert.issuer.rfc4514_string())
    except _BAD_INPUT:
        return "an unreadable issuer"


def _subject_text(cert: x509.Certificate) -> str:
    try:
        return repr(cert.subject.rfc4514_string())
    except _BAD_INPUT:
        return "an unreadable subject"


def _common_name(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str):
        return None
    return values[0].value


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The host names a certificate is issued to: its DNS SANs, else a fully qualified CN.

    Lower-cased (DNS names are case-insensitive). Wildcards are returned as
    written and so never equal a host name.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = tuple(name.lower() for name in san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = ()
    if dns_names:
        return dns_names
    cn = _common_name(cert)
    if cn is not None and _FQDN_RE.fullmatch(cn):
        return (cn.lower(),)
    return ()


def _binding_problem(anchor: Anchor, cert: x509.Certificate, host: str) -> str | None:
    """Why this leaf is not bound to publishing a service-account key for ``host``."""
    if anchor.common_name is not None:
        cn = _common_name(cert)
        if cn is None:
            return f"leaf has no single subject CN; the anchor requires {anchor.common_name!r}"
        if cn != anchor.common_name:
            return f"leaf CN {cn!r} is not {anchor.common_name!r}"
        return None
    names = certificate_names(cert)
    if host.lower() not in names:
        shown = ", ".join(names) if names else "none"
        return f"leaf names ({shown}) do not include Host {host}"
    return None


def _parse_certificates(
    leaf_pem: bytes, intermediates: Sequence[bytes]
) -> tuple[x509.Certificate, list[x509.Certificate]] | str:
    """The leaf and intermediates as certificates, or what is wrong with the bytes."""
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
    except _BAD_INPUT as exc:
        return f"leaf certificate cannot be parsed: {exc}"
    chain = []
    for number, block in enumerate(intermediates, start=1):
        try:
            chain.append(x509.load_pem_x509_certificate(block))
        except _BAD_INPUT as exc:
            return f"intermediate {number} cannot be parsed: {exc}"
    return leaf, chain


def _precheck(leaf_pem: bytes | None, host: str | None) -> str | None:
    """The reasons no anchor can trust a value, whatever its CA."""
    if leaf_pem is None or (
        b"-----BEGIN PUBLIC KEY-----" in leaf_pem and b"-----BEGIN CERTIFICATE-----" not in leaf_pem
    ):
        return "no certificate (a bare PUBLIC KEY cannot be verified)"
    if not host:
        return "no Host header"
    return None


def verification_time(at: datetime, not_before: datetime | None, skew: timedelta) -> datetime:
    """Now, or the leaf's notBefore when that is at most ``skew`` ahead.

    Never a moment the certificate chooses beyond that: verifying as of a leaf's
    notAfter (or a notBefore far ahead) would let a leaf backdated into an expired
    intermediate's validity, or future-dated under a not-yet-valid one, be trusted by
    whoever holds a retired CA key. A key trusted once keeps its trust through the
    bundle (the planner's job), so a late renewal never drops it.
    """
    moment = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    if not_before is not None and moment < not_before <= moment + skew:
        return not_before
    return moment


def _no_issuer(leaf: x509.Certificate, chain: Sequence[x509.Certificate], ca_pems: bytes) -> bool:
    """Whether neither the value's intermediates nor the ca_file hold a certificate
    whose subject is the leaf's issuer (the verifier then only says "exhausted")."""
    try:
        issuer = leaf.issuer
        if issuer == leaf.subject:
            return False  # self-issued: no file holds its issuer, and none should
        candidates = [*chain, *_store_certificates(ca_pems)]
        return all(cert.subject != issuer for cert in candidates)
    except _BAD_INPUT:
        return False


@lru_cache(maxsize=64)
def _store_certificates(ca_pems: bytes) -> tuple[x509.Certificate, ...]:
    return tuple(x509.load_pem_x509_certificates(ca_pems))


def _check(
    anchor: Anchor, leaf_pem: bytes, intermediates: Sequence[bytes], host: str, at: datetime
) -> tuple[str, str | None]:
    """("", issuer) when the anchor certifies the value, else (reason, None)."""
    if host.lower() not in _host_set(anchor.hosts):
        return f"host {host} not in the anchor's hosts", None
    parsed = _parse_certificates(leaf_pem, intermediates)
    if isinstance(parsed, str):
        return parsed, None
    leaf, chain = parsed
    try:
        moment = verification_time(at, leaf.not_valid_before_utc, anchor.clock_skew)
        verified = _verifier(anchor.ca_pems, anchor.name, moment).verify(leaf, chain).chain
    except _BAD_INPUT as exc:
        if _no_issuer(leaf, chain, anchor.ca_pems):
            return (
                f"no issuer of {_subject_text(leaf)} (issued by {_issuer_text(leaf)}) in the "
                "value or in the anchor's ca_file: publish the chained file (leaf, then "
                "intermediate) or add the intermediate to ca_file"
            ), None
        message = _ENCOUNTERED_RE.sub("", str(exc))
        return (
            f"certificate issued by {_issuer_text(leaf)} does not chain to "
            f"the anchor's ca_file ({message})"
        ), None
    try:
        problem = _binding_problem(anchor, leaf, host)
        # A chain of one: the ca_file lists the leaf itself; its issuer is still the CA.
        issuer = _display_name(verified[1].subject if len(verified) > 1 else leaf.issuer)
    except _BAD_INPUT as exc:
        return f"leaf certificate cannot be read: {exc}", None
    if problem is not None:
        return problem, None
    return "", issuer


def verify(
    anchor: Anchor,
    leaf_pem: bytes | None,
    intermediates: Sequence[bytes],
    host: str | None,
    at: datetime,
) -> Verdict:
    """Does ``anchor`` certify this value (leaf, intermediates, Host) as of ``at``?

    Never raises for any value bytes; raises SakeystateError only when the
    anchor's own ``ca_file`` bytes hold no usable certificate.
    """
    problem = _precheck(leaf_pem, host)
    if problem is not None or leaf_pem is None or host is None:
        return Verdict(False, f"anchor {anchor.name}: {problem}")
    reason, issuer = _check(anchor, leaf_pem, intermediates, host, at)
    if issuer is None:
        return Verdict(False, f"anchor {anchor.name}: {reason}")
    return Verdict(True, f"anchor {anchor.name}: certificate for {host} issued by {issuer}", issuer)


def verify_any(
    anchors: Sequence[Anchor],
    leaf_pem: bytes | None,
    intermediates: Sequence[bytes],
    host: str | None,
    at: datetime,
) -> Verdict:
    """The first anchor that certifies the value, else every anchor's reason in one line."""
    if not anchors:
        return Verdict(False, "no trust anchors")
    problem = _precheck(leaf_pem, host)
    if problem is not None:
        return Verdict(False, problem)
    verdicts = []
    for anchor in anchors:
        verdict = verify(anchor, leaf_pem, intermediates, host, at)
        if verdict.trusted:
            return verdict
        verdicts.append(verdict.reason)
    return Verdict(False, "; ".join(verdicts))
