"""Token safety in every operator path (contract revision 2, R1-R7), against real etcd.

Each test is one observation of the production trial, named by its number there,
with the material that trial used: a cfssl-style PKI (offline root, per-cluster
intermediate, ECDSA leaves, chained ``leaf + intermediate`` files), one state
file shared by three hosts (``host: self``, ``exclude_host: self``).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import yaml
from jwt_support import sign, verifies_with_bundle

from sakeystate.keys import format_time

from conftest import Env
from pki import Leaf, Pki, host
from support import T0, run_cli

AT = format_time(T0)
HOSTS = [host(1001), host(1002), host(1003)]


def shared_state(env: Env, trusted: list[tuple[str, str]], **overrides: object) -> Path:
    """One reviewed file for every control plane: host self, exclude_host self."""
    bundle = {"exclude_host": "self", **overrides.pop("bundle", {})}  # type: ignore[dict-item]
    return env.state(trusted, bundle=bundle, **overrides)


def publish(env: Env, leaf_pem: bytes, fqdn: str, name: str) -> str:
    path = env.tmp / f"{name}.pem"
    path.write_bytes(leaf_pem)
    if not env.state_path.exists():
        env.state([])
    result = env.cli("publish", "--cert", str(path), "--host", fqdn, "--at", AT)
    assert result.code == 0, result.err
    return result.out


def published_fleet(env: Env) -> tuple[Pki, list[Leaf]]:
    """A cluster PKI and one CN-sa leaf per host, each published by `sakeystate publish`."""
    pki = Pki()
    leaves = [pki.sa() for _ in HOSTS]
    for leaf, fqdn in zip(leaves, HOSTS, strict=True):
        publish(env, leaf.chained, fqdn, fqdn)
    return pki, leaves


def pinned(leaves: list[Leaf]) -> list[tuple[str, str]]:
    """The trusted entries that pin each leaf to its host."""
    return [(leaf.kid, fqdn) for leaf, fqdn in zip(leaves, HOSTS, strict=True)]


def kids_of(env: Env, bundle: Path | None = None) -> list[str]:
    from sakeystate.keys import parse_pem_bundle

    keys, _problems = parse_pem_bundle((bundle or env.bundle).read_bytes())
    return [k.kid for k in keys]


def test_1_chained_legacy_entry_migrates_with_its_leaf_and_adopt_offers_no_ca_key(env: Env) -> None:
    pki = Pki()
    leaves = [pki.sa() for _ in HOSTS]
    for leaf, fqdn in zip(leaves, HOSTS, strict=True):
        env.etcd.put(env.prefix + fqdn, leaf.chained)  # the old publisher's FQDN layout
    shared_state(env, pinned(leaves))
    result = env.cli("converge", "--host", HOSTS[1], "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert sorted(report["bundle"]["kids_after"]) == sorted(
        leaf.kid for i, leaf in enumerate(leaves) if i != 1
    )
    # R13: each host moves its own entry (here the pins say whose each is).
    assert env.prefix + HOSTS[0] in env.dump() and env.prefix + HOSTS[1] not in env.dump()
    for fqdn in (HOSTS[0], HOSTS[2]):
        assert env.cli("converge", "--host", fqdn, "--at", AT).code == 0
    dump = env.dump()
    for leaf, fqdn in zip(leaves, HOSTS, strict=True):
        stored = dump[env.key(fqdn, leaf.kid)]
        assert stored.endswith(leaf.chained), "the intermediate stays after the leaf"
    assert sorted(dump) == sorted(
        env.key(f, leaf.kid) for leaf, f in zip(leaves, HOSTS, strict=True)
    )
    adopted = env.cli(
        "adopt", "--state", str(env.state_path), "--bundle-path", str(env.bundle), "--at", AT
    )
    assert adopted.code == 0, adopted.err
    offered = {e["fingerprint"] for e in yaml.safe_load(adopted.out)["trusted"]}
    assert offered == {leaf.kid for leaf in leaves}
    assert pki.intermediate().cert.public_key() is not None
    from sakeystate.keys import kid_of

    assert kid_of(pki.intermediate().cert.public_key()) not in adopted.out  # type: ignore[arg-type]


def test_2_converge_at_a_future_date_is_refused_and_deletes_nothing(env: Env) -> None:
    _pki, leaves = published_fleet(env)
    shared_state(env, pinned(leaves))
    before = env.dump()
    for argv in (
        ["converge", "--state", str(env.state_path), "--at", "2027-12-01T00:00:00Z"],
        [
            "converge",
            "--state",
            str(env.state_path),
            "--allow-removals",
            "--at",
            "2027-12-01T00:00:00Z",
        ],
    ):
        import subprocess
        import sys

        proc = subprocess.run(
            [str(Path(sys.executable).parent / "sakeystate"), *argv, "--host", HOSTS[0]],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 1 and "--at is only for read-only commands" in proc.stderr
    assert env.dump() == before and not env.bundle.exists()
    plan = run_cli(
        "plan", "--state", str(env.state_path), "--host", HOSTS[0], "--at", "2027-12-01T00:00:00Z"
    )
    assert plan.code == 0, plan.err


def test_4_exclude_host_naming_another_host_is_an_error_naming_both(env: Env) -> None:
    _pki, leaves = published_fleet(env)
    env.state(
        pinned(leaves),
        bundle={"exclude_host": HOSTS[0]},
    )
    for command in ("plan", "converge", "inspect"):
        result = env.cli(command, "--host", HOSTS[1], "--at", AT)
        assert result.code == 1, (command, result)
        assert f"names {HOSTS[0]}, but this host is {HOSTS[1]}" in result.err
    check = env.cli("check", "--host", HOSTS[1], "--at", AT)
    assert check.code == 0 and f"names {HOSTS[0]}" in check.err
    assert not env.bundle.exists()


def test_5_a_typo_in_a_trusted_kid_is_refused_and_suggested(env: Env) -> None:
    _pki, leaves = published_fleet(env)
    trusted = pinned(leaves)
    shared_state(env, trusted)
    assert env.cli("converge", "--host", HOSTS[1], "--at", AT).code == 0
    before = env.bundle_bytes()
    good = leaves[0].kid
    typo = good[:10] + ("A" if good[10] != "A" else "B") + good[11:]
    shared_state(env, [(typo, HOSTS[0]), *trusted[1:]])
    assert run_cli("validate", str(env.state_path)).code == 0  # a kid-shaped typo validates
    plan = env.cli("plan", "--host", HOSTS[1], "--at", AT, "--format", "json")
    assert plan.code == 1
    assert f"the plan removes {good} ({HOSTS[0]}) from the bundle" in plan.err
    assert f"the newest key {HOSTS[0]} has published: its apiserver probably signs" in plan.err
    report = json.loads(plan.out)
    assert any(f"did you mean {good} (published by {HOSTS[0]})" in w for w in report["warnings"])
    converge = env.cli("converge", "--host", HOSTS[1], "--at", AT)
    assert converge.code == 1 and env.bundle_bytes() == before
    check = env.cli("check", "--host", HOSTS[1], "--at", AT)
    assert check.code == 0  # Puppet runs the converge, which fails loudly


def test_6_publish_host_rules_chained_files_ca_and_revoked(env: Env) -> None:
    pki = Pki()
    named = pki.sa_named(HOSTS[1])
    seed = pki.sa()
    revoked = pki.sa()
    env.state([], revoked=[{"fingerprint": revoked.kid, "reason": "exposed"}])
    cert = env.tmp / "named.pem"
    cert.write_bytes(named.chained)
    # No --host and no FQDN on this machine: refused, never "localhost".
    from sakeystate import state as state_module

    if state_module.machine_fqdn() is None:
        bare = env.cli("publish", "--cert", str(cert))
        assert bare.code == 1 and "not fully qualified" in bare.err
    wrong = env.cli("publish", "--cert", str(cert), "--host", HOSTS[2])
    assert wrong.code == 1 and f"the certificate names {HOSTS[1]}, not this host" in wrong.err
    local = env.cli("publish", "--cert", str(cert), "--host", "localhost")
    assert local.code == 1 and "not a fully qualified host name" in local.err
    assert env.dump() == {}
    ok = env.cli("publish", "--cert", str(cert), "--host", HOSTS[1], "--check")
    assert ok.code == 2 and env.dump() == {}
    ok = env.cli("publish", "--cert", str(cert), "--host", HOSTS[1])
    assert ok.code == 0, ok.err
    assert env.dump()[env.key(HOSTS[1], named.kid)].endswith(named.chained)
    assert env.cli("publish", "--cert", str(cert), "--host", HOSTS[1], "--check").code == 0
    ca = env.tmp / "ca.pem"
    ca.write_bytes(pki.ca_file(with_intermediate=True))
    as_ca = env.cli("publish", "--cert", str(ca), "--host", HOSTS[1])
    assert as_ca.code == 1 and "CA certificate" in as_ca.err
    seed_file = env.tmp / "seed.pem"
    seed_file.write_bytes(seed.chained)
    assert env.cli("publish", "--cert", str(seed_file), "--host", HOSTS[0]).code == 0
    revoked_file = env.tmp / "revoked.pem"
    revoked_file.write_bytes(revoked.chained)
    again = env.cli("publish", "--cert", str(revoked_file), "--host", HOSTS[2])
    assert again.code == 1 and "it is revoked (exposed)" in again.err
    assert not any(revoked.kid in key for key in env.dump())


def test_7_an_untrusted_junk_key_never_becomes_a_hosts_current_key(env: Env) -> None:
    pki, leaves = published_fleet(env)
    reloads = env.tmp / "reloads.log"
    shared_state(
        env,
        pinned(leaves),
        bundle={"reload": ["sh", "-c", f"echo reload >> {reloads}"]},
    )
    assert env.cli("converge", "--host", HOSTS[0], "--at", AT).code == 0
    before = env.bundle_bytes()
    junk = pki.sa()
    later = T0 + timedelta(hours=1)
    z = format_time

    publish(env, junk.chained, HOSTS[0], "junk")
    for _run in range(2):
        result = env.cli("converge", "--host", HOSTS[0], "--at", z(later), "--format", "json")
        assert result.code == 0, result.err
        assert json.loads(result.out)["changed"] is False
    env.etcd.client.delete(env.key(HOSTS[0], junk.kid))
    assert env.cli("converge", "--host", HOSTS[0], "--at", z(later)).code == 0
    assert env.bundle_bytes() == before
    assert reloads.read_text().count("reload") == 1
    # Every host's bundle still verifies tokens of every other host.
    for index, leaf in enumerate(leaves):
        if index:
            assert verifies_with_bundle(sign(leaf.key), env.bundle_bytes() or b"")


def test_8_inspect_shows_the_bundle_on_disk_and_after_the_plan(env: Env) -> None:
    pki = Pki()
    leaves = [pki.sa() for _ in HOSTS]
    for leaf, fqdn in zip(leaves[:2], HOSTS[:2], strict=True):
        publish(env, leaf.chained, fqdn, fqdn)
    trusted = pinned(leaves)
    shared_state(env, trusted)
    assert env.cli("converge", "--host", HOSTS[2], "--at", AT).code == 0
    publish(env, leaves[2].chained, HOSTS[2], HOSTS[2])
    report = json.loads(env.cli("inspect", "--host", HOSTS[0], "--at", AT, "--format", "json").out)
    rows = {k["kid"]: k for k in report["keys"]}
    assert rows[leaves[2].kid]["in_bundle"] is False and rows[leaves[2].kid]["bundle_after"] is True
    assert rows[leaves[0].kid]["in_bundle"] is True and rows[leaves[0].kid]["bundle_after"] is False


def test_9_a_host_whose_own_key_is_revoked_is_warned_on_every_run(env: Env) -> None:
    _pki, leaves = published_fleet(env)
    own = env.tmp / "sa.pem"
    own.write_bytes(leaves[0].chained)
    shared_state(
        env,
        [(leaf.kid, fqdn) for leaf, fqdn in zip(leaves[1:], HOSTS[1:], strict=True)],
        revoked=[{"fingerprint": leaves[0].kid, "reason": "exposed"}],
        own_cert=str(own),
    )
    assert env.cli("converge", "--host", HOSTS[0], "--at", AT).code == 0
    for command in ("plan", "converge", "check"):
        result = env.cli(command, "--host", HOSTS[0], "--at", AT)
        assert f"this host's own key {leaves[0].kid} is revoked" in result.err, command


def test_own_cert_copied_from_another_host_never_leaves_that_hosts_key_out(env: Env) -> None:
    """A file copied to the wrong host: own_cert on ctrl1002 holds ctrl1001's certificate."""
    _pki, leaves = published_fleet(env)
    own = env.tmp / "sa.pem"
    own.write_bytes(leaves[0].chained)
    shared_state(
        env,
        pinned(leaves),
        own_cert=str(own),
    )
    result = env.cli("converge", "--host", HOSTS[1], "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    assert leaves[0].kid in json.loads(result.out)["bundle"]["kids_after"]
    assert f"own_cert holds {leaves[0].kid}, which is {HOSTS[0]}'s key" in result.err
    assert verifies_with_bundle(sign(leaves[0].key), env.bundle_bytes() or b"")
