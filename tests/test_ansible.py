"""The Ansible module under real ansible-playbook (ansible-core), on localhost, against real etcd.

Every run is isolated from ~/.ansible: ANSIBLE_HOME, the temp dirs and the
config file live under the test's tmp_path. A debug task prints the
module's registered result as JSON, so tests assert report fields rather than
the callback's prose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sakeystate.keys import format_time

from conftest import Env
from support import REPO, T0, private_key, public_pem, state_data

LIBRARY = REPO / "ansible" / "library"
BIN = Path(sys.executable).parent
AT = format_time(T0)


def ansible_environ(tmp: Path) -> dict[str, str]:
    """Environment for ansible-* commands that touches nothing outside ``tmp``."""
    home = tmp / "ansible-home"
    home.mkdir(exist_ok=True)
    config = tmp / "ansible.cfg"
    config.write_text("[defaults]\n")
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
        "ANSIBLE_LIBRARY": str(LIBRARY),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
    }


@dataclass
class PlaybookRun:
    code: int
    out: str
    err: str
    result: dict[str, Any] | None

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def ansible_tool(tmp: Path, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an ansible-core command with every Ansible path under ``tmp``."""
    return subprocess.run(
        [str(BIN / tool), *args],
        cwd=tmp,
        env=ansible_environ(tmp),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ansible_playbook(
    tmp: Path, playbook: Path, *args: str, inventory: str = "localhost,"
) -> subprocess.CompletedProcess[str]:
    return ansible_tool(tmp, "ansible-playbook", "-i", inventory, str(playbook), *args)


def run_module(
    tmp: Path, module_args: dict[str, Any], *args: str, interpreter: str = sys.executable
) -> PlaybookRun:
    """One play: the sakeystate task, then a debug task printing its registered result."""
    play = {
        "name": "sakeystate under test",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars": {"ansible_python_interpreter": interpreter},
        "tasks": [
            {"name": "Converge", "sakeystate": module_args, "register": "converged"},
            {"name": "Registered result", "ansible.builtin.debug": {"var": "converged"}},
        ],
    }
    playbook = tmp / "playbook.yml"
    playbook.write_text(yaml.safe_dump([play], sort_keys=False))
    proc = ansible_playbook(tmp, playbook, *args)
    return PlaybookRun(proc.returncode, proc.stdout, proc.stderr, registered(proc.stdout))


def registered(out: str) -> dict[str, Any] | None:
    """The result printed by the debug task (JSON after ``ok: [localhost] =>``), if it ran."""
    _, found, rest = out.partition("TASK [Registered result]")
    if not found:
        return None
    printed, _end = json.JSONDecoder().raw_decode(rest[rest.index("=> ") + 3 :])
    result: dict[str, Any] = printed["converged"]
    return result


def recap_changed(out: str) -> int:
    line = next(x for x in out.splitlines() if x.startswith("localhost") and "changed=" in x)
    return int(line.split("changed=")[1].split()[0])


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
    args = {"state_file": str(state), "at": AT}
    etcd_before = env.dump()

    checked = run_module(env.tmp, args, "--check")
    assert checked.code == 0, checked
    assert checked.result is not None and checked.result["changed"] is True
    assert recap_changed(checked.out) == 1
    assert env.bundle_bytes() is None
    assert env.dump() == etcd_before
    assert not reloads.exists()

    first = run_module(env.tmp, args)
    assert first.code == 0, first
    assert first.result is not None and first.result["changed"] is True
    assert recap_changed(first.out) == 1
    # Check mode predicted exactly what the real run did.
    assert first.result["actions"] == checked.result["actions"]
    assert first.result["bundle"] == checked.result["bundle"]
    assert first.result["bundle"]["kids_before"] == []
    assert first.result["bundle"]["kids_after"] == sorted([kid_a, kid_b])
    assert [(x["target"], x["op"], x.get("kid")) for x in first.result["actions"]] == [
        *(("bundle", "add", k) for k in sorted([kid_a, kid_b])),
        ("etcd", "delete", kid_r),
        ("reload", "run", None),
    ]
    written = env.bundle_bytes()
    assert written is not None
    assert public_pem(a) in written and public_pem(b) in written
    assert public_pem(revoked) not in written
    assert env.prefix + kid_r not in env.dump()
    assert reloads.read_text() == "reload\n"  # run_reload defaults to true
    # The report's warnings are Ansible warnings: shown to the operator, and in the result.
    untrusted = f"untrusted key {kid_u} (ctrl1009.example.org) is published in etcd"
    assert f"[WARNING]: {untrusted}" in first.out + first.err
    assert any(w.startswith(untrusted) for w in first.result["warnings"])
    assert "DEPRECATION" not in first.out + first.err
    # The module leaves etcd and the bundle exactly where the CLI would.
    assert env.cli("plan", "--at", AT, "--detailed-exitcode").code == 0

    second = run_module(env.tmp, args)
    assert second.code == 0, second
    assert second.result is not None and second.result["changed"] is False
    assert second.result["actions"] == []
    assert recap_changed(second.out) == 0
    assert env.bundle_bytes() == written
    assert reloads.read_text() == "reload\n"


def test_diff_shows_bundle_kids_before_after_and_etcd_deletes(env: Env) -> None:
    old, new, revoked = (private_key("ec256", i) for i in (3, 4, 5))
    kid_old = env.publish(old, "ctrl1001.example.org")
    state = env.state([(kid_old, "ctrl1001.example.org")])
    assert env.cli("converge", "--at", AT).code == 0
    kid_new = env.publish(new, "ctrl1002.example.org")
    kid_revoked = env.publish(revoked, "ctrl1003.example.org")
    env.state(
        [(kid_old, "ctrl1001.example.org"), (kid_new, "ctrl1002.example.org")],
        revoked=[{"fingerprint": kid_revoked, "reason": "host decommissioned"}],
    )

    run = run_module(env.tmp, {"state_file": str(state), "at": AT}, "--check", "--diff")
    assert run.code == 0, run
    lines = run.out.splitlines()
    assert f" {kid_old}" in lines  # unchanged kid, context line
    assert f"+{kid_new}" in lines
    assert f"-{env.prefix}{kid_revoked}  # revoked: host decommissioned" in lines
    assert f"--- before: {env.bundle} (kids)" in lines
    assert "--- before: etcd (keys deleted)" in lines
    assert env.prefix + kid_revoked in env.dump()  # --check: shown, not done


def test_invalid_state_fails_the_task_with_the_schema_error(env: Env) -> None:
    data = state_data(env.etcd.url, env.prefix, env.bundle, [])
    data["retention"]["superseded_grace"] = "1 day"
    data["colour"] = "blue"

    inline = run_module(env.tmp, {"state": data})
    assert inline.code == 2, inline
    assert "fatal: [localhost]: FAILED!" in inline.out
    assert "colour: unknown field; allowed here: apiVersion" in inline.out
    assert "retention.superseded_grace: '1 day' is not valid: expected a number and a unit" in (
        inline.out
    )
    assert env.bundle_bytes() is None


def test_refused_plan_fails_with_the_tool_message_and_writes_nothing(env: Env) -> None:
    key = private_key("ec256", 6)
    state = env.state([(env.publish(key, "ctrl1001.example.org"), "ctrl1001.example.org")])
    env.state([], retention={"min_keys": 1})
    etcd_before = env.dump()

    run = run_module(env.tmp, {"state_file": str(state), "at": AT})
    assert run.code == 2, run
    assert "refusing to converge: the bundle would hold 0 key(s)" in run.out
    assert env.bundle_bytes() is None
    assert env.dump() == etcd_before


def test_failed_reload_fails_the_task_after_the_bundle_was_written(env: Env) -> None:
    key = private_key("ec256", 10)
    state = env.state(
        [(env.publish(key, "ctrl1001.example.org"), "ctrl1001.example.org")],
        bundle={"reload": ["sh", "-c", "echo apiserver refused >&2; exit 3"]},
    )
    run = run_module(env.tmp, {"state_file": str(state), "at": AT})
    assert run.code == 2, run
    fatal = next(x for x in run.out.splitlines() if x.startswith("fatal: [localhost]: FAILED!"))
    failure = json.loads(fatal.split("=> ", 1)[1])
    assert failure["changed"] is True  # the bundle was written; only the restart failed
    assert failure["msg"].startswith("reload command 'sh -c echo apiserver refused >&2; exit 3'")
    assert failure["msg"].endswith("exited 3: apiserver refused; it will be retried")
    assert env.bundle_bytes() is not None
    # The failure is remembered: the next check reports drift so the reload is retried.
    assert env.cli("check", "--at", AT).code == 0


def test_example_playbook_leaves_the_restart_to_its_handler(env: Env) -> None:
    key = private_key("ec521", 7)
    restarted, module_reload = env.tmp / "handler-restarts", env.tmp / "module-reloads"
    state = env.state(
        [(env.publish(key, "ctrl1001.example.org"), "ctrl1001.example.org")],
        bundle={"reload": ["sh", "-c", f"echo reload >> {module_reload}"]},
    )
    inventory = env.tmp / "inventory.ini"
    inventory.write_text(
        f"[kube_control_plane]\nlocalhost ansible_connection=local "
        f"ansible_python_interpreter={sys.executable}\n"
    )
    extra = json.dumps(
        {
            "sakeystate_state_file": str(state),
            "kube_apiserver_restart_argv": ["sh", "-c", f"echo restart >> {restarted}"],
        }
    )
    playbook = REPO / "ansible" / "playbook.yml"

    first = ansible_playbook(env.tmp, playbook, "-e", extra, inventory=str(inventory))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "RUNNING HANDLER [Restart kube-apiserver]" in first.stdout
    assert restarted.read_text() == "restart\n"
    assert not module_reload.exists()  # run_reload: false; the handler restarted instead
    assert env.bundle_bytes() is not None

    second = ansible_playbook(env.tmp, playbook, "-e", extra, inventory=str(inventory))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "RUNNING HANDLER" not in second.stdout
    assert restarted.read_text() == "restart\n"


def test_missing_package_gives_the_standard_missing_library_message(tmp_path: Path) -> None:
    # Python without site-packages: it cannot import sakeystate (or anything pip installed).
    bare = tmp_path / "python-without-site-packages"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    run = run_module(tmp_path, {"state_file": str(tmp_path / "state.yaml")}, interpreter=str(bare))
    assert run.code == 2, run
    assert "Failed to import the required Python library (sakeystate)" in run.out


def test_ansible_doc_renders_without_warnings(tmp_path: Path) -> None:
    proc = ansible_tool(tmp_path, "ansible-doc", "-M", str(LIBRARY), "sakeystate")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for section in ("OPTIONS", "EXAMPLES", "RETURN VALUES", "state_file", "run_reload"):
        assert section in proc.stdout
