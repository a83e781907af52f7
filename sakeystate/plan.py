"""desired x observed x at -> Plan. Pure: no I/O, no clock, no environment.

The plan is a value: ``plan`` prints it, ``check`` asks whether it is empty,
``converge`` applies it with every etcd write guarded on the revision that was
observed. Each action carries the reason a reviewer reads.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sakeystate.errors import KeyRejected, SakeystateError
from sakeystate.keys import (
    KID_RE,
    EntryValue,
    KeyInfo,
    format_time,
    parse_pem_bundle,
    parse_value,
    render_value,
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
UPCOMING_WINDOW = timedelta(days=30)


@dataclass(frozen=True)
class Action:
    """One change, with the reason a reviewer reads and the guarded etcd writes behind it."""

    target: str  # "bundle" | "etcd" | "reload"
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
    """What sakeystate concluded about one key it saw, and why."""

    kid: str | None
    host: str | None
    status: str
    reason: str
    not_after: datetime | None = None
    etcd_key: str | None = None
    in_bundle: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "host": self.host,
            "status": self.status,
            "not_after": format_time(self.not_after) if self.not_after else None,
            "etcd_key": self.etcd_key,
            "in_bundle": self.in_bundle,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class BundledKey:
    kid: str
    host: str | None
    key: KeyInfo


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

    @property
    def changed(self) -> bool:
        return bool(self.actions)

    @property
    def etcd_actions(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.target == "etcd")

    @property
    def reload(self) -> Action | None:
        return next((a for a in self.actions if a.target == "reload"), None)


@dataclass
class _Candidate:
    """A valid, accepted key found in etcd under its kid and/or under legacy host names."""

    kid: str
    value: EntryValue
    entry: EtcdEntry | None = None
    legacy: list[EtcdEntry] = field(default_factory=list)

    @property
    def etcd_keys(self) -> list[EtcdEntry]:
        return ([self.entry] if self.entry else []) + self.legacy


def render_bundle(keys: Iterable[BundledKey]) -> bytes:
    """Public keys sorted by kid, each under a ``# kid host`` line. Deterministic."""
    parts = []
    for item in sorted(keys, key=lambda k: k.kid):
        parts.append(f"# {item.kid} {item.host or '-'}\n".encode() + item.key.public_pem)
    return b"".join(parts)


def _b64u(number: int, size: int) -> str:
    return base64.urlsafe_b64encode(number.to_bytes(size, "big")).rstrip(b"=").decode("ascii")


