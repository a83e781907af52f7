"""Executes plans: observe, plan, apply; and publish.

Order of a converge, chosen so that a crash at any point is repaired by the
next run: lock; read etcd and the bundle; plan; refuse if unsafe; etcd writes
(guarded, re-planned from a fresh read when something moved); mark a restart as
owed; write the bundle atomically; the status record when nothing is owed. The
restart itself (cluster lock, command, check, record, clearing the mark) is
``sakeystate.restart``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from sakeystate import bundle, restart
from sakeystate.anchors import Anchor, load_roots
from sakeystate.errors import EtcdError, PermissionDenied, SakeystateError
from sakeystate.etcd import EtcdStore, batches
from sakeystate.keys import KeyInfo
from sakeystate.model import BundleObservation, Delete, EtcdEntry, EtcdObservation, Guard, Put
from sakeystate.plan import (
    LocalFacts,
    Plan,
    Refused,
    StatusObservation,
    certify,
    own_entry_key,
    plan,
    plan_prune,
    plan_publish,
)
from sakeystate.restart import Who
from sakeystate.state import AnchorConfig, DesiredState

# A guarded write that loses a race is re-planned from a fresh read this often.
MAX_ATTEMPTS = 5
MAX_CA_FILE_BYTES = 1024 * 1024


def own_key(desired: DesiredState) -> KeyInfo | None:
    """The key of ``own_cert`` (this host's service-account certificate), if set."""
    if not desired.own_cert:
        return None
    return read_cert_file(desired.own_cert, "own_cert")[0]


def local_facts(desired: DesiredState) -> LocalFacts:
    """What this host adds to the plan; a failure converge would hit becomes a refusal."""
    problems: list[str] = []
    own = None
    try:
        own = own_key(desired)
    except SakeystateError as exc:
        problems.append(str(exc))
    problems += bundle.preflight(desired.bundle)
    anchors = []
    for config in desired.trust_anchors:
        try:
            anchors.append(load_anchor(config))
        except SakeystateError as exc:
            problems.append(str(exc))
    return LocalFacts(
        own_kid=own.kid if own else None,
        problems=tuple(problems),
        anchors=tuple(anchors),
        own_key=own,
    )


def load_anchor(config: AnchorConfig) -> Anchor:
    """A trust anchor with its CA file read and checked (the verifier parses it once)."""
    from sakeystate.files import read_capped

    what = f"trust_anchors {config.name}: ca_file"
    pem = read_capped(config.ca_file, MAX_CA_FILE_BYTES, what)
    load_roots(pem, f"{what} {config.ca_file}")
    return Anchor(config.name, pem, config.hosts, config.common_name, config.clock_skew)


def observe(
    desired: DesiredState, snapshot_path: str | None = None
) -> tuple[EtcdObservation, BundleObservation, StatusObservation | None]:
    """etcd (or a snapshot of it), the bundle, and this host's status record, as a plan
    sees them.

    A snapshot that carries the bundle of ``bundle.path`` stands in for the local
    file too, so a review machine plans exactly what the host would; it carries no
    status record, whose drift is then not judged.
    """
    if snapshot_path:
        from sakeystate import snapshot

        observed, found = snapshot.load_with_bundle(snapshot_path, desired.etcd.prefix)
        if found is not None and found.path == desired.bundle.path:
            return observed, found, None
        return observed, bundle.observe(desired.bundle), None
    with EtcdStore(desired.etcd) as store:
        observed = store.read(desired.etcd.prefix)
        return observed, bundle.observe(desired.bundle), observe_status(desired, store)


def observe_and_plan(
    desired: DesiredState,
    store: EtcdStore,
    at: datetime,
    allow_removals: bool = False,
    reload_by_caller: bool = False,
) -> Plan:
    observed = store.read(desired.etcd.prefix)
    found = bundle.observe(desired.bundle)
    return plan(
        desired,
        observed,
        found,
        at,
        allow_removals,
        local_facts(desired),
        reload_by_caller,
        observe_status(desired, store),
    )


def observe_status(desired: DesiredState, store: EtcdStore) -> StatusObservation | None:
    """This host's own status record: part of what a plan converges (R18)."""
    if desired.host is None:
        return None
    key = desired.etcd.status_prefix + desired.host
    return StatusObservation(key, store.get(key))


def apply_etcd(store: EtcdStore, current: Plan) -> tuple[bool, list[str]]:
    """Apply the plan's etcd writes: (False when a guard failed: re-plan and retry, the
    warnings of migrations that could only copy)."""
    items = [(a.guards, a.writes) for a in current.etcd_actions]
    try:
        return all(store.transaction(g, w) for g, w in batches(items)), []
    except PermissionDenied:
        if not any(a.op == "migrate" for a in current.etcd_actions):
            raise
    # Under the per-host grants this host may not delete its old flat or legacy copies:
    # each migration then only creates the new copy; the old one is left to prune.
    notes = []
    for action in current.etcd_actions:
        try:
            ok = store.transaction(action.guards, action.writes)
        except PermissionDenied:
            if action.op != "migrate":
                raise
            copy = [w for w in action.writes if isinstance(w, Put)]
            try:
                ok = not copy or store.transaction(action.guards[:1], copy)
            except PermissionDenied as error:
                # Not even the new copy: the old one stays in use; nothing else changes.
                notes.append(
                    f"etcd key {action.key}: this host may not move its key to its own "
                    f"entry ({error}); the old copy is read meanwhile"
                )
                continue
            notes.append(
                f"etcd key {action.key}: this host may not delete this old copy of its key "
                "(the per-host grants); it is read meanwhile; an operator's `sakeystate "
                "prune` removes it"
            )
        if not ok:
            return False, notes
    return True, notes


@dataclass(frozen=True)
class Applied:
    """A converge's writes: the plan applied, and whether a restart is owed afterwards
    (``restart.Restarter`` performs it, or the caller does)."""

    plan: Plan
    owed: bool
    record_error: str | None = None  # the status record could not be written (the run fails)


def converge(
    desired: DesiredState,
    store: EtcdStore,
    at: datetime,
    allow_removals: bool = False,
    who: Who = Who.RUN,
    on_applied: Callable[[Plan], None] | None = None,
) -> Applied:
    """Bring etcd and the bundle to the desired state; the restart is left to ``restart``.

    Under the local lock: plan, etcd writes, the owed-restart marker (before the bundle
    write that makes a restart owed), the bundle and JWKS writes, ``on_applied`` (watch's
    hook: a signer serves the set from here), then, when no restart is owed, the status
    record. A restart owed is performed afterwards, outside this lock, so that waiting
    for the cluster's reload lock never holds up the next converge of this host.
    """
    config = desired.bundle
    # Another run on this host may be in its etcd writes or its restart.
    with bundle.locked(config, config.reload_timeout + desired.etcd.timeout):
        for _attempt in range(MAX_ATTEMPTS):
            current = observe_and_plan(desired, store, at, allow_removals, who is Who.CALLER)
            if current.refusals:
                raise Refused(current)
            applied, notes = apply_etcd(store, current)
            if applied:
                current = replace(current, warnings=(*current.warnings, *notes))
                break
        else:
            raise EtcdError(
                f"etcd keys under {desired.etcd.prefix} kept changing during {MAX_ATTEMPTS} "
                "attempts; nothing more was written, run again"
            )
        owed = restart.owes(current, who)
        if owed:
            # Owed until a restart ran or `reload-done` confirmed one, whoever does it;
            # owed to nobody (no restart configured, no caller), it is only a warning.
            reason = "bundle key set changed"
            nobody = who is Who.RUN and not config.reload
            bundle.mark_reload_pending(config, f"unowned: {reason}" if nobody else reason)
        if current.write_bundle:
            bundle.write(config, current.bundle_content)
        elif any(a.op == "permissions" for a in current.actions):
            bundle.fix_permissions(config)
        if current.write_jwks and current.jwks_content is not None and config.jwks_path:
            bundle.write(config, current.jwks_content, config.jwks_path)
        if on_applied is not None:
            on_applied(current)
        # Owed from an earlier run too (the plan saw the marker); restart-free: never.
        owed = who is not Who.NEVER and (owed or current.owes_reload)
        record_error = None
        if not owed:
            # In sync, nothing owed: what this host's apiserver verifies is settled.
            try:
                restart.write_record(desired, store, current, at, restart.mode_of(who))
            except EtcdError as exc:
                record_error = str(exc)
    return Applied(current, owed, record_error)


def prune(
    desired: DesiredState,
    store: EtcdStore,
    at: datetime,
    local: LocalFacts,
    only_host: str | None = None,
    allow_removals: bool = False,
    dry_run: bool = False,
) -> Plan:
    """``sakeystate prune``: plan, refuse, then delete (guarded; re-planned when an entry
    moved since it was read). Returns the plan that was applied (or would be)."""
    for _attempt in range(MAX_ATTEMPTS):
        observed = store.read(desired.etcd.prefix)
        statuses = store.read(desired.etcd.status_prefix)
        current = plan_prune(desired, observed, statuses, at, local, only_host, allow_removals)
        if current.refusals:
            raise Refused(current)
        if dry_run:
            return current
        applied, _notes = apply_etcd(store, current)
        if applied:
            return current
    raise EtcdError(
        f"etcd keys under {desired.etcd.prefix} kept changing during {MAX_ATTEMPTS} "
        "attempts; nothing more was written, run again"
    )


def _other_copies(
    store: EtcdStore, desired: DesiredState, host: str, kid: str
) -> tuple[list[tuple[EtcdEntry, datetime | None]], str | None]:
    """This key's copies in the revision-2 flat layout (``<prefix><kid>``) and the legacy
    one (``<prefix><host>``) with their publish times (publishing moves them), and the
    etcd key of a copy under another host's path, if any (publishing is then refused)."""
    from sakeystate.keys import parse_value

    prefix = desired.etcd.prefix
    old = []
    elsewhere = None
    for entry in store.read(prefix).entries:
        name = entry.key[len(prefix) :]
        if name.endswith("/" + kid) and name != f"{host}/{kid}":
            elsewhere = elsewhere or entry.key
        if name not in (kid, host):
            continue
        try:
            value = parse_value(entry.value)
        except SakeystateError:
            continue
        if value.key.kid == kid:
            old.append((entry, value.published if name == kid else None))
    return old, elsewhere


def _put_moving(store: EtcdStore, guard: Guard, put: Put, old: list[EtcdEntry]) -> bool:
    """Put, deleting the old copies in the same transaction; under the per-host grants
    (which do not let this host delete them) the put alone, and prune removes them."""
    guards = [guard, *(Guard(e.key, e.mod_revision) for e in old)]
    try:
        return store.transaction(guards, [put, *(Delete(e.key) for e in old)])
    except PermissionDenied:
        if not old:
            raise
        return store.transaction([guard], [put])


@dataclass(frozen=True)
class PublishResult:
    changed: bool  # written (or, with dry_run, would be)
    key: str
    message: str


def read_cert_file(path: str, what: str) -> tuple[KeyInfo, tuple[bytes, ...]]:
    """A certificate (possibly followed by its intermediates) or public key file."""
    from sakeystate.files import read_capped
    from sakeystate.keys import MAX_VALUE_BYTES, parse_key_file

    pem = read_capped(path, MAX_VALUE_BYTES, what)
    try:
        return parse_key_file(pem)
    except SakeystateError as exc:
        raise SakeystateError(f"{what} {path}: {exc}") from None


def publish_host(desired: DesiredState, key: KeyInfo) -> str:
    """The host a key is published for: ``--host``, else the state's ``host`` (R7).

    It must be fully qualified, and one of the names the certificate gives, when it
    gives any: a certificate issued to another host is never published as this one.
    """
    from sakeystate.keys import names_of

    host = desired.host
    if host is None:
        raise SakeystateError(
            "cannot tell which host publishes: this machine's name is not fully qualified; "
            "pass --host FQDN or set host in the state file"
        )
    names = names_of(key)
    if names and host not in names:
        raise SakeystateError(
            f"refusing to publish for {host}: the certificate names {', '.join(names)}, "
            "not this host"
        )
    return host


def publish(
    store: EtcdStore,
    desired: DesiredState,
    key: KeyInfo,
    intermediates: tuple[bytes, ...],
    at: datetime,
    dry_run: bool = False,
) -> PublishResult:
    """Put this host's certificate under its kid; never overwrite a different key."""
    host = publish_host(desired, key)
    if key.kid in desired.revoked:
        raise SakeystateError(
            f"refusing to publish {key.kid}: it is revoked ({desired.revoked[key.kid]})"
        )
    anchors = local_facts(desired).anchors
    if desired.trust_anchors and key.kid not in desired.trusted:
        verdict = certify(anchors, key, intermediates, host, at)
        if not verdict.trusted:
            raise SakeystateError(
                f"refusing to publish {key.kid} for {host}: no trust anchor certifies it "
                f"({verdict.reason}); its peers would not trust it"
            )
    target = own_entry_key(desired, host, key.kid)
    attempted: bytes | None = None
    for _attempt in range(MAX_ATTEMPTS):
        existing = store.get(target)
        old: list[tuple[EtcdEntry, datetime | None]] = []
        if existing is None:
            old, elsewhere = _other_copies(store, desired, host, key.kid)
            if elsewhere is not None:
                raise SakeystateError(
                    f"refusing to publish {key.kid} for {host}: {elsewhere} already holds it "
                    "(another host published this key)"
                )
        published = old[0][1] if old else None
        decision = plan_publish(target, existing, key, host, at, intermediates, published)
        if decision.value is None:
            # A write whose answer was lost may have applied: then it is ours.
            ours = attempted is not None and existing is not None and existing.value == attempted
            return PublishResult(ours, target, decision.message)
        if dry_run:
            return PublishResult(True, target, "would be " + decision.message)
        guard = Guard(target, existing.mod_revision if existing else 0)
        attempted = decision.value
        if _put_moving(store, guard, Put(target, decision.value), [e for e, _p in old]):
            return PublishResult(True, target, decision.message)
    raise EtcdError(f"{target} kept changing during {MAX_ATTEMPTS} attempts; run again")
