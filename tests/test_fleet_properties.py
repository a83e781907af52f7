"""Fault isolation as a property (hypothesis), over random 3-5-host fleets of the seed PKI
(CN ``sa`` leaves, a ``common_name: sa`` anchor, ``exclude_host: self``), each host with
its own bundle, some reimaged, entries in the per-host or the revision-2 flat layout.

One party misbehaves at a time:
- an etcd writer holding one host's credentials (it may write only under that host's
  path), or one with every right (root);
- one host's clock shifted by up to a year either way;
- one state edit a careful operator makes (dropping a host from the anchor, unpinning
  nothing else: decommissioning a host and removing it from fleet and anchor);
- one host down.

Then every host that is up converges (the planner applied to its own bundle and to
etcd, twice), and a host reimaged afterwards converges from an empty bundle. Properties:
- no key that can still verify an unexpired token (its host's next key published less
  than superseded_grace ago, its host not decommissioned max_token_lifetime ago)
  leaves the bundle of any host but the one whose clock is wrong; a host reimaged
  afterwards bundles every such key (unless a root writer deleted, overwrote or
  re-dated it in etcd: a host that has never seen a key has only etcd's word for it);
- no host's bundle key set changes because of an etcd writer's change (no restart).

The etcd here is a dict: the planner is pure, the runs are sequential, so every guard
holds; transactions, revisions and watches are tested against real etcd elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sakeystate.anchors import Anchor
from sakeystate.keys import KeyInfo, format_time, parse_key_pem, parse_pem_bundle, parse_value
from sakeystate.keys import render_value as value_of
from sakeystate.model import BundleObservation, Delete, EtcdEntry, EtcdObservation, Put
from sakeystate.plan import LocalFacts, plan
from sakeystate.state import (
    AnchorConfig,
    BundleConfig,
    DesiredState,
    EtcdConfig,
    Retention,
)

from pki import Leaf, Pki, host
from support import T0

PREFIX = "/p/"
ALL_HOSTS = tuple(host(1001 + i) for i in range(5))
YEAR = timedelta(days=365)
NOW = T0  # the true time of the rounds after the fault


@cache
def _pki() -> Pki:
    return Pki()


@cache
def leaf(host_index: int, generation: int) -> Leaf:
    return _pki().sa(not_before=T0 - timedelta(days=800), not_after=T0 + timedelta(days=800))


@cache
def junk() -> Leaf:
    from pki import self_signed

    return self_signed(ALL_HOSTS[0])


@dataclass(frozen=True)
class HostSpec:
    reimaged_days_ago: int | None  # None: never reimaged (one key)
    layout: str  # "host" | "flat"


@dataclass
class Cluster:
    hosts: tuple[str, ...]
    specs: dict[str, HostSpec]
    etcd: dict[str, EtcdEntry] = field(default_factory=dict)
    bundles: dict[str, bytes | None] = field(default_factory=dict)
    revision: int = 10
    fleet: tuple[str, ...] = ()
    anchor_hosts: tuple[str, ...] = ()
    decommissioned: dict[str, datetime] = field(default_factory=dict)

    def keys_of(self, name: str) -> list[tuple[Leaf, datetime]]:
        """(leaf, published) for each key the host has had, oldest first."""
        index = self.hosts.index(name)
        out = [(leaf(index, 0), T0 - timedelta(days=700))]
        ago = self.specs[name].reimaged_days_ago
        if ago is not None:
            out.append((leaf(index, 1), T0 - timedelta(days=ago)))
        return out

    def current(self, name: str) -> Leaf:
        return self.keys_of(name)[-1][0]

    def put(self, key: str, value: bytes) -> None:
        self.revision += 1
        old = self.etcd.get(key)
        create = old.create_revision if old else self.revision
        self.etcd[key] = EtcdEntry(key, value, self.revision, create)

    def observation(self) -> EtcdObservation:
        return EtcdObservation(PREFIX, self.revision, tuple(self.etcd.values()))

    def desired(self, name: str) -> DesiredState:
        return DesiredState(
            source="generated.yaml",
            cluster="prop",
            host=name,
            etcd=EtcdConfig(endpoints=("http://127.0.0.1:1",), prefix=PREFIX),
            bundle=BundleConfig(path=f"/nonexistent/{name}.pem", exclude_host=name),
            trusted={},
            trust_anchors=(AnchorConfig("pki", "/ca.pem", self.anchor_hosts, "sa"),),
            fleet_hosts=self.fleet,
            decommissioned=dict(self.decommissioned),
            retention=Retention(
                superseded_grace=YEAR, max_token_lifetime=YEAR, min_keys=1, max_removals=2
            ),
        )

    def local(self, name: str) -> LocalFacts:
        own = parse_key_pem(self.current(name).pem)
        anchor = Anchor("pki", _pki().ca_file(), self.anchor_hosts, "sa")
        return LocalFacts(own_kid=own.kid, anchors=(anchor,), own_key=own)


def publish_all(cluster: Cluster) -> None:
    for name in cluster.hosts:
        layout = cluster.specs[name].layout
        for generation, (item, published) in enumerate(cluster.keys_of(name)):
            path = f"{PREFIX}{name}/{item.kid}" if layout == "host" else PREFIX + item.kid
            info = _info(item)
            cluster.put(path, value_of(info, name, published, item.intermediate_pems))
            del generation


def _info(item: Leaf) -> KeyInfo:
    return parse_value(item.chained).key


def converge(cluster: Cluster, name: str, at: datetime) -> None:
    """One converge of ``name``: plan against its bundle; apply unless refused."""
    desired = cluster.desired(name)
    bundle = BundleObservation(desired.bundle.path, cluster.bundles.get(name), mode=0o644)
    current = plan(desired, cluster.observation(), bundle, at, local=cluster.local(name))
    if current.refusals:
        return
    for action in current.etcd_actions:
        for op in action.writes:
            if isinstance(op, Put):
                cluster.put(op.key, op.value)
            else:
                assert isinstance(op, Delete)
                cluster.etcd.pop(op.key, None)
    cluster.bundles[name] = current.bundle_content


def bundle_kids(cluster: Cluster, name: str) -> set[str]:
    content = cluster.bundles.get(name)
    return {k.kid for k in parse_pem_bundle(content or b"")[0]}


def live_kids(cluster: Cluster, at: datetime) -> dict[str, str]:
    """Oracle: kid -> host, for every key that can still verify an unexpired token at
    ``at``, from the true publish times (not from etcd)."""
    out = {}
    for name in cluster.hosts:
        keys = cluster.keys_of(name)
        gone = cluster.decommissioned.get(name)
        if gone is not None and at >= gone + YEAR:
            continue
        for position, (item, _published) in enumerate(keys):
            successor = keys[position + 1][1] if position + 1 < len(keys) else None
            if successor is None or at < successor + YEAR:
                out[item.kid] = name
    return out


# --- faults ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: str  # writer-host | writer-root | clock | down | decommission | drop-from-anchor
    actor: int  # index of the host involved
    victim: int
    detail: int


faults = st.builds(
    Fault,
    kind=st.sampled_from(
        [
            "writer-host",
            "writer-host",
            "writer-root",
            "clock",
            "down",
            "decommission",
            "drop-from-anchor",
        ]
    ),
    actor=st.integers(0, 4),
    victim=st.integers(0, 4),
    detail=st.integers(0, 5),
)

CLOCK_SHIFTS = (-365, -200, -30, 30, 200, 366)


def _victim_entry(cluster: Cluster, victim: str) -> EtcdEntry | None:
    for entry in sorted(cluster.etcd.values(), key=lambda e: e.key):
        try:
            value = parse_value(entry.value)
        except Exception:
            continue
        if value.key.kid == cluster.current(victim).kid:
            return entry
    return None


def inject(cluster: Cluster, fault: Fault) -> tuple[str | None, str | None]:
    """Apply one fault; returns (the host whose clock is wrong, the host that is down)."""
    hosts = cluster.hosts
    actor, victim = hosts[fault.actor % len(hosts)], hosts[fault.victim % len(hosts)]
    if fault.kind in ("writer-host", "writer-root"):
        _write(cluster, fault, actor, victim)
        return None, None
    if fault.kind == "clock":
        return actor, None
    if fault.kind == "down":
        return None, actor
    if fault.kind == "decommission":
        cluster.decommissioned[actor] = NOW - timedelta(days=10)
        cluster.fleet = tuple(h for h in cluster.fleet if h != actor)
        cluster.anchor_hosts = tuple(h for h in cluster.anchor_hosts if h != actor)
        return None, None
    cluster.anchor_hosts = tuple(h for h in cluster.anchor_hosts if h != actor)
    return None, None


def _write(cluster: Cluster, fault: Fault, actor: str, victim: str) -> None:
    entry = _victim_entry(cluster, victim)
    own_path = f"{PREFIX}{actor}/"
    root = fault.kind == "writer-root"
    if entry is None:
        return
    value = parse_value(entry.value)
    forged_host = value_of(value.key, actor, value.published, value.intermediates)
    choice = fault.detail % 6
    if choice == 0:  # a copy of the victim's certificate under the actor's own path
        cluster.put(own_path + value.key.kid, forged_host)
    elif choice == 1:  # junk under its own path
        item = junk()
        cluster.put(own_path + item.kid, value_of(_info(item), actor, NOW, ()))
    elif choice == 2 and root:  # the victim's Host line edited
        cluster.put(entry.key, forged_host)
    elif choice == 3 and root:  # the victim's entry re-dated far into the past
        cluster.put(
            entry.key,
            value_of(value.key, value.host, NOW - timedelta(days=3000), value.intermediates),
        )
    elif choice == 4 and root:  # deleted
        del cluster.etcd[entry.key]
    elif choice == 5 and root:  # overwritten with garbage
        cluster.put(entry.key, b"garbage")
    elif not root:  # an RBAC-limited writer re-publishes the victim's key as its own, dated now
        cluster.put(own_path + value.key.kid, value_of(value.key, actor, NOW, value.intermediates))


# --- the property --------------------------------------------------------------------------------


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    count = draw(st.integers(3, 5))
    hosts = ALL_HOSTS[:count]
    specs = {
        name: HostSpec(
            reimaged_days_ago=draw(st.sampled_from([None, None, 1, 100, 380])),
            layout=draw(st.sampled_from(["host", "host", "flat"])),
        )
        for name in hosts
    }
    return Cluster(hosts, specs, fleet=hosts, anchor_hosts=hosts)


SETTINGS = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(clusters(), faults, st.sampled_from(CLOCK_SHIFTS))
def test_no_single_party_removes_a_live_key_or_restarts_another_host(
    cluster: Cluster, fault: Fault, shift: int
) -> None:
    publish_all(cluster)
    start = NOW - timedelta(hours=2)
    for _round in range(2):
        for name in cluster.hosts:
            converge(cluster, name, start)
    before = {name: bundle_kids(cluster, name) for name in cluster.hosts}
    wrong_clock, down = inject(cluster, fault)
    for _round in range(2):
        for name in cluster.hosts:
            if name == down:
                continue
            at = NOW + timedelta(days=shift) if name == wrong_clock else NOW
            converge(cluster, name, at)
    live = live_kids(cluster, NOW)
    for name in cluster.hosts:
        if name == wrong_clock:
            continue
        kept = bundle_kids(cluster, name) | {cluster.current(name).kid}
        lost = {kid for kid in before[name] if kid in live} - kept
        assert not lost, (name, fault, {kid: live[kid] for kid in lost})
        if fault.kind.startswith("writer"):
            assert bundle_kids(cluster, name) == before[name], (name, fault)
    # A host reimaged now (its bundle starts empty) gets every live key from etcd, unless
    # a writer with every right deleted it, overwrote it or re-dated it: a host that has
    # never seen a key has only etcd's word for it (with the per-host grants, only the
    # key's own host may write that word).
    if fault.kind == "writer-root" and fault.detail % 6 in (3, 4, 5):
        return
    fresh = next(h for h in cluster.hosts if h not in (wrong_clock, down))
    cluster.bundles[fresh] = None
    converge(cluster, fresh, NOW)
    got = bundle_kids(cluster, fresh) | {cluster.current(fresh).kid}
    published = {item.kid: when for name in cluster.hosts for item, when in cluster.keys_of(name)}

    def still_trusted(kid: str, owner: str) -> bool:
        """What the state still trusts for a host that has never seen the key."""
        if owner in cluster.anchor_hosts:
            return True
        gone = cluster.decommissioned.get(owner)
        return gone is not None and published[kid] <= gone

    missing = {kid for kid, owner in live.items() if still_trusted(kid, owner)} - got
    assert not missing, (fresh, fault, format_time(NOW), missing)
