"""desired x observed x at -> Plan. Pure: no I/O, no clock, no environment.

The plan is a value: ``plan`` prints it, ``check`` asks whether it is empty,
``converge`` applies it with every etcd write guarded on the revision that was
observed. Each action carries the reason a reviewer reads.

``plan()`` is a pipeline of named steps; each step's output is a new value that the
next steps read, never rewrite:

1. ``_observe``: what etcd holds (every copy of every kid, in any layout) and what
   the bundle holds and remembers;
2. ``_attribute``: each key's host and publish time, decided once, from
   authenticated sources only (R12);
3. ``_decide_trust``: pinned, certified by an anchor now (R14), kept from the
   bundle, or revoked;
4. ``_retention``: superseded or decommissioned (R15); certificate dates never;
5. ``_current_keys``: each host's current key (R3, R16);
6. ``_select``: the effective set, exclude_host and the never-empty rule (R19);
7. the diff: bundle, JWKS and etcd actions (R13: etcd writes only to this host's
   own entries), the status record (R18), refusals and warnings.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sakeystate.anchors import Anchor, Verdict, verify_any
from sakeystate.errors import KeyRejected, SakeystateError
from sakeystate.keys import (
    KID_RE,
    UTC_MIN,
    EntryValue,
    KeyInfo,
    format_time,
    is_host_name,
    names_of,
    parse_pem_bundle,
    parse_time,
    parse_value,
    render_value,
    saturating_add,
)
from sakeystate.model import (
    BundleObservation,
    Delete,
    EtcdEntry,
    EtcdObservation,
    EtcdOp,
    Guard,
    Put,
)
from sakeystate.state import DesiredState, format_duration

# The comment line sakeystate writes above each bundle block: ``# <kid> <host> <published>``
# (revision-1 bundles have no publish time), and the line that remembers the key this
# host leaves out (its own), which has no block.
_BUNDLE_COMMENT_RE = re.compile(
    rb"^# ([A-Za-z0-9_-]{43}) (\S+)(?: ([0-9TZ:-]{20}|-))?$", re.MULTILINE
)
_EXCLUDED_COMMENT_RE = re.compile(
    rb"^# excluded ([A-Za-z0-9_-]{43}) (\S+) ([0-9TZ:-]{20}|-)(?: .*)?$", re.MULTILINE
)
_EXCLUDED_NOTE = "(this host's own key: its apiserver loads it from its own flag)"
UPCOMING_WINDOW_DAYS = 30
# "Did you mean": a pinned kid missing from etcd is compared with the kids etcd holds
# when there are at most this many missing (each comparison is 43x43 steps).
_SUGGEST_MAX_MISSING = 20
_SUGGEST_MAX_DISTANCE = 3

# Where a key's host came from (R12). The first four are authenticated: sakeystate's own
# bundle, the reviewed state file, the CA's word, or a path only that host may write
# (with the documented etcd grants). The rest are any etcd writer's word.
FROM_BUNDLE = "recorded in this host's bundle"
FROM_PINNED = "pinned"
FROM_CERTIFICATE = "named by the certificate"
FROM_PATH = "etcd path"
FROM_OWN_CERT = "this host's own_cert"
FROM_HEADER = "Host header (flat layout, unauthenticated)"
FROM_LEGACY_NAME = "legacy key name (unauthenticated)"
AUTHENTICATED = (FROM_BUNDLE, FROM_PINNED, FROM_CERTIFICATE, FROM_PATH)


@dataclass(frozen=True)
class Action:
    """One change, with the reason a reviewer reads and the guarded etcd writes behind it."""

    target: str  # "bundle" | "jwks" | "etcd" | "reload" | "status"
    op: str  # bundle: add/remove/write/permissions; etcd: delete/migrate; reload: run
    reason: str
    kid: str | None = None
    host: str | None = None
    key: str | None = None
    guards: tuple[Guard, ...] = ()
    writes: tuple[EtcdOp, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "op": self.op}
        for name in ("kid", "host", "key"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class KeyReport:
    """What sakeystate concluded about one key it saw, and why.

    ``in_bundle`` is the bundle file as found on disk; ``bundle_after`` is the
    bundle this plan writes; ``host_source`` says where ``host`` came from.
    """

    kid: str | None
    host: str | None
    status: str
    reason: str
    not_after: datetime | None = None
    etcd_key: str | None = None
    in_bundle: bool = False
    bundle_after: bool = False
    trust: str | None = None
    host_source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "host": self.host,
            "host_source": self.host_source,
            "status": self.status,
            "trust": self.trust,
            "not_after": format_time(self.not_after) if self.not_after else None,
            "etcd_key": self.etcd_key,
            "in_bundle": self.in_bundle,
            "bundle_after": self.bundle_after,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class BundledKey:
    kid: str
    host: str | None
    key: KeyInfo
    published: datetime | None = None


@dataclass(frozen=True)
class LocalFacts:
    """What this host adds to a plan, read at the edges (``apply.observe``).

    ``own_key`` is the key of ``own_cert``; ``problems`` are failures a converge
    would hit before writing anything (unreadable ``own_cert``, a missing bundle
    directory, an unknown owner): the plan refuses with the same message.
    ``anchors`` are the trust anchors with their CA files' contents.
    """

    own_kid: str | None = None
    problems: tuple[str, ...] = ()
    anchors: tuple[Anchor, ...] = ()
    own_key: KeyInfo | None = None


@dataclass(frozen=True)
class StatusObservation:
    """This host's own status record as read (``entry`` None: there is none)."""

    key: str
    entry: EtcdEntry | None


@dataclass(frozen=True)
class Plan:
    cluster: str
    at: datetime
    bundle_path: str
    actions: tuple[Action, ...]
    kids_before: tuple[str, ...]
    kids_after: tuple[str, ...]
    bundle_keys: tuple[BundledKey, ...]
    bundle_content: bytes
    write_bundle: bool
    keys: tuple[KeyReport, ...]
    warnings: tuple[str, ...]
    refusals: tuple[str, ...] = ()
    jwks_content: bytes | None = None  # set when bundle.jwks_path is configured
    write_jwks: bool = False
    host: str | None = None
    verified_kids: tuple[str, ...] = ()  # what this host's apiserver verifies after the plan
    next_event: datetime | None = None  # the next moment at which time alone changes the plan
    current: tuple[tuple[str, str], ...] = ()  # (host, its current kid), sorted by host
    bundle_changed: bool = False  # the bundle's key set changes: what a restart follows
    status_value: bytes | None = None  # this host's status record, when it must be written
    owes_reload: bool = False  # the apiserver has not loaded this bundle's key set yet
    excluded: BundledKey | None = None  # this host's own key, left out of the bundle

    @property
    def changed(self) -> bool:
        return bool(self.actions)

    @property
    def etcd_actions(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.target == "etcd")

    @property
    def reload(self) -> Action | None:
        return next((a for a in self.actions if a.target == "reload"), None)

    @property
    def removed_kids(self) -> tuple[str, ...]:
        return tuple(k for k in self.kids_before if k not in set(self.kids_after))


class Refused(SakeystateError):
    """The plan breaks a safety rule (min_keys, max_removals); nothing was written."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        super().__init__("refusing to converge: " + "; ".join(plan.refusals))


# --- step 1: what etcd and the bundle hold ------------------------------------------------


@dataclass(frozen=True)
class _Copy:
    """One etcd entry holding a key. ``layout``: ``host`` (``<prefix><host>/<kid>``),
    ``flat`` (``<prefix><kid>``, revision 2) or ``legacy`` (``<prefix><fqdn>``)."""

    entry: EtcdEntry
    layout: str
    path_host: str | None  # host layout: the path's host; legacy: the key name
    value: EntryValue


@dataclass(frozen=True)
class _Recorded:
    """What this host's bundle remembers of a key it saw first (its own file)."""

    host: str | None
    published: datetime | None
    excluded: bool = False  # the line for the key this host leaves out


