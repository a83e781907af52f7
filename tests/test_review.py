"""Plans for code review: the Markdown plan, offline plans from a snapshot, validate in CI."""

from __future__ import annotations

import base64
import html
import json
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from sakeystate.keys import format_time

from conftest import Env
from support import REPO, T0, kid, make_cert, private_key, run_sakeystate

AT = format_time(T0)
NOT_PUBLISHED = "A" * 43  # a well-formed kid no key in etcd has


def review_cluster(env: Env) -> dict[str, str]:
    """Every kind of line a reviewer should see, in one etcd prefix."""
    kids = {
        "current": env.publish(private_key("ec521", 30), "ctrl1001.example.org"),
        "expiring": env.publish(
            private_key("ec384", 31), "ctrl1002.example.org", not_after=T0 + timedelta(days=10)
        ),
        "revoked": env.publish(private_key("ec256", 32), "ctrl1003.example.org"),
        "untrusted": env.publish(private_key("ec256", 33), "ctrl1009.example.org"),
    }
    env.state(
        [
            (kids["current"], "ctrl1001.example.org"),
            (kids["expiring"], "ctrl1002.example.org"),
            (NOT_PUBLISHED, "ctrl1004.example.org"),
        ],
        revoked=[{"fingerprint": kids["revoked"], "reason": "key exposed | T12345"}],
    )
    return kids


def test_markdown_plan_has_summary_table_with_reasons_and_warnings(env: Env) -> None:
    kids = review_cluster(env)

    # As ctrl1003 plans it: a host deletes only its own entries from etcd (R13).
    result = env.cli(
        "plan", "--at", AT, "--host", "ctrl1003.example.org", "--format", "markdown",
        "--detailed-exitcode",
    )  # fmt: skip
    assert result.code == 2, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"### sakeystate plan for `test` at {AT}"
    assert "**would add 2 bundle key(s); etcd: 1 delete (0 -> 2 bundle keys).**" in lines
    table = lines.index("| target | op | kid | host / key | reason |")
    assert lines[table + 1] == "|---|---|---|---|---|"
    rows = lines[table + 2 : table + 5]
    assert sorted(rows) == sorted(
        [
            f"| bundle | add | `{kids['current']}` | ctrl1001.example.org "
            "| pinned, published in etcd |",
            f"| bundle | add | `{kids['expiring']}` | ctrl1002.example.org "
            "| pinned, published in etcd |",
            # A pipe in a reason must not break the table.
            f"| etcd | delete | `{kids['revoked']}` | ctrl1003.example.org "
            "| revoked: key exposed &#124; T12345 |",
        ]
    )
    # Values are markdown-escaped (a kid's "_" included): compare as a reader sees them.
    warnings = [html.unescape(line) for line in lines[lines.index("**Warnings**") + 2 :]]
    assert (
        f"- untrusted key {kids['untrusted']} (ctrl1009.example.org) is published in etcd; "
        "add it to trusted after review" in warnings
    )
    assert (
        f"- trusted key {NOT_PUBLISHED} (ctrl1004.example.org) is not published in etcd" in warnings
    )
    # R1: a certificate expiring in 10 days removes nothing, so no drop is announced.
    assert not any(kids["expiring"] in w and "dropped" in w for w in warnings)
    # Keys retention keeps for longer than 30 days are not a reviewer's concern yet.
    assert not any(kids["current"] in w for w in warnings)
    assert lines[-1] == f"Bundle `{env.bundle}`: 0 -> 2 keys."


def test_markdown_plan_warns_of_a_superseded_key_dropped_within_30_days(env: Env) -> None:
    """A reviewer sees a drop coming (supersession, R1: never a certificate's expiry)."""
    host = "ctrl1001.example.org"
    grace = timedelta(hours=8760)
    old = env.publish(private_key("ec256", 34), host, published=T0 - grace - timedelta(days=9))
    new = env.publish(private_key("ec256", 35), host, published=T0 - grace + timedelta(days=10))
    expiring = env.publish(
        private_key("ec384", 36), "ctrl1002.example.org", not_after=T0 + timedelta(days=5)
    )
    env.state([(old, host), (new, host), (expiring, "ctrl1002.example.org")])

    result = env.cli("plan", "--at", AT, "--format", "markdown")
    assert result.code == 0, result.err
    lines = html.unescape(result.out).splitlines()
    warnings = lines[lines.index("**Warnings**") + 2 :]
    drop = format_time(T0 + timedelta(days=10))
    upcoming = f"- key {old} ({host}) will be dropped on {drop}: superseded by {new}"
    assert [w for w in warnings if old in w or new in w] == [upcoming]
    assert not any(expiring in w for w in warnings)
    assert env.cli("converge", "--at", AT).code == 0
    assert env.cli("reload-done").code == 0  # no restart configured: the operator restarted
    after = json.loads(env.cli("plan", "--at", drop, "--format", "json").out)
    # The bundle drops it; its etcd entry stays for `sakeystate prune` (R13).
    assert {(a["target"], a["op"], a.get("kid")) for a in after["actions"]} == {
        ("bundle", "remove", old),
    }


