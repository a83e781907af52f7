"""desired x observed x at -> Plan. Pure: no I/O, no clock, no environment.

The plan is a value: ``plan`` prints it, ``check`` asks whether it is empty,
``converge`` applies it with every etcd write guarded on the revision that was
observed. Each action carries the reason a reviewer reads.

``plan()`` is a pipeline of named steps over one table of keys (``_Key`` per kid):
collect what etcd holds, read the bundle as kube-apiserver reads it, decide
trust, apply retention, keep what only the bundle still holds, pick each host's
current key, render the effective set, diff, and check the refusals.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sakeystate.anchors import Anchor, Verdict, verify_any
from sakeystate.errors import KeyRejected, SakeystateError
from sakeystate.keys import (
    KID_RE,
    EntryValue,
    KeyInfo,
    format_time,
    parse_pem_bundle,
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

# Legacy layout: the old publisher keyed each certificate by the host's FQDN.
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*$"
)
# The comment line sakeystate writes above each bundle block: ``# <kid> <host>``.
_BUNDLE_COMMENT_RE = re.compile(rb"^# ([A-Za-z0-9_-]{43}) (\S+)$", re.MULTILINE)
UPCOMING_WINDOW_DAYS = 30
# "Did you mean": a pinned kid missing from etcd is compared with the kids etcd holds
# when there are at most this many missing (each comparison is 43x43 steps).
_SUGGEST_MAX_MISSING = 20
_SUGGEST_MAX_DISTANCE = 3


@dataclass(frozen=True)
class Action:
    """One change, with the reason a reviewer reads and the guarded etcd writes behind it."""

    target: str  # "bundle" | "jwks" | "etcd" | "reload"
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
    bundle this plan writes.
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "host": self.host,
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


@dataclass(frozen=True)
class LocalFacts:
    """What this host adds to a plan, read at the edges (``apply.observe``).

    ``own_kid`` is the kid of ``own_cert``; ``problems`` are failures a converge
    would hit before writing anything (unreadable ``own_cert``, a missing bundle
    directory, an unknown owner): the plan refuses with the same message.
    ``anchors`` are the trust anchors with their CA files' contents.
    """

    own_kid: str | None = None
    problems: tuple[str, ...] = ()
    anchors: tuple[Anchor, ...] = ()


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

    @property
    def changed(self) -> bool:
        return bool(self.actions)

    @property
    def etcd_actions(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.target == "etcd")

    @property
    def reload(self) -> Action | None:
        return next((a for a in self.actions if a.target == "reload"), None)

    bundle_changed: bool = False  # the bundle's key set changes: what a restart follows

    @property
    def removed_kids(self) -> tuple[str, ...]:
        return tuple(k for k in self.kids_before if k not in set(self.kids_after))


# --- the table of keys -----------------------------------------------------------------


@dataclass
class _Key:
    """Everything the plan knows and decides about one kid."""

    kid: str
    info: KeyInfo
    host: str | None = None
    published: datetime | None = None
    entry: EtcdEntry | None = None  # under <prefix><kid>
    legacy: list[EtcdEntry] = field(default_factory=list)  # under <prefix><fqdn>
    intermediates: tuple[bytes, ...] = ()
    value_host: str | None = None  # the value's Host header, as published
    in_etcd: bool = True
    in_bundle: bool = False
    trust: str | None = None  # "pinned" / "anchor <name>: ..." when trusted
    status: str = "untrusted"
    reason: str = ""
    drop: str | None = None  # why it is not in the effective set
    delete: bool = False  # retention or revocation deletes its etcd entries

    @property
    def etcd_entries(self) -> list[EtcdEntry]:
        return ([self.entry] if self.entry else []) + self.legacy

    @property
    def etcd_key(self) -> str | None:
        entries = self.etcd_entries
        return entries[0].key if entries else None


@dataclass
class _Work:
    """The plan under construction: the key table and what the steps say."""

    desired: DesiredState
    at: datetime
    keys: dict[str, _Key] = field(default_factory=dict)
    reports: list[KeyReport] = field(default_factory=list)  # rejected/poisoned etcd values
    warnings: list[str] = field(default_factory=list)
    occupied: set[str] = field(default_factory=set)
    bundle_hosts: dict[str, str] = field(default_factory=dict)
    current: dict[str, str] = field(default_factory=dict)  # host -> its current kid
    excluded: str | None = None
    events: list[datetime] = field(default_factory=list)  # when time alone changes the plan


def render_bundle(keys: Iterable[BundledKey]) -> bytes:
    """Public keys sorted by kid, each under a ``# kid host`` line. Deterministic."""
    parts = []
    for item in sorted(keys, key=lambda k: k.kid):
        parts.append(f"# {item.kid} {item.host or '-'}\n".encode() + item.key.public_pem)
    return b"".join(parts)


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


