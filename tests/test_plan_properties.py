"""Properties of the pure planner, over generated clusters (hypothesis).

- applying a plan, then planning again, gives an empty plan;
- the order in which etcd returns entries does not change the plan;
- no plan drops (from the bundle or etcd) a trusted, valid, unexpired,
  unrevoked, unsuperseded key, checked against an independent oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sakeystate.keys import KeyInfo, parse_value
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
}
PUBLISHED = (None, -9000, -800, -30, 0)  # hours from T0; None: no Published header


@cache
def cert_pem(index: int, validity: str) -> bytes:
    before, after = VALIDITY[validity]
    return make_cert(
        private_key("ec256", 100 + index),
        f"k{index}.example.org",
        not_before=T0 + timedelta(hours=before),
        not_after=T0 + timedelta(hours=after),
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
    desired = DesiredState(
        source="generated.yaml",
        cluster="prop",
        etcd=EtcdConfig(endpoints=("http://127.0.0.1:1",), prefix=PREFIX),
        bundle=BundleConfig(
            path="/nonexistent/bundle.pem",
            exclude_host=draw(st.sampled_from((None, *HOSTS))),
            reload=("true",) if draw(st.booleans()) else None,
        ),
        trusted={
            pool_kid(s.index): TrustedKey(pool_kid(s.index), s.host)
            for s in specs
            if s.trust == "trusted"
        },
        revoked={pool_kid(s.index): "test" for s in specs if s.trust == "revoked"},
        retention=Retention(
            expired_grace=draw(st.sampled_from([timedelta(0), timedelta(hours=24)])),
            superseded_grace=draw(
                st.sampled_from([timedelta(0), timedelta(days=30), timedelta(days=400)])
            ),
            min_keys=1,
            max_removals=100,
        ),
    )
    at = T0 + timedelta(hours=draw(st.sampled_from([0, 12, 48])))
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
    reordered = DesiredState(
        desired.source,
        desired.cluster,
        desired.etcd,
        desired.bundle,
        dict(trusted),
        desired.revoked,
        desired.retention,
    )
    assert plan(reordered, shuffled, bundle, at) == plan(desired, observed, bundle, at)


def _protected(desired: DesiredState, observed: EtcdObservation, at: datetime) -> set[str]:
    """Independent oracle: trusted keys that policy says must stay in the bundle."""
    live: dict[str, tuple[KeyInfo, str, datetime | None]] = {}
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
        if k.not_after and k.not_after + desired.retention.expired_grace <= at:
            continue
        if k.not_before and k.not_before > at:
            continue
        published = value.published if name == k.kid else min(k.not_before or at, at)
        if k.kid not in live or name == k.kid:
            live[k.kid] = (k, desired.trusted[k.kid].host or "", published)
    protected = set()
    for k_id, (_key, host, published) in live.items():
        superseded = published is not None and any(
            other_host == host
            and other_pub is not None
            and other_pub > published
            and other_pub + desired.retention.superseded_grace <= at
            for other_id, (_k, other_host, other_pub) in live.items()
            if other_id != k_id
        )
        if not superseded:
            protected.add(k_id)
    return protected


@SETTINGS
@given(clusters())
def test_no_plan_drops_a_trusted_valid_unexpired_unrevoked_key(case: tuple) -> None:  # type: ignore[type-arg]
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
    for protected in _protected(desired, observed, at):
        assert protected in result.kids_after or protected in excluded, protected
        assert protected in remaining, f"{protected} was deleted from etcd"