@dataclass(frozen=True)
class _Seen:
    """One kid: every etcd copy of it, and the bundle's view of it."""

    kid: str
    info: KeyInfo
    copies: tuple[_Copy, ...] = ()
    in_bundle: bool = False  # kube-apiserver loads it from the bundle now
    recorded: _Recorded | None = None

    @property
    def in_etcd(self) -> bool:
        return bool(self.copies)

    @property
    def intermediates(self) -> tuple[bytes, ...]:
        return self.copies[0].value.intermediates if self.copies else ()

    @property
    def etcd_key(self) -> str | None:
        return self.copies[0].entry.key if self.copies else None


@dataclass(frozen=True)
class _Observed:
    keys: Mapping[str, _Seen]
    rejected: tuple[KeyReport, ...]
    warnings: tuple[str, ...]
    kids_before: tuple[str, ...]
    occupied: frozenset[str]  # every etcd key under the prefix


_LAYOUT_ORDER = {"host": 0, "flat": 1, "legacy": 2}


def _classify(prefix: str, entry: EtcdEntry) -> tuple[str, str | None, str | None] | str:
    """(layout, path host, kid named by the key) or why the key name is unusable."""
    name = entry.key[len(prefix) :] if entry.key.startswith(prefix) else entry.key
    host, slash, rest = name.partition("/")
    if slash:
        if is_host_name(host) and KID_RE.match(rest):
            return "host", host.lower(), rest
        return "key name is neither <host>/<kid>, a kid nor a host name"
    if KID_RE.match(name):
        return "flat", None, name
    if is_host_name(name):
        return "legacy", name.lower(), None
    return "key name is neither <host>/<kid>, a kid nor a host name"


def _observe(
    desired: DesiredState,
    observed: EtcdObservation,
    bundle: BundleObservation,
    own_key: KeyInfo | None = None,
) -> _Observed:
    prefix = desired.etcd.prefix
    rejected: list[KeyReport] = []
    warnings: list[str] = []
    copies: dict[str, list[_Copy]] = {}
    infos: dict[str, KeyInfo] = {}
    for entry in sorted(observed.entries, key=lambda e: e.key):
        shape = _classify(prefix, entry)
        if isinstance(shape, str):
            rejected.append(KeyReport(None, None, "rejected", shape, etcd_key=entry.key))
            warnings.append(f"etcd key {entry.key}: {shape}; never bundled, left alone")
            continue
        layout, path_host, named = shape
        try:
            value = parse_value(entry.value)
        except KeyRejected as exc:
            rejected.append(KeyReport(named, path_host, "rejected", str(exc), etcd_key=entry.key))
            warnings.append(f"etcd key {entry.key}: {exc}; never bundled, left alone")
            continue
        kid = value.key.kid
        if named is not None and kid != named:
            reason = (
                f"value holds the key with kid {kid}, not {named}: never trusted (possible "
                "poisoning)"
            )
            rejected.append(KeyReport(named, path_host, "poisoned", reason, etcd_key=entry.key))
            warnings.append(f"etcd key {entry.key}: {reason}")
            continue
        copies.setdefault(kid, []).append(_Copy(entry, layout, path_host, value))
        infos.setdefault(kid, value.key)
    for kid, found in copies.items():
        found.sort(key=lambda c: (_LAYOUT_ORDER[c.layout], c.entry.create_revision, c.entry.key))
        infos[kid] = found[0].value.key

    known = {info.public_pem: info for info in infos.values()}
    before, problems = parse_pem_bundle(bundle.content or b"", known)
    warnings += [f"bundle {bundle.path}: {p}" for p in problems]
    recorded = _recorded(bundle.content or b"")
    loaded = {info.kid: info for info in before}
    if own_key is not None and own_key.kid in recorded and recorded[own_key.kid].excluded:
        # The key this host leaves out is in its bundle too, as far as memory goes: an
        # etcd writer deleting its entry must not make it unknown here.
        infos.setdefault(own_key.kid, own_key)
    keys: dict[str, _Seen] = {}
    for kid in sorted(set(copies) | set(loaded) | set(infos)):
        keys[kid] = _Seen(
            kid=kid,
            info=infos.get(kid) or loaded[kid],
            copies=tuple(copies.get(kid, ())),
            in_bundle=kid in loaded,
            recorded=recorded.get(kid),
        )
    return _Observed(
        keys=keys,
        rejected=tuple(rejected),
        warnings=tuple(warnings),
        kids_before=tuple(sorted(loaded)),
        occupied=frozenset(e.key for e in observed.entries),
    )


def _recorded(content: bytes) -> dict[str, _Recorded]:
    """The bundle's memory: ``# <kid> <host> <published>`` above each block, and the line
    for the key this host leaves out. A publish time sakeystate did not write is none."""

    def when(raw: bytes | None) -> datetime | None:
        if not raw or raw == b"-":
            return None
        with contextlib.suppress(ValueError):
            return parse_time(raw.decode())
        return None

    def host(raw: bytes) -> str | None:
        text = raw.decode("utf-8", "replace").lower()
        return None if text == "-" else text

    memory: dict[str, _Recorded] = {}
    for match in _BUNDLE_COMMENT_RE.finditer(content):
        memory[match.group(1).decode()] = _Recorded(host(match.group(2)), when(match.group(3)))
    for match in _EXCLUDED_COMMENT_RE.finditer(content):
        kid = match.group(1).decode()
        memory.setdefault(kid, _Recorded(host(match.group(2)), when(match.group(3)), True))
    return memory


# --- step 2: each key's host and publish time, decided once (R12) -------------------------


@dataclass(frozen=True)
class _Facts:
    host: str | None
    source: str | None  # one of the FROM_* constants
    published: datetime | None
    contested: bool = False  # more than one host's path holds it (reported)


def _certificate_host(info: KeyInfo, hints: Iterable[str | None]) -> str | None:
    names = names_of(info)
    if not names:
        return None
    for hint in hints:
        if hint is not None and hint in names:
            return hint
    return names[0]


def _claims(seen: _Seen) -> list[tuple[str, str, str]]:
    """What etcd says about a key's host: (host, source, etcd key), strongest first."""
    out = []
    for copy in seen.copies:
        if copy.layout == "host" and copy.path_host:
            out.append((copy.path_host, FROM_PATH, copy.entry.key))
        elif copy.layout == "flat" and copy.value.host:
            out.append((copy.value.host.lower(), FROM_HEADER, copy.entry.key))
        elif copy.layout == "legacy" and copy.path_host:
            out.append((copy.path_host, FROM_LEGACY_NAME, copy.entry.key))
    return out


def _host_of(
    desired: DesiredState, local: LocalFacts, seen: _Seen
) -> tuple[str | None, str | None, bool]:
    """A key's host from the sources R12 names, in order; (host, source, contested)."""
    claims = _claims(seen)
    paths = sorted({h for h, source, _key in claims if source == FROM_PATH})
    if seen.recorded is not None and seen.recorded.host is not None:
        return seen.recorded.host, FROM_BUNDLE, len(paths) > 1
    pinned = desired.trusted.get(seen.kid)
    if pinned is not None and pinned.host:
        return pinned.host, FROM_PINNED, len(paths) > 1
    named = _certificate_host(seen.info, [*paths, *(h for h, _s, _k in claims)])
    if named is not None:
        return named, FROM_CERTIFICATE, len(paths) > 1
    if paths:
        # Copies under two hosts' paths: the first one created (the first publisher).
        first = next(h for h, source, _key in claims if source == FROM_PATH)
        return first, FROM_PATH, len(paths) > 1
    if seen.kid == local.own_kid and desired.host:
        return desired.host, FROM_OWN_CERT, False
    if claims:
        return claims[0][0], claims[0][1], False
    return None, None, False