# --- step 1: what etcd holds -----------------------------------------------------------


def _reject(work: _Work, entry: EtcdEntry, kid: str | None, host: str | None, why: str) -> None:
    work.reports.append(KeyReport(kid, host, "rejected", why, etcd_key=entry.key))
    work.warnings.append(f"etcd key {entry.key}: {why}; never bundled, left alone")


def _collect(work: _Work, observed: EtcdObservation) -> None:
    """Every accepted key etcd holds, under its kid and/or under legacy host names."""
    prefix = work.desired.etcd.prefix
    work.occupied = {e.key for e in observed.entries}
    for entry in sorted(observed.entries, key=lambda e: e.key):
        name = entry.key[len(prefix) :] if entry.key.startswith(prefix) else entry.key
        is_kid = bool(KID_RE.match(name))
        if not is_kid and not _HOST_RE.match(name):
            _reject(work, entry, None, None, "key name is neither a kid nor a host name")
            continue
        try:
            value = parse_value(entry.value)
        except KeyRejected as exc:
            _reject(work, entry, name if is_kid else None, None if is_kid else name, str(exc))
            continue
        kid = value.key.kid
        if is_kid and kid != name:
            reason = (
                f"value holds the key with kid {kid}, not {name}: "
                "never trusted (possible poisoning)"
            )
            work.reports.append(KeyReport(name, value.host, "poisoned", reason, etcd_key=entry.key))
            work.warnings.append(f"etcd key {entry.key}: {reason}")
            continue
        key = work.keys.get(kid)
        if key is None:
            key = work.keys[kid] = _Key(kid=kid, info=value.key)
        if is_kid:
            _take_value(key, entry, value)
        else:
            key.legacy.append(entry)
            if key.entry is None:
                key.intermediates = key.intermediates or value.intermediates
                key.value_host = key.value_host or name.lower()
    for key in work.keys.values():
        if key.entry is None:
            key.published = _legacy_published(key, work.at)


def _take_value(key: _Key, entry: EtcdEntry, value: EntryValue) -> None:
    key.entry = entry
    key.info = value.key
    key.published = value.published
    key.intermediates = value.intermediates
    key.value_host = value.host.lower() if value.host else None


def _legacy_published(key: _Key, at: datetime) -> datetime | None:
    """When a legacy (FQDN-keyed) key was published: its certificate's not-before.

    The old publisher wrote a certificate when it was issued and kept no date of its
    own. Stamping the key "now" instead would make it look newer than a key its
    host published under its kid since (after a reimage), so supersession and
    exclude_host would take the pre-reimage key for the host's current one. A bare
    public key has no date at all: it stays undated, so it never supersedes nor is
    superseded (only revocation or decommissioning removes it).
    """
    not_before = key.info.not_before
    return min(not_before, at) if not_before is not None else None


# --- step 2: the bundle as kube-apiserver reads it -------------------------------------


def _read_bundle(work: _Work, bundle: BundleObservation) -> list[KeyInfo]:
    """The keys kube-apiserver loads from the bundle now (Go's encoding/pem + keyutil)."""
    known = {k.info.public_pem: k.info for k in work.keys.values()}
    before, problems = parse_pem_bundle(bundle.content or b"", known)
    work.warnings += [f"bundle {bundle.path}: {p}" for p in problems]
    work.bundle_hosts = {
        m.group(1).decode(): m.group(2).decode("utf-8", "replace").lower()
        for m in _BUNDLE_COMMENT_RE.finditer(bundle.content or b"")
    }
    for info in before:
        key = work.keys.get(info.kid)
        if key is None:
            key = work.keys[info.kid] = _Key(kid=info.kid, info=info, in_etcd=False)
        key.in_bundle = True
    return before


