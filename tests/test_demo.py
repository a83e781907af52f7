"""The README's first command: the demo runs to the end and cleans up, also on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from support import REPO


def _demo() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-u", str(REPO / "examples" / "demo.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_demo_ends_with_the_old_token_verifying_and_removes_its_files() -> None:
    proc = _demo()
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    old_kid = re.search(r"signed a token for calico-node with kid (\S+)", out)
    assert old_kid is not None
    for host in ("ctrl1001", "ctrl1002", "ctrl1003"):
        assert re.search(rf"{host}\S*: token with kid {re.escape(old_kid.group(1))} verifies", out)
    new_kid = re.search(r"now signs with kid (\S+)", out)
    assert new_kid is not None and new_kid.group(1) != old_kid.group(1)
    for host in ("ctrl1001", "ctrl1002", "ctrl1003"):
        assert re.search(
            rf"{host}\S*: token with new kid {re.escape(new_kid.group(1))} verifies", out
        )
    # The gate: wait timed out while the peers lagged, then returned once they converged.
    assert "timed out waiting until every fleet host verifies " + new_kid.group(1) in out
    assert f"every fleet host verifies {new_kid.group(1)} (3 host(s))" in out
    assert "3 item(s) need attention" in out and "trusted: []" in out
    assert "Demo complete: no token stopped validating." in out
    root = re.search(r"data in (\S+)", out)
    assert root is not None and not Path(root.group(1)).exists()


def test_demo_interrupted_stops_etcd_and_removes_its_files() -> None:
    proc = _demo()
    assert proc.stdout is not None
    root = None
    for line in proc.stdout:
        match = re.search(r"data in (\S+)", line)
        if match:
            root = Path(match.group(1))
            break
    assert root is not None and root.exists()
    etcd_pids = _pids_mentioning(str(root))
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert not root.exists()
    assert etcd_pids and not any(_pid_alive(pid) for pid in etcd_pids)
