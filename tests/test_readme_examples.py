"""The README's entry-point examples, run as written against a real etcd.

The region between ``<!-- BEGIN entry-points`` and ``<!-- END entry-points -->``
is split into its ``###`` sections. In each, a fenced block whose info string
carries ``file=NAME`` is written to NAME, and every command of a ``sh`` block
is run in order; a trailing ``# exit N`` comment is the exit status the command
must return (0 otherwise). Production paths are pointed at a scratch directory
by the substitutions below, and nothing else is changed. The sections that
manage services run in private namespaces where ``/etc/systemd/system`` is a
scratch directory and ``systemctl`` a stand-in (``ansible_support.standin_runner``):
no systemd runs in the test container.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_puppet import puppet_binary

from ansible_support import STANDIN_HOST, ansible_environ, standin_runner, systemctl_log
from conftest import Env
from support import REPO, make_cert, private_key, state_data, write_state

BIN = Path(sys.executable).parent
NOW = datetime.now(UTC)
VALID_NOW = {"not_before": NOW - timedelta(days=1), "not_after": NOW + timedelta(days=365)}
SECTIONS = (
    "Ansible",
    "Ansible: watch as a service",
    "Puppet",
    "Puppet: watch as a service",
    "Plans in code review",
)
# Sections that manage services or unit files: run as on a systemd control plane.
ON_SYSTEMD = {"Ansible: watch as a service", "Puppet", "Puppet: watch as a service"}
UNITS = REPO / "examples" / "systemd"
_BLOCK_RE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.S | re.M)
_EXIT_RE = re.compile(r"#\s*exit (\d+)")


@dataclass
class Section:
    files: dict[str, str]
    commands: list[tuple[str, int]]


def readme_sections() -> dict[str, Section]:
    text = (REPO / "README.md").read_text()
    region = text[text.index("<!-- BEGIN entry-points") : text.index("<!-- END entry-points -->")]
    sections: dict[str, Section] = {}
    for chunk in region.split("\n### ")[1:]:
        title, _, body = chunk.partition("\n")
        section = sections[title.strip()] = Section({}, [])
        for lang, info, code in _BLOCK_RE.findall(body):
            name = re.search(r"\bfile=(\S+)", info)
            if name:
                section.files[name.group(1)] = code
            elif lang == "sh":
                section.commands += shell_commands(code)
    return sections


def shell_commands(code: str) -> list[tuple[str, int]]:
    """Each command of a sh block with its expected exit status (``# exit N``, else 0)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        command, _, comment = line.partition(" #")
        if line.lstrip().startswith("#") or not command.strip():
            continue
        expected = _EXIT_RE.search("#" + comment)
        commands.append((command.strip(), int(expected.group(1)) if expected else 0))
    return commands


def substitutions(tmp: Path, puppet: bool) -> dict[str, str]:
    """Production paths and commands -> the scratch directory's."""
    table = {
        "/etc/sakeystate/state.yaml": str(tmp / "state" / "wikikube-eqiad.yaml"),
        "/usr/local/bin/sakeystate": str(BIN / "sakeystate"),
        "systemctl restart kube-apiserver-safe-restart.service": f"touch {tmp / 'restarted'}",
    }
    if puppet:
        dirs = " ".join(
            f"--{name}={tmp / 'puppet' / name}"
            for name in ("confdir", "vardir", "codedir", "logdir", "rundir")
        )
        table["puppet apply"] = (
            f"{puppet_binary()} apply --color=false {dirs} "
            f"--hiera_config={tmp / 'puppet' / 'hiera.yaml'} --modulepath={REPO / 'puppet'}"
        )
    return table


def substitute(text: str, table: dict[str, str]) -> str:
    for production, scratch in table.items():
        text = text.replace(production, scratch)
    return text


def test_readme_documents_the_three_entry_points() -> None:
    sections = readme_sections()
    assert tuple(sections) == SECTIONS
    for title, section in sections.items():
        assert section.commands, f"README section {title!r} has no command to run"


@pytest.mark.parametrize(
    "title",
    SECTIONS,
)
def test_readme_example_runs_as_documented(env: Env, title: str) -> None:
    section = readme_sections()[title]
    keys = [private_key("ec521", 50), private_key("ec256", 51)]
    trusted = [
        (env.publish(key, f"ctrl100{i}.example.org", **VALID_NOW), f"ctrl100{i}.example.org")
        for i, key in enumerate(keys, 1)
    ]
    (env.tmp / "state").mkdir()
    cert = env.tmp / "state" / "sa.pem"
    cert.write_bytes(make_cert(keys[0], STANDIN_HOST, **VALID_NOW))
    write_state(
        env.tmp / "state" / "wikikube-eqiad.yaml",
        state_data(
            env.etcd.url,
            env.prefix,
            env.bundle,
            trusted,
            own_cert=str(cert),
            bundle={"reload": ["touch", str(env.tmp / "restarted")]},
        ),
    )
    (env.tmp / "inventory").write_text(
        f"[kube_control_plane]\n{STANDIN_HOST} ansible_connection=local "
        f"ansible_python_interpreter={sys.executable}\n"
    )
    table = substitutions(env.tmp, puppet=title.startswith("Puppet"))
    for name, content in section.files.items():
        (env.tmp / name).write_text(substitute(content, table))
    environ = {**ansible_environ(env.tmp), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    units = env.tmp / "units"
    prefix: list[str] = []
    if title in ON_SYSTEMD:
        prefix = [str(standin_runner(env.tmp, units))]
        environ["PATH"] = f"{env.tmp / 'systemd-standin'}{os.pathsep}{environ['PATH']}"
        environ["FAKE_SYSTEMD_STATE"] = str(env.tmp / "systemd-state")
        environ["FAKE_SYSTEMD_UNIT_PATH"] = str(units)
        (units / "kube-apiserver.service").write_text("[Service]\nExecStart=/bin/true\n")

    outputs = []
    for command, expected in section.commands:
        proc = subprocess.run(
            [*prefix, "bash", "-o", "pipefail", "-c", substitute(command, table)],
            cwd=env.tmp,
            env=environ,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert proc.returncode == expected, f"{command}\n{proc.stdout}\n{proc.stderr}"
        outputs.append(proc.stdout)

    bundle = env.bundle_bytes()
    kids = sorted(kid for kid, _host in trusted)
    if title == "Ansible":
        assert any(x.startswith(f"+{kids[0]}  # ") for x in outputs[0].splitlines())  # the diff
        assert (env.tmp / "restarted").exists()  # the handler restarted, under the lock
        assert bundle is not None
    elif title == "Puppet":
        assert "current_value 'would converge: " in outputs[0]
        assert bundle is not None
        assert "start kube-apiserver.service" in systemctl_log(env.tmp)
    elif title.endswith("watch as a service"):
        assert bundle is None  # deploying the units converges nothing by itself
        for name in ("sakeystate-watch.service", "sakeystate-boot.service"):
            assert (units / name).exists(), name
        assert (units / "sakeystate-watch.service").read_bytes() == (
            UNITS / "sakeystate-watch.service"
        ).read_bytes()
        (dropin,) = (units / "sakeystate-watch.service.d").glob("*.conf")
        assert f'"--host" "{STANDIN_HOST}"' in dropin.read_text()
        assert "start sakeystate-watch.service" in systemctl_log(env.tmp)
        assert "enable sakeystate-boot.service" in systemctl_log(env.tmp)
    else:
        plan = (env.tmp / "plan.md").read_text()
        assert plan.startswith("### sakeystate plan for `test`")
        assert all(f"| bundle | add | `{kid}` |" in plan for kid in kids)
        assert bundle is None  # review never writes
    if bundle is not None:
        assert all(f"# {kid} " in bundle.decode() for kid in kids)
