"""The collection's modules under real ansible-playbook (ansible-core), against real etcd.

Every run is isolated from ~/.ansible (tests/ansible_support.py). A debug task
prints a module's registered result as JSON, so tests assert report fields
rather than the callback's prose. The fleet tests drive four inventory hosts
(local connection, each with its own certificate, bundle and state file, and
--host from the inventory name) through a new cluster's bootstrap, a reimage
in check mode and for real, and the example playbook with its restart handler.
The modules find ``sakeystate`` on the PATH (the project venv's console script).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ansible_support import (
    BIN,
    COLLECTION,
    OLD_VERSION,
    ansible_tool,
    old_sakeystate,
    systemctl_log,
    systemd_standin,
)
from conftest import Env
from support import REPO, bundle_file_kids, kid, make_cert, private_key, public_pem, state_data

PLAYBOOK = REPO / "ansible" / "playbook.yml"
HOSTS = ("ctrl1001.example.org", "ctrl1002.example.org", "ctrl1003.example.org")


@dataclass
class PlaybookRun:
    code: int
    out: str
    err: str
    result: dict[str, Any] | None

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"

    __repr__ = __str__


def ansible_playbook(
    tmp: Path,
    playbook: Path,
    *args: str,
    inventory: str = "localhost,",
    environ: dict[str, str] | None = None,
) -> PlaybookRun:
    proc = ansible_tool(
        tmp, "ansible-playbook", "-i", inventory, str(playbook), *args, environ=environ
    )
    return PlaybookRun(proc.returncode, proc.stdout, proc.stderr, registered(proc.stdout))


def run_module(
    tmp: Path,
    module_args: dict[str, Any],
    *args: str,
    module: str = "converge",
    interpreter: str = sys.executable,
    environ: dict[str, str] | None = None,
    inventory_name: str = "localhost",
) -> PlaybookRun:
    """One play: a module's task, then a debug task printing its registered result."""
    play = {
        "name": "sakeystate under test",
        "hosts": inventory_name,
        "connection": "local",
        "gather_facts": False,
        "vars": {"ansible_python_interpreter": interpreter, "ansible_connection": "local"},
        "tasks": [
            {"name": "Module", f"sakeystate.sakeystate.{module}": module_args, "register": "r"},
            {"name": "Registered result", "ansible.builtin.debug": {"var": "r"}},
        ],
    }
    playbook = tmp / "playbook.yml"
    playbook.write_text(yaml.safe_dump([play], sort_keys=False))
    return ansible_playbook(tmp, playbook, *args, inventory=f"{inventory_name},", environ=environ)


def fatal(run: PlaybookRun) -> dict[str, Any]:
    """The JSON of the first ``fatal: [host]: FAILED! => {...}`` line."""
    line = next(x for x in run.out.splitlines() if x.startswith("fatal: [") and "FAILED!" in x)
    failure: dict[str, Any] = json.loads(line.split("=> ", 1)[1])
    return failure


def registered(out: str) -> dict[str, Any] | None:
    """The result printed by the debug task (JSON after ``ok: [host] =>``), if it ran."""
    _, found, rest = out.partition("TASK [Registered result]")
    if not found:
        return None
    printed, _end = json.JSONDecoder().raw_decode(rest[rest.index("=> ") + 3 :])
    result: dict[str, Any] = printed["r"]
    return result


