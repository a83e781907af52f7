"""Reimage with no 401 and no human step: trust anchors, status records, `status`, `wait`.

Three control planes share one anchor-based state file (on a real fleet the file is
byte-identical on every host; here each host's copy differs only in where its
bundle and own certificate live, since the three "hosts" share one machine). A
root CA, an intermediate and P-521 leaves are made by tests/pki.py; tokens are
ES512 JWTs checked against each bundle as kube-apiserver's keyutil reads it
(``parse_pem_bundle``, held equal to Go by tests/test_bundle_go.py).
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from fleet_support import AT, HOSTS, Fleet
from jwt_support import sign

from sakeystate.keys import format_time, parse_pem_bundle

from conftest import Env
from pki import Pki, host, self_signed
from support import T0, run_cli, write_state


@pytest.mark.parametrize(
    ("shape", "common_name"),
    [("san", None), ("sa", "sa")],
    ids=["leaves-named-in-the-san", "seed-pki-cn-sa-no-san"],
)
def test_reimage_needs_no_human_step_and_no_token_fails(
    env: Env, shape: str, common_name: str | None
) -> None:
    fleet = Fleet(env, Pki(), common_name, shape)
    one, two, three = fleet.planes
    for plane in fleet.planes:
        fleet.publish(plane)
    for plane in fleet.planes:
        fleet.converge(plane)
    assert fleet.cli(one, "status", "--at", AT).code == 0
    old_token = sign(two.leaf.key)

    # Reimage ctrl1002: a new key and leaf, its chained file published. Nobody edits state.
    state_before = [p.state.read_bytes() for p in fleet.planes]
    two.leaf = fleet.new_leaf(two.name)
    two.own_cert.write_bytes(two.leaf.chained)
    fleet.publish(two)
    new_token = sign(two.leaf.key)
    assert fleet.cli(one, "status", "--at", AT).code == 2
    waited = fleet.cli(two, "wait", "--cert", str(two.own_cert), "--timeout", "2s")
    assert waited.code == 1 and one.name in waited.err and three.name in waited.err

    fleet.converges = 0
    for plane in (one, two):
        report = fleet.converge(plane)
        trust = {k["kid"]: k["trust"] for k in report["keys"]}
        assert trust[two.leaf.kid].startswith("anchor wikikube-pki: certificate for ctrl1002")
    status = fleet.cli(one, "status", "--at", AT)
    assert status.code == 2 and f"{three.name} does not verify {two.leaf.kid}" in status.out
    waited = fleet.cli(two, "wait", "--cert", str(two.own_cert), "--timeout", "2s")
    assert waited.code == 1 and three.name in waited.err and one.name not in waited.err
    fleet.converge(three)
    assert fleet.cli(two, "wait", "--cert", str(two.own_cert), "--timeout", "2s").code == 0
    assert fleet.cli(one, "status", "--at", AT).code == 0

    assert fleet.converges == 3  # one per peer (and the reimaged host's own)
    assert [p.state.read_bytes() for p in fleet.planes] == state_before  # zero human steps
    for plane in fleet.planes:
        assert fleet.verifies(plane, new_token), plane.name
        assert fleet.verifies(plane, old_token), plane.name
        assert plane.reloads == 2, plane.name  # first converge, then the new key
    # The old key stays in the reimaged host's own bundle: its pre-reimage tokens verify.
    assert two.leaf.kid not in {k.kid for k in parse_pem_bundle(two.bundle.read_bytes())[0]}

    # A no-op converge writes nothing to etcd, status records included.
    revision = env.etcd.revision()
    for plane in fleet.planes:
        assert fleet.converge(plane)["changed"] is False
    assert env.etcd.revision() == revision


def test_wait_absent_returns_once_a_revocation_reached_every_host(env: Env) -> None:
    fleet = Fleet(env, Pki(), "sa", "sa")
    for plane in fleet.planes:
        fleet.publish(plane)
    old = fleet.planes[1].leaf
    fleet.planes[1].leaf = fleet.new_leaf(HOSTS[1])
    fleet.planes[1].own_cert.write_bytes(fleet.planes[1].leaf.chained)
    fleet.publish(fleet.planes[1])
    for plane in fleet.planes:
        fleet.converge(plane)
    assert fleet.cli(fleet.planes[0], "wait", "--kid", old.kid, "--timeout", "1s").code == 0
    for plane in fleet.planes:
        data = json.loads(json.dumps(__import__("yaml").safe_load(plane.state.read_text())))
        data["revoked"] = [{"fingerprint": old.kid, "reason": "private key exposed"}]
        write_state(plane.state, data)
    absent = ("wait", "--kid", old.kid, "--absent", "--timeout", "1s")
    assert fleet.cli(fleet.planes[0], *absent).code == 1
    for plane in fleet.planes[:2]:
        fleet.converge(plane)
    late = fleet.cli(fleet.planes[0], *absent)
    assert late.code == 1 and HOSTS[2] in late.err and HOSTS[0] not in late.err
    status = fleet.cli(fleet.planes[0], "status", "--at", AT)
    assert status.code == 2 and f"revoked key {old.kid} is still verified by {HOSTS[2]}" in (
        status.out
    )
    fleet.converge(fleet.planes[2])
    assert fleet.cli(fleet.planes[0], *absent).code == 0


def _bad_values(pki: Pki, other: Pki) -> dict[str, tuple[bytes, str, str]]:
    """(value, Host header, expected reason fragment) for each certificate no anchor trusts."""
    expired_ca = pki.expired_intermediate()
    return {
        "leaf-from-another-ca": (other.sa().chained, HOSTS[1], "does not chain"),
        "host-outside-hosts": (pki.sa().chained, host(2001), "not in the anchor's hosts"),
        "kubelet-client-cert": (pki.kubelet(HOSTS[1]).chained, HOSTS[1], "is not 'sa'"),
        "admin-client-cert": (pki.admin().chained, HOSTS[1], "is not 'sa'"),
        "self-signed-for-a-fleet-host": (self_signed(HOSTS[1]).pem, HOSTS[1], "does not chain"),
        "expired-intermediate": (pki.sa(issuer=expired_ca).chained, HOSTS[1], "chain"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "leaf-from-another-ca",
        "host-outside-hosts",
        "kubelet-client-cert",
        "admin-client-cert",
        "self-signed-for-a-fleet-host",
        "expired-intermediate",
    ],
)
def test_a_certificate_no_anchor_trusts_is_reported_and_restarts_nothing(
    env: Env, case: str
) -> None:
    pki = Pki()
    fleet = Fleet(env, pki, "sa", "sa")
    for plane in fleet.planes:
        fleet.publish(plane)
    one = fleet.planes[0]
    fleet.converge(one)
    before, reloads = one.bundle.read_bytes(), one.reloads
    value, named, reason = _bad_values(pki, Pki(org="Elsewhere Ltd"))[case]
    from sakeystate.keys import parse_key_file

    key_kid = parse_key_file(value)[0].kid
    published = (f"Host: {named}\nPublished: {format_time(T0 + timedelta(hours=1))}\n").encode()
    env.etcd.put(env.prefix + key_kid, published + value)
    report = fleet.converge(one, format_time(T0 + timedelta(hours=2)))
    assert report["changed"] is False
    row = next(k for k in report["keys"] if k["kid"] == key_kid)
    assert row["status"] == "untrusted" and row["trust"] is None
    assert reason in row["reason"], row["reason"]
    assert one.bundle.read_bytes() == before and one.reloads == reloads
    inspect = fleet.cli(one, "inspect", "--at", AT)
    assert reason in inspect.out
    refused = one.root / "refused.pem"
    refused.write_bytes(value)
    publish = run_cli("publish", "--state", str(one.state), "--host", named, "--cert", str(refused))
    if named in HOSTS:
        assert publish.code == 1 and "no trust anchor certifies it" in publish.err, publish.err


def test_a_ca_certificate_in_etcd_is_never_a_key(env: Env) -> None:
    pki = Pki()
    fleet = Fleet(env, pki, None, "san")
    one = fleet.planes[0]
    for plane in fleet.planes:
        fleet.publish(plane)
    from sakeystate.keys import kid_of

    intermediate = pki.intermediate().cert
    ca_kid = kid_of(intermediate.public_key())  # type: ignore[arg-type]
    from pki import pem

    env.etcd.put(env.prefix + ca_kid, f"Host: {HOSTS[1]}\n".encode() + pem(intermediate))
    report = fleet.converge(one)
    assert ca_kid not in report["bundle"]["kids_after"]
    row = next(k for k in report["keys"] if k["kid"] == ca_kid)
    assert row["status"] == "rejected" and "CA certificate" in row["reason"]
