"""Running ansible-core commands in tests, isolated from ~/.ansible and /etc/ansible.

ANSIBLE_HOME, the temporary directories and the configuration file live under the
test's tmp directory; the collection is used from the checkout
(ansible/ansible_collections/sakeystate/sakeystate).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO

BIN = Path(sys.executable).parent
COLLECTIONS = REPO / "ansible"
COLLECTION = COLLECTIONS / "ansible_collections" / "sakeystate" / "sakeystate"


def ansible_environ(tmp: Path) -> dict[str, str]:
    """Environment for ansible-* commands that touches nothing outside ``tmp``."""
    home = tmp / "ansible-home"
    home.mkdir(exist_ok=True)
    config = tmp / "ansible.cfg"
    if not config.exists():
        config.write_text("[defaults]\n")
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
    }


def ansible_tool(
    tmp: Path,
    tool: str,
    *args: str,
    cwd: Path | None = None,
    timeout: float = 300,
    environ: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ansible-core's ``tool`` (beside this interpreter) with its paths under ``tmp``."""
    return subprocess.run(
        [str(BIN / tool), *args],
        cwd=cwd or tmp,
        env={**ansible_environ(tmp), **(environ or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- an older sakeystate, for the minimum-version checks --------------------------------

# The last commit of main released as 0.1.0 (before the collection and the Puppet module
# required 0.3.0): built as a wheel and installed into a venv of its own.
OLD_COMMIT = "e70bab124d7618c854d242d15ff34881c4b997df"
OLD_VERSION = "0.1.0"


def old_sakeystate(scratch: Path) -> Path:
    """``sakeystate`` 0.1.0 from ``OLD_COMMIT``, built once per project venv.

    The venv holds the old wheel only (``--no-deps``); its dependencies come from the
    project venv's site-packages through a ``.pth`` line, which is not a site directory,
    so the project's editable install of the new sakeystate never shadows the old one.
    """
    venv = Path(sys.prefix) / f"old-sakeystate-{OLD_COMMIT[:12]}"
    exe = venv / "bin" / "sakeystate"
    done = venv / "complete"
    if done.exists():
        return exe
    shutil.rmtree(venv, ignore_errors=True)
    known = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"], check=False
    )
    if known.returncode != 0:
        message = f"commit {OLD_COMMIT} is not in this clone's history (a shallow clone?)"
        if os.environ.get("CI"):
            raise AssertionError(message)
        import pytest

        pytest.skip(message)
    source = scratch / "old-source"
    source.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", OLD_COMMIT],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    dist = scratch / "old-dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob(f"sakeystate-{OLD_VERSION}-*.whl")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python",
         str(venv / "bin" / "python"), "install", "--quiet", "--no-deps", str(wheel)],
        check=True, timeout=600,
    )  # fmt: skip
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (project_site,) = (Path(sys.prefix) / "lib").glob("python3*/site-packages")
    (site / "project-dependencies.pth").write_text(f"{project_site}\n")
    done.touch()
    return exe


# --- a stand-in for systemctl (no systemd runs in the test container) --------------------

