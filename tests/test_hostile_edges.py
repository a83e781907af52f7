"""Hostile input at the edges, end to end against real etcd (contract R9-R11).

Each test names the finding of the security and code reviews it pins (issue 13's
numbering); the unit-level twins live in test_keys_hostile.py, test_bundle_go.py,
test_hostile_output.py and test_hostile_files.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization

from sakeystate.keys import format_time, kid_of

from conftest import Env
from pki import Pki, host
from support import T0, entry_value, kid, make_cert, private_key, run_cli

AT = format_time(T0)
A, B, C = host(1001), host(1002), host(1003)
NO_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text


def test_finding_1_extreme_dates_never_crash_and_check_still_says_in_sync(env: Env) -> None:
    good = env.publish(private_key("ec256", 1), A)
    forever = private_key("ec256", 2)
    env.etcd.put(
        env.prefix + kid(forever),
        b"Host: " + B.encode() + b"\n" + make_cert(forever, B, not_after=NO_EXPIRY),
    )
    for n, published in enumerate(("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00")):
        odd = private_key("ec256", 3 + n)
        env.etcd.put(
            env.prefix + kid(odd),
            f"Host: {C}\nPublished: {published}\n".encode() + make_cert(odd, C),
        )
    env.state([(good, A), (kid(forever), B)], bundle={"reload": ["true"]})
    for command in ("plan", "converge", "inspect"):
        result = env.cli(command, "--at", AT)
        assert result.code == 0, (command, result.err)
        _no_traceback(result.out, result.err)
    assert env.cli("check", "--at", AT).code == 1  # in sync: the revocation path works
    env.state([(good, A)], revoked=[{"fingerprint": kid(forever), "reason": "test"}])
    assert env.cli("converge", "--at", AT).code == 0
    assert env.prefix + kid(forever) in env.dump()  # R13: B's entry, B deletes it
    assert env.cli("converge", "--at", AT, "--host", B).code == 0
    assert env.prefix + kid(forever) not in env.dump()


def test_finding_3_flags_that_overflow_are_clear_errors(env: Env) -> None:
    env.state([env.publish(private_key("ec256", 1), A)])
    plan = env.cli("plan", "--at", "0001-01-01T00:00:00+01:00")
    assert plan.code == 1 and "--at" in plan.err
    _no_traceback(plan.err)
    cert = env.tmp / "c.pem"
    cert.write_bytes(make_cert(private_key("ec256", 9), "sa"))
    publish = env.cli("publish", "--cert", str(cert), "--host", "ctrl\u00e9.example.org")
    assert publish.code == 1 and "not a fully qualified host name" in publish.err
    _no_traceback(publish.err)


def _spaced(pem: bytes) -> bytes:
    """A PEM block with a space after BEGIN and a tab inside a base64 line: Go reads it."""
    lines = pem.decode().splitlines()
    lines[0] += " "
    lines[1] = lines[1][:10] + "\t" + lines[1][10:]
    return ("\n".join(lines) + "\n").encode()


def test_finding_4_keys_hidden_by_odd_whitespace_count_as_removals(env: Env) -> None:
    keys = [private_key("ec256", 10 + i) for i in range(3)]
    env.bundle.write_bytes(
        b"".join(_spaced(make_cert(k, h)) for k, h in zip(keys, (A, B, C), strict=True))
    )
    kept = env.publish(private_key("ec256", 20), A)
    env.state([kept], retention={"max_removals": 0})
    plan = env.cli("plan", "--at", AT, "--format", "json")
    report = json.loads(plan.out)
    assert sorted(report["bundle"]["kids_before"]) == sorted(kid(k) for k in keys)
    assert plan.code == 1 and "more than retention.max_removals (0)" in plan.err
    before = env.bundle_bytes()
    assert env.cli("converge", "--at", AT).code == 1 and env.bundle_bytes() == before
    adopted = run_cli(
        "adopt", "--no-etcd", "--cluster", "c", "--endpoint", env.etcd.url,
        "--from-bundle", str(env.bundle),
    )  # fmt: skip
    assert adopted.code == 0, adopted.err
    offered = {e["fingerprint"] for e in yaml.safe_load(adopted.out)["trusted"]}
    assert offered == {kid(k) for k in keys}


def test_finding_6_a_legacy_public_key_is_migrated_undated_and_never_outranks(env: Env) -> None:
    old_key, current = private_key("ec256", 30), private_key("ec256", 31)
    public = old_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    env.etcd.put(env.prefix + A, public)  # the old publisher's FQDN layout, a bare key
    now = datetime.now(UTC).replace(microsecond=0)
    env.etcd.put(env.prefix + kid(current), entry_value(current, A, now - timedelta(days=2)))
    env.state([(kid(old_key), A), (kid(current), A)], host=A, retention={"superseded_grace": "1d"})
    assert env.cli("converge").code == 0
    migrated = env.dump()[env.key(A, kid(old_key))]
    assert b"Published:" not in migrated and migrated.startswith(f"Host: {A}\n".encode())
    for _run in range(2):
        result = env.cli("converge", "--format", "json")
        assert result.code == 0, result.err
        assert kid(current) in json.loads(result.out)["bundle"]["kids_after"]
    assert env.key(A, kid(current)) in env.dump()  # the current key is never superseded


def test_finding_7_a_renewal_dated_seconds_ahead_keeps_its_key(env: Env) -> None:
    pki = Pki()
    leaf = pki.sa_named(A)
    ca = env.tmp / "ca.pem"
    ca.write_bytes(pki.ca_file())
    anchor = {"name": "pki", "ca_file": str(ca), "hosts": [A, B]}
    other = pki.sa_named(B)
    env.state([], trust_anchors=[anchor], bundle={"reload": ["true"]})
    for item, name in ((leaf, A), (other, B)):
        path = env.tmp / f"{name}.pem"
        path.write_bytes(item.chained)
        assert env.cli("publish", "--cert", str(path), "--host", name).code == 0
    assert env.cli("converge").code == 0
    before = env.bundle_bytes()
    ahead = datetime.now(UTC) + timedelta(minutes=5)
    renewal = pki.renew(leaf, not_before=ahead, not_after=ahead + timedelta(days=365))
    path = env.tmp / "renewal.pem"
    path.write_bytes(renewal.chained)
    assert env.cli("publish", "--cert", str(path), "--host", A).code == 0
    result = env.cli("converge", "--format", "json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["changed"] is False and env.bundle_bytes() == before


def test_finding_8_max_removals_counts_what_prune_deletes_from_etcd(env: Env) -> None:
    """Revision 2 deleted superseded keys from etcd in converge, and max_removals had to
    count them even with no bundle yet. Now converge deletes nothing retention decides
    (R13); prune does, and counts the trusted keys it deletes."""
    keys = [private_key("ec256", 40 + i) for i in range(4)]
    for i, key in enumerate(keys):
        env.publish(key, A, published=T0 - timedelta(days=30 - i))
    env.state([(kid(k), A) for k in keys], retention={"superseded_grace": "1d", "max_removals": 1})
    before = env.dump()
    assert env.cli("converge", "--at", AT).code == 0
    assert env.dump() == before
    refused = env.cli("prune", "--at", AT)
    assert refused.code == 1 and "more than retention.max_removals (1)" in refused.err
    assert env.dump() == before
    assert env.cli("prune", "--at", AT, "--allow-removals").code == 0
    assert list(env.dump()) == [env.key(A, kid(keys[-1]))]


def test_finding_14_an_owed_reload_is_reported_until_reload_done(env: Env) -> None:
    kids = [env.publish(private_key("ec256", 50 + i), h) for i, h in enumerate((A, B))]
    env.state(list(zip(kids, (A, B), strict=True)))
    for _run in range(2):  # an aborted play, a failed handler: the restart is still owed
        result = env.cli("converge", "--no-reload", "--format", "json", "--detailed-exitcode")
        assert result.code == 2, result.err
        report = json.loads(result.out)
        assert report["reload_needed"] is True
    assert json.loads(env.cli("check", "--format", "json").out)["reload_needed"] is True
    done = env.cli("reload-done")
    assert done.code == 0 and "cleared" in done.out
    again = env.cli("converge", "--no-reload", "--format", "json", "--detailed-exitcode")
    assert again.code == 0 and json.loads(again.out)["reload_needed"] is False
    assert "no reload was owed" in env.cli("reload-done").out


class _LostAnswer:
    """A store whose first transaction applies but whose answer is lost (the network)."""

    def __init__(self, store: object) -> None:
        self.store, self.lost = store, False

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    def transaction(self, guards: object, writes: object) -> bool:
        applied = self.store.transaction(guards, writes)  # type: ignore[attr-defined]
        if not self.lost:
            self.lost = True
            return False  # etcd applied it; the retry on another endpoint sees the compare fail
        return bool(applied)


def test_finding_17_a_publish_whose_answer_was_lost_reports_published(env: Env) -> None:
    from sakeystate.apply import publish
    from sakeystate.etcd import EtcdStore
    from sakeystate.keys import parse_key_file
    from sakeystate.state import load_state

    env.state([], host=A)
    desired = load_state(env.state_path)
    key, chain = parse_key_file(make_cert(private_key("ec256", 60), "sa"))
    with EtcdStore(desired.etcd) as store:
        result = publish(_LostAnswer(store), desired, key, chain, T0)  # type: ignore[arg-type]
    assert result.changed is True and "published" in result.message
    assert env.key(A, key.kid) in env.dump()


def test_usage_errors_exit_1_on_every_command(env: Env) -> None:
    env.state([])
    for argv in (
        [],
        ["frobnicate"],
        ["plan", "--bogus"],
        ["converge", "--at", AT],
        ["publish", "--at", AT],
        ["status", "--format", "yaml"],
        ["wait"],
        ["check", "--detailed-exitcode"],
    ):
        result = run_cli(*argv)
        assert result.code == 1, (argv, result)


def test_check_exits_0_when_a_dependency_is_missing(env: Env) -> None:
    """A broken install (cryptography missing) must read as "run the converge"."""
    kids = [env.publish(private_key("ec256", 70), A)]
    env.state(kids)
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'cryptography':\n"
        "            raise ImportError('No module named cryptography (test)')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from sakeystate.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", blocker]
    check = subprocess.run(
        [*argv, "check", "--state", str(env.state_path)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    assert "cryptography" in check.stderr and "Traceback" not in check.stderr
    converge = subprocess.run(
        [*argv, "converge", "--state", str(env.state_path)], capture_output=True, text=True
    )
    assert converge.returncode == 1 and "Traceback" not in converge.stderr


def test_adopt_anchor_ca_writes_an_anchor_based_state_and_json(env: Env) -> None:
    pki = Pki()
    leaves = {h: pki.sa() for h in (A, B, C)}
    for fqdn, leaf in leaves.items():
        env.etcd.put(env.prefix + leaf.kid, f"Host: {fqdn}\n".encode() + leaf.chained)
    ca = env.tmp / "ca.pem"
    ca.write_bytes(pki.ca_file())
    result = run_cli(
        "adopt", "--endpoint", env.etcd.url, "--prefix", env.prefix, "--cluster", "eqiad",
        "--anchor-ca", str(ca), "--bundle-path", str(env.bundle), "--format", "json",
    )  # fmt: skip
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["version"] == 1 and sorted(report["trusted"]) == sorted(
        leaf.kid for leaf in leaves.values()
    )
    state = yaml.safe_load(report["state"])
    assert state["trust_anchors"] == [
        {"name": "eqiad-pki", "ca_file": str(ca), "hosts": sorted(leaves), "common_name": "sa"}
    ]
    written = env.tmp / "adopted.yaml"
    written.write_text(report["state"])
    assert run_cli("validate", str(written)).code == 0
    reimaged = pki.sa()
    env.etcd.put(env.prefix + reimaged.kid, f"Host: {B}\n".encode() + reimaged.chained)
    plan = run_cli("plan", "--state", str(written), "--host", A, "--format", "json")
    rows = {k["kid"]: k for k in json.loads(plan.out)["keys"]}
    assert rows[reimaged.kid]["trust"].startswith("anchor eqiad-pki: certificate for " + B)


def test_a_san_for_another_host_published_under_a_fleet_name_is_never_trusted(
    env: Env,
) -> None:
    pki = Pki()
    ca = env.tmp / "ca.pem"
    ca.write_bytes(pki.ca_file())
    good = pki.sa_named(A)
    env.etcd.put(env.prefix + good.kid, f"Host: {A}\n".encode() + good.chained)
    wrong = pki.sa_named(C)  # the CA issued it to ctrl1003
    env.etcd.put(env.prefix + wrong.kid, f"Host: {B}\n".encode() + wrong.chained)
    env.state([], trust_anchors=[{"name": "pki", "ca_file": str(ca), "hosts": [A, B]}])
    report = json.loads(env.cli("converge", "--format", "json").out)
    assert report["bundle"]["kids_after"] == [good.kid]
    row = next(k for k in report["keys"] if k["kid"] == wrong.kid)
    # R12: the certificate names its host; the Host line claiming B is ignored and said.
    assert (row["host"], row["host_source"]) == (C, "named by the certificate")
    assert row["status"] == "untrusted" and f"host {C} not in the anchor's hosts" in row["reason"]
    assert any(f"says {B}, but key {wrong.kid} is {C}'s" in w for w in report["warnings"])
    assert kid_of(wrong.key.public_key()) == wrong.kid
    path = Path(env.tmp / "wrong.pem")
    path.write_bytes(wrong.chained)
    refused = env.cli("publish", "--cert", str(path), "--host", B)
    assert refused.code == 1 and f"the certificate names {C}" in refused.err


def test_re_dating_a_hosts_current_key_in_etcd_never_supersedes_it(env: Env) -> None:
    """An etcd writer re-dates ctrl1001's current key to before its previous one, so that
    the previous key would supersede it. The bundle remembers when each key was first
    seen, so nothing changes, and the forged header is reported."""
    previous, current = private_key("ec256", 80), private_key("ec256", 81)
    env.publish(previous, A, published=T0 - timedelta(days=400))
    env.publish(current, A, published=T0 - timedelta(days=10))
    other = env.publish(private_key("ec256", 82), B)
    env.state([(kid(previous), A), (kid(current), A), (other, B)], bundle={"reload": ["true"]})
    assert env.cli("converge", "--at", AT).code == 0
    before = env.bundle_bytes()
    env.publish(current, A, published=T0 - timedelta(days=500))  # the forgery
    plan = env.cli("plan", "--at", AT, "--format", "json")
    report = json.loads(plan.out)
    assert plan.code == 0 and report["actions"] == [], report["actions"]
    assert any("when this host first saw the key" in w for w in report["warnings"])
    assert env.cli("converge", "--at", AT).code == 0
    assert env.bundle_bytes() == before and env.key(A, kid(current)) in env.dump()


def test_finding_15_a_prefix_filled_with_huge_values_is_refused_at_once(env: Env) -> None:
    """700 values of 1.4 MiB made every converge time out; a read past the cap is a clear
    error naming the prefix (the cap is lowered here so that the test stays small)."""
    from sakeystate.errors import EtcdError
    from sakeystate.etcd import EtcdStore
    from sakeystate.state import load_state

    env.state([env.publish(private_key("ec256", 90), A)])
    for number in range(3):
        env.etcd.put(f"{env.prefix}huge{number}.example.org", b"x" * (1024 * 1024))
    desired = load_state(env.state_path)
    with EtcdStore(desired.etcd, max_read=2 * 1024 * 1024) as store:
        try:
            store.read(desired.etcd.prefix)
        except EtcdError as exc:
            assert f"more than 2 MiB under {desired.etcd.prefix}" in str(exc)
        else:
            raise AssertionError("the read was not refused")
    result = env.cli("converge")  # under the default cap: the huge values are reported
    assert result.code == 0 and "over the 65536-byte limit" in result.err, result.err