# --- step 3: trust ----------------------------------------------------------------------


def _host_of(work: _Work, key: _Key) -> str | None:
    pinned = work.desired.trusted.get(key.kid)
    if pinned and pinned.host:
        return pinned.host
    return key.value_host or work.bundle_hosts.get(key.kid)


def _decide_trust(work: _Work, local: LocalFacts) -> None:
    """Pinned, or certified by a trust anchor; revocation wins over both."""
    desired = work.desired
    for key in work.keys.values():
        key.host = _host_of(work, key)
        if key.kid in desired.revoked:
            key.status, key.reason = "revoked", f"revoked: {desired.revoked[key.kid]}"
            key.drop, key.delete = key.reason, True
            continue
        if key.kid in desired.trusted:
            key.trust = "pinned"
        elif key.in_etcd and local.anchors:
            verdict = _anchor_verdict(work, key, local)
            if verdict.trusted:
                key.trust = verdict.reason
            else:
                key.reason = verdict.reason
        if key.trust is None and key.in_bundle:
            key.trust = _kept_from_bundle(work, key)
        if key.trust is not None:
            key.status = "trusted"
            key.reason = key.trust if key.in_etcd else f"{key.trust}; not published in etcd"
            continue
        key.status = "untrusted"
        anchor_says = f": {key.reason}" if key.reason else ""
        key.reason = key.reason or "valid but not in the trusted list: awaiting review"
        key.drop = "not in the trusted list" + anchor_says
        if key.in_etcd:
            work.warnings.append(
                f"untrusted key {key.kid} ({key.host or 'unknown host'}) is published in "
                f"etcd{anchor_says}; add it to trusted after review"
            )


def _anchor_verdict(work: _Work, key: _Key, local: LocalFacts) -> Verdict:
    return certify(local.anchors, key.info, key.intermediates, key.value_host, work.at)


def certify(
    anchors: tuple[Anchor, ...],
    info: KeyInfo,
    intermediates: tuple[bytes, ...],
    host: str | None,
    at: datetime,
) -> Verdict:
    """The anchors' verdict on a key's certificate as of ``at``, moved into the leaf's
    validity: the verifier takes min(at, notAfter) itself, and a same-key renewal whose
    notBefore is seconds ahead of this host's clock must not drop the key (certificate
    dates never do)."""
    if info.not_before is not None and info.not_before > at:
        at = info.not_before
    return verify_any(anchors, info.certificate_pem, intermediates, host, at)


def _kept_from_bundle(work: _Work, key: _Key) -> str | None:
    """Trust a bundled key keeps when etcd no longer shows it (deleted, overwritten or
    unreadable): etcd alone never removes trust. The bundle is sakeystate's own output,
    so a key in it was trusted when written; it stays while the state still covers its
    host with an anchor (pinned keys are decided above)."""
    host = work.bundle_hosts.get(key.kid)
    if host is None:
        return None
    for anchor in work.desired.trust_anchors:
        if host in anchor.hosts:
            return f"anchor {anchor.name} (kept from the bundle: etcd no longer certifies it)"
    return None


# --- step 4: retention -------------------------------------------------------------------


def _retire(key: _Key, status: str, reason: str) -> None:
    key.status, key.reason, key.drop, key.delete = status, reason, reason, True


def _apply_retention(work: _Work, local: LocalFacts) -> None:
    """Supersession and decommissioning. Certificate dates never remove a key."""
    desired, at = work.desired, work.at
    retention = desired.retention
    by_host: dict[str, list[_Key]] = {}
    for key in work.keys.values():
        if key.trust is None or key.drop is not None or key.host is None:
            continue
        gone_at = desired.decommissioned.get(key.host)
        if gone_at is not None:
            drop_at = saturating_add(gone_at, retention.max_token_lifetime)
            if at >= drop_at:
                _retire(
                    key,
                    "decommissioned",
                    f"host {key.host} decommissioned {format_time(gone_at)}, "
                    f"max_token_lifetime {format_duration(retention.max_token_lifetime)}",
                )
                continue
            _upcoming(work, key, drop_at, f"host {key.host} decommissioned")
        if key.in_etcd and key.published is not None:
            by_host.setdefault(key.host, []).append(key)
    for items in by_host.values():
        _supersede(work, items, local)


