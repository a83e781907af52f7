"""adopt: write the first state file from what etcd and the existing bundle hold today.

The first state file is generated and reviewed, not hand-typed. Which keys
etcd holds, and which of them are valid, poisoned or malformed, is decided by
the planner (run with an empty trusted list), so adopt never disagrees with
what ``plan`` will report. The sources decide what is trusted:

- with ``--from-bundle``: exactly the bundle's keys, since that file is what
  every apiserver trusts today; keys only in etcd are listed commented out,
  for review (a freshly reimaged host's key the old watcher never picked up);
- from etcd alone: every valid, accepted key found there.

The output is checked with the same loader as ``validate`` before it is
written, and a second plan against it tells which kids converge will bundle.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from sakeystate.errors import KeyRejected, SakeystateError
from sakeystate.escape import for_terminal, for_yaml_comment
from sakeystate.keys import KeyInfo, format_time, parse_pem_bundle, parse_value
from sakeystate.model import BundleObservation, EtcdObservation
from sakeystate.plan import plan
from sakeystate.state import load_state_text, state_from_data

LEGACY_BUNDLE = "/etc/kubernetes/pki/kube-apiserver-sa-certs.pem"
DEFAULT_PREFIX = "/kube-apiserver-sa-certs/"
# An old watcher's bundle: one certificate per control plane, ever; far below this.
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
# Contract defaults; superseded_grace covers a one-year projected token.
DEFAULT_RETENTION: Mapping[str, Any] = {
    "superseded_grace": "8760h",
    "min_keys": 1,
    "max_removals": 2,
    "max_token_lifetime": "8760h",
}
_FQDN_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


@dataclass
class AdoptedKey:
    kid: str
    key: KeyInfo
    host: str | None = None
    sources: list[str] = field(default_factory=list)
    trusted: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Adoption:
    text: str
    keys: tuple[AdoptedKey, ...]
    bundled_after: tuple[str, ...]  # the kids converge would bundle with this state
    warnings: tuple[str, ...]  # escaped for a terminal: they quote etcd key names


def base_document(o: Options, from_state: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every section of the new state but ``trusted``: from an existing state file or flags."""
    tls = {"ca_file": o.ca_file, "cert_file": o.cert_file, "key_file": o.key_file}
    etcd_flags = (o.endpoints, o.prefix, o.timeout, o.username, o.password_file, *tls.values())
    if from_state is not None:
        if any(etcd_flags):
            raise SakeystateError(
                "give the etcd connection either with --state or with --endpoint/--prefix/"
                "--ca-file/... flags, not both"
            )
        data = {k: v for k, v in from_state.items() if k != "trusted"}
    else:
        if not o.endpoints:
            raise SakeystateError(
                "adopt needs the etcd connection the state file will use: --endpoint URL "
                "(repeatable) and the options that go with it, or --state FILE"
            )
        etcd: dict[str, Any] = {
            "endpoints": list(o.endpoints),
            "prefix": o.prefix or DEFAULT_PREFIX,
            "timeout": o.timeout or "5s",
        }
        if any(tls.values()):
            etcd["tls"] = {k: v for k, v in tls.items() if v}
        if o.username or o.password_file:
            etcd["auth"] = {"username": o.username, "password_file": o.password_file}
        data = {
            "apiVersion": "sakeystate/v1",
            "cluster": o.cluster,
            "etcd": etcd,
            "bundle": {"path": LEGACY_BUNDLE},
            "retention": dict(DEFAULT_RETENTION),
        }
    if o.cluster:
        data["cluster"] = o.cluster
    if not data.get("cluster"):
        raise SakeystateError("adopt needs --cluster NAME (shown in every report)")
    bundle_path = o.bundle_path or (None if o.state else o.from_bundle)
    if bundle_path:
        data["bundle"] = {**data.get("bundle", {}), "path": bundle_path}
    return data


