"""The Puppet example (exec guarded by `onlyif => sakeystate check`) under real `puppet apply`.

Debian's puppet runs with its conf/var/code dirs under tmp_path, so nothing on
the machine is touched. Without puppet the tests fail when $CI is set (CI must
run them) and skip with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conftest import Env
from support import REPO, free_port, private_key, public_pem

MODULEPATH = REPO / "examples" / "puppet"
SAKEYSTATE = Path(sys.executable).parent / "sakeystate"
NOW = datetime.now(UTC)
# Puppet's check/converge evaluate policy at the real current time, so the certificates
# are valid around now (no assertion depends on how long anything takes).
VALID_NOW = {"not_before": NOW - timedelta(days=1), "not_after": NOW + timedelta(days=365)}


def puppet_binary() -> str:
    found = shutil.which("puppet")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("puppet is not installed; CI must run the Puppet tests (.ci/run installs it)")
    pytest.skip("puppet is not installed (apt-get install puppet); CI installs it and runs these")


def puppet_apply(tmp: Path, state_file: Path) -> subprocess.CompletedProcess[str]:
    """`puppet apply --detailed-exitcodes` of the example class (0 same, 2 changed, 4/6 failed)."""
    base = tmp / "puppet"
    manifest = (
        f"class {{ 'sakeystate': state_file => '{state_file}', sakeystate => '{SAKEYSTATE}' }}"
    )
    dirs = {name: base / name for name in ("confdir", "vardir", "codedir", "logdir", "rundir")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [
            puppet_binary(),
            "apply",
            "--detailed-exitcodes",
            "--color=false",
            *(f"--{name}={path}" for name, path in dirs.items()),
            f"--hiera_config={base / 'hiera.yaml'}",
            f"--modulepath={MODULEPATH}",
            "-e",
            manifest,
        ],
        cwd=tmp,
        env={**os.environ, "HOME": str(base)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_first_apply_converges_second_apply_changes_nothing(env: Env) -> None:
    a, b = private_key("ec521", 20), private_key("rsa2048", 21)
    kid_a = env.publish(a, "ctrl1001.example.org", **VALID_NOW)
    kid_b = env.publish(b, "ctrl1002.example.org", **VALID_NOW)
    state = env.state([(kid_a, "ctrl1001.example.org"), (kid_b, "ctrl1002.example.org")])

    first = puppet_apply(env.tmp, state)
    assert first.returncode == 2, first.stdout + first.stderr
    assert "Exec[sakeystate converge]/returns: executed successfully" in first.stdout
    written = env.bundle_bytes()
    assert written is not None
    assert public_pem(a) in written and public_pem(b) in written
    etcd_after_first = env.dump()

    second = puppet_apply(env.tmp, state)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Exec[sakeystate converge]" not in second.stdout
    assert env.bundle_bytes() == written
    assert env.dump() == etcd_after_first


def test_apply_fails_loudly_when_etcd_is_unreachable(env: Env) -> None:
    key = private_key("ec256", 22)
    kid = env.publish(key, "ctrl1001.example.org", **VALID_NOW)
    state = env.state(
        [(kid, "ctrl1001.example.org")],
        etcd={"endpoints": [f"http://127.0.0.1:{free_port()}"], "timeout": "1s"},
    )

    run = puppet_apply(env.tmp, state)
    assert run.returncode in (4, 6), run.stdout + run.stderr
    # check failed (exit 0), so the converge ran and failed with the tool's own message.
    assert "Exec[sakeystate converge]/returns: change from 'notrun' to ['0'] failed" in run.stderr
    assert "sakeystate: error: reading " in run.stdout
    assert "from etcd failed within the 1s timeout" in run.stdout
    assert env.bundle_bytes() is None


def test_missing_puppet_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the Puppet tests"):
        puppet_binary()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="puppet is not installed"):
        puppet_binary()