def _supersede(work: _Work, items: list[_Key], local: LocalFacts) -> None:
    """A host's older key goes superseded_grace after the host published a newer
    *trusted* key. Untrusted keys never supersede anything, so writing to etcd alone
    cannot push a trusted key out; keys published at the same moment never supersede
    each other; this host's own key (own_cert) is never superseded."""
    grace = work.desired.retention.superseded_grace
    dated = sorted(items, key=lambda k: (k.published, k.kid))
    first_at: dict[datetime, _Key] = {}
    for key in dated:
        first_at.setdefault(key.published, key)  # type: ignore[arg-type]
    next_time = dict(itertools.pairwise(first_at))
    for older in dated:
        newer_published = next_time.get(older.published)  # type: ignore[arg-type]
        if newer_published is None:
            continue
        newer = first_at[newer_published]
        drop_at = saturating_add(newer_published, grace)
        if work.at < drop_at:
            _upcoming(work, older, drop_at, f"superseded by {newer.kid}")
            continue
        if older.kid == local.own_kid and older.host == work.desired.host:
            work.warnings.append(
                f"key {older.kid} is superseded by {newer.kid} but is this host's own_cert "
                "key: kept; renew own_cert or reimage before it is dropped"
            )
            continue
        _retire(
            older,
            "superseded",
            f"superseded by {newer.kid} published {format_time(newer_published)}, "
            f"grace {format_duration(grace)}",
        )


def _upcoming(work: _Work, key: _Key, drop_at: datetime, why: str) -> None:
    work.events.append(drop_at)
    if (drop_at - work.at).days < UPCOMING_WINDOW_DAYS:
        work.warnings.append(
            f"key {key.kid} ({key.host or 'unknown host'}) will be dropped on "
            f"{format_time(drop_at)}: {why}"
        )


# --- step 5: current keys and the effective set ------------------------------------------


def _newest(keys: Iterable[_Key]) -> _Key | None:
    dated = [k for k in keys if k.in_etcd]
    if not dated:
        return None
    return max(dated, key=lambda k: (k.published is not None, k.published or datetime.min, k.kid))


def _newest_published(work: _Work, host: str) -> _Key | None:
    """The newest key ``host`` published, trusted or not, revoked keys aside."""
    revoked = work.desired.revoked
    return _newest(k for k in work.keys.values() if k.host == host and k.kid not in revoked)


def _pick_current(work: _Work, local: LocalFacts) -> None:
    """A host's current key: own_cert's kid for this host, else its newest published
    trusted key. Untrusted keys never become a host's current key."""
    by_host: dict[str, list[_Key]] = {}
    for key in work.keys.values():
        if key.host and key.trust is not None and key.drop is None:
            by_host.setdefault(key.host, []).append(key)
    for host, keys in by_host.items():
        newest = _newest(keys)
        if newest is not None:
            work.current[host] = newest.kid
    if local.own_kid and work.desired.host:
        work.current[work.desired.host] = local.own_kid


def _exclude(work: _Work, local: LocalFacts) -> None:
    """Leave out the current key of exclude_host, which its apiserver loads itself.

    Without own_cert the current key is the host's newest published *trusted* key:
    a junk key published under the host's name never changes its bundle (nor
    restarts it). A newer key that awaits review is warned about: after a reimage
    that is the key the apiserver signs with, and own_cert says so for certain.
    """
    host = work.desired.bundle.exclude_host
    if host is None or host == "self":
        return
    kid = work.current.get(host)
    if kid is None:
        return
    newest = _newest_published(work, host)
    if local.own_kid is None and newest is not None and newest.kid != kid:
        work.warnings.append(
            f"exclude_host {host}: it published {newest.kid}, newer than its current key "
            f"{kid}, and not trusted; set own_cert so that sakeystate knows which key "
            "this host signs with"
        )
    key = work.keys.get(kid)
    if key is not None and key.host not in (None, host):
        # own_cert holds another host's key (a file copied to the wrong host): leaving it
        # out would make this apiserver reject that host's tokens.
        work.warnings.append(
            f"own_cert holds {kid}, which is {key.host}'s key, not {host}'s: it stays in "
            "the bundle; fix own_cert"
        )
        return
    if key is not None and key.drop is None:
        work.excluded = kid
        key.status = "excluded"
        key.reason = "current key of exclude_host; its own apiserver loads it"
        key.drop = f"excluded: {key.reason}"