def _cert_host(key: KeyInfo) -> str | None:
    """The host a certificate names (first DNS SAN, else its CN) when it is an FQDN.

    Raises KeyRejected for a CA certificate (never a service-account key) and
    for extensions cryptography refuses to read (a duplicate SAN, say): this is
    the boundary where the certificate's own bytes are interpreted, and
    cryptography signals malformed input with several unrelated exception
    classes (ValueError, DuplicateExtension, UnsupportedGeneralNameType, ...),
    every one of which must become a rejection, never a traceback.
    """
    if key.certificate_pem is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate(key.certificate_pem)
        is_ca = _is_ca(cert)
        names = _names(cert)
    except Exception as exc:  # any parse failure is a rejection: see the docstring
        raise KeyRejected(f"certificate cannot be read: {type(exc).__name__}: {exc}") from None
    if is_ca:
        raise KeyRejected(
            "a CA certificate (basicConstraints CA:TRUE) is not a service-account key"
        )
    return next((n for n in names if _FQDN_RE.match(n) and "." in n), None)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _names(cert: x509.Certificate) -> list[str]:
    """DNS SANs first, then the subject CNs."""
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names += san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    return names + [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _from_etcd(
    base: Mapping[str, Any], observed: EtcdObservation, at: datetime, warnings: list[str]
) -> dict[str, AdoptedKey]:
    desired = state_from_data({**base, "trusted": []}, "the adopted state")
    seen = plan(desired, observed, BundleObservation(desired.bundle.path, None), at)
    values = {e.key: e.value for e in observed.entries}
    found: dict[str, AdoptedKey] = {}
    for report in seen.keys:
        # With nothing trusted yet, "untrusted" is exactly "valid, accepted, not
        # revoked, not past its expiry grace": the keys a reviewer can choose from.
        if report.status != "untrusted" or report.kid is None or report.etcd_key is None:
            what = f" ({report.kid})" if report.kid else ""
            why = report.reason
            if not why.startswith(report.status):
                why = f"{report.status}: {why}"
            warnings.append(f"etcd key {report.etcd_key}{what}: {why}; not adopted")
            continue
        key = parse_value(values[report.etcd_key]).key
        try:
            _cert_host(key)  # only for its refusals: the planner already named the host
        except KeyRejected as exc:
            warnings.append(f"etcd key {report.etcd_key} ({report.kid}): {exc}; not adopted")
            continue
        legacy = not report.etcd_key.endswith("/" + report.kid)
        item = AdoptedKey(report.kid, key, report.host)
        layout = " (legacy layout, migrated by converge)" if legacy else ""
        item.sources.append(f"etcd {report.etcd_key}{layout}")
        if key.not_before and key.not_before > at:
            item.notes.append("certificate not valid yet; bundled from its not-before date")
        found[report.kid] = item
    return found


def adopt(
    base: Mapping[str, Any],
    at: datetime,
    observed: EtcdObservation | None = None,
    bundle_data: bytes | None = None,
    bundle_source: str | None = None,
) -> Adoption:
    """The first state file, from etcd and/or the bundle an old watcher wrote. Pure."""
    if observed is None and bundle_data is None:
        raise SakeystateError("nothing to adopt from: read etcd, or give --from-bundle FILE")
    warnings: list[str] = []
    in_etcd = _from_etcd(base, observed, at, warnings) if observed is not None else {}
    keys: dict[str, AdoptedKey]
    if bundle_data is not None:
        bundle_keys, problems = parse_pem_bundle(bundle_data)
        warnings += [f"bundle {bundle_source}: {p}; not adopted" for p in problems]
        keys = {}
        revoked = set(state_from_data({**base, "trusted": []}, "the adopted state").revoked)
        for number, info in enumerate(bundle_keys, start=1):
            if info.kid in revoked:
                warnings.append(f"bundle {bundle_source} block {number}: {info.kid} is revoked")
                continue
            try:
                host = _cert_host(info)
            except KeyRejected as exc:
                warnings.append(f"bundle {bundle_source} block {number} ({info.kid}): {exc}")
                continue
            item = in_etcd.get(info.kid) or AdoptedKey(info.kid, info, host)
            item.sources.append(f"bundle {bundle_source} block {number}")
            keys[info.kid] = item
            if observed is not None and info.kid not in in_etcd:
                warnings.append(
                    f"key {info.kid} ({item.host or 'unknown host'}) is in the bundle but not "
                    "published in etcd: converge will leave it out until it is published"
                )
        for kid, item in in_etcd.items():
            if kid not in keys:
                item.trusted = False
                keys[kid] = item
                warnings.append(
                    f"key {kid} ({item.host or 'unknown host'}) is in etcd but not in the bundle: "
                    "listed commented out; trust it only after review"
                )
    else:
        keys = in_etcd
    for item in keys.values():
        expires = item.key.not_after
        if expires is not None and expires <= at:
            item.notes.append("certificate expired: still trusted (kube-apiserver ignores dates)")
    ordered = sorted(keys.values(), key=lambda k: k.kid)
    bundled: tuple[str, ...] = ()
    if observed is not None:
        trusted = [_entry(k) for k in ordered if k.trusted]
        desired = state_from_data({**base, "trusted": trusted}, "the adopted state")
        empty = BundleObservation(desired.bundle.path, None)
        bundled = plan(desired, observed, empty, at, allow_removals=True).kids_after
        for item in ordered:
            if item.trusted and item.kid in in_etcd and item.kid not in bundled:
                warnings.append(
                    f"key {item.kid} ({item.host or 'unknown host'}) is trusted but converge "
                    f"would not bundle it yet ({'; '.join(item.notes) or 'see plan'})"
                )
    text = render(base, ordered, at, warnings)
    load_state_text(text, "the adopted state")  # what validate will say about it
    return Adoption(text, tuple(ordered), bundled, tuple(for_terminal(w) for w in warnings))


def with_anchor(base: Mapping[str, Any], ca_file: str, first: Adoption) -> dict[str, Any]:
    """The base document with a trust anchor for ``ca_file`` over the adopted keys' hosts.

    The keys found stay pinned (reviewed now); the anchor trusts the next ones its CA
    certifies for these hosts (a reimage) with no edit. ``common_name`` is set when
    every certificate found shares one subject CN (the seed PKI's ``sa``), which binds
    the anchor to the service-account profile.
    """
    from sakeystate.anchors import load_roots
    from sakeystate.files import read_capped

    load_roots(read_capped(ca_file, MAX_BUNDLE_BYTES, "--anchor-ca"), f"--anchor-ca {ca_file}")
    hosts = sorted({k.host for k in first.keys if k.trusted and k.host})
    if not hosts:
        raise SakeystateError("--anchor-ca: no adopted key names its host; nothing to anchor")
    names = {k.key.subject_cn for k in first.keys if k.trusted and k.key.certificate_pem}
    anchor: dict[str, Any] = {"name": f"{base['cluster']}-pki", "ca_file": ca_file, "hosts": hosts}
    if len(names) == 1 and None not in names:
        anchor["common_name"] = names.pop()
    return {**base, "trust_anchors": [anchor]}


def _comment(item: AdoptedKey) -> list[str]:
    expires = format_time(item.key.not_after) if item.key.not_after else "no certificate"
    first = f"{item.key.algorithm}, not after {expires}"
    lines = [first, *item.sources, *item.notes]
    return [f"# {for_yaml_comment(line)}" for line in lines]


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=False)


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line + "\n" for line in text.splitlines())


