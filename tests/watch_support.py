"""Helpers for the watch and reload-lock tests: watcher processes and a reload probe.

The probe is the ``bundle.reload`` command: it appends ``start <name> <time> <pid>``
and ``end <name> <time>`` lines to a log (one write each, O_APPEND), sleeping in
between, so a test can tell from the log alone whether two reloads overlapped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SAKEYSTATE = str(Path(sys.executable).parent / "sakeystate")
_PROBE = str(Path(__file__).with_name("reload_probe.py"))


def probe(log: Path, name: str, pause: float = 0.0) -> list[str]:
    """A ``bundle.reload`` argv that logs its start and end around ``pause`` seconds."""
    return [sys.executable, _PROBE, str(log), name, str(pause)]


@dataclass(frozen=True)
class Reload:
    name: str
    start: float
    end: float | None
    pid: int


def reloads(log: Path) -> list[Reload]:
    """The reloads in the log, in start order (``end`` None: killed or still running)."""
    if not log.exists():
        return []
    started: dict[str, list[Reload]] = {}
    for line in log.read_text().splitlines():
        kind, name, stamp, *rest = line.split()
        if kind == "start":
            started.setdefault(name, []).append(Reload(name, float(stamp), None, int(rest[0])))
        else:
            runs = started[name]
            last = runs[-1]
            runs[-1] = Reload(name, last.start, float(stamp), last.pid)
    return sorted((r for runs in started.values() for r in runs), key=lambda r: r.start)


def overlapping(runs: list[Reload]) -> list[tuple[Reload, Reload]]:
    """Pairs of reloads that ran at the same time (a killed one runs until its pid died,
    which the tests make sure happened before the next could start)."""
    pairs = []
    for before, after in itertools.pairwise(runs):
        if before.end is not None and after.start < before.end:
            pairs.append((before, after))
    return pairs


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


class WatchProcess:
    """``sakeystate watch`` as a separate process, its stderr in a file."""

    def __init__(self, state: Path, host: str, log: Path, *args: str) -> None:
        self.log = log
        self._stderr = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [SAKEYSTATE, "watch", "--state", str(state), "--host", host, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self._stderr.close()
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