SYSTEMCTL = '''\
#!/usr/bin/env python3
"""systemctl stand-in for tests: units are files under $FAKE_SYSTEMD_UNIT_PATH; enabled
and active states are files under $FAKE_SYSTEMD_STATE; every call is logged there."""
import os, sys
from pathlib import Path

state = Path(os.environ["FAKE_SYSTEMD_STATE"])
state.mkdir(parents=True, exist_ok=True)
words = [w for w in sys.argv[1:] if w not in ("--", "-l", "--no-pager", "--full", "--all")]
words = [w for w in words if not w.startswith("--type") and w != "service"]
verb, units = (words[0], words[1:]) if words else ("", [])

def unit_name(text):
    text = text.strip("'")
    return text if "." in text else text + ".service"

with open(state / "log", "a") as log:  # unit names as systemd spells them
    log.write(" ".join([verb, *(u if u.startswith("-") else unit_name(u) for u in units)]))
    log.write("\\n")

def exists(unit):
    dirs = os.environ.get("FAKE_SYSTEMD_UNIT_PATH", "").split(":")
    return (state / (unit + ".exists")).exists() or any(
        d and (Path(d) / unit).exists() for d in dirs)

def flag(unit, name):
    return (state / f"{unit}.{name}").exists()

def put(unit, name, on):
    path = state / f"{unit}.{name}"
    path.touch() if on else path.unlink(missing_ok=True)

if verb in ("daemon-reload", "unmask", "mask", ""):
    sys.exit(0)
if verb == "list-unit-files":
    for unit in units or []:
        u = unit_name(unit.rstrip("*"))
        if exists(u):
            print(f"{u} {'enabled' if flag(u, 'enabled') else 'disabled'}")
    sys.exit(0)
unit = unit_name(units[0]) if units else ""
if verb in ("show",):
    if any(w.startswith("--property=NeedDaemonReload") for w in sys.argv):
        print("NeedDaemonReload=no"); sys.exit(0)
    load = "loaded" if exists(unit) else "not-found"
    active = "active" if flag(unit, "active") else "inactive"
    enabled = "enabled" if flag(unit, "enabled") else "disabled"
    print(f"Id={unit}\\nLoadState={load}\\nActiveState={active}\\nSubState={active}\\n"
          f"UnitFileState={enabled}")
    sys.exit(0)
if not exists(unit):
    print(f"Unit {unit} not found.", file=sys.stderr); sys.exit(4 if verb == "is-active" else 1)
if verb == "cat":
    sys.exit(0)
if verb == "is-enabled":
    on = flag(unit, "enabled")
    print("enabled" if on else "disabled"); sys.exit(0 if on else 1)
if verb == "is-active":
    on = flag(unit, "active")
    print("active" if on else "inactive"); sys.exit(0 if on else 3)
if verb in ("enable", "disable"):
    put(unit, "enabled", verb == "enable"); sys.exit(0)
if verb in ("start", "restart", "reload-or-restart", "try-restart"):
    put(unit, "active", True); sys.exit(0)
if verb == "stop":
    put(unit, "active", False); sys.exit(0)
print(f"systemctl stand-in: unsupported {sys.argv[1:]}", file=sys.stderr)
sys.exit(1)
'''


def systemd_standin(tmp: Path, unit_path: str) -> dict[str, str]:
    """Environment whose PATH starts with a systemctl stand-in (state under ``tmp``)."""
    bindir = tmp / "systemd-standin"
    bindir.mkdir(exist_ok=True)
    systemctl = bindir / "systemctl"
    systemctl.write_text(SYSTEMCTL)
    systemctl.chmod(0o755)
    # Puppet's systemd provider is used only when PID 1 is called systemd.
    (bindir / "systemd").unlink(missing_ok=True)
    (bindir / "systemd").symlink_to("/bin/sh")
    return {
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_SYSTEMD_STATE": str(tmp / "systemd-state"),
        "FAKE_SYSTEMD_UNIT_PATH": unit_path,
    }


def systemctl_log(tmp: Path) -> list[str]:
    log = tmp / "systemd-state" / "log"
    return log.read_text().splitlines() if log.exists() else []


STANDIN_HOST = "ctrl1001.example.org"


def standin_runner(tmp: Path, units: Path) -> Path:
    """A command prefix that runs its arguments as on a systemd control plane, privately.

    In new PID, mount and UTS namespaces: PID 1 is named ``systemd`` (so Puppet picks its
    systemd provider), the host name is ``STANDIN_HOST`` (so facter's FQDN is one),
    ``/etc/systemd/system`` is ``units`` (bind-mounted, visible to nothing outside), and
    ``systemctl`` is the stand-in (``systemd_standin``). The command is a child of PID 1,
    never exec'ed in its place.
    """
    systemd_standin(tmp, str(units))
    units.mkdir(parents=True, exist_ok=True)
    runner = tmp / "systemd-standin" / "run"
    script = (
        f"hostname {STANDIN_HOST} && mount --bind {units} /etc/systemd/system && "
        '"$@"; status=$?; exit $status'
    )
    runner.write_text(
        "#!/bin/sh\n"
        f"exec unshare --pid --fork --mount-proc --uts {tmp / 'systemd-standin' / 'systemd'} "
        f"-c '{script}' systemd \"$@\"\n"
    )
    runner.chmod(0o755)
    return runner
