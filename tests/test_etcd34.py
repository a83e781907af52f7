"""Debian's etcd-server (3.4) must work too: the converge scenarios, re-run against it.

CI installs it (.ci/run); there, a missing /usr/bin/etcd fails this test rather than
letting it pass silently. Elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO

DEBIAN_ETCD = Path("/usr/bin/etcd")


def test_converge_scenarios_pass_against_debian_etcd_3_4() -> None:
    if not DEBIAN_ETCD.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must provide Debian's etcd-server (/usr/bin/etcd); .ci/run installs it")
        pytest.skip("Debian's etcd-server is not installed (apt-get install etcd-server)")
    version = subprocess.run(
        [str(DEBIAN_ETCD), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert "etcd Version: 3.4" in version, version
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "test_converge.py"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
        env={**os.environ, "SAKEYSTATE_ETCD": str(DEBIAN_ETCD)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
