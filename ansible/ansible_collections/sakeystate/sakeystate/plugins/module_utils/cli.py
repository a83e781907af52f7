# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The one place the collection's modules run the ``sakeystate`` command.

The modules hold no logic of their own: they run the ``sakeystate``
executable (option ``executable``, else ``sakeystate`` on the PATH or in
``/usr/local/bin``, the documented link into the ``/opt/sakeystate`` venv), read
its JSON report, exit code and stderr, and word what they pass on in the
module's terms (``allow_removals: true`` rather than ``--allow-removals``). The
CLI's contract (flags, exit codes, report fields) is therefore the only
interface between the two, and the package need not be importable by the
Python that runs the module (Debian's system Python is externally managed).

Before anything else a module asks the executable for its version: an older
sakeystate fails the task with "requires sakeystate >= X, found Y" instead of
a usage error about a flag it does not know yet.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

MIN_PYTHON = (3, 11)
# The oldest sakeystate whose commands and flags these modules use (reload, status, wait).
MIN_SAKEYSTATE = (0, 3, 0)
# Where the documented install links the console script (a venv in /opt/sakeystate).
INSTALL_DIRS = ["/usr/local/bin", "/opt/sakeystate/bin"]
_VERSION_RE = re.compile(r"^sakeystate (\d+)\.(\d+)\.(\d+)\S*$")

# Options every module takes: the executable, where the desired state comes from, and
# which host this is.
EXECUTABLE_OPTION: dict[str, dict[str, Any]] = {"executable": {"type": "path"}}
STATE_OPTIONS: dict[str, dict[str, Any]] = {
    **EXECUTABLE_OPTION,
    "state_file": {"type": "path"},
    "desired_state": {"type": "dict"},
    "host": {"type": "str"},
}
STATE_CHOICE: dict[str, Any] = {
    "mutually_exclusive": [("state_file", "desired_state")],
    "required_one_of": [("state_file", "desired_state")],
}

# CLI flags as the module's users know them, longest first so no flag eats another's prefix.
MODULE_TERMS = (
    ("--allow-removals", "allow_removals: true"),
    ("--no-reload", "run_reload: false"),
    ("--state", "state_file"),
    ("--host", "host"),
    ("--cert", "cert"),
)
# What every check-mode diff says about the other hosts (and the other tasks) of the run.
CHECK_MODE_NOTE = (
    "check mode: planned from etcd as it is now; a publish or a deletion that another task "
    "of this check run only predicted (on this host or a peer) is not seen, so a peer's "
    "check can show ok where the real run changes it"
)
# The CLI's warning about a trusted key nobody published yet (a reimage in progress).
_UNPUBLISHED_RE = re.compile(r"^trusted key (\S+) \((\S+)\) is not published in etcd")
WARNING = "sakeystate: warning: "
ERROR = "sakeystate: error: "


class Run:
    """One CLI run: exit code, its JSON report (when it printed one) and its stderr, sorted."""

    def __init__(self, rc: int, out: str, err: str, inline: str | None) -> None:
        self.rc = rc
        self.out = out
        self.report = _json_object(out)
        self.warnings: list[str] = []
        self.errors: list[str] = []
        other: list[str] = []
        for line in err.splitlines():
            line = in_module_terms(line, inline)
            if line.startswith(WARNING):
                self.warnings.append(line[len(WARNING) :])
            elif line.startswith(ERROR):
                self.errors.append(line[len(ERROR) :])
            elif line.strip():
                other.append(line)
        # Anything else on stderr (a crash of a broken install) is the message itself.
        self.other = other

    def message(self) -> str:
        """Why the run failed, in the CLI's words (a traceback's last line when it crashed)."""
        if self.errors:
            return "; ".join(self.errors)
        if self.other:
            return f"sakeystate exited {self.rc}: {self.other[-1]}"
        return f"sakeystate exited {self.rc}"


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def in_module_terms(text: str, inline: str | None) -> str:
    """A CLI message reworded for a playbook author."""
    if inline:
        text = text.replace(inline, "desired_state")
    for flag, option in MODULE_TERMS:
        text = text.replace(flag, option)
    return text


def require_sakeystate(module: AnsibleModule) -> list[str]:
    """The command that runs sakeystate, checked to be at least ``MIN_SAKEYSTATE``.

    Fails with Ansible's standard messages: a missing executable names the paths
    searched, an old one says "requires sakeystate >= X, found Y".
    """
    if sys.version_info < MIN_PYTHON:
        module.fail_json(
            msg=missing_required_lib(
                f"Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}", reason="by the sakeystate modules"
            )
        )
    executable = module.params.get("executable") or module.get_bin_path(
        "sakeystate", opt_dirs=INSTALL_DIRS
    )
    if executable and not os.access(executable, os.X_OK):
        module.fail_json(msg=f"executable {executable} is not an executable file")
    if not executable:
        searched = os.pathsep.join([os.environ.get("PATH", ""), *INSTALL_DIRS])
        module.fail_json(
            msg=f'Failed to find required executable "sakeystate" in paths: {searched}; '
            "install it (a venv in /opt/sakeystate linked as /usr/local/bin/sakeystate) "
            "or set executable"
        )
    rc, out, err = module.run_command([executable, "--version"])
    found = _VERSION_RE.match(out.strip())
    if rc != 0 or not found:
        detail = (err or out).strip().splitlines()[-1:] or [f"exit {rc}"]
        module.fail_json(msg=f"cannot tell the version of {executable}: {detail[0]}")
    version = tuple(int(part) for part in found.groups())
    if version < MIN_SAKEYSTATE:
        wanted = ".".join(str(part) for part in MIN_SAKEYSTATE)
        module.fail_json(
            msg=f"the sakeystate.sakeystate collection requires sakeystate >= {wanted}, "
            f"found {'.'.join(str(part) for part in version)} ({executable})"
        )
    return [executable]


def state_arguments(module: AnsibleModule) -> tuple[list[str], str | None]:
    """``--state`` (and ``--host``) arguments; an inline desired state goes to a private file.

    JSON is YAML, so the inline mapping is written as indented JSON under Ansible's
    per-task temporary directory, which Ansible removes after the task.
    """
    params = module.params
    inline = None
    path = params["state_file"]
    if params["desired_state"] is not None:
        inline = os.path.join(module.tmpdir, "desired_state.yaml")
        with open(inline, "w", encoding="utf-8") as handle:
            json.dump(params["desired_state"], handle, indent=2, default=str)
        path = inline
    args = ["--state", path]
    if params["host"]:
        args += ["--host", params["host"]]
    return args, inline


def run_cli(module: AnsibleModule, command: list[str], args: list[str], inline: str | None) -> Run:
    """Run ``sakeystate ARGS`` (``command`` comes from ``require_sakeystate``)."""
    rc, out, err = module.run_command([*command, *args])
    return Run(rc, out, err, inline)


def plan_result(module: AnsibleModule, run: Run, inline: str | None) -> dict[str, Any]:
    """A plan or converge report as a task result: ``keys`` renamed (it would shadow
    ``dict.keys`` in Jinja), the CLI's warnings as Ansible warnings, errors in the
    module's terms."""
    report = dict(run.report or {})
    report.pop("warnings", None)
    for warning in run.warnings:
        module.warn(warning)
    if "keys" in report:
        report["service_account_keys"] = report.pop("keys")
    report["errors"] = [in_module_terms(e, inline) for e in report.get("errors", [])]
    return report


def restart_owed(
    module: AnsibleModule, command: list[str], state: list[str], inline: str | None
) -> bool:
    """Check mode of the restart modules: would a restart be owed when the handler runs?

    ``plan`` answers it exactly for the play being checked: ``reload_needed`` is true
    when an earlier restart is still owed, and when the key set is about to change (the
    converge task before the handler, not run in check mode, would leave it owed).
    """
    run = run_cli(module, command, ["plan", *state, "--format", "json"], inline)
    if run.rc != 0 or run.report is None:
        module.fail_json(msg=f"check mode cannot tell whether a restart is owed: {run.message()}")
    return bool(run.report.get("reload_needed"))


def unseen_publishes(report: dict[str, Any], warnings: list[str]) -> list[str]:
    """Check mode: what the plan cannot see, said for this host (Ansible shows each distinct
    warning once, so the host is part of the text).

    A trusted key that is not published yet is the one case check mode knows it may
    under-predict: a publish task of this very run would make the real run add it to this
    bundle, and restart kube-apiserver, while this check shows ok.
    """
    host = report.get("host") or "this host"
    found = []
    for warning in warnings:
        matched = _UNPUBLISHED_RE.match(warning)
        if matched:
            found.append(
                f"check mode on {host}: trusted key {matched.group(1)} ({matched.group(2)}) "
                "is not published yet; if this run publishes it, the real run adds it to this "
                "bundle (and restarts kube-apiserver) where this check shows no change"
            )
    return found