def test_markdown_plan_in_sync_has_no_table(env: Env) -> None:
    review_cluster(env)
    assert env.cli("converge", "--at", AT).code == 0
    assert env.cli("reload-done").code == 0  # no restart configured: the operator restarted

    result = env.cli("plan", "--at", AT, "--format", "markdown", "--detailed-exitcode")
    assert result.code == 0, result.err
    assert (
        "**No changes: 2 key(s) in the bundle, etcd and bundle match the desired state.**"
        in result.out.splitlines()
    )
    assert "| target |" not in result.out
    assert "(ctrl1009.example.org) is published in etcd" in result.out  # still awaiting review


def put_private_material(env: Env) -> list[str]:
    """Private keys stored in etcd by mistake, in the forms people store them.

    Returns the start of each key's base64-encoded DER (what a PEM body or a
    base64-encoded binary value would show), which must never be copied.
    """
    pkcs8_pem, traditional_pem, der, with_cert = (private_key("ec256", i) for i in (40, 41, 42, 43))
    enc, fmt = serialization.Encoding, serialization.PrivateFormat
    none = serialization.NoEncryption()
    values = {
        "ctrl1005.example.org": pkcs8_pem.private_bytes(enc.PEM, fmt.PKCS8, none),
        "ctrl1006.example.org": traditional_pem.private_bytes(
            enc.PEM, fmt.TraditionalOpenSSL, none
        ),
        "ctrl1007.example.org": der.private_bytes(enc.DER, fmt.PKCS8, none),
        # Over the value size limit: rejected for its size, whatever it holds.
        "ctrl1012.example.org": pkcs8_pem.private_bytes(enc.PEM, fmt.PKCS8, none) * 400,
        # A certificate file with its key appended, under the key's kid.
        kid(with_cert): make_cert(with_cert, "ctrl1008.example.org")
        + with_cert.private_bytes(enc.PEM, fmt.PKCS8, none),
    }
    for name, value in values.items():
        env.etcd.put(env.prefix + name, value)
    return [
        base64.b64encode(key.private_bytes(enc.DER, form, none))[:48].decode()
        for key in (pkcs8_pem, traditional_pem, der, with_cert)
        for form in (fmt.PKCS8, fmt.TraditionalOpenSSL)
    ]


