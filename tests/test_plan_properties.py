"""Properties of the pure planner, over generated clusters (hypothesis).

- applying a plan, then planning again, gives an empty plan;
- the order in which etcd returns entries does not change the plan;
- no plan drops (from the bundle or etcd) a trusted key that can still verify an
  unexpired token (not revoked, not superseded for superseded_grace, its host not
  decommissioned for max_token_lifetime), whatever the certificate dates (RFC 5280's
  "no expiry" 9999-12-31 included), ``at`` (up to ten years ahead) and etcd contents
  (deleted, poisoned and garbage entries), checked against an independent oracle;
- a plan never counts fewer removals than it makes: one that removes more kids than
  max_removals (from the bundle, or trusted ones from etcd) is refused.

Each property runs 120 generated clusters of up to 6 keys on 3 hosts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sakeystate.keys import parse_pem_bundle, parse_value
from sakeystate.model import BundleObservation, Delete, EtcdEntry, EtcdObservation, Put
from sakeystate.plan import Plan, plan
from sakeystate.state import BundleConfig, DesiredState, EtcdConfig, Retention, TrustedKey

from support import T0, kid, make_cert, private_key

PREFIX = "/p/"
HOSTS = ("h1.example.org", "h2.example.org", "h3.example.org")
POOL = 6
# (not_before, not_after) offsets from T0, in hours.
VALIDITY = {
    "valid": (-720, 8760),
    "expired-long-ago": (-9000, -240),
    "expired-within-grace": (-9000, -1),
    "not-yet-valid": (24, 9000),
    "no-expiry": (-720, None),  # notAfter 9999-12-31T23:59:59Z
}
NO_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
AT_HOURS = (0, 12, 48, 24 * 400, 24 * 3650)
PUBLISHED = (None, -9000, -800, -30, 0)  # hours from T0; None: no Published header


@cache
def cert_pem(index: int, validity: str) -> bytes:
    before, after = VALIDITY[validity]
    return make_cert(
        private_key("ec256", 100 + index),
        f"k{index}.example.org",
        not_before=T0 + timedelta(hours=before),
        not_after=T0 + timedelta(hours=after) if after is not None else NO_EXPIRY,
    )


@cache
def pool_kid(index: int) -> str:
    return kid(private_key("ec256", 100 + index))


@dataclass(frozen=True)
class KeySpec:
    index: int
    layout: str  # absent | kid | legacy | both
    validity: str
    host: str
    published: int | None
    trust: str  # trusted | untrusted | revoked
    in_bundle: bool


key_specs = st.builds(
    KeySpec,
    index=st.just(0),
    layout=st.sampled_from(["absent", "kid", "kid", "legacy", "both"]),
    validity=st.sampled_from(list(VALIDITY)),
    host=st.sampled_from(HOSTS),
    published=st.sampled_from(PUBLISHED),
    trust=st.sampled_from(["trusted", "trusted", "untrusted", "revoked"]),
    in_bundle=st.booleans(),
)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[DesiredState, EtcdObservation, BundleObservation, datetime]:
    specs = [
        KeySpec(
            i,
            *(
                getattr(draw(key_specs), f)
                for f in ("layout", "validity", "host", "published", "trust", "in_bundle")
            ),
        )
        for i in range(POOL)
    ]
    entries: list[EtcdEntry] = []
    revision = 10
    for spec in specs:
        pem = cert_pem(spec.index, spec.validity)
        if spec.layout in ("kid", "both"):
            header = f"Host: {spec.host}\n"
            if spec.published is not None:
                published = T0 + timedelta(hours=spec.published)
                header += f"Published: {published.strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
            revision += 1
            entries.append(
                EtcdEntry(PREFIX + pool_kid(spec.index), header.encode() + pem, revision)
            )
        if spec.layout in ("legacy", "both"):
            revision += 1
            entries.append(EtcdEntry(f"{PREFIX}old{spec.index}.{spec.host}", pem, revision))
    if draw(st.booleans()):
        entries.append(EtcdEntry(PREFIX + "garbage.example.org", b"not a certificate", 3))
    if draw(st.booleans()):
        # A value stored under another key's kid: poisoning.
        entries.append(EtcdEntry(PREFIX + "A" * 43, cert_pem(0, "valid"), 4))
    bundle_keys = [cert_pem(s.index, "valid") for s in specs if s.in_bundle]
    bundle_content = b"".join(bundle_keys) if draw(st.booleans()) or bundle_keys else None
    host = draw(st.sampled_from(HOSTS))
    gone = draw(st.sampled_from([None, *HOSTS]))
    desired = DesiredState(
        source="generated.yaml",
        cluster="prop",
        host=host,
        decommissioned=(
            {gone: T0 - timedelta(days=draw(st.sampled_from([10, 400])))} if gone else {}
        ),
        etcd=EtcdConfig(endpoints=("http://127.0.0.1:1",), prefix=PREFIX),
        bundle=BundleConfig(
            path="/nonexistent/bundle.pem",
            exclude_host=draw(st.sampled_from((None, host))),
            reload=("true",) if draw(st.booleans()) else None,
        ),
        trusted={
            pool_kid(s.index): TrustedKey(pool_kid(s.index), s.host)
            for s in specs
            if s.trust == "trusted"
        },
        revoked={pool_kid(s.index): "test" for s in specs if s.trust == "revoked"},
        retention=Retention(
            superseded_grace=draw(
                st.sampled_from([timedelta(0), timedelta(days=30), timedelta(days=400)])
            ),
            max_token_lifetime=draw(st.sampled_from([timedelta(days=1), timedelta(days=365)])),
            min_keys=1,
            max_removals=draw(st.sampled_from([0, 1, 2, 100])),
        ),
    )
    at = T0 + timedelta(hours=draw(st.sampled_from(AT_HOURS)))
    observed = EtcdObservation(PREFIX, revision, tuple(entries))
    bundle = BundleObservation(
        desired.bundle.path, bundle_content, mode=0o644, reload_pending=draw(st.booleans())
    )
    return desired, observed, bundle, at


def apply_in_memory(
    current: Plan, observed: EtcdObservation, bundle: BundleObservation
) -> tuple[EtcdObservation, BundleObservation]:
    """What converge does, against a dict: every guard must hold, as nothing else runs."""
    store = {e.key: e for e in observed.entries}
    revision = observed.revision
    for action in current.etcd_actions:
        for guard in action.guards:
            found = store.get(guard.key)
            assert (found.mod_revision if found else 0) == guard.mod_revision, action
        for op in action.writes:
            revision += 1
            if isinstance(op, Put):
                store[op.key] = EtcdEntry(op.key, op.value, revision, revision)
            else:
                assert isinstance(op, Delete)
                del store[op.key]
    content = current.bundle_content if current.write_bundle else bundle.content
    return (
        EtcdObservation(observed.prefix, revision, tuple(store.values())),
        BundleObservation(bundle.path, content, mode=0o644, reload_pending=False),
    )


SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(clusters())
def test_applying_a_plan_then_planning_again_gives_an_empty_plan(case: tuple) -> None:  # type: ignore[type-arg]
    desired, observed, bundle, at = case
    first = plan(desired, observed, bundle, at, allow_removals=True)
    if first.refusals:
        return
    observed2, bundle2 = apply_in_memory(first, observed, bundle)
    second = plan(desired, observed2, bundle2, at, allow_removals=True)
    assert second.actions == (), second.actions
    assert second.kids_after == first.kids_after


@SETTINGS
@given(clusters(), st.randoms(use_true_random=False))
def test_input_order_does_not_change_the_plan(case: tuple, rnd) -> None:  # type: ignore[no-untyped-def,type-arg]
    desired, observed, bundle, at = case
    entries = list(observed.entries)
    rnd.shuffle(entries)
    shuffled = EtcdObservation(observed.prefix, observed.revision, tuple(entries))
    trusted = list(desired.trusted.items())
    rnd.shuffle(trusted)
    reordered = replace(desired, trusted=dict(trusted))
    assert plan(reordered, shuffled, bundle, at) == plan(desired, observed, bundle, at)


def _protected(
    desired: DesiredState, observed: EtcdObservation, bundle: BundleObservation, at: datetime
) -> set[str]:
    """Independent oracle: trusted keys that can still verify an unexpired token.

    Certificate dates play no part. A pinned key stays while it is in etcd under its
    kid or a legacy name, or in the bundle already (etcd alone never removes trust).
    """
    retention = desired.retention
    live: dict[str, tuple[str, datetime | None]] = {}
    for entry in observed.entries:
        name = entry.key[len(PREFIX) :]
        try:
            value = parse_value(entry.value)
        except Exception:
            continue
        k = value.key
        if name != k.kid and len(name) == 43:
            continue  # poisoned
        if k.kid not in desired.trusted or k.kid in desired.revoked:
            continue
        published = (
            value.published if name == k.kid else (min(k.not_before, at) if k.not_before else None)
        )
        if k.kid not in live or name == k.kid:
            live[k.kid] = (desired.trusted[k.kid].host or "", published)
    in_bundle = {cert.kid for cert in parse_pem_bundle(bundle.content or b"")[0]}
    protected = set()
    for k_id in in_bundle:
        if k_id in desired.trusted and k_id not in desired.revoked and k_id not in live:
            live[k_id] = (desired.trusted[k_id].host or "", None)
    for k_id, (host, published) in live.items():
        superseded = published is not None and any(
            other_host == host
            and other_pub is not None
            and other_pub > published
            and other_pub + retention.superseded_grace <= at
            for other_id, (other_host, other_pub) in live.items()
            if other_id != k_id
        )
        gone = desired.decommissioned.get(host)
        if gone is not None and gone + retention.max_token_lifetime <= at:
            continue
        if not superseded:
            protected.add(k_id)
    return protected


@SETTINGS
@given(clusters())
def test_no_plan_drops_a_key_that_can_still_verify_an_unexpired_token(case: tuple) -> None:  # type: ignore[type-arg]
    desired, observed, bundle, at = case
    result = plan(desired, observed, bundle, at, allow_removals=True)
    excluded = {k.kid for k in result.keys if k.status == "excluded"}
    assert len(excluded) <= 1
    after, _bundle = apply_in_memory(result, observed, bundle)
    remaining = set()
    for entry in after.entries:
        try:
            remaining.add(parse_value(entry.value).key.kid)
        except Exception:
            continue
    in_etcd = {parse_value(e.value).key.kid for e in observed.entries if _parses(e.value)}
    for protected in _protected(desired, observed, bundle, at):
        assert protected in result.kids_after or protected in excluded, protected
        if protected in in_etcd:
            assert protected in remaining, f"{protected} was deleted from etcd"


def _parses(value: bytes) -> bool:
    try:
        parse_value(value)
    except Exception:
        return False
    return True


@SETTINGS
@given(clusters())
def test_a_plan_never_counts_fewer_removals_than_it_makes(case: tuple) -> None:  # type: ignore[type-arg]
    desired, observed, bundle, at = case
    result = plan(desired, observed, bundle, at)
    removed = set(result.kids_before) - set(result.kids_after)
    removed |= {
        a.kid
        for a in result.etcd_actions
        if a.op == "delete" and a.kid in desired.trusted and a.kid not in desired.revoked
    }
    if len(removed) > desired.retention.max_removals:
        assert any("retention.max_removals" in r for r in result.refusals), removed