def _effective(work: _Work) -> list[BundledKey]:
    return [
        BundledKey(k.kid, k.host, k.info)
        for k in sorted(work.keys.values(), key=lambda k: k.kid)
        if k.trust is not None and k.drop is None
    ]


# --- step 6: the diff ----------------------------------------------------------------------


def _deletes(key: _Key) -> list[Action]:
    return [
        Action(
            "etcd",
            "delete",
            key.reason,
            kid=key.kid,
            host=key.host,
            key=e.key,
            guards=(Guard(e.key, e.mod_revision),),
            writes=(Delete(e.key),),
        )
        for e in key.etcd_entries
    ]


def _migration(work: _Work, key: _Key) -> Action | None:
    """Move a key's legacy (FQDN-keyed) copies under its kid in one guarded transaction.

    The transaction holds only if every legacy copy is still at the revision read
    and the kid entry is still as read (absent, or at its revision), so a key is
    never deleted from one name without being present under the other.
    """
    prefix = work.desired.etcd.prefix
    target = prefix + key.kid
    first = key.legacy[0]
    legacy_host = first.key[len(prefix) :]
    if key.entry is None and target in work.occupied:
        # The kid's own name holds something else (poisoned or unparsable): moving the
        # legacy copy there would overwrite it, so leave both for a human.
        work.warnings.append(
            f"cannot migrate {first.key}: {target} holds a different or invalid value; "
            "fix or delete it, then converge again"
        )
        return None
    guards = [Guard(e.key, e.mod_revision) for e in key.legacy]
    writes: list[EtcdOp] = []
    if key.entry is not None:
        guards.append(Guard(target, key.entry.mod_revision))
        reason = f"legacy layout: {target} already holds this key; remove the FQDN-keyed copy"
    else:
        guards.append(Guard(target, 0))
        value = render_value(key.info, legacy_host, key.published, key.intermediates)
        writes.append(Put(target, value))
        reason = f"legacy layout: move {first.key} to {target} (Host: {legacy_host})"
    writes += [Delete(e.key) for e in key.legacy]
    return Action(
        "etcd",
        "migrate",
        reason,
        kid=key.kid,
        host=legacy_host,
        key=first.key,
        guards=tuple(guards),
        writes=tuple(writes),
    )


def _etcd_actions(work: _Work) -> list[Action]:
    actions: list[Action] = []
    for key in sorted(work.keys.values(), key=lambda k: k.kid):
        if key.delete:
            actions += _deletes(key)
        elif key.legacy:
            migration = _migration(work, key)
            if migration is not None:
                actions.append(migration)
    return actions


def _bundle_actions(work: _Work, before: set[str], after: set[str]) -> list[Action]:
    actions: list[Action] = []
    for kid in sorted(after - before):
        key = work.keys[kid]
        how = "migrated from the legacy layout" if key.entry is None else "published in etcd"
        actions.append(
            Action("bundle", "add", f"{key.trust or 'trusted'}, {how}", kid=kid, host=key.host)
        )
    for kid in sorted(before - after):
        key = work.keys[kid]
        actions.append(
            Action(
                "bundle",
                "remove",
                f"{key.drop}; tokens with kid {kid} stop validating",
                kid=kid,
                host=key.host,
            )
        )
    return actions


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


# --- step 7: refusals and warnings ---------------------------------------------------------


def _refusals(
    work: _Work, before: set[str], after: set[str], allow_removals: bool, local: LocalFacts
) -> list[str]:
    retention = work.desired.retention
    refusals = list(local.problems)
    if work.desired.bundle.exclude_host == "self":
        refusals.append(
            "bundle.exclude_host is self, but this host's FQDN is unknown: pass --host "
            "or set host in the state file"
        )
    if len(after) < retention.min_keys:
        refusals.append(
            f"the bundle would hold {len(after)} key(s), fewer than "
            f"retention.min_keys ({retention.min_keys})"
        )
    if allow_removals:
        return refusals
    removed = before - after
    removed |= {k.kid for k in work.keys.values() if k.delete and k.trust is not None}
    if len(removed) > retention.max_removals:
        refusals.append(
            f"the plan removes {len(removed)} keys ({', '.join(sorted(removed))}) from the "
            f"bundle or etcd, more than retention.max_removals ({retention.max_removals}); "
            "review the plan and re-run with --allow-removals"
        )
    for kid in sorted(before - after):
        key = work.keys[kid]
        if kid in work.desired.revoked or kid == work.excluded or key.host is None:
            continue
        if key.host in work.desired.decommissioned:
            continue
        newest = _newest_published(work, key.host)
        if newest is not None and newest.kid == kid:
            refusals.append(
                f"the plan removes {kid}, the newest key {key.host} has published "
                f"({key.drop}): its apiserver probably signs with it. Revoke it to pull it "
                "on purpose, fix the trusted entry, or re-run with --allow-removals"
            )
    return refusals


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


