"""Fault isolation (R12-R16): no single etcd writer, clock, edit or host can remove another
host's key, or restart another host's apiserver. Each test reproduces one finding of the
fleet trials against a real etcd, with the seed PKI (cfssl-style root and intermediate,
CN ``sa`` leaves with no SAN, chained files, a ``common_name: sa`` anchor) unless the
finding is about another shape.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from fleet_support import AT, Fleet, Plane
from jwt_support import sign

from sakeystate.keys import format_time, parse_value, render_value

from conftest import Env
from pki import Pki, host
from support import T0, run_cli

FOUR = [host(1001), host(1002), host(1003), host(1005)]


def converge_all(fleet: Fleet, at: str = AT) -> None:
    for plane in fleet.planes:
        fleet.converge(plane, at)


def settled(fleet: Fleet, published: str = AT) -> None:
    for plane in fleet.planes:
        fleet.publish(plane, published)
    converge_all(fleet)


def rewrite_host_header(env: Env, key: str, new_host: str) -> None:
    """What an etcd writer does: the same certificate, another ``Host:`` line."""
    value = parse_value(env.etcd.get(key) or b"")
    env.etcd.put(key, render_value(value.key, new_host, value.published, value.intermediates))


def etcd_ops(report: dict[str, object]) -> list[tuple[str, str]]:
    actions = report["actions"]
    assert isinstance(actions, list)
    return [(a["op"], a.get("key", "")) for a in actions if a["target"] == "etcd"]


# --- finding 1 and 2: forged attribution, and the restart storm it drove ---


def test_finding_1_a_second_copy_under_another_hosts_path_changes_nothing(env: Env) -> None:
    """Per-host layout: with ctrl1002's credentials an attacker copies ctrl1001's
    certificate under ctrl1002's path (the only place it may write) and, with broader
    rights, edits the Host line of ctrl1001's entry. Nothing is removed, superseded or
    restarted anywhere; ctrl1001's tokens verify on every host, and a host whose bundle
    is new (no memory) still gives the key to its first publisher."""
    fleet = Fleet(env, Pki(), "sa", "sa")
    one, two, three = fleet.planes
    settled(fleet)
    token = sign(one.leaf.key)
    bundles = {p.name: p.bundle.read_bytes() for p in fleet.planes}
    env.etcd.put(fleet.key(two, one.leaf.kid), env.etcd.get(fleet.key(one)) or b"")
    rewrite_host_header(env, fleet.key(one), two.name)
    etcd_before = env.dump()
    for plane in fleet.planes:
        report = fleet.converge(plane)
        assert report["changed"] is False, (plane.name, report["actions"])
        warned = " ".join(report["warnings"])
        assert f"key {one.leaf.kid} is published under two hosts' paths" in warned
    assert {p.name: p.bundle.read_bytes() for p in fleet.planes} == bundles
    assert env.dump() == etcd_before
    assert [p.reloads for p in fleet.planes] == [1, 1, 1]
    for plane in fleet.planes:
        assert fleet.verifies(plane, token), plane.name
    # A host with no memory (its bundle lost): the first publisher keeps the key.
    three.bundle.unlink()
    report = fleet.converge(three)
    facts = {k["kid"]: (k["host"], k["host_source"]) for k in report["keys"]}
    assert facts[one.leaf.kid] == (one.name, "etcd path")
    assert one.leaf.kid in fleet.bundle_kids(three) and fleet.verifies(three, token)


def test_finding_1_a_forged_host_line_in_the_flat_layout_is_ignored_and_migrated(
    env: Env,
) -> None:
    """Revision-2 layout: the entries sit under <prefix><kid>, where the Host line is an
    etcd writer's word. Once a host has bundled a key, its bundle's record wins; ctrl1001
    moves its own entry to its path (own_cert says it is its key), ctrl1002 never does."""
    fleet = Fleet(env, Pki(), "sa", "sa")
    one, two, _three = fleet.planes
    for plane in fleet.planes:
        env.etcd.put(env.prefix + plane.leaf.kid, _flat_value(plane))
    for plane in (two, fleet.planes[2]):  # the peers first: they migrate nothing of ctrl1001's
        fleet.converge(plane)
    token = sign(one.leaf.key)
    rewrite_host_header(env, env.prefix + one.leaf.kid, two.name)
    for plane in (two, fleet.planes[2]):
        report = fleet.converge(plane)
        assert [a for a in report["actions"] if a.get("kid") == one.leaf.kid] == []
        assert any(
            f"says {two.name}, but key {one.leaf.kid} is {one.name}'s" in w
            for w in report["warnings"]
        )
        assert fleet.verifies(plane, token)
    report = fleet.converge(one)
    moved = [a for a in report["actions"] if a["target"] == "etcd"]
    assert [(a["op"], a["kid"]) for a in moved] == [("migrate", one.leaf.kid)]
    assert env.prefix + one.leaf.kid not in env.dump()
    assert parse_value(env.etcd.get(fleet.key(one)) or b"").host == one.name
    assert [p.reloads for p in fleet.planes] == [1, 1, 1]


def _flat_value(plane: Plane) -> bytes:
    return f"Host: {plane.name}\nPublished: {AT}\n".encode() + plane.leaf.chained


def test_finding_2_toggling_attribution_restarts_nothing(env: Env) -> None:
    """Six etcd puts toggling ctrl1001's Host line (forged, original, ...) gave six
    restarts of ctrl1001. Now the host's own key is its own (own_cert, and the bundle's
    record of it), peers keep what they recorded: zero restarts, in both layouts."""
    fleet = Fleet(env, Pki(), "sa", "sa")
    one, two, _three = fleet.planes
    settled(fleet)
    env.etcd.put(env.prefix + one.leaf.kid, _flat_value(one))  # a flat copy too
    for toggle in range(6):
        forged = two.name if toggle % 2 == 0 else one.name
        rewrite_host_header(env, fleet.key(one), forged)
        # ctrl1001 deletes its own old flat copy; the writer puts it back, forged.
        env.etcd.put(
            env.prefix + one.leaf.kid,
            f"Host: {forged}\nPublished: {AT}\n".encode() + one.leaf.chained,
        )
        for plane in fleet.planes:
            report = fleet.converge(plane)
            assert "bundle" not in {a["target"] for a in report["actions"]}, report["actions"]
    assert [p.reloads for p in fleet.planes] == [1, 1, 1]


# --- finding 3: one clock a year ahead ---


def _faketime() -> str:
    found = shutil.which("faketime")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("faketime (Debian's faketime package) is missing; .ci/run installs it")
        pytest.skip("faketime is not installed (apt install faketime)")
    return found


def test_finding_3_a_clock_a_year_ahead_deletes_nothing_a_later_host_needs(env: Env) -> None:
    """ctrl1001 runs converge with its clock 366 days ahead (libfaketime, a real process).
    It may drop, from its own bundle, keys its wrong clock calls superseded; it deletes
    nothing from etcd, so a host reimaged afterwards still gets every key, and the
    peers' bundles never change."""
    fleet = Fleet(env, Pki(), "sa", "sa", retention={"superseded_grace": "30d"})
    one, two, three = fleet.planes
    settled(fleet)
    old_two = fleet.reimage(two)
    converge_all(fleet)
    old_token = sign(old_two.key)
    etcd_before = env.dump()
    peers_before = {p.name: p.bundle.read_bytes() for p in (two, three)}
    proc = subprocess.run(
        [
            _faketime(),
            "-f",
            "+366d",
            sys.executable,
            "-m",
            "sakeystate",
            "converge",
            "--state",
            str(one.state),
            "--host",
            one.name,
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["at"] > format_time(T0 + timedelta(days=366))  # the clock really was ahead
    assert etcd_ops(report) == []
    assert env.dump() == etcd_before
    for plane in (two, three):
        fleet.converge(plane)
        assert plane.bundle.read_bytes() == peers_before[plane.name]
    # ctrl1003 is reimaged now: a new key, and a bundle that starts from nothing.
    three.bundle.unlink()
    fleet.reimage(three)
    fleet.converge(three)
    assert old_two.kid in fleet.bundle_kids(three) and fleet.verifies(three, old_token)


# --- findings 4 and 5: decommissioning ---


def _decommission(fleet: Fleet, gone: str, at: str, keep_in_anchor: bool) -> None:
    import yaml

    data = yaml.safe_load(fleet.planes[0].state.read_text())
    hosts = [h for h in fleet.hosts if keep_in_anchor or h != gone]
    anchors = [{**data["trust_anchors"][0], "hosts": hosts}]
    fleet.edit_state(
        decommissioned=[{"host": gone, "at": at}],
        fleet=[h for h in fleet.hosts if h != gone],
        trust_anchors=anchors,
    )


def test_finding_4_a_careful_decommission_keeps_the_keys_until_at_plus_lifetime(
    env: Env,
) -> None:
    """ctrl1005 was decommissioned 7 days ago, and removed from fleet and from the anchor's
    hosts as a careful operator would: its keys stay in every bundle until
    at + max_token_lifetime, then go (and prune removes them from etcd)."""
    fleet = Fleet(env, Pki(), "sa", "sa", hosts=FOUR, retention={"max_token_lifetime": "90d"})
    gone = fleet.plane(FOUR[3])
    settled(fleet)
    token = sign(gone.leaf.key)
    at = format_time(T0 + timedelta(days=1))
    now = format_time(T0 + timedelta(days=8))
    _decommission(fleet, gone.name, at, keep_in_anchor=False)
    for plane in fleet.planes[:3]:
        report = fleet.converge(plane, now)
        assert report["changed"] is False, report["actions"]
        assert gone.leaf.kid in fleet.bundle_kids(plane) and fleet.verifies(plane, token)
    one = fleet.planes[0]
    due = format_time(T0 + timedelta(days=91))
    plan = json.loads(fleet.cli(one, "plan", "--at", due, "--format", "json").out)
    removal = [a for a in plan["actions"] if a["target"] == "bundle"]
    assert [(a["op"], a["kid"]) for a in removal] == [("remove", gone.leaf.kid)]
    assert f"host {gone.name} decommissioned {at}" in removal[0]["reason"]
    before_due = format_time(T0 + timedelta(days=90, hours=23))
    early = json.loads(fleet.cli(one, "plan", "--at", before_due, "--format", "json").out)
    assert early["actions"] == []
    # prune's --host limits it to one host's entries: the operator runs it without.
    pruned = run_cli("prune", "--state", str(one.state), "--at", due, "--format", "json")
    assert pruned.code == 0, pruned.err
    assert fleet.key(gone) not in env.dump()


def test_finding_5_a_reused_fqdn_is_warned_and_its_new_key_outlives_the_decommission(
    env: Env,
) -> None:
    """A new machine takes the decommissioned FQDN and publishes a new key: every run
    warns that the decommission does not cover it, and at at + max_token_lifetime only
    the old machine's key goes."""
    fleet = Fleet(env, Pki(), "sa", "sa", hosts=FOUR, retention={"max_token_lifetime": "90d"})
    gone = fleet.plane(FOUR[3])
    settled(fleet, format_time(T0 - timedelta(days=30)))
    at = format_time(T0 - timedelta(hours=1))
    _decommission(fleet, gone.name, at, keep_in_anchor=True)
    old = fleet.reimage(gone)  # the new machine, same name, publishes at T0
    one = fleet.planes[0]
    report = fleet.converge(one)
    assert gone.leaf.kid in fleet.bundle_kids(one)
    assert any(
        f"host {gone.name} was decommissioned at {at}, but published {gone.leaf.kid} since" in w
        for w in report["warnings"]
    )
    later = format_time(T0 + timedelta(days=90))
    plan = json.loads(fleet.cli(one, "plan", "--at", later, "--format", "json").out)
    assert [(a["op"], a["kid"]) for a in plan["actions"] if a["target"] == "bundle"] == [
        ("remove", old.kid)
    ]
    assert gone.leaf.kid in plan["bundle"]["kids_after"]


# --- finding 6: revoking a host's current key ---


def test_finding_6_revoking_the_current_key_never_makes_an_older_key_excluded(env: Env) -> None:
    """No own_cert: ctrl1001's current key is its newest trusted one. Revoking it used to
    make the previous key "current", which exclude_host then left out of ctrl1001's own
    bundle: the tokens it signed with that key were rejected there. Now the revoked key
    leaves, the older key stays in ctrl1001's own bundle, and ctrl1001 is warned."""
    fleet = Fleet(env, Pki(), "sa", "sa", own_cert=None)
    one = fleet.planes[0]
    settled(fleet, format_time(T0 - timedelta(days=30)))
    first = one.leaf
    fleet.reimage(one)
    converge_all(fleet)
    assert first.kid in fleet.bundle_kids(one)  # its own older key: in its bundle
    fleet.edit_state(revoked=[{"fingerprint": one.leaf.kid, "reason": "key exposed"}])
    report = fleet.converge(one)
    assert first.kid in fleet.bundle_kids(one) and one.leaf.kid not in fleet.bundle_kids(one)
    assert fleet.verifies(one, sign(first.key))
    assert any(
        f"this host's own key {one.leaf.kid} is revoked, and its apiserver still signs" in w
        for w in report["warnings"]
    )
    assert ("delete", fleet.key(one)) in etcd_ops(report)  # its own entry: its to delete


# --- finding 7: anchors verify as of now ---


@pytest.mark.parametrize(
    "case", ["backdated-into-expired-intermediate", "future-under-not-yet-valid-intermediate"]
)
def test_finding_7_a_retired_or_future_ca_never_certifies_a_new_key(env: Env, case: str) -> None:
    """Verification used to move to the leaf's notBefore, then to min(at, notAfter): a
    leaf backdated into an expired intermediate's validity, or future-dated under a
    not-yet-valid one, was trusted. Publish refuses them and no host bundles them."""
    pki = Pki()
    fleet = Fleet(env, pki, "sa", "sa")
    one, two, _three = fleet.planes
    settled(fleet)
    if case == "backdated-into-expired-intermediate":
        issuer = pki.expired_intermediate()
        leaf = pki.sa(
            issuer=issuer,
            not_before=T0 - timedelta(days=300),
            not_after=T0 - timedelta(days=31),
        )
    else:
        issuer = pki.intermediate(
            not_before=T0 + timedelta(days=10), not_after=T0 + timedelta(days=400)
        )
        leaf = pki.sa(issuer=issuer, not_before=T0 + timedelta(days=11))
    cert = env.tmp / "minted.pem"
    cert.write_bytes(leaf.chained)
    refused = fleet.cli(two, "publish", "--cert", str(cert), "--at", AT)
    assert refused.code == 1 and "no trust anchor certifies it" in refused.err
    env.etcd.put(
        fleet.key(two, leaf.kid),
        f"Host: {two.name}\nPublished: {AT}\n".encode() + leaf.chained,
    )
    report = fleet.converge(one)
    assert leaf.kid not in fleet.bundle_kids(one)
    status = {k["kid"]: k["status"] for k in report["keys"]}
    assert status[leaf.kid] == "untrusted"


def test_finding_7_a_renewal_seconds_ahead_is_trusted_and_a_late_renewal_keeps_its_key(
    env: Env,
) -> None:
    """clock_skew (default 5m): a renewal issued 2 minutes ahead of this host's clock is
    trusted now; one whose certificate has expired stays trusted through the bundle."""
    pki = Pki()
    fleet = Fleet(env, pki, "sa", "sa")
    one, two, _three = fleet.planes
    settled(fleet)
    ahead = pki.renew(two.leaf, not_before=T0 + timedelta(minutes=2))
    two.leaf = ahead
    two.own_cert.write_bytes(ahead.chained)
    fleet.publish(two)
    assert fleet.converge(one)["changed"] is False
    expired = format_time(T0 + timedelta(days=700))  # every leaf has expired by then
    report = json.loads(fleet.cli(one, "plan", "--at", expired, "--format", "json").out)
    assert report["actions"] == [] and two.leaf.kid in report["bundle"]["kids_after"]
    trust = {k["kid"]: k["trust"] for k in report["keys"]}
    assert "kept from the bundle" in trust[two.leaf.kid]


# --- R15: other edits that would remove a live key are refused ---


def test_unpinning_or_dropping_a_host_from_the_anchor_is_refused_without_allow_removals(
    env: Env,
) -> None:
    fleet = Fleet(env, Pki(), "sa", "sa")
    one, _two, three = fleet.planes
    settled(fleet)
    import yaml

    anchor = yaml.safe_load(one.state.read_text())["trust_anchors"][0]
    fleet.edit_state(trust_anchors=[{**anchor, "hosts": [one.name, fleet.planes[1].name]}])
    refused = fleet.cli(one, "converge", "--at", AT)
    assert refused.code == 1
    assert f"the plan removes {three.leaf.kid} ({three.name}) from the bundle" in refused.err
    assert "Revoke it to pull it on purpose" in refused.err
    assert three.leaf.kid in fleet.bundle_kids(one)
    allowed = fleet.cli(one, "converge", "--at", AT, "--allow-removals")
    assert allowed.code == 0 and three.leaf.kid not in fleet.bundle_kids(one)


# --- R19: the first control plane ---


def test_the_first_control_plane_converges_with_its_own_key_in_its_bundle(env: Env) -> None:
    fleet = Fleet(env, Pki(), "sa", "sa")
    one, two, _three = fleet.planes
    fleet.publish(one)
    report = fleet.converge(one)
    assert fleet.bundle_kids(one) == {one.leaf.kid}
    assert "a bundle is never empty" in report["actions"][0]["reason"]
    fleet.publish(two)
    fleet.converge(one)
    assert fleet.bundle_kids(one) == {two.leaf.kid}
    # Nothing published yet at all: own_cert alone still gives a bundle.
    fresh = Fleet(env, Pki(), "sa", "sa", hosts=[host(2001), host(2002)])
    first = fresh.planes[0]
    result = fresh.cli(first, "converge", "--at", AT)
    assert result.code == 0, result.err
    assert fresh.bundle_kids(first) == {first.leaf.kid}


def test_metrics_textfile_in_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    """Finding 8 (write path): the metrics file is written like the bundle, never in a
    directory another user could plant a link in (the race itself: test_metrics_race)."""
    from sakeystate.errors import SakeystateError
    from sakeystate.metrics import Metrics

    shared = tmp_path / "textfiles"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victim = tmp_path / "victim"
    victim.write_bytes(b"secret")
    os.chmod(victim, 0o600)
    (shared / "sakeystate.prom").symlink_to(victim)
    with pytest.raises(SakeystateError, match="writable by group or others"):
        Metrics(str(shared / "sakeystate.prom")).record("unchanged", T0)
    assert victim.read_bytes() == b"secret"


def test_deleting_a_hosts_current_key_from_etcd_changes_nothing_on_that_host(env: Env) -> None:
    """Found by the fleet property: ctrl1003 left its own key out of its bundle, so when
    an etcd writer deleted that key's entry, ctrl1003 forgot it, its superseded older
    key had no successor any more, and came back (a restart). The bundle's line for the
    key it leaves out keeps it known."""
    fleet = Fleet(env, Pki(), "sa", "sa", retention={"superseded_grace": "20d"})
    _one, _two, three = fleet.planes
    settled(fleet, format_time(T0 - timedelta(days=29)))
    old = fleet.reimage(three, format_time(T0 - timedelta(days=25)))
    converge_all(fleet)
    assert old.kid not in fleet.bundle_kids(three)  # superseded, its grace over
    before = {p.name: p.bundle.read_bytes() for p in fleet.planes}
    env.etcd.client.delete(fleet.key(three))
    for plane in fleet.planes:
        report = fleet.converge(plane)
        assert "bundle" not in {a["target"] for a in report["actions"]}, report["actions"]
    assert {p.name: p.bundle.read_bytes() for p in fleet.planes} == before
    assert [p.reloads for p in fleet.planes] == [2, 2, 1]  # nothing new for ctrl1003 itself
    warned = " ".join(fleet.converge(three)["warnings"])
    assert f"this host's own key {three.leaf.kid} is not published in etcd" in warned
