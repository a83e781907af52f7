"""The collection's modules under real ansible-playbook (ansible-core), against real etcd.

Every run is isolated from ~/.ansible (tests/ansible_support.py). A debug task
prints a module's registered result as JSON, so tests assert report fields
rather than the callback's prose. The fleet tests drive three inventory hosts
(local connection, each with its own bundle and --host) through the example
playbook, with serial: 1, any_errors_fatal and its restart handlers.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ansible_support import BIN, COLLECTION, ansible_tool
from conftest import Env
from support import REPO, kid, make_cert, private_key, public_pem, state_data

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
    tmp: Path, playbook: Path, *args: str, inventory: str = "localhost,"
) -> PlaybookRun:
    proc = ansible_tool(tmp, "ansible-playbook", "-i", inventory, str(playbook), *args)
    return PlaybookRun(proc.returncode, proc.stdout, proc.stderr, registered(proc.stdout))


def run_module(
    tmp: Path,
    module_args: dict[str, Any],
    *args: str,
    module: str = "converge",
    interpreter: str = sys.executable,
) -> PlaybookRun:
    """One play: a module's task, then a debug task printing its registered result."""
    play = {
        "name": "sakeystate under test",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars": {"ansible_python_interpreter": interpreter},
        "tasks": [
            {"name": "Module", f"sakeystate.sakeystate.{module}": module_args, "register": "r"},
            {"name": "Registered result", "ansible.builtin.debug": {"var": "r"}},
        ],
    }
    playbook = tmp / "playbook.yml"
    playbook.write_text(yaml.safe_dump([play], sort_keys=False))
    return ansible_playbook(tmp, playbook, *args)