def _published_of(seen: _Seen, at: datetime) -> datetime | None:
    """The bundle's first-seen publish time, else etcd's ``Published`` of the preferred
    copy, else (a legacy certificate) its notBefore. A bare legacy public key stays
    undated: it never supersedes nor is superseded."""
    if seen.recorded is not None and seen.recorded.published is not None:
        return seen.recorded.published
    for copy in seen.copies:
        if copy.layout != "legacy":
            return copy.value.published
    if seen.copies and seen.info.not_before is not None:
        # The old publisher kept no date; "now" would outrank keys published since.
        return min(seen.info.not_before, at)
    return None


def _attribute(
    desired: DesiredState, local: LocalFacts, observed: _Observed, at: datetime
) -> tuple[dict[str, _Facts], list[str]]:
    facts: dict[str, _Facts] = {}
    warnings: list[str] = []
    for kid, seen in observed.keys.items():
        host, source, contested = _host_of(desired, local, seen)
        published = _published_of(seen, at)
        facts[kid] = _Facts(host, source, published, contested)
        warnings += _attribution_warnings(seen, host, source, contested)
        etcd_published = next((c.value.published for c in seen.copies), None)
        if (
            seen.recorded is not None
            and seen.recorded.published is not None
            and etcd_published is not None
            and etcd_published != seen.recorded.published
        ):
            warnings.append(
                f"etcd key {seen.etcd_key}: Published {format_time(etcd_published)} differs "
                f"from {format_time(seen.recorded.published)}, when this host first saw the "
                "key; the first is ignored"
            )
    return facts, warnings


def _attribution_warnings(
    seen: _Seen, host: str | None, source: str | None, contested: bool
) -> list[str]:
    """An etcd claim that differs from the host decided: ignored, and said."""
    if host is None:
        return []
    out = []
    for claimed, how, key in _claims(seen):
        if claimed == host:
            continue
        if how == FROM_PATH and contested:
            out.append(
                f"key {seen.kid} is published under two hosts' paths ({key} too); it is "
                f"{host}'s ({source}): the other copy is ignored; pin the key with its host "
                "if that is wrong"
            )
        elif source in AUTHENTICATED or source == FROM_OWN_CERT:
            what = "path" if how == FROM_PATH else "Host header" if how == FROM_HEADER else "name"
            out.append(
                f"etcd key {key}: its {what} says {claimed}, but key {seen.kid} is {host}'s "
                f"({source}); the etcd claim is ignored"
            )
    return out


# --- step 3: trust -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Trust:
    status: str  # "trusted" | "untrusted" | "revoked"
    reason: str
    source: str | None = None  # "pinned" / "anchor <name>: ..." when trusted


def _covered_by_decommission(desired: DesiredState, facts: _Facts) -> bool:
    """A decommissioned host's key published before ``at`` keeps its retention (R15),
    whatever ``fleet`` or the anchors' hosts say now."""
    if facts.host is None or facts.host not in desired.decommissioned:
        return False
    return facts.published is None or facts.published <= desired.decommissioned[facts.host]


def _anchors_for(desired: DesiredState, local: LocalFacts, facts: _Facts) -> tuple[Anchor, ...]:
    if facts.host is not None and _covered_by_decommission(desired, facts):
        host = facts.host
        return tuple(
            a if host in a.hosts else replace(a, hosts=(*a.hosts, host)) for a in local.anchors
        )
    return local.anchors


def _kept_from_bundle(desired: DesiredState, seen: _Seen, facts: _Facts) -> str | None:
    """Trust a bundled key keeps when etcd no longer certifies it (deleted, overwritten,
    its certificate expired or renewed late): etcd and certificate dates alone never
    remove trust. It stays while the state still covers its host with an anchor, or the
    host is decommissioned (R15); pinned keys are decided before this."""
    remembered = seen.recorded is not None and seen.recorded.excluded
    if not (seen.in_bundle or remembered) or facts.host is None:
        return None
    for anchor in desired.trust_anchors:
        if facts.host in anchor.hosts:
            return f"anchor {anchor.name} (kept from the bundle: etcd no longer certifies it)"
    if _covered_by_decommission(desired, facts) and desired.trust_anchors:
        return (
            f"anchor {desired.trust_anchors[0].name} (kept from the bundle: {facts.host} is "
            "decommissioned)"
        )
    return None


def _decide_trust(
    desired: DesiredState,
    local: LocalFacts,
    observed: _Observed,
    facts: Mapping[str, _Facts],
    at: datetime,
) -> dict[str, _Trust]:
    """Pinned, or certified by a trust anchor now; revocation wins over both."""
    out: dict[str, _Trust] = {}
    for kid, seen in observed.keys.items():
        fact = facts[kid]
        if kid in desired.revoked:
            out[kid] = _Trust("revoked", f"revoked: {desired.revoked[kid]}")
            continue
        anchor_says = ""
        if kid in desired.trusted:
            out[kid] = _Trust("trusted", "pinned", "pinned")
            continue
        if seen.in_etcd and local.anchors:
            verdict = _certify_seen(desired, local, seen, fact, at)
            if verdict.trusted:
                out[kid] = _Trust("trusted", verdict.reason, verdict.reason)
                continue
            anchor_says = verdict.reason
        kept = _kept_from_bundle(desired, seen, fact)
        if kept is not None:
            out[kid] = _Trust("trusted", kept, kept)
            continue
        out[kid] = _Trust(
            "untrusted", anchor_says or "valid but not in the trusted list: awaiting review"
        )
    return out


def _certify_seen(
    desired: DesiredState, local: LocalFacts, seen: _Seen, facts: _Facts, at: datetime
) -> Verdict:
    """Any copy's certificate chain certified for the key's host (renewals may differ)."""
    anchors = _anchors_for(desired, local, facts)
    verdict = Verdict(False, "no copy")
    for copy in seen.copies:
        verdict = verify_any(
            anchors, copy.value.key.certificate_pem, copy.value.intermediates, facts.host, at
        )
        if verdict.trusted:
            return verdict
    return verdict


def certify(
    anchors: tuple[Anchor, ...],
    info: KeyInfo,
    intermediates: tuple[bytes, ...],
    host: str | None,
    at: datetime,
) -> Verdict:
    """The anchors' verdict on a key's certificate for ``host``, as of now (``at``)."""
    return verify_any(anchors, info.certificate_pem, intermediates, host, at)


# --- step 4: retention --------------------------------------------------------------------


@dataclass(frozen=True)
class _Retired:
    status: str  # "superseded" | "decommissioned"
    reason: str


@dataclass(frozen=True)
class _Retention:
    retired: Mapping[str, _Retired]
    events: tuple[datetime, ...]  # when time alone changes the plan
    warnings: tuple[str, ...]


def _retention(
    desired: DesiredState,
    local: LocalFacts,
    facts: Mapping[str, _Facts],
    trust: Mapping[str, _Trust],
    at: datetime,
) -> _Retention:
    """Supersession and decommissioning (R15). Certificate dates never remove a key."""
    retired: dict[str, _Retired] = {}
    events: list[datetime] = []
    warnings: list[str] = []
    lifetime = desired.retention.max_token_lifetime
    by_host: dict[str, list[str]] = {}
    for kid, fact in sorted(facts.items()):
        if trust[kid].status != "trusted" or fact.host is None:
            continue
        gone_at = desired.decommissioned.get(fact.host)
        if gone_at is not None and _covered_by_decommission(desired, fact):
            drop_at = saturating_add(gone_at, lifetime)
            if at >= drop_at:
                retired[kid] = _Retired(
                    "decommissioned",
                    f"host {fact.host} decommissioned {format_time(gone_at)}, "
                    f"max_token_lifetime {format_duration(lifetime)}",
                )
                continue
            events.append(drop_at)
            warnings += _upcoming(kid, fact.host, drop_at, at, f"host {fact.host} decommissioned")
        elif gone_at is not None and fact.published is not None:
            warnings.append(
                f"host {fact.host} was decommissioned at {format_time(gone_at)}, but published "
                f"{kid} since ({format_time(fact.published)}): that decommission does not "
                "cover this key (it is kept); if the name was reused by a new machine, remove "
                f"{fact.host} from decommissioned"
            )
        if fact.published is not None:
            by_host.setdefault(fact.host, []).append(kid)
    for kids in by_host.values():
        _supersede(desired, local, facts, kids, at, retired, events, warnings)
    return _Retention(retired, tuple(events), tuple(warnings))


