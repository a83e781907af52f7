"""A cfssl-shaped PKI for the tests: an offline root, a per-cluster intermediate, leaves.

The shapes mirror what the deployment sakeystate replaces actually runs (cfssl):
- the root CA: offline, P-384 (or RSA), ``basicConstraints CA`` without a path
  length, ``keyCertSign, cRLSign``;
- one intermediate per cluster: ``CA, pathlen 0``, ``keyCertSign, cRLSign,
  digitalSignature``; it issues the service-account certificates *and* the
  apiserver's serving certificate, kubelet and admin client certificates;
- the service-account leaf (the ``service-account-management`` profile:
  usages "signing, key encipherment"): subject CN ``sa``, no SAN, no EKU;
- leaves named after their host (DNS SAN = the host's FQDN), as other PKIs do.

cfssl's ``bundle`` output (the "chained" file) is the leaf followed by the
intermediate; ``ca_file()`` is what an anchor's ``ca_file`` holds. Private keys
stay reachable so tests can sign tokens with them (ES512 for P-521 leaves,
ES256 for P-256). Key generation is cached: CA keys per (PKI, cluster), and the
slow RSA root key once per session.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sakeystate.keys import kid_of

from support import T0

__all__ = ["T0", "Ca", "Leaf", "Pki", "host", "new_key", "pem", "self_signed"]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
DOMAIN = "example.org"
_CURVES: dict[str, ec.EllipticCurve] = {
    "p256": ec.SECP256R1(),
    "p384": ec.SECP384R1(),
    "p521": ec.SECP521R1(),
}
_EKUS = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}
_serials = itertools.count(0x5A0001)


def host(number: int, site: str = "eqiad") -> str:
    """A fleet host's FQDN, e.g. ``ctrl1002.eqiad.example.org``."""
    return f"ctrl{number}.{site}.{DOMAIN}"


@cache
def _rsa_root_key() -> rsa.RSAPrivateKey:
    """RSA key generation is slow: one per test session."""
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