def registered(out: str) -> dict[str, Any] | None:
    """The result printed by the debug task (JSON after ``ok: [localhost] =>``), if it ran."""
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
    args = {"state_file": str(state)}
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

    run = run_module(env.tmp, {"state_file": str(state)}, "--check", "--diff")
    assert run.code == 0, run
    lines = run.out.splitlines()
    assert f" {kid_old}  # ctrl1001.example.org" in lines  # unchanged kid, context line
    assert f"+{kid_new}  # ctrl1002.example.org" in lines
    assert f"-{env.prefix}{kid_revoked}  # ctrl1003.example.org: revoked: host decommissioned" in (
        lines
    )
    assert f"--- before: {env.bundle} (kids)" in lines
    assert "--- before: etcd (keys deleted)" in lines
    assert any(x.startswith("+reload run: bundle key set changed") for x in lines)
    assert env.prefix + kid_revoked in env.dump()  # --check: shown, not done

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
    state = env.state([*zip(kids, hosts, strict=True), (kid_keep, "ctrl1004.example.org")])
    assert env.cli("converge").code == 0
    env.state(
        [(kid_keep, "ctrl1004.example.org")],
        revoked=[{"fingerprint": k, "reason": "rotated"} for k in kids],
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


def test_missing_package_gives_the_standard_missing_library_message(tmp_path: Path) -> None:
    # Python without site-packages: it cannot import sakeystate (or anything pip installed).
    bare = tmp_path / "python-without-site-packages"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    run = run_module(tmp_path, {"state_file": str(tmp_path / "state.yaml")}, interpreter=str(bare))
    assert run.code == 2, run
    assert "Failed to import the required Python library (sakeystate)" in run.out


def test_broken_install_fails_the_task_with_the_reason(env: Env) -> None:
    # sakeystate importable, but one of its dependencies is not (a broken upgrade).
    blocker = env.tmp / "without-cryptography"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['cryptography'] = None\n")
    broken = env.tmp / "python-without-cryptography"
    broken.write_text(f'#!/bin/sh\nPYTHONPATH={blocker} exec {sys.executable} "$@"\n')
    broken.chmod(0o755)
    key_id = env.publish(private_key("ec256", 18), "ctrl1001.example.org")
    state = env.state([(key_id, "ctrl1001.example.org")])

    for mode in ((), ("--check",)):
        run = run_module(env.tmp, {"state_file": str(state)}, *mode, interpreter=str(broken))
        assert run.code == 2, run
        assert "fatal: [localhost]: FAILED!" in run.out
        assert "cryptography" in run.out
    assert env.bundle_bytes() is None


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


@pytest.mark.parametrize("module", ["converge", "publish", "reload_done"])
def test_ansible_doc_renders_without_warnings(tmp_path: Path, module: str) -> None:
    proc = ansible_tool(tmp_path, "ansible-doc", f"sakeystate.sakeystate.{module}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for section in ("OPTIONS", "EXAMPLES", "state_file", "desired_state"):
        assert section in proc.stdout


# --- three control planes through the example playbook ----------------------------------


@dataclass
class Fleet:
    """Three inventory hosts on this machine, each with its own bundle, state file and --host."""

    env: Env
    keys: dict[str, Any]

    @property
    def tmp(self) -> Path:
        return self.env.tmp

    def bundle(self, host: str) -> Path:
        return self.tmp / f"bundle-{host}.pem"

    @property
    def restarts(self) -> list[str]:
        log = self.tmp / "restarts"
        return log.read_text().split() if log.exists() else []

    def template(self, trusted: list[tuple[str, str]], **overrides: Any) -> None:
        """The shared state as a Jinja template: every host renders its own bundle path."""
        data = state_data(
            self.env.etcd.url,
            self.env.prefix,
            str(self.tmp / "bundle-{{ inventory_hostname }}.pem"),
            trusted,
            **overrides,
        )
        (self.tmp / "state.yaml.j2").write_text(yaml.safe_dump(data, sort_keys=False))

    def fail_restart(self, host: str, failing: bool) -> None:
        flag = self.tmp / f"fail-restart-{host}"
        if failing:
            flag.touch()
        else:
            flag.unlink()

    def play(self, *args: str, abort_host: str = "none") -> PlaybookRun:
        """The example playbook, plus a task that aborts the play on ``abort_host``."""
        plays = yaml.safe_load(PLAYBOOK.read_text())
        plays[0]["tasks"].append(
            {
                "name": "Abort the play here (test)",
                "ansible.builtin.fail": {"msg": "aborted"},
                "when": "inventory_hostname == abort_host",
            }
        )
        playbook = self.tmp / "fleet.yml"
        playbook.write_text(yaml.safe_dump(plays, sort_keys=False))
        inventory = self.tmp / "inventory.ini"
        inventory.write_text(
            "[kube_control_plane]\n"
            + "".join(
                f"{h} ansible_connection=local ansible_python_interpreter={sys.executable}\n"
                for h in HOSTS
            )
        )
        restart = (
            f"if [ -e {self.tmp}/fail-restart-$0 ]; then echo refused >&2; exit 1; fi; "
            f"echo $0 >> {self.tmp}/restarts"
        )
        extra = {
            "abort_host": abort_host,
            "sakeystate_state_template": str(self.tmp / "state.yaml.j2"),
            "sakeystate_state_file": str(self.tmp / "state-{{ inventory_hostname }}.yaml"),
            "sakeystate_validate": f"{BIN / 'sakeystate'} validate %s",
            "kube_apiserver_restart_argv": ["sh", "-c", restart, "{{ inventory_hostname }}"],
        }
        return ansible_playbook(
            self.tmp, playbook, "-e", json.dumps(extra), *args, inventory=str(inventory)
        )


@pytest.fixture
def fleet(env: Env) -> Fleet:
    keys = {h: private_key("ec256", 30 + i) for i, h in enumerate(HOSTS)}
    kids = {h: env.publish(k, h) for h, k in keys.items()}
    result = Fleet(env, kids)
    result.template([(kids[h], h) for h in HOSTS])
    return result


def test_owed_restart_survives_abort_and_failed_handler_and_happens_once(fleet: Fleet) -> None:
    a, b, c = HOSTS
    aborted = fleet.play(abort_host=a)
    assert aborted.code == 2, aborted
    assert fleet.bundle(a).exists() and not fleet.bundle(b).exists()
    assert fleet.restarts == []  # the play ended before any handler ran
    # Check mode reports the owed restart too (and restarts nothing).
    checked = fleet.play("--check")
    assert checked.code == 0, checked
    assert statuses(checked.out, "Converge etcd and the service-account key bundle") == (
        dict.fromkeys(HOSTS, "changed")
    )
    assert fleet.restarts == []

    fleet.fail_restart(b, True)
    failed = fleet.play()
    assert failed.code == 2, failed
    # a: the restart owed since the aborted play; b: its restart failed; c: never reached.
    assert fleet.restarts == [a]
    assert statuses(failed.out, "Restart kube-apiserver")[b] == "fatal"
    assert fleet.bundle(b).exists() and not fleet.bundle(c).exists()

    fleet.fail_restart(b, False)
    recovered = fleet.play()
    assert recovered.code == 0, recovered
    # a is not restarted again; b's owed restart happens; c converges and restarts.
    assert fleet.restarts == [a, b, c]
    assert statuses(recovered.out, "Converge etcd and the service-account key bundle") == {
        a: "ok",
        b: "changed",
        c: "changed",
    }

    settled = fleet.play()
    assert settled.code == 0, settled
    assert fleet.restarts == [a, b, c]
    assert {h: counts["changed"] for h, counts in recap(settled.out).items()} == dict.fromkeys(
        HOSTS, 0
    )


def test_check_mode_reports_a_state_change_made_in_the_same_play(fleet: Fleet) -> None:
    a, b, c = HOSTS
    # Fresh hosts: no state file, no bundle yet. Check mode still plans from the template.
    checked = fleet.play("--check", "--diff")
    assert checked.code == 0, checked
    converge = "Converge etcd and the service-account key bundle"
    assert statuses(checked.out, converge) == dict.fromkeys(HOSTS, "changed")
    assert not any(fleet.bundle(h).exists() for h in HOSTS)
    assert not (fleet.tmp / f"state-{a}.yaml").exists()
    assert fleet.restarts == []

    assert fleet.play().code == 0
    assert fleet.restarts == [a, b, c]
    before = {h: fleet.bundle(h).read_bytes() for h in HOSTS}

    # The same play changes the state (a reimaged host's new key is trusted) and checks it.
    new_kid = fleet.env.publish(private_key("ec256", 39), b)
    fleet.template([*((fleet.keys[h], h) for h in HOSTS), (new_kid, b)])
    rechecked = fleet.play("--check", "--diff")
    assert rechecked.code == 0, rechecked
    assert statuses(rechecked.out, converge) == dict.fromkeys(HOSTS, "changed")
    assert f"+{new_kid}  # {b}" in rechecked.out.splitlines()
    assert {h: fleet.bundle(h).read_bytes() for h in HOSTS} == before
    assert fleet.restarts == [a, b, c]  # check mode restarts nothing and owes nothing

    assert fleet.play().code == 0
    assert fleet.restarts == [a, b, c, a, b, c]


def test_handler_follows_the_key_set_not_an_etcd_only_cleanup(fleet: Fleet) -> None:
    assert fleet.play().code == 0
    assert fleet.restarts == list(HOSTS)
    # A key nobody trusts is revoked: etcd loses it, no bundle changes, nothing restarts.
    stray = fleet.env.publish(private_key("ec256", 40), "ctrl1009.example.org")
    fleet.template(
        [(fleet.keys[h], h) for h in HOSTS],
        revoked=[{"fingerprint": stray, "reason": "never ours"}],
    )
    cleaned = fleet.play()
    assert cleaned.code == 0, cleaned
    assert fleet.env.prefix + stray not in fleet.env.dump()
    # The first host deletes the entry from etcd; the others find nothing left to do.
    assert statuses(cleaned.out, "Converge etcd and the service-account key bundle") == {
        HOSTS[0]: "changed",
        HOSTS[1]: "ok",
        HOSTS[2]: "ok",
    }
    assert statuses(cleaned.out, "Restart kube-apiserver") == {HOSTS[0]: "skipping"}
    assert fleet.restarts == list(HOSTS)


def test_result_reports_bundle_changed_and_reload_needed_until_confirmed(env: Env) -> None:
    key = private_key("ec256", 41)
    state = env.state([(env.publish(key, "ctrl1001.example.org"), "ctrl1001.example.org")])
    args = {"state_file": str(state), "host": "ctrl1001.example.org", "run_reload": False}

    first = run_module(env.tmp, args)
    assert first.code == 0, first
    assert first.result is not None
    assert (first.result["bundle_changed"], first.result["reload_needed"]) == (True, True)
    assert first.result["host"] == "ctrl1001.example.org"

    again = run_module(env.tmp, args)
    assert again.result is not None
    assert (again.result["bundle_changed"], again.result["reload_needed"]) == (False, True)
    assert again.result["changed"] is True  # the restart is still owed

    done = run_module(env.tmp, {"state_file": str(state)}, module="reload_done")
    assert done.code == 0, done
    assert done.result is not None and done.result["changed"] is True
    again_done = run_module(env.tmp, {"state_file": str(state)}, module="reload_done")
    assert again_done.result is not None and again_done.result["changed"] is False
    settled = run_module(env.tmp, args)
    assert settled.result is not None
    assert (settled.result["reload_needed"], settled.result["changed"]) == (False, False)


def test_publish_checks_diffs_then_publishes_once(env: Env) -> None:
    host = "ctrl1001.example.org"
    key = private_key("ec256", 42)
    cert = env.tmp / "sa.pem"
    cert.write_bytes(make_cert(key, host))
    state = env.state([])
    args = {"state_file": str(state), "host": host, "cert": str(cert)}

    checked = run_module(env.tmp, args, "--check", "--diff", module="publish")
    assert checked.code == 0, checked
    assert checked.result is not None and checked.result["changed"] is True
    assert env.dump() == {}
    assert checked.result["kid"] == kid(key)
    assert f"+{env.prefix}{kid(key)}  # {host}" in checked.out.splitlines()

    published = run_module(env.tmp, args, module="publish")
    assert published.code == 0, published
    assert published.result is not None and published.result["changed"] is True
    assert list(env.dump()) == [env.prefix + kid(key)] == [published.result["key"]]

    again = run_module(env.tmp, args, module="publish")
    assert again.result is not None and again.result["changed"] is False