def _supersede(
    desired: DesiredState,
    local: LocalFacts,
    facts: Mapping[str, _Facts],
    kids: list[str],
    at: datetime,
    retired: dict[str, _Retired],
    events: list[datetime],
    warnings: list[str],
) -> None:
    """A host's older key goes superseded_grace after the host published a newer
    *trusted* key. Untrusted keys never supersede anything, so writing to etcd alone
    cannot push a trusted key out; keys published at the same moment never supersede
    each other; this host's own key (own_cert) is never superseded."""
    grace = desired.retention.superseded_grace
    dated = sorted(kids, key=lambda k: (facts[k].published, k))
    first_at: dict[datetime, str] = {}
    for kid in dated:
        first_at.setdefault(facts[kid].published, kid)  # type: ignore[arg-type]
    next_time = dict(itertools.pairwise(first_at))
    for older in dated:
        newer_published = next_time.get(facts[older].published)  # type: ignore[arg-type]
        if newer_published is None:
            continue
        newer = first_at[newer_published]
        drop_at = saturating_add(newer_published, grace)
        if at < drop_at:
            events.append(drop_at)
            warnings += _upcoming(older, facts[older].host, drop_at, at, f"superseded by {newer}")
            continue
        if older == local.own_kid and facts[older].host == desired.host:
            warnings.append(
                f"key {older} is superseded by {newer} but is this host's own_cert key: "
                "kept; renew own_cert or reimage before it is dropped"
            )
            continue
        retired[older] = _Retired(
            "superseded",
            f"superseded by {newer} published {format_time(newer_published)}, "
            f"grace {format_duration(grace)}",
        )


def _upcoming(kid: str, host: str | None, drop_at: datetime, at: datetime, why: str) -> list[str]:
    if (drop_at - at).days < UPCOMING_WINDOW_DAYS:
        return [
            f"key {kid} ({host or 'unknown host'}) will be dropped on {format_time(drop_at)}: {why}"
        ]
    return []


# --- step 5: each host's current key (R3, R16) -----------------------------------------------


@dataclass(frozen=True)
class _Current:
    by_host: Mapping[str, str]  # host -> its current kid (revoked ones included)
    wrong_host_own: str | None  # own_cert holds another host's key (a copied file)


def _sort_key(fact: _Facts) -> tuple[bool, datetime]:
    """Newest last: dated keys after undated ones, then by publish time."""
    return (fact.published is not None, fact.published or UTC_MIN)


def _current_keys(
    desired: DesiredState,
    local: LocalFacts,
    observed: _Observed,
    facts: Mapping[str, _Facts],
    trust: Mapping[str, _Trust],
    retired: Mapping[str, _Retired],
) -> _Current:
    """A host's current key: own_cert's kid for this host, else its newest published key
    that is trusted *or revoked*. Untrusted keys never become current, so junk published
    under a host's name changes nothing; a revoked newest key stays the host's current
    key (it still signs with it), so revoking it never makes an older key "current" and
    excluded (R16)."""
    candidates: dict[str, list[str]] = {}
    for kid, fact in facts.items():
        if fact.host is None or kid in retired or not observed.keys[kid].in_etcd:
            continue
        if trust[kid].status in ("trusted", "revoked"):
            candidates.setdefault(fact.host, []).append(kid)
    by_host = {}
    for host, kids in candidates.items():
        newest = max(kids, key=lambda k: (*_sort_key(facts[k]), k))
        by_host[host] = newest
    wrong_host = None
    me = desired.host
    if local.own_kid and me:
        own = facts.get(local.own_kid)
        if own is not None and own.host not in (None, me) and own.source in AUTHENTICATED:
            wrong_host = local.own_kid
        else:
            by_host[me] = local.own_kid
    return _Current(by_host, wrong_host)


# --- step 6: the effective set --------------------------------------------------------------


@dataclass(frozen=True)
class _Selection:
    bundled: tuple[BundledKey, ...]
    excluded: BundledKey | None  # this host's own key, left out of the bundle
    kept_alone: str | None  # its own key kept in: nothing else to verify (R19)
    dropped: Mapping[str, str]  # kid -> why it is not in the bundle


def _select(
    desired: DesiredState,
    local: LocalFacts,
    observed: _Observed,
    facts: Mapping[str, _Facts],
    trust: Mapping[str, _Trust],
    retired: Mapping[str, _Retired],
    current: _Current,
) -> _Selection:
    """The trusted keys retention keeps, minus this host's own current key, which its
    apiserver loads from its own flag: unless nothing else would be left (R19: the first
    or only control plane keeps its own key; a bundle is never empty)."""
    dropped: dict[str, str] = {}
    effective: dict[str, BundledKey] = {}
    for kid, seen in observed.keys.items():
        verdict = trust[kid]
        if verdict.status == "revoked":
            dropped[kid] = verdict.reason
        elif verdict.status != "trusted":
            dropped[kid] = (
                "not in the trusted list"
                if verdict.reason.startswith("valid but")
                else f"not trusted ({verdict.reason})"
            )
        elif kid in retired:
            dropped[kid] = retired[kid].reason
        else:
            fact = facts[kid]
            effective[kid] = BundledKey(kid, fact.host, seen.info, fact.published)
    own = _own_key(desired, local, observed, facts, current, effective)
    if own is None:
        return _Selection(_sorted(effective.values()), None, None, dropped)
    rest = [key for kid, key in effective.items() if kid != own.kid]
    if not rest:
        return _Selection((own,), None, own.kid, dropped)
    if own.kid not in effective:
        # Not trusted: nothing to leave out (its apiserver loads it anyway), nothing to
        # remember (a memory line must never create trust).
        return _Selection(_sorted(rest), None, None, dropped)
    dropped[own.kid] = (
        "this host's own key: its apiserver loads it from its own --service-account-key-file"
    )
    return _Selection(_sorted(rest), own, None, dropped)


def _own_key(
    desired: DesiredState,
    local: LocalFacts,
    observed: _Observed,
    facts: Mapping[str, _Facts],
    current: _Current,
    effective: Mapping[str, BundledKey],
) -> BundledKey | None:
    """The key exclude_host leaves out: this host's current key, unless it is revoked
    (R16: it leaves the bundle anyway, and no other key is left out in its place)."""
    host = desired.bundle.exclude_host
    if host is None or host == "self":
        return None
    kid = current.by_host.get(host)
    if kid is None or kid in desired.revoked:
        return None
    if kid in effective:
        return effective[kid]
    info = observed.keys[kid].info if kid in observed.keys else None
    if info is None and kid == local.own_kid:
        info = local.own_key
    if info is None:
        return None
    published = facts[kid].published if kid in facts else None
    return BundledKey(kid, host, info, published)


def _sorted(keys: Iterable[BundledKey]) -> tuple[BundledKey, ...]:
    return tuple(sorted(keys, key=lambda k: k.kid))


# --- step 7: the bundle, the JWKS and etcd ----------------------------------------------------