def recap(out: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host."""
    found = {}
    for line in out.split("PLAY RECAP", 1)[-1].splitlines():
        host, sep, counters = line.partition(" : ")
        if sep:
            found[host.strip()] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counters)}
    return found


def statuses(out: str, task: str) -> dict[str, str]:
    """Each host's status (ok, changed, skipping, fatal) under the headers of ``task``."""
    found: dict[str, str] = {}
    for block in re.split(r"\n(?=TASK \[|RUNNING HANDLER \[|PLAY )", out):
        if block.startswith((f"TASK [{task}]", f"RUNNING HANDLER [{task}]")):
            for status, host in re.findall(
                r"^(ok|changed|skipping|fatal): \[([^\]]+)\]", block, re.M
            ):
                found[host] = status
    return found


def test_check_mode_then_first_run_changes_then_second_run_is_unchanged(env: Env) -> None:
    a, b, revoked = private_key("ec521", 0), private_key("ec256", 1), private_key("ec384", 2)
    kid_a, kid_b = env.publish(a, "ctrl1001.example.org"), env.publish(b, "ctrl1002.example.org")
    kid_r = env.publish(revoked, "ctrl1003.example.org")
    kid_u = env.publish(private_key("ec256", 9), "ctrl1009.example.org")  # awaiting review
    reloads = env.tmp / "reloads"
    state = env.state(
        [(kid_a, "ctrl1001.example.org"), (kid_b, "ctrl1002.example.org")],
        revoked=[{"fingerprint": kid_r, "reason": "private key exposed"}],
        bundle={"reload": ["sh", "-c", f"echo reload >> {reloads}"]},
    )
    # As ctrl1003: a host deletes only its own entries from etcd (its revoked key).
    args = {"state_file": str(state), "host": "ctrl1003.example.org"}
    etcd_before = env.dump()

    checked = run_module(env.tmp, args, "--check")
    assert checked.code == 0, checked
    assert checked.result is not None and checked.result["changed"] is True
    assert recap(checked.out)["localhost"]["changed"] == 1
    assert env.bundle_bytes() is None
    assert env.dump() == etcd_before
    assert not reloads.exists()

    first = run_module(env.tmp, args)
    assert first.code == 0, first
    assert first.result is not None and first.result["changed"] is True
    # Check mode predicted exactly what the real run did.
    assert first.result["actions"] == checked.result["actions"]
    assert first.result["bundle"] == checked.result["bundle"]
    assert first.result["bundle"]["kids_after"] == sorted([kid_a, kid_b])
    assert [(x["target"], x["op"], x.get("kid")) for x in first.result["actions"]] == [
        *(("bundle", "add", k) for k in sorted([kid_a, kid_b])),
        ("etcd", "delete", kid_r),
        ("reload", "run", None),
    ]
    # `keys` would shadow dict.keys in Jinja; the list is service_account_keys.
    assert "keys" not in first.result
    seen = {k["kid"]: k["status"] for k in first.result["service_account_keys"]}
    assert seen[kid_a] == "trusted" and seen[kid_u] == "untrusted"
    written = env.bundle_bytes()
    assert written is not None
    assert public_pem(a) in written and public_pem(b) in written
    assert public_pem(revoked) not in written
    assert env.prefix + kid_r not in env.dump()
    assert reloads.read_text() == "reload\n"  # run_reload defaults to true
    # The CLI's warnings are Ansible warnings: shown to the operator, and in the result.
    untrusted = f"untrusted key {kid_u} (ctrl1009.example.org) is published in etcd"
    assert f"[WARNING]: {untrusted}" in first.out + first.err
    assert any(w.startswith(untrusted) for w in first.result["warnings"])
    assert "DEPRECATION" not in first.out + first.err
    assert env.cli("plan", "--detailed-exitcode").code == 0

    second = run_module(env.tmp, args)
    assert second.code == 0, second
    assert second.result is not None and second.result["changed"] is False
    assert second.result["actions"] == []
    assert env.bundle_bytes() == written
    assert reloads.read_text() == "reload\n"


def test_result_lists_work_in_jinja(env: Env) -> None:
    key = private_key("ec256", 11)
    key_id = env.publish(key, "ctrl1001.example.org")
    state = env.state([(key_id, "ctrl1001.example.org")])
    play = [
        {
            "name": "Jinja over the result",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars": {"ansible_python_interpreter": sys.executable},
            "tasks": [
                {
                    "name": "Module",
                    "sakeystate.sakeystate.converge": {"state_file": str(state)},
                    "check_mode": True,
                    "register": "r",
                },
                {
                    "name": "Registered result",
                    "ansible.builtin.debug": {
                        "var": "r.service_account_keys | map(attribute='kid') | list"
                    },
                },
            ],
        }
    ]
    playbook = env.tmp / "jinja.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    proc = ansible_tool(env.tmp, "ansible-playbook", "-i", "localhost,", str(playbook))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'"r.service_account_keys | map(attribute=\'kid\') | list": [\n        "{key_id}"' in (
        proc.stdout
    )


def test_diff_names_hosts_etcd_deletes_and_reload(env: Env) -> None:
    old, new, revoked = (private_key("ec256", i) for i in (3, 4, 5))
    kid_old = env.publish(old, "ctrl1001.example.org")
    state = env.state([(kid_old, "ctrl1001.example.org")])
    assert env.cli("converge").code == 0
    kid_new = env.publish(new, "ctrl1002.example.org")
    kid_revoked = env.publish(revoked, "ctrl1003.example.org")
    env.state(
        [(kid_old, "ctrl1001.example.org"), (kid_new, "ctrl1002.example.org")],
        revoked=[{"fingerprint": kid_revoked, "reason": "host decommissioned"}],
        bundle={"reload": ["true"]},
    )

    args = {"state_file": str(state), "host": "ctrl1003.example.org"}  # its own revoked key
    run = run_module(env.tmp, args, "--check", "--diff")
    assert run.code == 0, run
    lines = run.out.splitlines()
    assert f" {kid_old}  # ctrl1001.example.org" in lines  # unchanged kid, context line
    assert f"+{kid_new}  # ctrl1002.example.org" in lines
    revoked_key = env.key("ctrl1003.example.org", kid_revoked)
    assert f"-{revoked_key}  # ctrl1003.example.org: revoked: host decommissioned" in lines
    assert f"--- before: {env.bundle} (kids)" in lines
    assert "--- before: etcd (keys deleted)" in lines
    assert any(x.startswith("+reload run: bundle key set changed") for x in lines)
    assert revoked_key in env.dump()  # --check: shown, not done

    assert env.cli("converge").code == 0
    env.state(
        [(kid_old, "ctrl1001.example.org"), (kid_new, "ctrl1002.example.org")],
        bundle={"mode": "0600"},
    )
    chmod = run_module(env.tmp, {"state_file": str(state)}, "--check", "--diff")
    assert chmod.code == 0, chmod
    assert any(x.startswith("+bundle permissions: ") for x in chmod.out.splitlines())


def test_invalid_inline_state_fails_naming_the_fields_in_module_terms(env: Env) -> None:
    data = state_data(env.etcd.url, env.prefix, env.bundle, [])
    data["colour"] = "blue"
    data["retention"]["min_keys"] = "many"

    inline = run_module(env.tmp, {"desired_state": data})
    assert inline.code == 2, inline
    fatal = next(x for x in inline.out.splitlines() if x.startswith("fatal: [localhost]: FAILED!"))
    failure = json.loads(fatal.split("=> ", 1)[1])
    assert "colour: unknown field" in failure["msg"]
    assert "retention.min_keys" in failure["msg"]
    assert failure["msg"].startswith("desired_state")  # not the private temporary file
    assert str(env.tmp / "ansible-home") not in failure["msg"]
    assert env.bundle_bytes() is None


def test_refusal_is_worded_in_module_terms_and_writes_nothing(env: Env) -> None:
    keys = [private_key("ec256", i) for i in (12, 13, 14)]
    hosts = ["ctrl1001.example.org", "ctrl1002.example.org", "ctrl1003.example.org"]
    kids = [env.publish(k, h) for k, h in zip(keys, hosts, strict=True)]
    keep = private_key("ec256", 15)
    kid_keep = env.publish(keep, "ctrl1004.example.org")
    trusted = [*zip(kids, hosts, strict=True), (kid_keep, "ctrl1004.example.org")]
    state = env.state(trusted, bundle={"reload": ["true"]})
    assert env.cli("converge").code == 0
    env.state(
        [(kid_keep, "ctrl1004.example.org")],
        revoked=[{"fingerprint": k, "reason": "rotated"} for k in kids],
        bundle={"reload": ["true"]},
    )
    etcd_before, bundle_before = env.dump(), env.bundle_bytes()

    run = run_module(env.tmp, {"state_file": str(state)})
    assert run.code == 2, run
    fatal = next(x for x in run.out.splitlines() if x.startswith("fatal: [localhost]: FAILED!"))
    failure = json.loads(fatal.split("=> ", 1)[1])
    assert failure["changed"] is False
    assert "allow_removals: true" in failure["msg"]
    assert "--allow-removals" not in run.out
    assert env.dump() == etcd_before and env.bundle_bytes() == bundle_before

    allowed = run_module(env.tmp, {"state_file": str(state), "allow_removals": True})
    assert allowed.code == 0, allowed
    assert env.bundle_bytes() != bundle_before


def test_failed_reload_fails_the_task_after_the_bundle_was_written(env: Env) -> None:
    key = private_key("ec256", 10)
    state = env.state(
        [(env.publish(key, "ctrl1001.example.org"), "ctrl1001.example.org")],
        bundle={"reload": ["sh", "-c", "echo apiserver refused >&2; exit 3"]},
    )
    run = run_module(env.tmp, {"state_file": str(state)})
    assert run.code == 2, run
    fatal = next(x for x in run.out.splitlines() if x.startswith("fatal: [localhost]: FAILED!"))
    failure = json.loads(fatal.split("=> ", 1)[1])
    assert failure["changed"] is True  # the bundle was written; only the restart failed
    assert failure["msg"].startswith("reload command 'sh -c echo apiserver refused >&2; exit 3'")
    assert "apiserver refused" in failure["msg"]
    assert env.bundle_bytes() is not None
    # The failure is remembered: the next check reports drift so the reload is retried.
    assert env.cli("check").code == 0


def test_missing_executable_gives_the_standard_message(tmp_path: Path) -> None:
    run = run_module(
        tmp_path,
        {"state_file": str(tmp_path / "state.yaml")},
        environ={"PATH": "/usr/bin:/bin"},
    )
    assert run.code == 2, run
    assert 'Failed to find required executable "sakeystate" in paths: /usr/bin:/bin' in run.out
    assert "or set executable" in run.out


def test_broken_install_fails_the_task_with_the_reason(env: Env) -> None:
    # sakeystate runs, but one of its dependencies cannot be imported (a broken upgrade).
    broken = env.tmp / "broken-sakeystate"
    code = (
        "import sys; sys.modules['cryptography'] = None; "
        "from sakeystate.cli import main; sys.exit(main())"
    )
    broken.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{code}" "$@"\n')
    broken.chmod(0o755)
    key_id = env.publish(private_key("ec256", 18), "ctrl1001.example.org")
    state = env.state([(key_id, "ctrl1001.example.org")])

    for mode in ((), ("--check",)):
        args = {"state_file": str(state), "executable": str(broken)}
        run = run_module(env.tmp, args, *mode)
        assert run.code == 2, run
        assert "fatal: [localhost]: FAILED!" in run.out
        assert "cryptography" in run.out
    assert env.bundle_bytes() is None


MODULES = ("converge", "publish", "reload", "reload_done", "status", "wait", "plan_info")


@pytest.mark.parametrize("module", MODULES)
def test_old_sakeystate_fails_with_the_minimum_version_message(env: Env, module: str) -> None:
    old = old_sakeystate(env.tmp)
    state = env.state([])
    args: dict[str, Any] = {"state_file": str(state), "executable": str(old)}
    if module == "wait":
        args["kid"] = "8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E"
    for mode in ((), ("--check",)):
        run = run_module(env.tmp, args, *mode, module=module)
        assert run.code == 2, run
        failure = fatal(run)
        assert failure["msg"] == (
            "the sakeystate.sakeystate collection requires sakeystate >= 0.3.0, "
            f"found {OLD_VERSION} ({old})"
        )
    assert env.dump() == {} and env.bundle_bytes() is None


def test_old_python_gives_the_standard_missing_library_message(tmp_path: Path) -> None:
    # An interpreter that reports itself as 3.10 (the module's floor is 3.11).
    old = tmp_path / "python3.10"
    old.write_text(
        f"#!{sys.executable}\n"
        "import runpy, sys\n"
        "sys.version_info = (3, 10, 14, 'final', 0)\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    old.chmod(0o755)
    run = run_module(tmp_path, {"state_file": str(tmp_path / "state.yaml")}, interpreter=str(old))
    assert run.code == 2, run
    assert "Failed to import the required Python library (Python >= 3.11)" in run.out
    assert "Traceback" not in run.out


def documented(module: str) -> dict[str, Any]:
    """The RETURN block of a module, parsed."""
    source = (COLLECTION / "plugins" / "modules" / f"{module}.py").read_text()
    block = source.split('RETURN = r"""', 1)[1].split('"""', 1)[0]
    parsed: dict[str, Any] = yaml.safe_load(block)
    return parsed


# Fields every Ansible module result carries, documented by Ansible itself.
ANSIBLE_FIELDS = {"changed", "failed", "warnings", "invocation", "diff", "msg", "deprecations"}


def test_every_returned_field_is_documented(env: Env) -> None:
    key = private_key("ec256", 16)
    kid_a = env.publish(key, "ctrl1001.example.org")
    revoked = env.publish(private_key("ec256", 17), "ctrl1002.example.org")
    state = env.state(
        [(kid_a, "ctrl1001.example.org")],
        revoked=[{"fingerprint": revoked, "reason": "rotated"}],
        bundle={"reload": ["true"]},
    )
    run = run_module(env.tmp, {"state_file": str(state)}, "--diff")
    assert run.code == 0, run
    assert run.result is not None
    docs = documented("converge")
    assert set(run.result) - ANSIBLE_FIELDS <= set(docs), set(run.result) - set(docs)
    for field in ("actions", "service_account_keys"):
        assert run.result[field], field  # the check below saw some items
        fields = {name for item in run.result[field] for name in item}
        assert fields <= set(docs[field]["contains"]), fields - set(docs[field]["contains"])
    assert set(run.result["bundle"]) <= set(docs["bundle"]["contains"])


@pytest.mark.parametrize("module", MODULES)
def test_ansible_doc_renders_without_warnings(tmp_path: Path, module: str) -> None:
    proc = ansible_tool(tmp_path, "ansible-doc", f"sakeystate.sakeystate.{module}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for section in ("OPTIONS", "EXAMPLES", "state_file", "desired_state"):
        assert section in proc.stdout


# --- check mode of the restart modules, diffs, read-only modules ---------------------------


def owed_restart(env: Env) -> dict[str, Any]:
    """A converged host whose restart was left to a handler (owed): the modules' args."""
    key_id = env.publish(private_key("ec256", 43), "ctrl1001.example.org")
    state = env.state([(key_id, "ctrl1001.example.org")], bundle={"reload": ["true"]})
    args = {"state_file": str(state), "host": "ctrl1001.example.org"}
    run = run_module(env.tmp, {**args, "run_reload": False})
    assert run.code == 0, run
    return args


@pytest.mark.parametrize("module", ["reload", "reload_done"])
def test_restart_modules_predict_exactly_in_check_mode(env: Env, module: str) -> None:
    key_id = env.publish(private_key("ec256", 44), "ctrl1001.example.org")
    state = env.state([(key_id, "ctrl1001.example.org")], bundle={"reload": ["true"]})
    args = {"state_file": str(state), "host": "ctrl1001.example.org"}
    # Nothing converged yet: the play's converge would change the key set, then this runs.
    pending = run_module(env.tmp, args, "--check", module=module)
    assert pending.result is not None and pending.result["changed"] is True, pending
    assert run_module(env.tmp, {**args, "run_reload": True}).code == 0
    # In sync, nothing owed: check mode says unchanged (it used to say changed always).
    settled = run_module(env.tmp, args, "--check", module=module)
    assert settled.result is not None and settled.result["changed"] is False, settled
    assert (
        "check mode: no" in settled.result["message"]
        or "nothing owed" in (settled.result["message"])
    )

    env.state([(key_id, "ctrl1001.example.org")], bundle={"reload": ["true"], "mode": "0600"})
    # A permission change is not a restart.
    chmod = run_module(env.tmp, args, "--check", module=module)
    assert chmod.result is not None and chmod.result["changed"] is False, chmod


def test_reload_done_check_mode_sees_an_owed_restart(env: Env) -> None:
    args = owed_restart(env)
    checked = run_module(env.tmp, args, "--check", module="reload_done")
    assert checked.result is not None and checked.result["changed"] is True
    assert (env.tmp / "sa-certs.pem.reload-pending").exists()  # check mode cleared nothing
    done = run_module(env.tmp, args, module="reload_done")
    assert done.result is not None and done.result["changed"] is True
    after = run_module(env.tmp, args, "--check", module="reload_done")
    assert after.result is not None and after.result["changed"] is False


def test_reload_module_restarts_an_owed_restart_once(env: Env) -> None:
    restarts = env.tmp / "restarts"
    key_id = env.publish(private_key("ec256", 45), "ctrl1001.example.org")
    reload = ["sh", "-c", f"echo restart >> {restarts}"]
    state = env.state([(key_id, "ctrl1001.example.org")], bundle={"reload": reload})
    args = {"state_file": str(state), "host": "ctrl1001.example.org"}
    assert run_module(env.tmp, {**args, "run_reload": False}).code == 0
    first = run_module(env.tmp, args, module="reload")
    assert first.code == 0, first
    assert first.result is not None
    assert (first.result["changed"], first.result["owed"]) == (True, False)
    assert restarts.read_text() == "restart\n"
    # The owner already restarted (watch, or this handler): the next handler does nothing.
    again = run_module(env.tmp, args, module="reload")
    assert again.result is not None and again.result["changed"] is False
    assert restarts.read_text() == "restart\n"
    status_prefix = env.prefix.rstrip("/").rsplit("/", 1)[0] + "/kube-apiserver-sa-status/"
    assert env.etcd.get(status_prefix + "ctrl1001.example.org") is not None


def test_handler_never_repeats_a_restart_watch_already_made(env: Env) -> None:
    restarts = env.tmp / "restarts"
    key_id = env.publish(private_key("ec256", 46), "ctrl1001.example.org")
    reload = ["sh", "-c", f"echo restart >> {restarts}"]
    state = env.state([(key_id, "ctrl1001.example.org")], bundle={"reload": reload})
    args = {"state_file": str(state), "host": "ctrl1001.example.org"}
    assert run_module(env.tmp, {**args, "run_reload": False}).code == 0
    # watch (the restart owner) runs the owed restart first, through the same lifecycle.
    assert env.cli("reload", "--host", "ctrl1001.example.org").code == 0
    handler = run_module(env.tmp, args, module="reload")
    assert handler.result is not None and handler.result["changed"] is False
    assert restarts.read_text() == "restart\n"  # one change, one restart


def test_run_reload_false_diff_leaves_the_restart_to_the_handler(env: Env) -> None:
    key_id = env.publish(private_key("ec256", 47), "ctrl1001.example.org")
    state = env.state([(key_id, "ctrl1001.example.org")], bundle={"reload": ["true"]})
    args = {"state_file": str(state), "run_reload": False}
    run = run_module(env.tmp, args, "--check", "--diff")
    assert run.code == 0, run
    lines = run.out.splitlines()
    assert not any("reload run" in x for x in lines), run.out
    assert any(
        x.startswith("+reload left to the handler (sakeystate.sakeystate.reload), owed from now on")
        for x in lines
    ), run.out
    assert any(x.startswith("+check mode: planned from etcd as it is now") for x in lines)

    default = run_module(env.tmp, {"state_file": str(state)}, "--check", "--diff")
    assert any(x.startswith("+reload run: ") for x in default.out.splitlines()), default.out


def test_status_module_works_in_until_and_assert(env: Env) -> None:
    host = "ctrl1001.example.org"
    key_id = env.publish(private_key("ec256", 48), host)
    state = env.state([(key_id, host)], fleet=[host], bundle={"reload": ["true"]})
    before = run_module(env.tmp, {"state_file": str(state), "host": host}, module="status")
    assert before.code == 0, before  # lagging is a result, not a failure
    assert before.result is not None and before.result["in_order"] is False
    assert before.result["changed"] is False
    assert any("no status record" in item for item in before.result["items"])
    assert set(before.result) - ANSIBLE_FIELDS <= set(documented("status"))

    assert env.cli("converge", "--host", host).code == 0
    play = [
        {
            "name": "The fleet gate",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars": {"ansible_python_interpreter": sys.executable},
            "tasks": [
                {
                    "name": "Wait until every apiserver verifies every key",
                    "sakeystate.sakeystate.status": {"state_file": str(state), "host": host},
                    "register": "fleet",
                    "until": "fleet.in_order",
                    "retries": 3,
                    "delay": 1,
                },
                {
                    "name": "Every effective key is verified by every fleet host",
                    "ansible.builtin.assert": {
                        "that": [
                            f"'{key_id}' in fleet.effective_kids",
                            f"fleet.hosts[0].verifies['{key_id}']",
                            "fleet.awaiting_review | length == 0",
                        ]
                    },
                },
            ],
        }
    ]
    playbook = env.tmp / "gate.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    gate = ansible_playbook(env.tmp, playbook)
    assert gate.code == 0, gate
    assert "All assertions passed" in gate.out


def test_wait_module_reaches_times_out_and_looks_once_in_check_mode(env: Env) -> None:
    host = "ctrl1001.example.org"
    key = private_key("ec256", 49)
    key_id = env.publish(key, host)
    other = kid(private_key("ec256", 50))
    state = env.state([(key_id, host)], fleet=[host], bundle={"reload": ["true"]})
    args = {"state_file": str(state), "host": host}
    assert env.cli("converge", "--host", host).code == 0

    reached = run_module(env.tmp, {**args, "kid": key_id, "timeout": "30s"}, module="wait")
    assert reached.code == 0, reached
    assert reached.result is not None
    assert (reached.result["reached"], reached.result["lagging"]) == (True, [])
    assert reached.result["changed"] is False

    late = run_module(env.tmp, {**args, "kid": other, "timeout": "1s"}, module="wait")
    assert late.code == 2, late
    failure = fatal(late)
    assert failure["reached"] is False
    assert [x["host"] for x in failure["lagging"]] == [host]
    assert host in failure["msg"]

    looked = run_module(env.tmp, {**args, "kid": other, "timeout": "10m"}, "--check", module="wait")
    assert looked.code == 0, looked  # check mode never waits, never fails on a late key
    assert looked.result is not None and looked.result["reached"] is False


def test_plan_info_returns_the_plan_for_assertions_and_changes_nothing(env: Env) -> None:
    host = "ctrl1001.example.org"
    key_id = env.publish(private_key("ec256", 51), host)
    state = env.state([(key_id, host)], bundle={"reload": ["true"]})
    args = {"state_file": str(state), "host": host}
    drift = run_module(env.tmp, args, module="plan_info")
    assert drift.code == 0, drift
    assert drift.result is not None
    assert (drift.result["in_sync"], drift.result["changed"]) == (False, False)
    assert drift.result["bundle"]["kids_after"] == [key_id]
    assert drift.result["reload_needed"] is True
    assert set(drift.result) - ANSIBLE_FIELDS <= set(documented("plan_info"))
    assert env.bundle_bytes() is None  # read-only

    assert env.cli("converge", "--host", host).code == 0
    settled = run_module(env.tmp, args, module="plan_info")
    assert settled.result is not None and settled.result["in_sync"] is True


def test_host_defaults_to_the_inventory_name_only_when_it_is_a_fqdn(env: Env) -> None:
    host = "ctrl1001.example.org"
    key_id = env.publish(private_key("ec256", 52), host)
    state = env.state([(key_id, host)])
    fqdn = run_module(env.tmp, {"state_file": str(state)}, "--check", inventory_name=host)
    assert fqdn.code == 0, fqdn
    assert fqdn.result is not None and fqdn.result["host"] == host

    short = run_module(env.tmp, {"state_file": str(state)}, "--check", inventory_name="ctrl1001")
    assert short.code == 0, short
    assert short.result is not None and short.result["host"] != "ctrl1001"  # the CLI's default
    explicit = run_module(
        env.tmp, {"state_file": str(state), "host": "ctrl1009.example.org"}, "--check"
    )
    assert explicit.result is not None and explicit.result["host"] == "ctrl1009.example.org"


# --- four control planes: bootstrap, reimage, check mode host by host ---------------------

HOSTS = tuple(f"ctrl100{i}.example.org" for i in range(1, 5))
CONVERGE = "Converge etcd and the service-account key bundle"
PUBLISH = "Publish this control plane's service-account certificate"


@dataclass
class Fleet:
    """Four inventory hosts on this machine, each with its own certificate, bundle and state."""

    env: Env
    keys: dict[str, Any]  # each host's current key
    every_kid: list[tuple[str, str]]  # every key ever trusted (old ones stay in their grace)

    @property
    def tmp(self) -> Path:
        return self.env.tmp

    def expected_bundle(self, host: str) -> set[str]:
        """Every trusted key but the host's own current one (exclude_host: self)."""
        return {k for k, _h in self.every_kid} - {kid(self.keys[host])}

    def pki(self, host: str) -> Path:
        path = self.tmp / host / "pki"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def bundle(self, host: str) -> Path:
        return self.pki(host) / "sa-certs.pem"

    def bundle_kids(self, host: str) -> set[str]:
        return bundle_file_kids(self.bundle(host))

    def reimage(self, host: str, key: Any) -> str:
        """A new key and certificate for ``host``, its bundle gone; trusted by the state."""
        self.keys[host] = key
        self.every_kid.append((kid(key), host))
        (self.pki(host) / "sa.pem").write_bytes(make_cert(key, host))
        self.bundle(host).unlink(missing_ok=True)
        return kid(key)

    def restarts(self) -> list[tuple[str, str, float]]:
        """(event, host, time) of every restart's start and end."""
        log = self.tmp / "restarts"
        lines = log.read_text().split("\n") if log.exists() else []
        return [(e, h, float(t)) for e, h, t in (x.split() for x in lines if x)]

    def restart_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(HOSTS, 0)
        for event, host, _ in self.restarts():
            counts[host] += event == "start"
        return counts

    def overlaps(self) -> int:
        """How many restarts began while another was running."""
        running, found = 0, 0
        for event, _host, _t in sorted(self.restarts(), key=lambda x: x[2]):
            if event == "start":
                found += running > 0
                running += 1
            else:
                running -= 1
        return found

    def template(self, trusted: list[tuple[str, str]]) -> None:
        """The shared state as a Jinja template: each host renders its own paths."""
        restart = (
            f'echo "start $0 $(date +%s.%N)" >> {self.tmp}/restarts; sleep 0.3; '
            f'echo "end $0 $(date +%s.%N)" >> {self.tmp}/restarts'
        )
        data = state_data(
            self.env.etcd.url,
            self.env.prefix,
            str(self.tmp / "{{ inventory_hostname }}" / "pki" / "sa-certs.pem"),
            trusted,
            host="self",
            own_cert=str(self.tmp / "{{ inventory_hostname }}" / "pki" / "sa.pem"),
            bundle={
                "exclude_host": "self",
                "reload": ["sh", "-c", restart, "{{ inventory_hostname }}"],
                "reload_timeout": "2m",
            },
        )
        (self.tmp / "state.yaml.j2").write_text(yaml.safe_dump(data, sort_keys=False))

    def inventory(self) -> Path:
        inventory = self.tmp / "inventory.ini"
        inventory.write_text(
            "[kube_control_plane]\n"
            + "".join(
                f"{h} ansible_connection=local ansible_python_interpreter={sys.executable}\n"
                for h in HOSTS
            )
        )
        return inventory

    def playbook(self, handler: bool, tasks: tuple[str, ...] | None = None) -> Path:
        """The example playbook; without ``handler``, converge restarts by itself (the
        default run_reload: true, same lock) so the run needs no ``sakeystate reload``."""
        plays = yaml.safe_load(PLAYBOOK.read_text())
        play = plays[0]
        if not handler:
            play.pop("handlers")
            converge = next(x for x in play["tasks"] if x["name"] == CONVERGE)
            converge.pop("notify")
            converge["sakeystate.sakeystate.converge"].pop("run_reload")
        if tasks is not None:
            play["tasks"] = [x for x in play["tasks"] if x["name"] in tasks]
        path = self.tmp / f"fleet-{len(list(self.tmp.glob('fleet-*.yml')))}.yml"
        path.write_text(yaml.safe_dump(plays, sort_keys=False))
        return path

    def play(self, playbook: Path, *args: str, abort_host: str = "none") -> PlaybookRun:
        extra = {
            "sakeystate_state_template": str(self.tmp / "state.yaml.j2"),
            "sakeystate_state_file": str(self.tmp / "{{ inventory_hostname }}" / "state.yaml"),
            "sakeystate_validate": f"{BIN / 'sakeystate'} validate %s",
        }
        return ansible_playbook(
            self.tmp, playbook, "-e", json.dumps(extra), *args, inventory=str(self.inventory())
        )


@pytest.fixture
def fleet(env: Env) -> Fleet:
    """A new cluster: every host has its certificate on disk; nothing is published yet."""
    result = Fleet(env, {}, [])
    for i, host in enumerate(HOSTS):
        result.reimage(host, private_key("ec256", 30 + i))
    result.template(result.every_kid)
    return result


def test_new_cluster_of_four_settles_in_one_play(fleet: Fleet) -> None:
    playbook = fleet.playbook(handler=False)
    first = fleet.play(playbook)
    assert first.code == 0, first
    # Every host published before any converged (one play, no serial), so each bundle
    # holds its three peers' keys after this one run: settled.
    assert statuses(first.out, PUBLISH) == dict.fromkeys(HOSTS, "changed")
    assert statuses(first.out, CONVERGE) == dict.fromkeys(HOSTS, "changed")
    for host in HOSTS:
        assert fleet.bundle_kids(host) == fleet.expected_bundle(host)
    # One restart per host, under the cluster-wide lock: never two at once.
    assert fleet.restart_counts() == dict.fromkeys(HOSTS, 1)
    assert fleet.overlaps() == 0

    second = fleet.play(playbook)
    assert second.code == 0, second
    assert {h: c["changed"] for h, c in recap(second.out).items()} == dict.fromkeys(HOSTS, 0)
    assert fleet.restart_counts() == dict.fromkeys(HOSTS, 1)


def test_check_mode_predicts_the_reimage_host_by_host(fleet: Fleet) -> None:
    """What check mode predicts across hosts, compared with the real run."""
    playbook = fleet.playbook(handler=False)
    assert fleet.play(playbook).code == 0
    a, b, c, d = HOSTS
    new_kid = fleet.reimage(c, private_key("ec256", 38))
    fleet.template(fleet.every_kid)

    checked = fleet.play(playbook, "--check", "--diff")
    assert checked.code == 0, checked
    real = fleet.play(playbook)
    assert real.code == 0, real
    predicted, happened = statuses(checked.out, PUBLISH), statuses(real.out, PUBLISH)
    assert predicted == happened == {a: "ok", b: "ok", c: "changed", d: "ok"}
    predicted, happened = statuses(checked.out, CONVERGE), statuses(real.out, CONVERGE)
    # Exact for the reimaged host; the peers' check cannot see c's publish, which was
    # only predicted: ok in check mode, changed (and restarted) in the real run.
    assert predicted == {a: "ok", b: "ok", c: "changed", d: "ok"}
    assert happened == dict.fromkeys(HOSTS, "changed")
    # ... and check mode says so: on every peer, a warning naming the unpublished key.
    for host in (a, b, d):
        warning = (
            f"[WARNING]: check mode on {host}: trusted key {new_kid} ({c}) is not published "
            "yet; if this run publishes it, the real run adds it to this bundle"
        )
        assert warning in checked.out + checked.err, checked
    assert "+check mode: planned from etcd as it is now; a publish or a deletion" in checked.out
    assert fleet.restart_counts() == dict.fromkeys(HOSTS, 2)
    assert fleet.overlaps() == 0

    # The exact review: publish for real first, then check; the real run then matches.
    fleet.reimage(d, private_key("ec256", 39))
    fleet.template(fleet.every_kid)
    published = fleet.play(fleet.playbook(handler=False, tasks=(PUBLISH,)))
    assert statuses(published.out, PUBLISH) == {a: "ok", b: "ok", c: "ok", d: "changed"}
    checked = fleet.play(playbook, "--check")
    real = fleet.play(playbook)
    assert statuses(checked.out, CONVERGE) == statuses(real.out, CONVERGE)
    assert statuses(real.out, CONVERGE) == dict.fromkeys(HOSTS, "changed")
    for host in HOSTS:
        assert fleet.bundle_kids(host) == fleet.expected_bundle(host)


def test_example_playbook_restarts_each_host_once_under_the_lock(fleet: Fleet) -> None:
    playbook = fleet.playbook(handler=True)
    first = fleet.play(playbook)
    assert first.code == 0, first
    assert fleet.restart_counts() == dict.fromkeys(HOSTS, 1)
    assert fleet.overlaps() == 0  # the handlers run on all hosts at once; the lock orders them
    settled = fleet.play(playbook)
    assert settled.code == 0, settled
    assert {h: c["changed"] for h, c in recap(settled.out).items()} == dict.fromkeys(HOSTS, 0)
    assert fleet.restart_counts() == dict.fromkeys(HOSTS, 1)


def test_example_playbook_owed_restart_survives_an_abort_and_happens_once(fleet: Fleet) -> None:
    playbook = fleet.playbook(handler=True)
    plays = yaml.safe_load(playbook.read_text())
    plays[0]["tasks"].append(
        {
            "name": "Abort the play here (test)",
            "ansible.builtin.fail": {"msg": "aborted"},
            "when": f"inventory_hostname == '{HOSTS[0]}'",
        }
    )
    aborting = fleet.tmp / "aborting.yml"
    aborting.write_text(yaml.safe_dump(plays, sort_keys=False))
    aborted = fleet.play(aborting)
    assert aborted.code == 2, aborted
    assert fleet.restart_counts() == dict.fromkeys(HOSTS, 0)  # no handler ran
    checked = fleet.play(playbook, "--check")
    assert statuses(checked.out, "Restart kube-apiserver under the sakeystate lock") == (
        dict.fromkeys(HOSTS, "changed")
    )
    recovered = fleet.play(playbook)
    assert recovered.code == 0, recovered
    assert fleet.restart_counts() == dict.fromkeys(HOSTS, 1)
    assert fleet.overlaps() == 0


# --- the watch and boot roles -------------------------------------------------------------

ROLES = COLLECTION / "roles"
UNITS = REPO / "examples" / "systemd"


def test_watch_and_boot_roles_install_the_units_with_host_drop_ins(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(
        "[kube_control_plane]\n"
        + "".join(
            f"{h} ansible_connection=local ansible_python_interpreter={sys.executable}\n"
            for h in HOSTS
        )
    )
    units = "{{ units_root }}/{{ inventory_hostname }}"
    play = [
        {
            "name": "sakeystate services",
            "hosts": "kube_control_plane",
            "gather_facts": False,
            "pre_tasks": [
                {
                    "name": "Unit directory (test)",
                    "ansible.builtin.file": {"path": units, "state": "directory", "mode": "0755"},
                }
            ],
            "roles": [
                {
                    "role": "sakeystate.sakeystate.watch",
                    "vars": {
                        "watch_unit_dir": units,
                        "watch_executable": str(BIN / "sakeystate"),
                        "watch_read_write_paths": ["/etc/kubernetes/pki", "-/var/lib/prom dir"],
                    },
                },
                {
                    "role": "sakeystate.sakeystate.boot",
                    "vars": {"boot_unit_dir": units, "boot_executable": str(BIN / "sakeystate")},
                },
            ],
        }
    ]
    playbook = tmp_path / "services.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    root = tmp_path / "units"
    environ = systemd_standin(tmp_path, ":".join(str(root / h) for h in HOSTS))
    args = ("-e", json.dumps({"units_root": str(root)}))
    first = ansible_playbook(tmp_path, playbook, *args, inventory=str(inventory), environ=environ)
    assert first.code == 0, first
    for host in HOSTS:
        unit = root / host / "sakeystate-watch.service"
        assert unit.read_bytes() == (UNITS / "sakeystate-watch.service").read_bytes()
        dropin = (root / host / "sakeystate-watch.service.d" / "sakeystate.conf").read_text()
        assert (
            f'ExecStart="{BIN / "sakeystate"}" "watch" "--state" "/etc/sakeystate/state.yaml" '
            f'"--host" "{host}" "--metrics-textfile" '
            '"/var/lib/prometheus/node-exporter/sakeystate.prom"\n'
        ) in dropin
        assert 'ReadWritePaths="/etc/kubernetes/pki" "-/var/lib/prom dir"\n' in dropin
        for name, words in (
            ("sakeystate-boot.service", '"converge" "--no-reload"'),
            ("sakeystate-boot-done.service", '"reload-done" "--wait-ready"'),
        ):
            boot = (root / host / f"{name}.d" / "sakeystate.conf").read_text()
            assert (f'{words} "--state" "/etc/sakeystate/state.yaml" "--host" "{host}"\n') in boot
            assert (root / host / name).read_bytes() == (UNITS / name).read_bytes()
            verify_unit(root / host, root / host / name)
        verify_unit(root / host, unit)
    log = systemctl_log(tmp_path)
    assert "enable sakeystate-watch.service" in log and "start sakeystate-watch.service" in log
    for name in ("sakeystate-boot.service", "sakeystate-boot-done.service"):
        assert f"enable {name}" in log
        assert f"start {name}" not in log  # they run at boot, not now

    calls = len(log)
    second = ansible_playbook(tmp_path, playbook, *args, inventory=str(inventory), environ=environ)
    assert second.code == 0, second
    assert {h: c["changed"] for h, c in recap(second.out).items()} == dict.fromkeys(HOSTS, 0)
    assert "restart sakeystate-watch.service" not in systemctl_log(tmp_path)[calls:]


def verify_unit(unit_dir: Path, unit: Path) -> None:
    import shutil

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is not installed; CI must run it (.ci/run installs it)")
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(
        [analyze, "verify", str(unit)],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_watch_role_ships_the_example_unit() -> None:
    shipped = ROLES / "watch" / "files" / "sakeystate-watch.service"
    assert shipped.read_bytes() == (UNITS / "sakeystate-watch.service").read_bytes(), (
        f"cp examples/systemd/sakeystate-watch.service {shipped.relative_to(REPO)}"
    )


@pytest.mark.parametrize("name", ["sakeystate-boot.service", "sakeystate-boot-done.service"])
def test_boot_role_ships_the_example_units(name: str) -> None:
    shipped = ROLES / "boot" / "files" / name
    assert shipped.read_bytes() == (UNITS / name).read_bytes(), (
        f"cp examples/systemd/{name} {shipped.relative_to(REPO)}"
    )
