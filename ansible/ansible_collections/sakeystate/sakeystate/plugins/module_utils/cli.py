# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The one place the collection's modules run the ``sakeystate`` command.

The modules hold no logic of their own: they run the CLI with the target's
interpreter (``python -m sakeystate``), read its JSON report, exit code and
stderr, and word what they pass on in the module's terms (``allow_removals:
true`` rather than ``--allow-removals``). The CLI's contract (flags, exit
codes, report fields) is therefore the only interface between the two.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.util import find_spec
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

MIN_PYTHON = (3, 11)

# Options every module takes: where the desired state comes from, and which host this is.
STATE_OPTIONS: dict[str, dict[str, Any]] = {
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


def require_sakeystate(module: AnsibleModule) -> None:
    """Fail with Ansible's standard missing-library message, never an ImportError."""
    if sys.version_info < MIN_PYTHON:
        module.fail_json(
            msg=missing_required_lib(
                f"Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}", reason="by the sakeystate package"
            )
        )
    if find_spec("sakeystate") is None:
        module.fail_json(msg=missing_required_lib("sakeystate"))


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


def run_cli(module: AnsibleModule, args: list[str], inline: str | None) -> Run:
    """Run ``python -m sakeystate ARGS`` with the interpreter running this module."""
    rc, out, err = module.run_command([sys.executable, "-m", "sakeystate", *args])
    return Run(rc, out, err, inline)