def render_bundle(keys: Iterable[BundledKey], excluded: BundledKey | None = None) -> bytes:
    """Public keys sorted by kid, each under a ``# kid host published`` line. Deterministic.

    The publish time is the one sakeystate first saw for the key, and the host the one
    it decided then: the bundle is its memory of both (R12). The key this host leaves
    out gets a comment line of its own, with no block, so that its host and publish
    time are remembered too (kube-apiserver skips text outside PEM blocks).
    """
    lines: list[tuple[str, bytes]] = []
    for item in keys:
        when = format_time(item.published) if item.published else "-"
        header = f"# {item.kid} {item.host or '-'} {when}\n".encode()
        lines.append((item.kid, header + item.key.public_pem))
    if excluded is not None:
        when = format_time(excluded.published) if excluded.published else "-"
        line = f"# excluded {excluded.kid} {excluded.host or '-'} {when} {_EXCLUDED_NOTE}\n"
        lines.append((excluded.kid, line.encode()))
    return b"".join(part for _kid, part in sorted(lines))


def jwk_of(item: BundledKey) -> dict[str, str]:
    """The JWK kube-apiserver serves for a key: PyJWT's, with its kid, ``use`` and ``alg``."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    public: Any = load_pem_public_key(item.key.public_pem)
    algorithm = item.key.algorithm
    if algorithm.startswith("RSA"):
        jwk: dict[str, str] = RSAAlgorithm.to_jwk(public, as_dict=True)
        alg = "RS256"
    else:
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        alg = _JWS_ALGORITHMS[algorithm]
    jwk.pop("key_ops", None)
    return {**jwk, "use": "sig", "kid": item.kid, "alg": alg}


_JWS_ALGORITHMS = {"ECDSA-P-256": "ES256", "ECDSA-P-384": "ES384", "ECDSA-P-521": "ES512"}


def render_jwks(keys: Iterable[BundledKey]) -> bytes:
    """The effective set as a JWKS document, sorted by kid. Deterministic. A key no JWS
    algorithm signs with (a P-224 key kept from an old bundle) has no JWK."""
    usable = [
        k for k in keys if k.key.algorithm.startswith("RSA") or k.key.algorithm in _JWS_ALGORITHMS
    ]
    document = {"keys": [jwk_of(k) for k in sorted(usable, key=lambda k: k.kid)]}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def _owned(desired: DesiredState, copy: _Copy, fact: _Facts) -> bool:
    """Whether this host may write ``copy`` (R13): its own path, or a flat or legacy
    copy of a key that is this host's by a source an etcd writer cannot forge."""
    me = desired.host
    if me is None:
        return False
    if copy.layout == "host":
        return copy.path_host == me
    return fact.host == me and fact.source in (*AUTHENTICATED, FROM_OWN_CERT)


def _etcd_actions(
    desired: DesiredState,
    observed: _Observed,
    facts: Mapping[str, _Facts],
    trust: Mapping[str, _Trust],
) -> list[Action]:
    """This host's own entries only (R13): deletes of its revoked keys, and the move of
    its flat or legacy copies to ``<prefix><host>/<kid>`` (R12). Retention deletes
    nothing from etcd: a host's clock alone must not remove a key that a host reimaged
    later still needs; ``sakeystate prune`` (operator-run) does that."""
    actions: list[Action] = []
    for kid, seen in observed.keys.items():
        fact = facts[kid]
        mine = [c for c in seen.copies if _owned(desired, c, fact)]
        if not mine:
            continue
        if trust[kid].status == "revoked":
            actions += [_delete(c, kid, fact.host, trust[kid].reason) for c in mine]
            continue
        old = [c for c in mine if c.layout != "host"]
        if old:
            new = next((c for c in mine if c.layout == "host"), None)
            migration = _migration(desired, observed, kid, fact, old, new)
            if migration is not None:
                actions.append(migration)
    return actions


def _delete(copy: _Copy, kid: str, host: str | None, reason: str) -> Action:
    key = copy.entry.key
    return Action(
        "etcd",
        "delete",
        reason,
        kid=kid,
        host=host,
        key=key,
        guards=(Guard(key, copy.entry.mod_revision),),
        writes=(Delete(key),),
    )


def own_entry_key(desired: DesiredState, host: str, kid: str) -> str:
    """Where a host's key lives in etcd: ``<prefix><host>/<kid>`` (R12)."""
    return f"{desired.etcd.prefix}{host}/{kid}"


def _migration(
    desired: DesiredState,
    observed: _Observed,
    kid: str,
    fact: _Facts,
    old: list[_Copy],
    new: _Copy | None,
) -> Action | None:
    """Move this host's flat or legacy copies of a key to its own path, in one guarded
    transaction: the new copy is created only where nothing is (or, when it is there
    already, kept at the revision read), and each old copy is deleted only at the
    revision read, so the key is never missing under both names."""
    assert desired.host is not None
    target = own_entry_key(desired, desired.host, kid)
    names = ", ".join(c.entry.key for c in old)
    olds = tuple(Guard(c.entry.key, c.entry.mod_revision) for c in old)
    deletes = tuple(Delete(c.entry.key) for c in old)
    if new is not None:
        return Action(
            "etcd",
            "migrate",
            f"per-host layout: {target} already holds this key; delete the old copy {names}",
            kid=kid,
            host=desired.host,
            key=old[0].entry.key,
            guards=(Guard(target, new.entry.mod_revision), *olds),
            writes=deletes,
        )
    if target in observed.occupied:
        return None  # the path holds something unusable: reported as rejected already
    first = old[0]
    value = render_value(first.value.key, desired.host, fact.published, first.value.intermediates)
    return Action(
        "etcd",
        "migrate",
        f"per-host layout: move {names} to {target} (Host: {desired.host})",
        kid=kid,
        host=desired.host,
        key=first.entry.key,
        guards=(Guard(target, 0), *olds),
        writes=(Put(target, value), *deletes),
    )


def _bundle_actions(d: _Decided, before: set[str], after: set[str]) -> list[Action]:
    selection = d.selection
    actions: list[Action] = []
    for kid in sorted(after - before):
        seen = d.observed.keys.get(kid)
        if selection.kept_alone == kid:
            how = "this host's own key, kept: nothing else to verify (a bundle is never empty)"
        elif seen is not None and not seen.in_etcd:
            how = "kept from the bundle"
        else:
            how = "published in etcd"
        source = d.trust[kid].source if kid in d.trust else None
        host = _host(d.facts, kid)
        actions.append(Action("bundle", "add", f"{source or 'trusted'}, {how}", kid=kid, host=host))
    for kid in sorted(before - after):
        why = selection.dropped.get(kid, "not in the effective set")
        if selection.excluded is None or kid != selection.excluded.kid:
            why = f"{why}; tokens with kid {kid} stop validating here"
        actions.append(Action("bundle", "remove", why, kid=kid, host=_host(d.facts, kid)))
    return actions


def _host(facts: Mapping[str, _Facts], kid: str) -> str | None:
    return facts[kid].host if kid in facts else None


def _perms_drift(desired: DesiredState, bundle: BundleObservation) -> str:
    if bundle.content is None:
        return ""
    drift = []
    if bundle.mode is not None and bundle.mode != desired.bundle.mode:
        drift.append(f"mode {bundle.mode:04o} -> {desired.bundle.mode:04o}")
    if desired.bundle.owner and bundle.owner != desired.bundle.owner:
        drift.append(f"owner {bundle.owner} -> {desired.bundle.owner}")
    if desired.bundle.group and bundle.group != desired.bundle.group:
        drift.append(f"group {bundle.group} -> {desired.bundle.group}")
    return ", ".join(drift)


# --- refusals ---------------------------------------------------------------------------------