def jwk_of(item: BundledKey) -> dict[str, str]:
    """The JWK kube-apiserver serves for a key: its kid, ``use: sig`` and its ``alg``."""
    public = serialization.load_pem_public_key(item.key.public_pem)
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {
            "use": "sig",
            "kty": "RSA",
            "kid": item.kid,
            "alg": "RS256",
            "n": _b64u(numbers.n, (numbers.n.bit_length() + 7) // 8),
            "e": _b64u(numbers.e, (numbers.e.bit_length() + 7) // 8),
        }
    assert isinstance(public, ec.EllipticCurvePublicKey)
    size = (public.curve.key_size + 7) // 8
    crv, alg = {256: ("P-256", "ES256"), 384: ("P-384", "ES384"), 521: ("P-521", "ES512")}[
        public.curve.key_size
    ]
    point = public.public_numbers()
    return {
        "use": "sig",
        "kty": "EC",
        "kid": item.kid,
        "crv": crv,
        "alg": alg,
        "x": _b64u(point.x, size),
        "y": _b64u(point.y, size),
    }


def render_jwks(keys: Iterable[BundledKey]) -> bytes:
    """The effective set as a JWKS document, sorted by kid. Deterministic."""
    document = {"keys": [jwk_of(k) for k in sorted(keys, key=lambda k: k.kid)]}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def _collect(
    desired: DesiredState, observed: EtcdObservation, reports: list[KeyReport], warnings: list[str]
) -> dict[str, _Candidate]:
    prefix = desired.etcd.prefix
    candidates: dict[str, _Candidate] = {}
    for entry in sorted(observed.entries, key=lambda e: e.key):
        name = entry.key[len(prefix) :] if entry.key.startswith(prefix) else entry.key
        is_kid = bool(KID_RE.match(name))
        if not is_kid and not _HOST_RE.match(name):
            reports.append(
                KeyReport(
                    None,
                    None,
                    "rejected",
                    "key name is neither a kid nor a host name",
                    etcd_key=entry.key,
                )
            )
            warnings.append(
                f"etcd key {entry.key}: key name is neither a kid nor a host name; left alone"
            )
            continue
        try:
            value = parse_value(entry.value)
        except KeyRejected as exc:
            reports.append(
                KeyReport(
                    name if is_kid else None,
                    None if is_kid else name,
                    "rejected",
                    str(exc),
                    etcd_key=entry.key,
                )
            )
            warnings.append(f"etcd key {entry.key}: {exc}; never bundled, left alone")
            continue
        kid = value.key.kid
        if is_kid and kid != name:
            reason = (
                f"value holds the key with kid {kid}, not {name}: "
                "never trusted (possible poisoning)"
            )
            reports.append(KeyReport(name, value.host, "poisoned", reason, etcd_key=entry.key))
            warnings.append(f"etcd key {entry.key}: {reason}")
            continue
        candidate = candidates.get(kid)
        if candidate is None:
            candidate = candidates[kid] = _Candidate(kid=kid, value=value)
        if is_kid:
            candidate.entry = entry
            candidate.value = value
        else:
            candidate.legacy.append(entry)
    return candidates


def _host_of(desired: DesiredState, cand: _Candidate, prefix: str) -> str | None:
    trusted = desired.trusted.get(cand.kid)
    if trusted and trusted.host:
        return trusted.host
    if cand.value.host:
        return cand.value.host
    if cand.legacy:
        return cand.legacy[0].key[len(prefix) :]
    return None


def _deletes(cand: _Candidate, reason: str, host: str | None) -> list[Action]:
    return [
        Action(
            "etcd",
            "delete",
            reason,
            kid=cand.kid,
            host=host,
            key=e.key,
            guards=(Guard(e.key, e.mod_revision),),
            writes=(Delete(e.key),),
        )
        for e in cand.etcd_keys
    ]


def _legacy_published(cand: _Candidate, at: datetime) -> datetime:
    """When a legacy (FQDN-keyed) key was published: its certificate's not-before.

    The old publisher wrote a certificate when it was issued and kept no date of its
    own. Stamping the key "now" instead would make it look newer than a key its
    host published under its kid since (after a reimage), so supersession and
    exclude_host would take the pre-reimage key for the host's current one.
    """
    not_before = cand.value.key.not_before
    return min(not_before, at) if not_before is not None else at


def _migration(cand: _Candidate, prefix: str, at: datetime) -> Action:
    """Move a key's legacy (FQDN-keyed) copies under its kid in one guarded transaction.

    The transaction holds only if every legacy copy is still at the revision read
    and the kid entry is still as read (absent, or at its revision), so a key is
    never deleted from one name without being present under the other.
    """
    target = prefix + cand.kid
    first = cand.legacy[0]
    legacy_host = first.key[len(prefix) :]
    guards = [Guard(e.key, e.mod_revision) for e in cand.legacy]
    writes: list[EtcdOp] = []
    if cand.entry is not None:
        guards.append(Guard(target, cand.entry.mod_revision))
        reason = f"legacy layout: {target} already holds this key; remove the FQDN-keyed copy"
    else:
        guards.append(Guard(target, 0))
        writes.append(
            Put(target, render_value(cand.value.key, legacy_host, _legacy_published(cand, at)))
        )
        reason = f"legacy layout: move {first.key} to {target} (Host: {legacy_host})"
    writes += [Delete(e.key) for e in cand.legacy]
    return Action(
        "etcd",
        "migrate",
        reason,
        kid=cand.kid,
        host=legacy_host,
        key=first.key,
        guards=tuple(guards),
        writes=tuple(writes),
    )


def plan(
    desired: DesiredState,
    observed: EtcdObservation,
    bundle: BundleObservation,
    at: datetime,
    allow_removals: bool = False,
) -> Plan:
    """Compute the changes that bring etcd and the bundle to the desired state at ``at``."""
    prefix = desired.etcd.prefix
    retention = desired.retention
    reports: list[KeyReport] = []
    warnings: list[str] = []
    actions_etcd: list[Action] = []
    drop_reason: dict[str, str] = {}
    candidates = _collect(desired, observed, reports, warnings)
    occupied = {e.key for e in observed.entries}
    migrating: list[_Candidate] = []
    # Every key a host published that this plan keeps, trusted or not: the newest is the
    # one its own apiserver signs with (exclude_host), even while it still awaits review.
    published_by_host: dict[str, list[tuple[datetime | None, str]]] = {}

    live: list[tuple[_Candidate, str | None, datetime | None]] = []
    status_of: dict[str, tuple[str, str]] = {}
    for kid in sorted(candidates):
        cand = candidates[kid]
        key = cand.value.key
        host = _host_of(desired, cand, prefix)
        published = (
            cand.value.published
            if cand.entry
            else (_legacy_published(cand, at) if cand.legacy else None)
        )
        grace_end = key.not_after + retention.expired_grace if key.not_after else None
        if kid in desired.revoked:
            reason = f"revoked: {desired.revoked[kid]}"
            actions_etcd += _deletes(cand, reason, host)
            status_of[kid] = ("revoked", reason)
            drop_reason[kid] = reason
            continue
        if grace_end is not None and key.not_after is not None and at >= grace_end:
            reason = (
                f"certificate expired {format_time(key.not_after)}, "
                f"grace {format_duration(retention.expired_grace)}"
            )
            actions_etcd += _deletes(cand, reason, host)
            status_of[kid] = ("expired", reason)
            drop_reason[kid] = reason
            continue
        if host:
            published_by_host.setdefault(host.lower(), []).append((published, kid))
        if cand.legacy and cand.entry is None and prefix + kid in occupied:
            # The kid's own name holds something else (poisoned or unparsable): moving the
            # legacy copy there would overwrite it, so leave both for a human.
            warnings.append(
                f"cannot migrate {cand.legacy[0].key}: {prefix + kid} holds a different or "
                "invalid value; fix or delete it, then converge again"
            )
        elif cand.legacy:
            migrating.append(cand)  # unless supersession below deletes it outright
        if kid not in desired.trusted:
            reason = "valid but not in the trusted list: awaiting review"
            status_of[kid] = ("untrusted", reason)
            drop_reason[kid] = "not in the trusted list"
            warnings.append(
                f"untrusted key {kid} ({host or 'unknown host'}) is published in etcd; "
                "add it to trusted after review"
            )
            continue
        if key.not_before is not None and key.not_before > at:
            reason = f"certificate not valid before {format_time(key.not_before)}"
            status_of[kid] = ("not-yet-valid", reason)
            drop_reason[kid] = reason
            warnings.append(
                f"trusted key {kid} ({host or 'unknown host'}): {reason}; not bundled yet"
            )
            continue
        live.append((cand, host, published))
        status_of[kid] = ("trusted", "trusted and published")
        if key.not_after is not None and grace_end is not None:
            if key.not_after <= at:
                status_of[kid] = (
                    "trusted",
                    f"certificate expired {format_time(key.not_after)}; "
                    f"kept until {format_time(grace_end)} (expired_grace)",
                )
            if grace_end <= at + UPCOMING_WINDOW:
                warnings.append(
                    f"key {kid} ({host or 'unknown host'}) will be dropped on "
                    f"{format_time(grace_end)}: certificate expires "
                    f"{format_time(key.not_after)}"
                )

    # Supersession: a host's older key goes superseded_grace after the host published a
    # newer *trusted* key. Untrusted keys never supersede anything, so writing to etcd
    # alone cannot push a trusted key out.
    by_host: dict[str, list[tuple[_Candidate, str | None, datetime | None]]] = {}
    for item in live:
        if item[1]:
            by_host.setdefault(item[1].lower(), []).append(item)
    superseded: set[str] = set()
    for items in by_host.values():
        dated = sorted((i for i in items if i[2] is not None), key=lambda i: (i[2], i[0].kid))
        # The key that supersedes one is the first published strictly later; keys
        # published at the same moment never supersede each other.
        first_at: dict[datetime, _Candidate] = {}
        for item in dated:
            first_at.setdefault(item[2], item[0])  # type: ignore[arg-type]
        next_time = dict(itertools.pairwise(first_at))
        for older in dated:
            newer_published = next_time.get(older[2])  # type: ignore[arg-type]
            if newer_published is None:
                continue
            newer = (first_at[newer_published],)
            drop_at = newer_published + retention.superseded_grace
            if at >= drop_at:
                reason = (
                    f"superseded by {newer[0].kid} published {format_time(newer_published)}, "
                    f"grace {format_duration(retention.superseded_grace)}"
                )
                superseded.add(older[0].kid)
                actions_etcd += _deletes(older[0], reason, older[1])
                status_of[older[0].kid] = ("superseded", reason)
                drop_reason[older[0].kid] = reason
                if newer_published + retention.max_token_lifetime > at:
                    warnings.append(
                        f"removing {older[0].kid} ({older[1]}) superseded less than "
                        f"max_token_lifetime ({format_duration(retention.max_token_lifetime)}) "
                        "ago: "
                        "tokens it signed may still be unexpired"
                    )
            elif drop_at <= at + UPCOMING_WINDOW:
                warnings.append(
                    f"key {older[0].kid} ({older[1]}) will be dropped on "
                    f"{format_time(drop_at)}: superseded by {newer[0].kid}"
                )

    actions_etcd += [_migration(c, prefix, at) for c in migrating if c.kid not in superseded]

    exclude = desired.bundle.exclude_host
    excluded_kid = None
    if exclude and published_by_host.get(exclude.lower()):
        newest = max(
            published_by_host[exclude.lower()], key=lambda p: (p[0] is not None, p[0] or at, p[1])
        )
        excluded_kid = newest[1]
    bundled: list[BundledKey] = []
    # The JWKS serves verifiers outside the cluster (OIDC discovery), who must accept
    # this host's tokens too: it keeps the key exclude_host leaves out of the bundle.
    jwks_keys: list[BundledKey] = []
    for cand, host, _published in live:
        if cand.kid in superseded:
            continue
        jwks_keys.append(BundledKey(cand.kid, host, cand.value.key))
        if cand.kid == excluded_kid:
            reason = "current key of exclude_host; its own apiserver loads it"
            status_of[cand.kid] = ("excluded", reason)
            drop_reason[cand.kid] = f"excluded: {reason}"
            continue
        bundled.append(BundledKey(cand.kid, host, cand.value.key))

    for kid in sorted(desired.trusted):
        if kid not in candidates:
            host = desired.trusted[kid].host
            warnings.append(
                f"trusted key {kid} ({host or 'unknown host'}) is not published in etcd yet"
            )

    content = render_bundle(bundled)
    kids_after = tuple(sorted(b.kid for b in bundled))
    # A bundle block byte-identical to the public key of a key read from etcd is that key,
    # so only the other blocks are parsed: a no-op run parses each key once, not twice.
    known = {
        c.value.key.public_pem: KeyInfo(c.kid, c.value.key.algorithm, c.value.key.public_pem)
        for c in candidates.values()
    }
    before_keys, problems = parse_pem_bundle(bundle.content or b"", known)
    warnings += [f"bundle {bundle.path}: {p}" for p in problems]
    kids_before = tuple(sorted({k.kid for k in before_keys}))
    # Membership tests against sets: with 10,000 keys, tuples made this step quadratic.
    before_set, after_set = set(kids_before), set(kids_after)
    host_of_bundled = {b.kid: b.host for b in bundled}

    actions: list[Action] = []
    for kid in kids_after:
        if kid not in before_set:
            cand = candidates[kid]
            how = "migrated from the legacy layout" if cand.entry is None else "published in etcd"
            actions.append(
                Action("bundle", "add", f"trusted, {how}", kid=kid, host=host_of_bundled[kid])
            )
    removed = [kid for kid in kids_before if kid not in after_set]
    for kid in removed:
        why = drop_reason.get(
            kid, "not published in etcd" if kid in desired.trusted else "not in the trusted list"
        )
        host = (
            _host_of(desired, candidates[kid], prefix)
            if kid in candidates
            else (desired.trusted[kid].host if kid in desired.trusted else None)
        )
        actions.append(
            Action(
                "bundle",
                "remove",
                f"{why}; tokens with kid {kid} stop validating",
                kid=kid,
                host=host,
            )
        )
    write_bundle = content != bundle.content
    key_set_changed = bundle.content is None or before_set != after_set
    if write_bundle and not key_set_changed:
        actions.append(
            Action(
                "bundle",
                "write",
                "bundle bytes differ from the canonical rendering of the same keys",
            )
        )
    jwks_content = render_jwks(jwks_keys) if desired.bundle.jwks_path else None
    write_jwks = jwks_content is not None and jwks_content != bundle.jwks_content
    if write_jwks:
        actions.append(
            Action(
                "jwks",
                "write",
                "JWKS document differs from the effective set",
                key=desired.bundle.jwks_path,
            )
        )
    desired_perms = _perms_drift(desired, bundle)
    if desired_perms and not write_bundle:
        actions.append(Action("bundle", "permissions", desired_perms))
    actions += actions_etcd
    if desired.bundle.reload:
        if key_set_changed:
            actions.append(Action("reload", "run", "bundle key set changed"))
        elif bundle.reload_pending:
            actions.append(Action("reload", "run", "an earlier reload failed or did not finish"))

    for kid, (status, reason) in status_of.items():
        cand = candidates[kid]
        reports.append(
            KeyReport(
                kid,
                _host_of(desired, cand, prefix),
                status,
                reason,
                not_after=cand.value.key.not_after,
                etcd_key=(cand.entry or cand.legacy[0]).key,
                in_bundle=kid in after_set,
            )
        )
    for kid in kids_before:
        if kid not in candidates:
            reports.append(
                KeyReport(
                    kid,
                    desired.trusted[kid].host if kid in desired.trusted else None,
                    "bundle-only",
                    "in the bundle but not published in etcd",
                    in_bundle=kid in after_set,
                )
            )

    refusals = []
    if len(kids_after) < retention.min_keys:
        refusals.append(
            f"the bundle would hold {len(kids_after)} key(s), fewer than "
            f"retention.min_keys ({retention.min_keys})"
        )
    if bundle.content is not None and len(removed) > retention.max_removals and not allow_removals:
        refusals.append(
            f"the plan removes {len(removed)} keys from the bundle, more than "
            f"retention.max_removals ({retention.max_removals}); review the plan "
            "and re-run with --allow-removals"
        )

    return Plan(
        cluster=desired.cluster,
        at=at,
        bundle_path=desired.bundle.path,
        actions=tuple(actions),
        kids_before=kids_before,
        kids_after=kids_after,
        bundle_keys=tuple(sorted(bundled, key=lambda b: b.kid)),
        bundle_content=content,
        write_bundle=write_bundle,
        keys=tuple(sorted(reports, key=lambda r: (r.etcd_key or "", r.kid or ""))),
        warnings=tuple(warnings),
        refusals=tuple(refusals),
        jwks_content=jwks_content,
        write_jwks=write_jwks,
    )


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


@dataclass(frozen=True)
class PublishDecision:
    value: bytes | None  # None: etcd already holds what we would write
    message: str


def plan_publish(
    target: str, existing: EtcdEntry | None, key: KeyInfo, host: str, at: datetime
) -> PublishDecision:
    """What ``publish`` writes under ``target`` (the key's kid): put-if-absent, or a renewal.

    A renewed certificate for the same key replaces an older one and keeps the
    original ``Published`` time (the key is not newer, so nothing is superseded).
    A value holding a different key, or one that cannot be parsed, is never
    overwritten.
    """
    if existing is None:
        return PublishDecision(
            render_value(key, host, at), f"published {key.kid} for {host} as {target}"
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
    value = render_value(key, host, current.published or at)
    if value == existing.value:
        return PublishDecision(None, f"{target} is already published")
    return PublishDecision(
        value, f"renewed the certificate of {key.kid} for {host} (same key; Published time kept)"
    )