def render(
    base: Mapping[str, Any], keys: Sequence[AdoptedKey], at: datetime, warnings: Sequence[str]
) -> str:
    """The state file text: the base sections, then one commented entry per key."""
    head = [
        f"# Generated by `sakeystate adopt` at {format_time(at)}.",
        "# Review every trusted key before committing: this file decides which",
        "# service-account keys every kube-apiserver of the cluster accepts.",
    ]
    # Warnings quote etcd key names, which may hold line breaks: escaped, each
    # stays one comment line and cannot become a live section of the file.
    head += [f"# warning: {for_yaml_comment(w)}" for w in warnings]
    order = ("apiVersion", "cluster", "etcd", "bundle")
    out = "\n".join(head) + "\n"
    out += _dump({k: base[k] for k in order if k in base})
    trusted = [k for k in keys if k.trusted]
    review = [k for k in keys if not k.trusted]
    out += "trusted:\n" if trusted else "trusted: []\n"
    for item in trusted:
        out += _indent("\n".join(_comment(item)), "  ")
        out += _indent(_dump([_entry(item)]), "  ")
    if review:
        out += "  # In etcd but not in the bundle: uncomment after review to trust.\n"
    for item in review:
        out += _indent("\n".join(_comment(item)), "  ")
        out += _indent(_dump([_entry(item)]), "  # ")
    rest = {k: v for k, v in base.items() if k not in (*order, "trusted")}
    if rest:
        out += _dump(rest)
    return out