def _refusals(
    desired: DesiredState,
    local: LocalFacts,
    d: _Decided,
    before: set[str],
    after: set[str],
    allow_removals: bool,
) -> list[str]:
    retention = desired.retention
    refusals = list(local.problems)
    if desired.bundle.exclude_host == "self":
        refusals.append(
            "bundle.exclude_host is self, but this host's FQDN is unknown: pass --host "
            "or set host in the state file"
        )
    if len(after) < retention.min_keys:
        hint = (
            "; publish this host's certificate (or set own_cert) first"
            if not after and desired.bundle.exclude_host
            else ""
        )
        refusals.append(
            f"the bundle would hold {len(after)} key(s), fewer than "
            f"retention.min_keys ({retention.min_keys}){hint}"
        )
    if allow_removals:
        return refusals
    removed = before - after
    if len(removed) > retention.max_removals:
        refusals.append(
            f"the plan removes {len(removed)} keys ({', '.join(sorted(removed))}) from the "
            f"bundle, more than retention.max_removals ({retention.max_removals}); "
            "review the plan and re-run with --allow-removals"
        )
    return refusals + _live_key_removals(desired, d, removed)


def _live_key_removals(desired: DesiredState, d: _Decided, removed: set[str]) -> list[str]:
    """R15: only revocation and retention remove a key sakeystate bundled; any other
    removal (an unpinned key, a host dropped from an anchor, a typo in a kid) is an
    edit that would reject the tokens that key signed. A block sakeystate never wrote
    (a hand edit) goes, within max_removals."""
    selection = d.selection
    excluded = selection.excluded.kid if selection.excluded else None
    out = []
    for kid in sorted(removed):
        seen = d.observed.keys.get(kid)
        if seen is None or seen.recorded is None:
            continue
        if kid in desired.revoked or kid in d.retention.retired or kid == excluded:
            continue
        host = _host(d.facts, kid)
        newest = (
            f"; it is the newest key {host} has published: its apiserver probably signs with it"
            if host is not None and _newest_published(d.observed, d.facts, desired, host) == kid
            else ""
        )
        out.append(
            f"the plan removes {kid} ({host or 'unknown host'}) from the bundle "
            f"({selection.dropped.get(kid, 'not in the effective set')}), though it may still "
            f"verify valid tokens{newest}. Revoke it to pull it on purpose, restore its trust, "
            "or re-run with --allow-removals"
        )
    return out


# --- warnings ---------------------------------------------------------------------------------


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance, or limit + 1 once it is certainly above ``limit``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        if min(current) > limit:
            return limit + 1
        previous = current
    return previous[-1]


def _untrusted_warnings(
    observed: _Observed, facts: Mapping[str, _Facts], trust: Mapping[str, _Trust]
) -> list[str]:
    out = []
    for kid, seen in observed.keys.items():
        if trust[kid].status == "untrusted" and seen.in_etcd:
            anchor_says = (
                f": {trust[kid].reason}" if trust[kid].reason.startswith(("anchor", "no ")) else ""
            )
            out.append(
                f"untrusted key {kid} ({facts[kid].host or 'unknown host'}) is published in "
                f"etcd{anchor_says}; add it to trusted after review"
            )
    return out


def _missing_warnings(
    desired: DesiredState,
    observed: _Observed,
    facts: Mapping[str, _Facts],
    trust: Mapping[str, _Trust],
    retired: Mapping[str, _Retired],
) -> list[str]:
    """Trusted keys etcd does not hold: kept from the bundle (R9), and "did you mean".
    A key retention removes in this plan is not worth a warning about etcd."""
    missing = [kid for kid in sorted(desired.trusted) if kid not in observed.keys]
    missing += [
        kid
        for kid, seen in observed.keys.items()
        if not seen.in_etcd and trust[kid].status == "trusted" and kid not in retired
    ]
    published = [kid for kid, seen in observed.keys.items() if seen.in_etcd]
    out = []
    for kid in missing:
        host = facts[kid].host if kid in facts else desired.trusted[kid].host
        seen = observed.keys.get(kid)
        if seen is not None and not seen.in_bundle:
            out.append(
                f"this host's own key {kid} is not published in etcd (deleted, overwritten "
                "or unreadable): its peers that have not bundled it yet cannot trust it; "
                "publish it again"
            )
            continue
        if kid in observed.keys:
            text = (
                f"trusted key {kid} ({host or 'unknown host'}) is in the bundle but not "
                "published in etcd (deleted, overwritten or unreadable): kept in the bundle; "
                "revoke it or remove it from trusted to drop it"
            )
        else:
            text = f"trusted key {kid} ({host or 'unknown host'}) is not published in etcd"
        if len(missing) <= _SUGGEST_MAX_MISSING and kid in desired.trusted:
            near = [
                p
                for p in published
                if trust[p].status == "untrusted"
                and _edit_distance(kid, p, _SUGGEST_MAX_DISTANCE) <= _SUGGEST_MAX_DISTANCE
            ]
            if near:
                text += "; did you mean " + " or ".join(
                    f"{p} (published by {facts[p].host or 'unknown host'})" for p in near
                )
        out.append(text)
    return out


def _own_key_warnings(
    desired: DesiredState,
    local: LocalFacts,
    observed: _Observed,
    facts: Mapping[str, _Facts],
    trust: Mapping[str, _Trust],
    current: _Current,
    at: datetime,
) -> list[str]:
    """This host's own current key revoked or untrusted, own_cert holding another host's
    key, and expired certificates on any host's current key: kube-apiserver ignores the
    dates, so these only warn."""
    out = []
    host = desired.host
    if current.wrong_host_own is not None:
        kid = current.wrong_host_own
        out.append(
            f"own_cert holds {kid}, which is {facts[kid].host}'s key "
            f"({facts[kid].source}), not {host}'s: it stays in the bundle; fix own_cert"
        )
    own = current.by_host.get(host) if host else None
    if own is not None:
        seen = observed.keys.get(own)
        if own in desired.revoked:
            out.append(
                f"this host's own key {own} is revoked, and its apiserver still signs with it: "
                "its peers reject every token it signs; reimage it or give it a new key"
            )
        elif seen is None or trust[own].status != "trusted":
            out.append(
                f"this host's own key {own} ({host}) is not trusted"
                + ("" if seen and seen.in_etcd else " and not published in etcd")
                + ": its peers reject every token it signs; publish it and trust it"
            )
    exclude = desired.bundle.exclude_host
    if exclude and exclude != "self" and local.own_kid is None:
        newest = _newest_published(observed, facts, desired, exclude)
        chosen = current.by_host.get(exclude)
        if newest is not None and chosen is not None and newest != chosen:
            out.append(
                f"exclude_host {exclude}: it published {newest}, newer than its current key "
                f"{chosen}, and not trusted; set own_cert so that sakeystate knows which key "
                "this host signs with"
            )
    for host_name, kid in sorted(current.by_host.items()):
        seen = observed.keys.get(kid)
        info = seen.info if seen else None
        if info is not None and info.not_after is not None and info.not_after <= at:
            out.append(
                f"the certificate of {host_name}'s current key {kid} expired "
                f"{format_time(info.not_after)}: the key is kept (kube-apiserver ignores "
                "certificate dates); renew the certificate"
            )
    return out


def _newest_published(
    observed: _Observed, facts: Mapping[str, _Facts], desired: DesiredState, host: str
) -> str | None:
    """The newest key ``host`` published, trusted or not, revoked keys aside."""
    kids = [
        kid
        for kid, seen in observed.keys.items()
        if seen.in_etcd and facts[kid].host == host and kid not in desired.revoked
    ]
    return max(kids, key=lambda k: (*_sort_key(facts[k]), k)) if kids else None