@cache
def _ca_key(label: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def new_key(curve: str = "p521") -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA key (P-521 by default, as the seed PKI's leaves)."""
    return ec.generate_private_key(_CURVES[curve])


def pem(cert: x509.Certificate) -> bytes:
    """One certificate as a PEM block."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attributes = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "San Francisco"),
    ]
    if org is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attributes)


def _signing_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    """The hash cfssl pairs with the issuer's key (ECDSA-SHA384 for P-384, SHA-256 for RSA)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = key.curve.key_size
        return (
            hashes.SHA512() if size == 521 else hashes.SHA384() if size == 384 else hashes.SHA256()
        )
    return hashes.SHA256()


def _key_usage(*, signing: bool, encipherment: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signing,
        content_commitment=False,
        key_encipherment=encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Ca:
    """A CA certificate and its key."""

    cert: x509.Certificate
    key: PrivateKey
    parent: Ca | None = None

    @property
    def pem(self) -> bytes:
        return pem(self.cert)

    @property
    def cn(self) -> str:
        return str(self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@dataclass(frozen=True)
class Leaf:
    """An issued (or self-signed) certificate, its private key and its issuer."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    issuer: Ca | None

    @property
    def pem(self) -> bytes:
        return pem(self.cert)

    @property
    def chained(self) -> bytes:
        """cfssl's bundle: the leaf, then its intermediate (never the root)."""
        return self.pem + b"".join(pem(cert) for cert in self.intermediates)

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """The CA certificates between this leaf and the root, leaf side first."""
        chain = []
        ca = self.issuer
        while ca is not None and ca.parent is not None:
            chain.append(ca.cert)
            ca = ca.parent
        return tuple(chain)

    @property
    def intermediate_pems(self) -> tuple[bytes, ...]:
        return tuple(pem(cert) for cert in self.intermediates)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def alg(self) -> str:
        """The JWS algorithm kube-apiserver signs with for this key."""
        return {256: "ES256", 384: "ES384", 521: "ES512"}[self.key.curve.key_size]

    @property
    def kid(self) -> str:
        return kid_of(self.key.public_key())


def _build(
    subject: x509.Name,
    public_key: Any,
    issuer_name: x509.Name,
    issuer_key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
    extensions: list[tuple[x509.ExtensionType, bool]],
    aki: bool = True,
) -> x509.Certificate:
    """A certificate as cfssl writes one: SKI always, AKI unless self-signed (or ``aki=False``)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(next(_serials))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if aki and subject != issuer_name:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, _signing_hash(issuer_key))


def _ca_extensions(
    pathlen: int | None, eku: str | None = None
) -> list[tuple[x509.ExtensionType, bool]]:
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=True, path_length=pathlen), True),
        (_key_usage(signing=pathlen is not None, encipherment=False, cert_sign=True), True),
    ]
    if eku is not None:
        extensions.append((x509.ExtendedKeyUsage([_EKUS[eku]]), False))
    return extensions


@dataclass
class Pki:
    """One organisation's PKI: a root, an intermediate per cluster, the leaves they issue."""

    org: str = "Wikimedia Foundation"
    root_kind: str = "p384"
    root_not_before: datetime = T0 - timedelta(days=5 * 365)
    root_not_after: datetime = T0 + timedelta(days=10 * 365)
    root: Ca = field(init=False)
    _intermediates: dict[str, Ca] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        key: PrivateKey = (
            _rsa_root_key() if self.root_kind == "rsa" else _ca_key(f"{self.org}/root")
        )
        name = _name(f"{self.org} Root CA", self.org)
        cert = _build(
            name,
            key.public_key(),
            name,
            key,
            self.root_not_before,
            self.root_not_after,
            _ca_extensions(None),
        )
        self.root = Ca(cert, key)

    def intermediate(
        self,
        cluster: str = "wikikube-eqiad",
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        pathlen: int | None = 0,
        parent: Ca | None = None,
        eku: str | None = None,
    ) -> Ca:
        """The cluster's intermediate CA: one per distinct set of arguments, made once."""
        label = f"{cluster}/{not_before}/{not_after}/{pathlen}/{parent and parent.cn}/{eku}"
        if label not in self._intermediates:
            issuer = parent or self.root
            key = _ca_key(f"{self.org}/{label}")
            cert = _build(
                _name(f"{cluster} Intermediate CA", self.org),
                key.public_key(),
                issuer.cert.subject,
                issuer.key,
                not_before or T0 - timedelta(days=3 * 365),
                not_after or T0 + timedelta(days=5 * 365),
                _ca_extensions(pathlen, eku),
            )
            self._intermediates[label] = Ca(cert, key, issuer)
        return self._intermediates[label]

    def expired_intermediate(self, cluster: str = "wikikube-eqiad") -> Ca:
        """An intermediate whose notAfter passed 30 days before T0."""
        return self.intermediate(
            cluster, not_before=T0 - timedelta(days=400), not_after=T0 - timedelta(days=30)
        )

    def ca_file(self, *, with_intermediate: bool = False, cluster: str = "wikikube-eqiad") -> bytes:
        """An anchor's ca_file: the root (optionally followed by the cluster's intermediate)."""
        return self.root.pem + (self.intermediate(cluster).pem if with_intermediate else b"")

    def leaf(
        self,
        host: str | None = None,
        cn: str = "sa",
        sans: tuple[str, ...] = (),
        key: ec.EllipticCurvePrivateKey | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        eku: str | None = None,
        ca: bool = False,
        curve: str = "p521",
        org: str | None = None,
        issuer: Ca | None = None,
        aki: bool = True,
    ) -> Leaf:
        """A certificate the intermediate issues; ``host`` adds the host's FQDN as DNS SAN."""
        key = key or new_key(curve)
        issuer = issuer or self.intermediate()
        names = ((host,) if host else ()) + sans
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=ca, path_length=None), True),
            (_key_usage(signing=True, encipherment=not ca, cert_sign=ca), True),
        ]
        if eku is not None:
            extensions.append((x509.ExtendedKeyUsage([_EKUS[eku]]), False))
        if names:
            extensions.append(
                (x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), False)
            )
        cert = _build(
            _name(cn, org),
            key.public_key(),
            issuer.cert.subject,
            issuer.key,
            not_before or T0 - timedelta(days=30),
            not_after or T0 + timedelta(days=365),
            extensions,
            aki,
        )
        return Leaf(cert, key, issuer)

    # --- the seed PKI's certificate shapes ------------------------------------------------

    def sa(self, **kwargs: Any) -> Leaf:
        """The service-account certificate: CN sa, no SAN, no EKU (the seed PKI's shape)."""
        return self.leaf(**kwargs)

    def sa_named(self, fqdn: str, **kwargs: Any) -> Leaf:
        """A service-account certificate named after its host (CN and DNS SAN = the FQDN)."""
        return self.leaf(host=fqdn, cn=fqdn, **kwargs)

    def kubelet(self, fqdn: str) -> Leaf:
        """A kubelet client certificate (CN system:node:<host>, O system:nodes, clientAuth)."""
        return self.leaf(cn=f"system:node:{fqdn}", org="system:nodes", eku="client", curve="p256")

    def admin(self) -> Leaf:
        """An admin client certificate (CN admin, O system:masters, clientAuth)."""
        return self.leaf(cn="admin", org="system:masters", eku="client", curve="p256")

    def apiserver(self, fqdn: str) -> Leaf:
        """The apiserver's serving certificate (SAN the host's FQDN, serverAuth)."""
        return self.leaf(
            host=fqdn,
            cn=fqdn,
            sans=("kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
            eku="server",
            curve="p256",
        )

    def renew(
        self, leaf: Leaf, *, not_before: datetime | None = None, not_after: datetime | None = None
    ) -> Leaf:
        """The same subject, names and key, new dates and serial (cfssl renews with the key)."""
        cert = leaf.cert
        builder = (
            x509.CertificateBuilder()
            .subject_name(cert.subject)
            .issuer_name(cert.issuer)
            .public_key(leaf.key.public_key())
            .serial_number(next(_serials))
            .not_valid_before(not_before or cert.not_valid_before_utc + timedelta(days=300))
            .not_valid_after(not_after or cert.not_valid_after_utc + timedelta(days=300))
        )
        for extension in cert.extensions:
            builder = builder.add_extension(extension.value, extension.critical)
        assert leaf.issuer is not None
        issued = builder.sign(leaf.issuer.key, _signing_hash(leaf.issuer.key))
        return Leaf(issued, leaf.key, leaf.issuer)

    def reimage(self, leaf: Leaf) -> Leaf:
        """The same host reinstalled: a new key, the same certificate shape."""
        cert = leaf.cert
        names: tuple[str, ...] = ()
        eku = None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = tuple(san.value.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            pass
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            eku = next(name for name, oid in _EKUS.items() if oid in usages)
        except x509.ExtensionNotFound:
            pass
        cn = str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        curve = "p521" if leaf.key.curve.key_size == 521 else "p256"
        return self.leaf(cn=cn, sans=names, eku=eku, curve=curve, issuer=leaf.issuer)


def self_signed(fqdn: str, key: ec.EllipticCurvePrivateKey | None = None) -> Leaf:
    """A certificate for a fleet host that nobody issued (CN and SAN the FQDN)."""
    key = key or new_key()
    name = _name(fqdn)
    cert = _build(
        name,
        key.public_key(),
        name,
        key,
        T0 - timedelta(days=1),
        T0 + timedelta(days=365),
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.SubjectAlternativeName([x509.DNSName(fqdn)]), False),
        ],
    )
    return Leaf(cert, key, None)