def test_snapshot_holds_public_material_only(env: Env) -> None:
    review_cluster(env)
    secrets = put_private_material(env)
    etcd_before = env.dump()
    # A hand-edited bundle with a key pasted into it: the snapshot carries the bundle too.
    leaked = private_key("ec256", 46)
    env.bundle.write_bytes(
        make_cert(private_key("ec521", 1), "ctrl1001.example.org")
        + leaked.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    secrets.append(
        base64.b64encode(
            leaked.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )[:48].decode()
    )

    result = env.cli("snapshot", "--at", AT)
    assert result.code == 0, result.err
    assert env.dump() == etcd_before  # read-only
    document = json.loads(result.out)
    assert sorted(e["key"] for e in document["entries"]) == sorted(etcd_before)
    for secret in secrets:
        assert secret not in result.out
    # Public material is kept verbatim: the offline planner needs it.
    for entry in document["entries"]:
        original = etcd_before[entry["key"]]
        if b"PRIVATE KEY" not in original and b"-----BEGIN" in original:
            assert entry["value"].encode() == original


def test_offline_plan_from_a_snapshot_equals_the_live_plan_at_that_moment(env: Env) -> None:
    kids = review_cluster(env)
    put_private_material(env)
    assert env.cli("converge", "--at", AT).code == 0  # a bundle exists, etcd deleted the revoked
    assert env.cli("reload-done").code == 0  # no restart configured: the operator restarted
    env.publish(private_key("ec256", 44), "ctrl1010.example.org")  # another host awaits review
    env.state(
        [(kids["current"], "ctrl1001.example.org"), (kids["untrusted"], "ctrl1009.example.org")],
        retention={"max_removals": 1},
    )
    # By then the expiring key's certificate has expired, which removes nothing (R1): the
    # key leaves the bundle because it is no longer trusted, and stays in etcd.
    later = format_time(T0 + timedelta(days=20))
    snapshot = env.tmp / "snap.json"
    snap = env.cli("snapshot", "--at", later)
    assert snap.code == 0, snap.err
    snapshot.write_text(snap.out)

    for fmt in ("json", "markdown", "text"):
        live = env.cli("plan", "--at", later, "--format", fmt)
        offline = env.cli("plan", "--at", later, "--format", fmt, "--observed", str(snapshot))
        assert (offline.code, offline.out, offline.err) == (live.code, live.out, live.err)

    # A review machine has no bundle: the snapshot carries the host's, so the plan holds.
    live_json = env.cli("plan", "--at", later, "--format", "json").out
    moved = env.tmp / "on-the-host.pem"
    env.bundle.rename(moved)
    offline_json = env.cli("plan", "--at", later, "--format", "json", "--observed", str(snapshot))
    assert offline_json.out == live_json
    moved.rename(env.bundle)
    plan = env.cli("plan", "--at", later, "--format", "json")
    report = json.loads(plan.out)
    assert report["changed"] is True
    assert {(a["target"], a["op"], a.get("kid")) for a in report["actions"]} == {
        ("bundle", "add", kids["untrusted"]),
        ("bundle", "remove", kids["expiring"]),
    }
    # R5: the untrusted key is the newest ctrl1002 has published: refused unless revoked.
    assert plan.code == 1
    assert any(
        f"the plan removes {kids['expiring']} (ctrl1002.example.org) from the bundle" in e
        and "the newest key ctrl1002.example.org has published" in e
        for e in report["errors"]
    )

    # The snapshot is frozen: etcd moving on does not change the offline plan.
    before = env.cli("plan", "--at", later, "--format", "json", "--observed", str(snapshot)).out
    env.publish(private_key("ec256", 45), "ctrl1011.example.org")
    after = env.cli("plan", "--at", later, "--format", "json", "--observed", str(snapshot)).out
    assert after == before
    assert env.cli("plan", "--at", later, "--format", "json").out != before


def test_validate_reports_every_file_with_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text((REPO / "state" / "minimal.yaml").read_text())
    schema = tmp_path / "schema.yaml"
    schema.write_text(
        "apiVersion: sakeystate/v1\n"
        "cluster: dev\n"
        "etcd:\n"
        "  endpoints: [http://127.0.0.1:2379]\n"
        "bundle:\n"
        "  path: /etc/kubernetes/pki/sa.pem\n"
        "  colour: blue\n"
        "trusted: []\n"
        "retention:\n"
        "  superseded_grace: 1 day\n"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: sakeystate/v1\ncluster: [dev\netcd: {}\n")
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text(good.read_text() + "cluster: again\n")
    duplicate_line = len(duplicate.read_text().splitlines())

    result = run_sakeystate("validate", str(good), str(schema), str(broken), str(duplicate))
    assert result.code == 1
    assert result.out == f"{good}: valid (dev: 1 trusted, 0 revoked, 0 trust anchor(s))\n"
    errors = result.err.splitlines()
    assert any(
        e.startswith(f"{schema}:7: bundle.colour: unknown field; allowed here:") for e in errors
    )
    assert (
        f"{schema}:10: retention.superseded_grace: '1 day' is not valid: expected a number "
        "and a unit (s, m, h, d), e.g. 24h or 1h30m" in errors
    )
    assert any(e.startswith(f"{broken}:") and "invalid YAML" in e for e in errors)
    assert any(
        e.startswith(f"{duplicate}:{duplicate_line}: cluster: duplicate key") for e in errors
    )
    assert "Traceback" not in result.err


def test_validate_accepts_the_repository_state_files() -> None:
    files = sorted(str(p) for p in (REPO / "state").glob("*.yaml"))
    assert files
    result = run_sakeystate("validate", *files)
    assert result.code == 0, result.err
    assert result.out.count(": valid (") == len(files)
