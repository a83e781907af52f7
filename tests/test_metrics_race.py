"""Issue finding 8: ``--metrics-textfile`` let a local user make root overwrite any file.

prometheus_client's ``write_to_textfile`` opens ``<path>.<pid>.<thread>`` with a plain
``open()``: a user who can create files in the textfile directory plants a symlink under
that name, and root writes the metrics into the link's target. Now the metrics file is
written with the bundle's writer (an exclusive, randomly named temporary, never a
followed link) and a directory another user can write to is refused.

Here a real ``watch`` runs as root while an unprivileged user (``nobody``, through
setpriv) races it, planting links to a root-only file under every name it can think of.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Env
from support import private_key
from watch_support import WatchProcess, wait_for

HOST = "ctrl1001.example.org"
NOBODY = 65534

# The attacker: for its whole life, keep links to the victim under the metrics file's
# name and under every name write_to_textfile could use for the watcher's process.
ATTACKER = r"""
import os, sys, time
target, victim, pid, until = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
planted = 0
while time.time() < until:
    names = [target] + [f"{target}.{pid}.{t}" for t in os.listdir(f"/proc/{pid}/task")]
    for name in names:
        try:
            os.symlink(victim, name)
            planted += 1
        except FileExistsError:
            pass
        except OSError:
            sys.exit(f"cannot plant {name}: not writable by this user")
    time.sleep(0.01)
print(planted)
"""


def _setpriv() -> str:
    found = shutil.which("setpriv")
    if found is None or os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("this test needs root and setpriv (util-linux)")
        pytest.skip("needs root and setpriv")
    return found


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory nobody may enter (but not write): pytest's own tmp is root's only."""
    directory = Path(tempfile.mkdtemp(prefix="sakeystate-race-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def victim(place: Path) -> Path:
    secret = place / "root-only"
    secret.write_bytes(b"root's secret\n")
    secret.chmod(0o600)
    return secret


def _race(env: Env, directory: Path, victim: Path, seconds: float) -> tuple[str, int]:
    """A watch with its metrics in ``directory``, raced by nobody; (its log, exit code)."""
    key = env.publish(private_key("ec256", 1), HOST)
    env.state([(key, HOST)], host=HOST)
    target = directory / "sakeystate.prom"
    watch = WatchProcess(
        env.state_path, HOST, env.tmp / "watch.log", "--metrics-textfile", str(target)
    )
    attacker = subprocess.Popen(
        [
            _setpriv(),
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            ATTACKER,
            str(target),
            str(victim),
            str(watch.proc.pid),
            str(time.time() + seconds),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for("the first pass", lambda: "pass 1" in watch.output, timeout=60)
        for number in range(2, 5):  # more passes, each writing the metrics again
            env.publish(private_key("ec256", number), HOST)
            wait_for(f"pass {number}", lambda n=number: f"pass {n}" in watch.output, timeout=60)
        _out, err = attacker.communicate(timeout=seconds + 30)
    finally:
        watch.stop()
    return watch.output + err, attacker.returncode


def test_a_textfile_directory_nobody_can_write_is_refused_and_the_race_wins_nothing(
    env: Env, place: Path, victim: Path
) -> None:
    shared = place / "textfiles"
    shared.mkdir()
    shared.chmod(0o1777)  # world-writable with the sticky bit, like /tmp
    output, code = _race(env, shared, victim, seconds=8)
    assert code == 0, output  # the attacker could plant its links here
    assert victim.read_bytes() == b"root's secret\n"
    assert "metrics directory" in output and "writable by group or others" in output
    assert all(p.is_symlink() for p in shared.iterdir()), list(shared.iterdir())


def test_in_a_root_only_directory_the_metrics_are_written_and_nobody_can_plant(
    env: Env, place: Path, victim: Path
) -> None:
    private = place / "node-exporter"
    private.mkdir()
    private.chmod(0o755)
    output, code = _race(env, private, victim, seconds=4)
    assert code != 0 and "not writable by this user" in output
    assert victim.read_bytes() == b"root's secret\n"
    target = private / "sakeystate.prom"
    assert target.is_file() and not target.is_symlink()
    names = {f.name for f in text_string_to_metric_families(target.read_text())}
    assert "sakeystate_bundle_keys" in names
    assert [p.name for p in private.iterdir()] == ["sakeystate.prom"]