def _reports(
    observed: _Observed,
    facts: Mapping[str, _Facts],
    trust: Mapping[str, _Trust],
    retired: Mapping[str, _Retired],
    selection: _Selection,
    after: set[str],
) -> list[KeyReport]:
    reports = list(observed.rejected)
    excluded = selection.excluded.kid if selection.excluded else None
    for kid, seen in observed.keys.items():
        verdict, fact = trust[kid], facts[kid]
        status, reason = verdict.status, verdict.reason
        if kid in retired:
            status, reason = retired[kid].status, retired[kid].reason
        elif kid == excluded and status == "trusted":
            status, reason = "excluded", selection.dropped[kid]
        elif status == "trusted" and not seen.in_etcd:
            status, reason = "bundle-only", "in the bundle but not published in etcd: kept"
        elif status == "untrusted" and verdict.reason.startswith("valid but"):
            reason = verdict.reason
        reports.append(
            KeyReport(
                kid,
                fact.host,
                status,
                reason,
                not_after=seen.info.not_after,
                etcd_key=seen.etcd_key,
                in_bundle=seen.in_bundle,
                bundle_after=kid in after,
                trust=verdict.source,
                host_source=fact.source,
            )
        )
    return sorted(reports, key=lambda r: (r.etcd_key or "", r.kid or ""))


def _next_event(
    observed: _Observed, events: Iterable[datetime], local: LocalFacts, at: datetime
) -> datetime | None:
    """The first retention removal or certificate start after ``at`` (what ``watch``
    sleeps until); certificate starts and ends change warnings and trust verdicts. A
    leaf becomes verifiable ``clock_skew`` before its notBefore."""
    skew = max((a.clock_skew for a in local.anchors), default=None)
    moments = list(events)
    for seen in observed.keys.values():
        info = seen.info
        moments += [m for m in (info.not_before, info.not_after) if m is not None]
        if skew is not None and info.not_before is not None:
            moments.append(info.not_before - skew)
    future = [m for m in moments if m > at]
    return min(future) if future else None


# --- the pipeline -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Decided:
    """Every step's output, for the plan and for ``prune``."""

    observed: _Observed
    facts: Mapping[str, _Facts]
    trust: Mapping[str, _Trust]
    retention: _Retention
    current: _Current
    selection: _Selection
    warnings: tuple[str, ...]


def _decide(
    desired: DesiredState,
    observed_etcd: EtcdObservation,
    bundle: BundleObservation,
    at: datetime,
    local: LocalFacts,
) -> _Decided:
    observed = _observe(desired, observed_etcd, bundle, local.own_key)
    facts, attribution_warnings = _attribute(desired, local, observed, at)
    trust = _decide_trust(desired, local, observed, facts, at)
    retention = _retention(desired, local, facts, trust, at)
    current = _current_keys(desired, local, observed, facts, trust, retention.retired)
    selection = _select(desired, local, observed, facts, trust, retention.retired, current)
    warnings = [
        *observed.warnings,
        *attribution_warnings,
        *_untrusted_warnings(observed, facts, trust),
        *retention.warnings,
    ]
    return _Decided(observed, facts, trust, retention, current, selection, tuple(warnings))


def plan(
    desired: DesiredState,
    observed: EtcdObservation,
    bundle: BundleObservation,
    at: datetime,
    allow_removals: bool = False,
    local: LocalFacts | None = None,
    reload_by_caller: bool = False,
    status: StatusObservation | None = None,
) -> Plan:
    """Compute the changes that bring etcd and the bundle to the desired state at ``at``.

    ``reload_by_caller``: the caller restarts kube-apiserver (an Ansible handler, a
    Puppet service) and confirms, so a reload is owed even without ``bundle.reload``.
    ``status``: this host's status record as read; None when it was not read (a plan
    from a snapshot), and then its drift is not judged.
    """
    local = local or LocalFacts()
    d = _decide(desired, observed, bundle, at, local)
    selection = d.selection
    files = _file_changes(desired, bundle, d)
    before, after = set(d.observed.kids_before), {b.kid for b in selection.bundled}
    key_set_changed = bundle.content is None or before != after
    actions = [*_bundle_actions(d, before, after), *files.actions]
    actions += _etcd_actions(desired, d.observed, d.facts, d.trust)
    warnings = list(d.warnings)
    reload = _reload_action(desired, bundle, key_set_changed, reload_by_caller, warnings)
    actions += [reload] if reload is not None else []
    # Its own apiserver verifies its own key whatever the state says of it: it loads the
    # file itself (revoked or not, trusted or not, in the bundle or not).
    own = d.current.by_host.get(desired.host) if desired.host else None
    verified = after | {k for k in (own, selection.excluded and selection.excluded.kid) if k}
    applied = Plan(
        cluster=desired.cluster,
        at=at,
        bundle_path=desired.bundle.path,
        actions=(),
        kids_before=d.observed.kids_before,
        kids_after=tuple(b.kid for b in selection.bundled),
        bundle_keys=selection.bundled,
        bundle_content=files.bundle,
        write_bundle=files.write_bundle,
        keys=(),
        warnings=(),
        host=desired.host,
        verified_kids=tuple(sorted(verified)),
        jwks_content=files.jwks,
        write_jwks=files.write_jwks,
        bundle_changed=key_set_changed,
        owes_reload=key_set_changed or bundle.reload_pending,
        excluded=selection.excluded,
    )
    status_value, status_action = _status_drift(desired, applied, status, at)
    actions += [status_action] if status_action is not None else []
    warnings += _missing_warnings(desired, d.observed, d.facts, d.trust, d.retention.retired)
    warnings += _own_key_warnings(desired, local, d.observed, d.facts, d.trust, d.current, at)
    return replace(
        applied,
        actions=tuple(actions),
        keys=tuple(_reports(d.observed, d.facts, d.trust, d.retention.retired, selection, after)),
        warnings=tuple(warnings),
        refusals=tuple(_refusals(desired, local, d, before, after, allow_removals)),
        next_event=_next_event(d.observed, d.retention.events, local, at),
        current=tuple(sorted(d.current.by_host.items())),
        status_value=status_value,
    )


@dataclass(frozen=True)
class _Files:
    """The bundle and JWKS this plan renders, and the actions that write them."""

    bundle: bytes
    write_bundle: bool
    jwks: bytes | None
    write_jwks: bool
    actions: tuple[Action, ...]


def _file_changes(desired: DesiredState, found: BundleObservation, d: _Decided) -> _Files:
    selection = d.selection
    content = render_bundle(selection.bundled, selection.excluded)
    before = set(d.observed.kids_before)
    after = {b.kid for b in selection.bundled}
    write_bundle = content != found.content
    actions = []
    if write_bundle and found.content is not None and before == after:
        actions.append(
            Action("bundle", "write", "bundle bytes differ from the canonical rendering")
        )
    # The JWKS serves verifiers outside the cluster (OIDC discovery), who must accept
    # this host's tokens too: it keeps the key exclude_host leaves out of the bundle.
    jwks_keys = [*selection.bundled, *([selection.excluded] if selection.excluded else [])]
    jwks = render_jwks(jwks_keys) if desired.bundle.jwks_path else None
    write_jwks = jwks is not None and jwks != found.jwks_content
    if write_jwks:
        actions.append(Action("jwks", "write", "JWKS document differs from the effective set"))
    drift = _perms_drift(desired, found)
    if drift and not write_bundle:
        actions.append(Action("bundle", "permissions", drift))
    return _Files(content, write_bundle, jwks, write_jwks, tuple(actions))


def _status_drift(
    desired: DesiredState, applied: Plan, status: StatusObservation | None, at: datetime
) -> tuple[bytes | None, Action | None]:
    """R18: this host's status record is converged state. Missing or saying other kids
    than its apiserver verifies is drift; while a reload is owed it must not claim the
    new set, so it is not judged then."""
    if status is None or desired.host is None or applied.owes_reload:
        return None, None
    value = status_record(desired, applied, status.entry, at)
    if value is None:
        return None, None
    what = "missing" if status.entry is None else "out of date"
    reason = (
        f"status record {status.key} is {what}: it must say what this host's apiserver verifies"
    )
    return value, Action("status", "write", reason, key=status.key)