def _missing_warnings(work: _Work) -> None:
    """Pinned keys etcd does not hold: kept from the bundle (R9), and "did you mean"."""
    missing = [kid for kid in sorted(work.desired.trusted) if kid not in work.keys]
    missing += [k.kid for k in work.keys.values() if not k.in_etcd and k.trust is not None]
    published = [k for k in sorted(work.keys) if work.keys[k].in_etcd]
    for kid in missing:
        key = work.keys.get(kid)
        host = key.host if key else work.desired.trusted[kid].host
        if key is not None and key.drop is None:
            text = (
                f"trusted key {kid} ({host or 'unknown host'}) is in the bundle but not "
                "published in etcd (deleted, overwritten or unreadable): kept in the bundle; "
                "revoke it or remove it from trusted to drop it"
            )
        else:
            text = f"trusted key {kid} ({host or 'unknown host'}) is not published in etcd"
        if len(missing) <= _SUGGEST_MAX_MISSING and kid in work.desired.trusted:
            near = [
                p
                for p in published
                if work.keys[p].trust is None
                and _edit_distance(kid, p, _SUGGEST_MAX_DISTANCE) <= _SUGGEST_MAX_DISTANCE
            ]
            if near:
                text += "; did you mean " + " or ".join(
                    f"{p} (published by {work.keys[p].host or 'unknown host'})" for p in near
                )
        work.warnings.append(text)


def _own_key_warnings(work: _Work, local: LocalFacts) -> None:
    """This host's own current key revoked or untrusted, and expired certificates on
    any host's current key: kube-apiserver ignores the dates, so these only warn."""
    host = work.desired.host
    own = local.own_kid or (work.current.get(host) if host else None)
    if own is not None:
        key = work.keys.get(own)
        if own in work.desired.revoked:
            work.warnings.append(
                f"this host's own key {own} is revoked: its peers reject every token it "
                "signs; reimage it or give it a new key"
            )
        elif key is None or key.trust is None:
            work.warnings.append(
                f"this host's own key {own} ({host}) is not trusted"
                + ("" if key and key.in_etcd else " and not published in etcd")
                + ": its peers reject every token it signs; publish it and trust it"
            )
    for host_name, kid in sorted(work.current.items()):
        key = work.keys.get(kid)
        if key is not None and key.info.not_after is not None and key.info.not_after <= work.at:
            work.warnings.append(
                f"the certificate of {host_name}'s current key {kid} expired "
                f"{format_time(key.info.not_after)}: the key is kept (kube-apiserver ignores "
                "certificate dates); renew the certificate"
            )


def _reports(work: _Work, after: set[str]) -> list[KeyReport]:
    reports = list(work.reports)
    for key in work.keys.values():
        status = key.status
        reason = key.reason
        if not key.in_etcd and status == "trusted":
            status, reason = "bundle-only", "in the bundle but not published in etcd: kept"
        reports.append(
            KeyReport(
                key.kid,
                key.host,
                status,
                reason,
                not_after=key.info.not_after,
                etcd_key=key.etcd_key,
                in_bundle=key.in_bundle,
                bundle_after=key.kid in after,
                trust=key.trust,
            )
        )
    return sorted(reports, key=lambda r: (r.etcd_key or "", r.kid or ""))


# --- the pipeline ---------------------------------------------------------------------------


