"""plan / converge / check / publish / inspect against a real etcd, asserting outcomes."""

from __future__ import annotations

import html
import json
import os
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from sakeystate.keys import parse_pem_bundle

from conftest import Env
from support import T0, entry_value, kid, make_cert, private_key, run_sakeystate

AT = "2026-11-22T10:00:00Z"
A, B, C = "ctrl1001.example.org", "ctrl1002.example.org", "ctrl1003.example.org"


def reload_counter(env: Env, fail_flag: Path | None = None) -> tuple[list[str], Path]:
    """A reload argv that appends a line to a log, and fails while ``fail_flag`` exists."""
    log = env.tmp / "reloads.log"
    script = (
        "import os, sys; "
        "sys.exit(3) if len(sys.argv) > 2 and os.path.exists(sys.argv[2]) else None; "
        "open(sys.argv[1], 'a').write('reload' + chr(10))"
    )
    argv = [sys.executable, "-c", script, str(log)]
    if fail_flag is not None:
        argv.append(str(fail_flag))
    return argv, log


def reloads(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def three_planes(env: Env, **overrides: Any) -> list[str]:
    """Three published, pinned keys; a restart that always succeeds unless one is given
    (with none configured, every key-set change would stay owed: see test_restart.py)."""
    kids = [env.publish(private_key("ec521", i), host) for i, host in enumerate((A, B, C))]
    overrides["bundle"] = {"reload": ["true"], **overrides.get("bundle", {})}
    env.state(list(zip(kids, (A, B, C), strict=True)), **overrides)
    return kids


def bundle_kids(env: Env) -> list[str]:
    """The kids kube-apiserver loads from the bundle, in file order."""
    return [k.kid for k in parse_pem_bundle(env.bundle_bytes() or b"")[0]]


def test_first_converge_changes_second_is_a_noop(env: Env) -> None:
    argv, log = reload_counter(env)
    kids = three_planes(env, bundle={"reload": argv})
    first = env.cli("converge", "--at", AT, "--format", "json")
    assert first.code == 0, first.err
    report = json.loads(first.out)
    assert report["changed"] is True
    assert sorted(report["bundle"]["kids_after"]) == sorted(kids)
    assert bundle_kids(env) == sorted(kids)
    assert reloads(log) == 1
    before_bytes, before_dump = env.bundle_bytes(), env.dump()
    revision = env.etcd.client.get_response(env.key(A, kids[0])).header.revision
    second = env.cli("converge", "--at", AT, "--format", "json", "--detailed-exitcode")
    assert second.code == 0, second.err
    assert json.loads(second.out)["changed"] is False
    assert json.loads(second.out)["actions"] == []
    assert env.bundle_bytes() == before_bytes
    assert env.dump() == before_dump
    assert env.etcd.client.get_response(env.key(A, kids[0])).header.revision == revision
    assert reloads(log) == 1


def test_bundle_is_public_keys_sorted_by_kid_with_mode(env: Env) -> None:
    kids = three_planes(env, bundle={"mode": "0640"})
    assert env.cli("converge", "--at", AT).code == 0
    expected = b"".join(
        f"# {k} {h} {AT}\n".encode()
        + private_key("ec521", i)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for k, h, i in sorted(zip(kids, (A, B, C), range(3), strict=True))
    )
    assert env.bundle_bytes() == expected
    assert b"CERTIFICATE" not in expected
    assert (os.stat(env.bundle).st_mode & 0o777) == 0o640


def test_converge_detailed_exitcode_and_quiet(env: Env) -> None:
    three_planes(env)
    assert env.cli("converge", "--at", AT, "--detailed-exitcode").code == 2
    again = env.cli("converge", "--at", AT, "--detailed-exitcode", "--quiet")
    assert (again.code, again.out) == (0, "")


def test_check_exit_status_follows_the_onlyif_contract(env: Env) -> None:
    kids = three_planes(env)
    drift = env.cli("check", "--at", AT)
    assert drift.code == 0
    assert env.cli("converge", "--at", AT).code == 0
    assert env.cli("check", "--at", AT).code == 1
    env.state([(kids[0], A), (kids[1], B)])
    assert env.cli("check", "--at", AT).code == 0


def test_check_exits_0_with_the_error_when_etcd_is_unreachable(env: Env) -> None:
    from etcd_server import free_port

    three_planes(env)
    env.state([], etcd={"endpoints": [f"http://127.0.0.1:{free_port()}"], "timeout": "1s"})
    result = env.cli("check", "--at", AT)
    assert result.code == 0
    assert "sakeystate: error:" in result.err and "127.0.0.1" in result.err


def test_plan_detailed_exitcode_is_0_2_1(env: Env) -> None:
    from etcd_server import free_port

    three_planes(env)
    assert env.cli("plan", "--at", AT, "--detailed-exitcode").code == 2
    assert env.cli("converge", "--at", AT).code == 0
    assert env.cli("plan", "--at", AT, "--detailed-exitcode").code == 0
    env.state([], etcd={"endpoints": [f"http://127.0.0.1:{free_port()}"], "timeout": "1s"})
    failed = env.cli("plan", "--at", AT, "--detailed-exitcode")
    assert failed.code == 1 and "Traceback" not in failed.err


def test_reimage_keeps_the_old_key_in_etcd_and_bundle(env: Env) -> None:
    argv, log = reload_counter(env)
    kids = three_planes(env, bundle={"reload": argv})
    assert env.cli("converge", "--at", AT).code == 0
    new = private_key("ec521", 10)
    new_kid = env.publish(new, A, published=T0 + timedelta(days=1))
    at = "2026-11-23T12:00:00Z"
    plan = json.loads(env.cli("plan", "--at", at, "--format", "json").out)
    assert plan["actions"] == []
    assert any("untrusted key " + new_kid in w for w in plan["warnings"])
    env.state([(new_kid, A), *zip(kids, (A, B, C), strict=True)], bundle={"reload": argv})
    result = env.cli("converge", "--at", at, "--format", "json")
    assert result.code == 0, result.err
    assert sorted(json.loads(result.out)["bundle"]["kids_after"]) == sorted([*kids, new_kid])
    assert set(env.dump()) == {
        env.key(h, k) for k, h in zip([*kids, new_kid], (A, B, C, A), strict=True)
    }
    assert bundle_kids(env) == sorted([*kids, new_kid])
    assert reloads(log) == 2


def test_superseded_key_goes_after_its_grace_and_not_before(env: Env) -> None:
    old_kid = env.publish(private_key("ec521", 0), A, published=T0 - timedelta(days=400))
    new_kid = env.publish(private_key("ec521", 1), A, published=T0)
    other = env.publish(private_key("ec521", 2), B, published=T0)
    trusted = [(old_kid, A), (new_kid, A), (other, B)]
    env.state(trusted, retention={"superseded_grace": "30d"})
    early = env.cli("converge", "--at", "2026-12-21T10:00:00Z", "--format", "json")
    assert early.code == 0
    assert old_kid in json.loads(early.out)["bundle"]["kids_after"]
    assert any(
        "will be dropped on 2026-12-22T10:00:00Z" in w for w in json.loads(early.out)["warnings"]
    )
    late = env.cli("converge", "--at", "2026-12-22T10:00:00Z", "--format", "json")
    assert late.code == 0, late.err
    report = json.loads(late.out)
    assert old_kid not in report["bundle"]["kids_after"]
    removal = next(a for a in report["actions"] if a["target"] == "bundle")
    assert removal["op"] == "remove" and removal["kid"] == old_kid
    assert f"superseded by {new_kid}" in removal["reason"]
    # R13: retention deletes nothing from etcd (a host's clock alone must not remove a key
    # a host reimaged later still needs); the operator's prune does.
    assert env.key(A, old_kid) in env.dump()
    assert not [a for a in report["actions"] if a["target"] == "etcd"]
    pruned = env.cli("prune", "--at", "2026-12-22T10:00:00Z", "--format", "json")
    assert pruned.code == 0, pruned.err
    deleted = [a for a in json.loads(pruned.out)["actions"] if a["target"] == "etcd"]
    assert [(a["op"], a["kid"]) for a in deleted] == [("delete", old_kid)]
    assert f"superseded by {new_kid}" in deleted[0]["reason"]
    assert set(env.dump()) == {env.key(A, new_kid), env.key(B, other)}


def test_expired_certificate_never_removes_a_current_key_and_warns_every_run(env: Env) -> None:
    """Observation 3 (R1): a host whose renewal is late still signs with its key; kube-apiserver
    ignores certificate dates, so expiry removes nothing, however long ago."""
    expiring = env.publish(private_key("ec256", 3), A, not_after=T0 + timedelta(days=10))
    others = [env.publish(private_key("ec521", i), h) for i, h in ((1, B), (2, C))]
    env.state([(expiring, A), (others[0], B), (others[1], C)], bundle={"reload": ["true"]})
    assert env.cli("converge", "--at", AT).code == 0
    before = env.bundle_bytes()
    for later in ("2026-12-03T10:00:00Z", "2031-01-01T00:00:00Z"):
        plan = env.cli("plan", "--at", later, "--format", "json", "--detailed-exitcode")
        assert plan.code == 0, plan.err
        assert json.loads(plan.out)["actions"] == []
        assert f"{A}'s current key {expiring} expired 2026-12-02T10:00:00Z" in plan.err
        result = env.cli("converge", "--at", later, "--format", "json")
        assert result.code == 0, result.err
        assert json.loads(result.out)["actions"] == []
        assert "expired 2026-12-02T10:00:00Z: the key is kept" in result.err
        check = env.cli("check", "--at", later)
        assert check.code == 1 and "expired" in check.err
    assert env.bundle_bytes() == before
    assert expiring in bundle_kids(env) and env.key(A, expiring) in env.dump()


def test_revoked_key_leaves_bundle_and_etcd(env: Env) -> None:
    kids = three_planes(env)
    assert env.cli("converge", "--at", AT).code == 0
    env.state(
        [(kids[1], B), (kids[2], C)],
        revoked=[{"fingerprint": kids[0], "reason": "private key exposed"}],
    )
    result = env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    assert kids[0] not in bundle_kids(env)
    reasons = [a["reason"] for a in json.loads(result.out)["actions"] if a.get("kid") == kids[0]]
    assert any("revoked: private key exposed" in r for r in reasons)
    # R13: a peer never deletes another host's entry; the revoked host itself does.
    assert env.key(A, kids[0]) in env.dump()
    own = env.cli("converge", "--at", AT, "--host", A, "--format", "json")
    assert own.code == 0, own.err
    assert env.key(A, kids[0]) not in env.dump()
    assert [a["op"] for a in json.loads(own.out)["actions"] if a["target"] == "etcd"] == ["delete"]


def test_untrusted_valid_key_stays_in_etcd_and_is_reported(env: Env) -> None:
    kids = three_planes(env)
    stranger = env.publish(private_key("ec384", 4), "new.example.org")
    result = env.cli("converge", "--at", AT, "--format", "json")
    report = json.loads(result.out)
    assert stranger not in report["bundle"]["kids_after"]
    assert env.key("new.example.org", stranger) in env.dump()
    status = {k["kid"]: k["status"] for k in report["keys"]}
    assert status[stranger] == "untrusted"
    assert sorted(bundle_kids(env)) == sorted(kids)
    assert any(stranger in w and "review" in w for w in report["warnings"])


def test_value_under_another_kid_is_never_trusted(env: Env) -> None:
    kids = three_planes(env)
    impostor = private_key("ec256", 5)
    # The attacker stores its own certificate under a trusted kid's name.
    poison = entry_value(impostor, A)
    env.etcd.put(env.key(A, kids[0]), poison)
    result = env.cli("converge", "--at", AT, "--format", "json")
    report = json.loads(result.out)
    assert kids[0] not in report["bundle"]["kids_after"]
    assert kid(impostor) not in report["bundle"]["kids_after"]
    assert {k["kid"]: k["status"] for k in report["keys"]}[kids[0]] == "poisoned"
    assert env.etcd.get(env.key(A, kids[0])) == poison  # reported, left for a human
    assert sorted(bundle_kids(env)) == sorted(kids[1:])


def test_private_key_in_etcd_is_never_copied_anywhere(env: Env) -> None:
    kids = three_planes(env)
    secret = private_key("ec256", 6).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    env.etcd.put(env.prefix + "leaky.example.org", secret)
    env.etcd.put(env.key(A, kids[0]), b"Host: a\n" + secret)
    outputs = [
        env.cli(cmd, "--at", AT, "--format", "json") for cmd in ("plan", "converge", "inspect")
    ]
    outputs.append(env.cli("snapshot", "--at", AT, "--format", "json"))
    body = secret.decode().splitlines()[1]
    for result in outputs:
        assert body not in result.out and body not in result.err
    assert body.encode() not in (env.bundle_bytes() or b"")
    for path in env.tmp.rglob("*"):
        if path.is_file():
            assert body.encode() not in path.read_bytes(), path
    assert sorted(bundle_kids(env)) == sorted(kids[1:])


def test_ed25519_and_short_rsa_never_reach_the_bundle(env: Env) -> None:
    kids = three_planes(env)
    weak = [
        env.publish(private_key("ed25519"), "x.example.org"),
        env.publish(private_key("rsa1024"), "y.example.org"),
    ]
    env.state([*zip(kids, (A, B, C), strict=True), *[(w, "x.example.org") for w in weak]])
    result = env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert sorted(report["bundle"]["kids_after"]) == sorted(kids)
    reasons = {k["kid"]: k["reason"] for k in report["keys"] if k["status"] == "rejected"}
    assert "Ed25519 keys are not accepted" in reasons[weak[0]]
    assert "1024 bits is too short" in reasons[weak[1]]


def test_min_keys_refusal_writes_nothing(env: Env) -> None:
    argv, log = reload_counter(env)
    kids = three_planes(env, bundle={"reload": argv})
    assert env.cli("converge", "--at", AT).code == 0
    before, dump = env.bundle_bytes(), env.dump()
    env.state(
        [(kids[0], A)],
        bundle={"reload": argv},
        revoked=[{"fingerprint": kids[1]}, {"fingerprint": kids[2]}],
        retention={"min_keys": 2, "max_removals": 5},
    )
    result = env.cli("converge", "--at", AT)
    assert result.code == 1
    assert "fewer than retention.min_keys (2)" in result.err
    assert env.bundle_bytes() == before and env.dump() == dump and reloads(log) == 1


def test_max_removals_refusal_writes_nothing_unless_allowed(env: Env) -> None:
    kids = three_planes(env)
    assert env.cli("converge", "--at", AT).code == 0
    before, dump = env.bundle_bytes(), env.dump()
    env.state(
        [(kids[0], A)],
        revoked=[{"fingerprint": kids[1]}, {"fingerprint": kids[2]}],
        retention={"max_removals": 1},
    )
    refused = env.cli("converge", "--at", AT, "--format", "json")
    assert refused.code == 1 and "--allow-removals" in refused.err
    assert json.loads(refused.out)["changed"] is False
    assert env.bundle_bytes() == before and env.dump() == dump
    assert env.cli("check", "--at", AT).code == 0
    allowed = env.cli("converge", "--at", AT, "--allow-removals")
    assert allowed.code == 0, allowed.err
    assert bundle_kids(env) == [kids[0]]


def test_etcd_unreachable_writes_nothing_and_exits_1(env: Env) -> None:
    from etcd_server import free_port

    three_planes(env)
    port = free_port()
    env.state([], etcd={"endpoints": [f"http://127.0.0.1:{port}"], "timeout": "1s"})
    result = env.cli("converge", "--at", AT)
    assert result.code == 1
    assert f"http://127.0.0.1:{port}" in result.err and "Traceback" not in result.err
    assert env.bundle_bytes() is None
    assert not list(env.tmp.glob("*.reload-pending"))


def test_failed_reload_fails_converge_and_next_run_retries_it(env: Env) -> None:
    flag = env.tmp / "apiserver-broken"
    flag.touch()
    argv, log = reload_counter(env, fail_flag=flag)
    three_planes(env, bundle={"reload": argv})
    failed = env.cli("converge", "--at", AT, "--format", "json")
    assert failed.code == 1 and "exited 3" in failed.err
    report = json.loads(failed.out)
    assert report["changed"] is True and "exited 3" in report["errors"][0]
    assert env.bundle_bytes() is not None  # the bundle is written; only the reload is owed
    assert env.cli("check", "--at", AT).code == 0
    still = env.cli("converge", "--at", AT)
    assert still.code == 1 and reloads(log) == 0
    flag.unlink()
    retried = env.cli("converge", "--at", AT, "--format", "json")
    assert retried.code == 0, retried.err
    report = json.loads(retried.out)
    assert [a["op"] for a in report["actions"]] == ["run"]
    assert "earlier reload" in report["actions"][0]["reason"]
    assert reloads(log) == 1
    assert env.cli("check", "--at", AT).code == 1


def test_reload_that_never_ends_is_killed_at_the_hard_cap_and_counts_as_failed(env: Env) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    three_planes(env, bundle={"reload": argv, "reload_timeout": "1s"})
    result = env.cli("converge", "--at", AT)
    assert result.code == 1 and "was still running after 3s (3 x reload_timeout)" in result.err
    assert env.cli("check", "--at", AT).code == 0


def test_same_key_renewal_changes_nothing(env: Env) -> None:
    argv, log = reload_counter(env)
    three_planes(env, bundle={"reload": argv})
    assert env.cli("converge", "--at", AT).code == 0
    before = env.bundle_bytes()
    cert = env.tmp / "renewed.pem"
    cert.write_bytes(make_cert(private_key("ec521", 0), A, not_after=T0 + timedelta(days=700)))
    published = env.cli("publish", "--cert", str(cert), "--host", A, "--at", AT)
    assert published.code == 0 and "renewed" in published.out
    result = env.cli("converge", "--at", AT, "--format", "json")
    assert json.loads(result.out)["changed"] is False
    assert env.bundle_bytes() == before and reloads(log) == 1


def test_publish_is_put_if_absent_idempotent_and_never_overwrites(env: Env) -> None:
    env.state([])
    key = private_key("ec521", 7)
    cert = env.tmp / "cert.pem"
    cert.write_bytes(make_cert(key, A))
    first = env.cli("publish", "--cert", str(cert), "--host", A, "--at", AT, "--detailed-exitcode")
    assert first.code == 2, first.err
    stored = env.etcd.get(env.key(A, kid(key)))
    assert stored is not None
    assert stored.startswith(f"Host: {A}\nPublished: {AT}\n".encode())
    again = env.cli("publish", "--cert", str(cert), "--host", A, "--detailed-exitcode")
    assert again.code == 0 and env.etcd.get(env.key(A, kid(key))) == stored
    other_host = env.cli("publish", "--cert", str(cert), "--host", B)
    assert other_host.code == 1 and f"the certificate names {A}, not this host" in other_host.err
    unnamed = env.tmp / "sa.pem"  # the seed PKI's shape: CN sa, no SAN
    unnamed.write_bytes(make_cert(key, "sa"))
    other_host = env.cli("publish", "--cert", str(unnamed), "--host", B)
    assert other_host.code == 1
    assert f"{env.key(A, kid(key))} already holds it (another host" in other_host.err
    assert set(env.dump()) == {env.key(A, kid(key))}
    poison = entry_value(private_key("ec256", 8), A)
    env.etcd.put(env.key(A, kid(key)), poison)
    poisoned = env.cli("publish", "--cert", str(cert), "--host", A)
    assert poisoned.code == 1 and "different key" in poisoned.err
    assert env.etcd.get(env.key(A, kid(key))) == poison


def test_publish_refuses_a_private_key_file(env: Env) -> None:
    env.state([])
    secret = env.tmp / "key.pem"
    secret.write_bytes(
        private_key("ec256").private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    result = env.cli("publish", "--cert", str(secret), "--host", A)
    assert result.code == 1 and "private key" in result.err
    assert env.dump() == {}


def test_exclude_host_leaves_out_only_its_current_key(env: Env) -> None:
    old = env.publish(private_key("ec521", 0), A, published=T0 - timedelta(days=2))
    new = env.publish(private_key("ec521", 1), A, published=T0)
    other = env.publish(private_key("ec521", 2), B)
    env.state([(old, A), (new, A), (other, B)], host=A, bundle={"exclude_host": "self"})
    result = env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    assert bundle_kids(env) == sorted([old, other])
    status = {k["kid"]: k["status"] for k in json.loads(result.out)["keys"]}
    assert status[new] == "excluded" and env.key(A, new) in env.dump()


def test_two_converges_on_one_host_never_interleave(env: Env) -> None:
    from sakeystate import bundle
    from sakeystate.state import load_state

    three_planes(env, etcd={"timeout": "1s"}, bundle={"reload_timeout": "1s"})
    desired = load_state(env.state_path)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with bundle.locked(desired.bundle, 1):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        blocked = env.cli("converge", "--at", AT)
    finally:
        release.set()
        holder.join()
    assert blocked.code == 1
    # It waited reload_timeout + etcd.timeout, and names the holder.
    assert f"(PID {os.getpid()}) holds the lock {env.bundle}.lock" in blocked.err
    assert "gave up after 2s" in blocked.err
    assert env.bundle_bytes() is None
    assert env.cli("converge", "--at", AT).code == 0


def test_inspect_lists_every_key_with_status_and_why(env: Env) -> None:
    kids = three_planes(env)
    stranger = env.publish(private_key("ec384", 4), "new.example.org")
    env.etcd.put(env.prefix + "broken.example.org", b"garbage")
    result = env.cli("inspect", "--at", AT)
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["KID", "HOST", "NOT-AFTER", "STATUS", "IN-BUNDLE", "AFTER", "WHY"]
    by_kid = {line.split()[0]: line for line in lines[1:]}
    for k in kids:
        # Not in the bundle on disk yet; in it after the plan; pinned.
        assert by_kid[k].split()[3:7] == ["trusted", "no", "yes", "pinned"]
    assert " untrusted " in by_kid[stranger]
    assert any("rejected" in line and "no PEM block" in line for line in lines)


def test_bundle_permissions_drift_is_fixed_without_reload(env: Env) -> None:
    argv, log = reload_counter(env)
    three_planes(env, bundle={"reload": argv})
    assert env.cli("converge", "--at", AT).code == 0
    os.chmod(env.bundle, 0o600)
    result = env.cli("converge", "--at", AT, "--format", "json")
    assert [a["op"] for a in json.loads(result.out)["actions"]] == ["permissions"]
    assert (os.stat(env.bundle).st_mode & 0o777) == 0o644 and reloads(log) == 1


def test_hand_edited_bundle_is_restored_and_reloaded(env: Env) -> None:
    argv, log = reload_counter(env)
    kids = three_planes(env, bundle={"reload": argv})
    assert env.cli("converge", "--at", AT).code == 0
    canonical = env.bundle_bytes()
    stray = private_key("ec256", 9)
    env.bundle.write_bytes((canonical or b"") + make_cert(stray, "stray.example.org"))
    result = env.cli("converge", "--at", AT, "--format", "json")
    actions = json.loads(result.out)["actions"]
    assert ("bundle", "remove", kid(stray)) in {
        (a["target"], a["op"], a.get("kid")) for a in actions
    }
    assert env.bundle_bytes() == canonical and reloads(log) == 2
    assert sorted(bundle_kids(env)) == sorted(kids)


def test_json_report_has_the_contract_fields(env: Env) -> None:
    three_planes(env)
    report = json.loads(env.cli("plan", "--at", AT, "--format", "json").out)
    assert {"version", "changed", "cluster", "at", "actions", "bundle", "keys", "warnings"} <= set(
        report
    )
    assert report["version"] == 1 and report["at"] == AT and report["cluster"] == "test"
    assert set(report["bundle"]) == {"path", "kids_before", "kids_after"}
    assert {"target", "op", "kid", "host", "reason"} <= set(report["actions"][0])
    assert {"kid", "host", "status", "not_after", "reason"} <= set(report["keys"][0])


@pytest.mark.parametrize("entry", [["sakeystate"], [sys.executable, "-m", "sakeystate"]])
def test_console_script_and_module_entry_points(env: Env, entry: list[str]) -> None:
    import subprocess

    three_planes(env)
    exe = [str(Path(sys.executable).parent / entry[0]), *entry[1:]] if len(entry) == 1 else entry
    proc = subprocess.run(
        [*exe, "converge", "--state", str(env.state_path), "--detailed-exitcode"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert run_sakeystate("check", "--state", str(env.state_path)).code == 1
    refused = run_sakeystate("converge", "--state", str(env.state_path), "--at", AT)
    assert refused.code == 1 and "--at is only for read-only commands" in refused.err


def test_converge_removes_temporaries_a_killed_run_left_behind(env: Env) -> None:
    argv, _log = reload_counter(env)
    three_planes(env, bundle={"reload": argv})
    stale = [
        env.tmp / f".{env.bundle.name}.tmp-99999",
        env.tmp / f".{env.bundle.name}.reload-pending.tmp-99998",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    assert env.cli("converge", "--at", AT).code == 0
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in env.tmp.iterdir()) == sorted(
        ["sa-certs.pem", "sa-certs.pem.lock", "state.yaml", "reloads.log"]
    )


def test_reimaged_host_keeps_its_old_key_in_its_own_bundle_while_new_key_awaits_review(
    env: Env,
) -> None:
    """R3: with own_cert, exclude_host leaves out exactly the key this host signs with.

    After a reimage that is the new key, still awaiting review: the old key must stay
    in the host's own bundle, or the tokens it signed before the reimage fail there.
    """
    old_key, new_key = private_key("ec521", 0), private_key("ec521", 1)
    own = env.tmp / "sa.pem"
    own.write_bytes(make_cert(old_key, "sa"))
    old = env.publish(old_key, A, published=T0 - timedelta(days=30))
    other = env.publish(private_key("ec521", 2), B)
    shared = {"host": A, "own_cert": str(own), "bundle": {"exclude_host": "self"}}
    env.state([(old, A), (other, B)], **shared)
    assert env.cli("converge", "--at", AT).code == 0
    assert bundle_kids(env) == [other]  # before the reimage A's apiserver loads `old` itself
    own.write_bytes(make_cert(new_key, "sa"))  # the reimage: a new key in own_cert
    new = env.publish(new_key, A, published=T0 + timedelta(hours=1))
    result = env.cli("converge", "--at", "2026-11-22T12:00:00Z", "--format", "json")
    assert result.code == 0, result.err
    assert bundle_kids(env) == sorted([old, other])  # A now signs with `new`; `old` must verify
    status = {k["kid"]: k["status"] for k in json.loads(result.out)["keys"]}
    assert status[new] == "untrusted" and status[old] == "trusted"
    assert f"this host's own key {new} ({A}) is not trusted" in result.err
    env.state([(old, A), (new, A), (other, B)], **shared)
    after_review = env.cli("converge", "--at", "2026-11-22T12:00:00Z", "--format", "json")
    assert after_review.code == 0
    assert bundle_kids(env) == sorted([old, other])
    assert {k["kid"]: k["status"] for k in json.loads(after_review.out)["keys"]}[new] == "excluded"


def test_plan_predicts_the_failures_converge_would_hit_with_its_message(env: Env) -> None:
    """Observation 8: plan, check and Ansible check mode said "clean change" where the run
    then failed. A missing bundle directory, an unknown owner or an unreadable own_cert
    is now a refusal of the plan, worded as converge's failure."""
    for bundle_settings, expect in (
        ({"path": str(env.tmp / "missing" / "sa.pem")}, f"{env.tmp / 'missing'} does not exist"),
        ({"owner": "no-such-user-here"}, "'no-such-user-here' is not a user on this host"),
        ({"group": "no-such-group-here"}, "'no-such-group-here' is not a group on this host"),
    ):
        kids = three_planes(env, bundle=bundle_settings)
        plan = env.cli("plan", "--at", AT, "--format", "json")
        assert plan.code == 1 and expect in plan.err, plan.err
        assert sorted(json.loads(plan.out)["bundle"]["kids_after"]) == sorted(kids)
        check = env.cli("check", "--at", AT)
        assert check.code == 0 and expect in check.err
        converge = env.cli("converge", "--at", AT)
        assert converge.code == 1 and expect in converge.err
    assert not (env.tmp / "missing").exists() and not env.bundle.exists()
    three_planes(env, own_cert=str(env.tmp / "nowhere.pem"))
    plan = env.cli("plan", "--at", AT)
    assert plan.code == 1 and "cannot read own_cert" in plan.err
    assert not env.bundle.exists()


def test_warnings_go_to_stderr_and_reports_to_stdout(env: Env) -> None:
    three_planes(env)
    stranger = env.publish(private_key("ec384", 4), "new.example.org")
    text = env.cli("plan", "--at", AT)
    assert f"untrusted key {stranger}" in text.err and stranger not in text.out
    assert text.err.startswith("sakeystate: warning: ")
    as_json = env.cli("plan", "--at", AT, "--format", "json")
    assert any(stranger in w for w in json.loads(as_json.out)["warnings"])
    markdown = env.cli("plan", "--at", AT, "--format", "markdown")
    assert f"untrusted key {stranger}" in html.unescape(markdown.out) and markdown.err == ""
    assert env.cli("converge", "--at", AT).code == 0
    quiet = env.cli("converge", "--at", AT, "--quiet")
    assert (quiet.out, quiet.err) == ("", "")


def test_jwks_temporaries_a_killed_run_left_are_removed_too(env: Env) -> None:
    three_planes(env, bundle={"jwks_path": str(env.tmp / "jwks.json")})
    stale = env.tmp / ".jwks.json.tmp-4242"
    stale.write_bytes(b"{")
    assert env.cli("converge", "--at", AT).code == 0
    assert not stale.exists() and json.loads((env.tmp / "jwks.json").read_text())["keys"]


def test_the_endpoint_that_answered_is_asked_first_next_time(env: Env) -> None:
    from sakeystate.etcd import EtcdStore
    from sakeystate.state import EtcdConfig

    from etcd_server import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    store = EtcdStore(EtcdConfig(endpoints=(dead, env.etcd.url), prefix=env.prefix, timeout=5))
    with store:
        store.read(env.prefix)
        assert [e.url for e in store.endpoints] == [env.etcd.url, dead]
        before = store.requests
        store.read(env.prefix)
        assert store.requests == before + 1  # straight to the live member


def test_a_trusted_key_gone_from_etcd_stays_in_the_bundle_and_is_reported(env: Env) -> None:
    """Issue 13 finding 5 (R9): deleting or overwriting a trusted key's entry never removes
    it from a bundle nor restarts anything; it is reported on every run."""
    argv, log = reload_counter(env)
    kids = three_planes(env, bundle={"reload": argv})
    assert env.cli("converge", "--at", AT).code == 0
    before = env.bundle_bytes()
    env.etcd.client.delete(env.key(A, kids[0]))
    env.etcd.put(env.key(B, kids[1]), entry_value(private_key("ec256", 9), B, T0))
    table = env.cli("inspect", "--at", AT)
    row = next(line for line in table.out.splitlines() if line.startswith(kids[0]))
    assert " bundle-only " in row
    plan = json.loads(env.cli("plan", "--at", AT, "--format", "json").out)
    assert plan["actions"] == [] and plan["bundle"]["kids_after"] == sorted(kids)
    assert any(
        f"trusted key {kids[0]}" in w and "kept in the bundle" in w for w in plan["warnings"]
    )
    for _run in range(3):
        result = env.cli("converge", "--at", AT, "--detailed-exitcode")
        assert result.code == 0, result.err
        env.etcd.put(env.key(C, kids[2]), b"garbage")
    assert env.bundle_bytes() == before and reloads(log) == 1