def _reload_action(
    desired: DesiredState,
    bundle: BundleObservation,
    key_set_changed: bool,
    reload_by_caller: bool,
    warnings: list[str],
) -> Action | None:
    """A reload is owed when this plan changes the bundle's key set, or an earlier one
    is still owed (remembered across runs, whoever restarts the apiserver). It is an
    action when someone will run it: ``bundle.reload``, or a caller (``converge
    --no-reload`` left it owed); owed to nobody, it is a warning on every run until
    ``reload-done`` confirms that kube-apiserver was restarted."""
    if key_set_changed:
        reason = "bundle key set changed"
    elif bundle.reload_pending:
        reason = "an earlier reload is still owed"
    else:
        return None
    caller = reload_by_caller or (bundle.reload_pending and not bundle.reload_unowned)
    if desired.bundle.reload or caller:
        return Action("reload", "run", reason)
    warnings.append(
        f"{reason}, but no restart is configured (bundle.reload): kube-apiserver verifies "
        "the keys it loaded last until it restarts, and this host's status record says so; "
        "restart it, then run `sakeystate reload-done`"
    )
    return None


# --- status records -------------------------------------------------------------------------

STATUS_VERSION = 1


def status_record(
    desired: DesiredState, current: Plan, existing: EtcdEntry | None, at: datetime
) -> bytes | None:
    """This host's status record after ``current`` was applied, or None when the record
    already says the same kids and bundle digest (a no-op run writes nothing)."""
    import hashlib

    record: dict[str, Any] = {
        "version": STATUS_VERSION,
        "host": desired.host,
        "cluster": desired.cluster,
        "kids": list(current.verified_kids),
        "bundle_sha256": hashlib.sha256(current.bundle_content).hexdigest(),
    }
    if existing is not None:
        try:
            old = json.loads(existing.value)
        except (ValueError, RecursionError):
            old = None
        if (
            isinstance(old, dict)
            and {k: old.get(k) for k in record} == record
            and isinstance(old.get("since"), str)
        ):
            return None
    record["since"] = format_time(at)
    return (json.dumps(record, sort_keys=True) + "\n").encode()


# --- prune --------------------------------------------------------------------------------------


def plan_prune(
    desired: DesiredState,
    observed: EtcdObservation,
    statuses: EtcdObservation,
    at: datetime,
    local: LocalFacts,
    only_host: str | None = None,
    allow_removals: bool = False,
) -> Plan:
    """What ``sakeystate prune`` (operator-run) deletes from etcd, and nothing else:

    - every copy of a revoked key;
    - every copy of a key retention retired (superseded past superseded_grace, or
      its host decommissioned past max_token_lifetime), as of ``at``;
    - flat and legacy copies of a key its host already holds under its own path;
    - status records (and what a host keeps under ``<status_prefix><host>/``) of hosts
      that are decommissioned or named nowhere in the state.

    Nothing is excluded: the cluster's view, not one host's. ``only_host`` limits it to
    one host's entries. Refused like converge: more than max_removals trusted keys.
    """
    everyone = replace(desired, bundle=replace(desired.bundle, exclude_host=None))
    d = _decide(everyone, observed, BundleObservation(desired.bundle.path, None), at, local)
    actions: list[Action] = []
    deleted_trusted: set[str] = set()
    for kid, seen in d.observed.keys.items():
        fact = d.facts[kid]
        if only_host is not None and fact.host != only_host:
            continue
        verdict = d.trust[kid]
        if verdict.status == "revoked":
            actions += [_delete(c, kid, fact.host, verdict.reason) for c in seen.copies]
        elif kid in d.retention.retired:
            reason = d.retention.retired[kid].reason
            actions += [_delete(c, kid, fact.host, reason) for c in seen.copies]
            if verdict.status == "trusted":
                deleted_trusted.add(kid)
        elif fact.host is not None and any(
            c.layout == "host" and c.path_host == fact.host for c in seen.copies
        ):
            for copy in seen.copies:
                if copy.layout != "host":
                    why = f"already migrated to {own_entry_key(desired, fact.host, kid)}"
                    actions.append(_delete(copy, kid, fact.host, why))
    actions += _stale_records(desired, statuses, only_host)
    refusals = list(local.problems)
    retention = desired.retention
    if not allow_removals and len(deleted_trusted) > retention.max_removals:
        refusals.append(
            f"prune deletes {len(deleted_trusted)} trusted keys "
            f"({', '.join(sorted(deleted_trusted))}), more than retention.max_removals "
            f"({retention.max_removals}); review the plan and re-run with --allow-removals"
        )
    return Plan(
        cluster=desired.cluster,
        at=at,
        bundle_path=desired.bundle.path,
        actions=tuple(actions),
        kids_before=(),
        kids_after=(),
        bundle_keys=(),
        bundle_content=b"",
        write_bundle=False,
        keys=tuple(_reports(d.observed, d.facts, d.trust, d.retention.retired, d.selection, set())),
        warnings=d.warnings,
        refusals=tuple(refusals),
        host=desired.host,
    )


def _stale_records(
    desired: DesiredState, statuses: EtcdObservation, only_host: str | None
) -> list[Action]:
    """Status records of hosts the state no longer names, or names as decommissioned."""
    named = {*desired.fleet, *(t.host for t in desired.trusted.values() if t.host)}
    named |= {h for a in desired.trust_anchors for h in a.hosts}
    named -= set(desired.decommissioned)
    prefix = desired.etcd.status_prefix
    actions = []
    for entry in statuses.entries:
        host = entry.key[len(prefix) :].split("/", 1)[0].lower()
        if host in named or (only_host is not None and host != only_host):
            continue
        why = (
            f"host {host} is decommissioned"
            if host in desired.decommissioned
            else f"host {host} is named nowhere in the state"
        )
        actions.append(
            Action(
                "etcd",
                "delete",
                f"status record of a host outside the fleet: {why}",
                host=host,
                key=entry.key,
                guards=(Guard(entry.key, entry.mod_revision),),
                writes=(Delete(entry.key),),
            )
        )
    return actions


# --- publish ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishDecision:
    value: bytes | None  # None: etcd already holds what we would write
    message: str


def plan_publish(
    target: str,
    existing: EtcdEntry | None,
    key: KeyInfo,
    host: str,
    at: datetime,
    intermediates: tuple[bytes, ...] = (),
    published: datetime | None = None,
) -> PublishDecision:
    """What ``publish`` writes under ``target`` (``<prefix><host>/<kid>``): put-if-absent,
    or a renewal.

    A renewed certificate for the same key replaces an older one and keeps the
    original ``Published`` time (the key is not newer, so nothing is superseded);
    ``published`` is the time of an older copy (the flat layout) being moved here.
    A value holding a different key, or one that cannot be parsed, is never
    overwritten.
    """
    if existing is None:
        return PublishDecision(
            render_value(key, host, published or at, intermediates),
            f"published {key.kid} for {host} as {target}",
        )
    try:
        current = parse_value(existing.value)
    except KeyRejected as exc:
        raise SakeystateError(
            f"refusing to overwrite {target}: it holds a value that is not an accepted key ({exc})"
        ) from None
    if current.key.kid != key.kid:
        raise SakeystateError(
            f"refusing to overwrite {target}: it holds a different key (kid {current.key.kid})"
        )
    old_cert, new_cert = current.key, key
    if new_cert.certificate_pem is None and old_cert.certificate_pem is not None:
        return PublishDecision(None, f"{target} already holds a certificate for this key")
    if old_cert.not_after and new_cert.not_after and new_cert.not_after < old_cert.not_after:
        return PublishDecision(
            None,
            f"{target} already holds a newer certificate for this key "
            f"(not after {format_time(old_cert.not_after)})",
        )
    value = render_value(key, host, current.published or published or at, intermediates)
    if value == existing.value:
        return PublishDecision(None, f"{target} is already published")
    return PublishDecision(
        value, f"renewed the certificate of {key.kid} for {host} (same key; Published time kept)"
    )