def plan(
    desired: DesiredState,
    observed: EtcdObservation,
    bundle: BundleObservation,
    at: datetime,
    allow_removals: bool = False,
    local: LocalFacts | None = None,
    reload_by_caller: bool = False,
) -> Plan:
    """Compute the changes that bring etcd and the bundle to the desired state at ``at``.

    ``reload_by_caller``: the caller restarts kube-apiserver (an Ansible handler, a
    Puppet service) and confirms with ``reload-done``, so a reload is owed even
    without ``bundle.reload``.
    """
    local = local or LocalFacts()
    work = _Work(desired, at)
    _collect(work, observed)
    before_keys = _read_bundle(work, bundle)
    _decide_trust(work, local)
    _apply_retention(work, local)
    _pick_current(work, local)
    _exclude(work, local)
    bundled = _effective(work)

    content = render_bundle(bundled)
    kids_before = tuple(sorted({k.kid for k in before_keys}))
    kids_after = tuple(b.kid for b in bundled)
    before, after = set(kids_before), set(kids_after)
    actions = _bundle_actions(work, before, after)
    write_bundle = content != bundle.content
    key_set_changed = bundle.content is None or before != after
    if write_bundle and not key_set_changed:
        actions.append(
            Action("bundle", "write", "bundle bytes differ from the canonical rendering")
        )
    # The JWKS serves verifiers outside the cluster (OIDC discovery), who must accept
    # this host's tokens too: it keeps the key exclude_host leaves out of the bundle.
    jwks_keys = bundled + [
        BundledKey(k.kid, k.host, k.info) for k in work.keys.values() if k.kid == work.excluded
    ]
    jwks_content = render_jwks(jwks_keys) if desired.bundle.jwks_path else None
    write_jwks = jwks_content is not None and jwks_content != bundle.jwks_content
    if write_jwks:
        actions.append(Action("jwks", "write", "JWKS document differs from the effective set"))
    drift = _perms_drift(desired, bundle)
    if drift and not write_bundle:
        actions.append(Action("bundle", "permissions", drift))
    actions += _etcd_actions(work)
    if key_set_changed and (desired.bundle.reload or reload_by_caller):
        actions.append(Action("reload", "run", "bundle key set changed"))
    elif bundle.reload_pending:
        # Owed until it ran or `reload-done` confirmed it, whoever restarts the apiserver.
        actions.append(Action("reload", "run", "an earlier reload is still owed"))

    _missing_warnings(work)
    _own_key_warnings(work, local)
    refusals = _refusals(work, before, after, allow_removals, local)
    verified = after | ({work.excluded} if work.excluded else set())
    return Plan(
        cluster=desired.cluster,
        at=at,
        bundle_path=desired.bundle.path,
        actions=tuple(actions),
        kids_before=kids_before,
        kids_after=kids_after,
        bundle_keys=tuple(bundled),
        bundle_content=content,
        write_bundle=write_bundle,
        keys=tuple(_reports(work, after)),
        warnings=tuple(work.warnings),
        refusals=tuple(refusals),
        jwks_content=jwks_content,
        write_jwks=write_jwks,
        host=desired.host,
        verified_kids=tuple(sorted(verified)),
        bundle_changed=key_set_changed,
        next_event=_next_event(work),
    )


def _next_event(work: _Work) -> datetime | None:
    """The first retention removal or certificate start after ``at`` (what ``watch``
    sleeps until); certificate starts and ends change warnings and trust verdicts."""
    moments = list(work.events)
    for key in work.keys.values():
        moments += [m for m in (key.info.not_before, key.info.not_after) if m is not None]
    future = [m for m in moments if m > work.at]
    return min(future) if future else None


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
) -> PublishDecision:
    """What ``publish`` writes under ``target`` (the key's kid): put-if-absent, or a renewal.

    A renewed certificate for the same key replaces an older one and keeps the
    original ``Published`` time (the key is not newer, so nothing is superseded).
    A value holding a different key, or one that cannot be parsed, is never
    overwritten.
    """
    if existing is None:
        return PublishDecision(
            render_value(key, host, at, intermediates),
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
    if current.host and current.host.lower() != host.lower():
        raise SakeystateError(
            f"refusing to publish: {target} is already published by host {current.host}, not {host}"
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
    value = render_value(key, host, current.published or at, intermediates)
    if value == existing.value:
        return PublishDecision(None, f"{target} is already published")
    return PublishDecision(
        value, f"renewed the certificate of {key.kid} for {host} (same key; Published time kept)"
    )