def _entry(item: AdoptedKey) -> dict[str, str]:
    entry = {"fingerprint": item.kid}
    if item.host and _FQDN_RE.match(item.host):
        entry["host"] = item.host
    return entry


def write_output(path: str, text: str, force: bool) -> None:
    """Write the state file; an existing file is kept unless ``force``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_TRUNC if force else os.O_EXCL
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise SakeystateError(f"{path} exists; not overwriting it (use --force)") from None
    except OSError as exc:
        raise SakeystateError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def read_bundle(path: str) -> bytes:
    from sakeystate.files import read_capped

    return read_capped(path, MAX_BUNDLE_BYTES, "--from-bundle")


def read_state_document(path: str) -> dict[str, Any]:
    """An existing state file (validated first), as the mapping it was written as."""
    from sakeystate.state import load_state

    load_state(path)
    with open(path, encoding="utf-8") as handle:
        data: dict[str, Any] = yaml.safe_load(handle)
    return data


@dataclass(frozen=True)
class Options:
    """What ``sakeystate adopt`` was asked, as parsed by the CLI."""

    # Fields the CLI passes through unchanged, by the same name as its options.
    FROM_ARGS: ClassVar[tuple[str, ...]] = (
        "cluster",
        "state",
        "prefix",
        "timeout",
        "ca_file",
        "cert_file",
        "key_file",
        "username",
        "password_file",
        "bundle_path",
        "from_bundle",
        "output",
        "force",
        "anchor_ca",
    )

    at: datetime
    cluster: str | None = None
    state: str | None = None
    endpoints: tuple[str, ...] = ()
    prefix: str | None = None
    timeout: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    bundle_path: str | None = None
    from_bundle: str | None = None
    read_etcd: bool = True
    output: str = "-"
    force: bool = False
    anchor_ca: str | None = None


def run(options: Options) -> Adoption:
    """The ``adopt`` command: read the sources, build the state, write it unless to stdout."""
    base = base_document(options, read_state_document(options.state) if options.state else None)
    desired = state_from_data({**base, "trusted": []}, "the adopted state")
    observed = None
    if options.read_etcd:
        from sakeystate.etcd import EtcdStore

        with EtcdStore(desired.etcd) as store:
            observed = store.read(desired.etcd.prefix)
    data = read_bundle(options.from_bundle) if options.from_bundle else None
    result = adopt(base, options.at, observed, data, options.from_bundle)
    if options.anchor_ca:
        base = with_anchor(base, options.anchor_ca, result)
        result = adopt(base, options.at, observed, data, options.from_bundle)
    if options.output != "-":
        write_output(options.output, result.text, options.force)
    return result
