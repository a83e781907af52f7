"""Helpers for the watch and reload-lock tests: watcher processes and a reload probe.

The probe is the ``bundle.reload`` command: it appends ``start <name> <time> <pid>``
and ``end <name> <time>`` lines to a log (one write each, O_APPEND), sleeping in
between, so a test can tell from the log alone whether two reloads overlapped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sakeystate.fleet import WATCH_KEY

from support import bundle_file_kids, private_key, state_data, write_state

if TYPE_CHECKING:
    from conftest import Env

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
    """``sakeystate watch`` (or another long-running ``COMMAND``) as a separate process,
    its stderr in a file."""

    COMMAND = "watch"

    def __init__(self, state: Path, host: str, log: Path, *args: str) -> None:
        self.log = log
        self._stderr = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [SAKEYSTATE, self.COMMAND, "--state", str(state), "--host", host, *args],
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


# --- restart-lifecycle helpers: detached restarts, several hosts on one etcd --------------
#
# A restart command is the probe started through ``setsid --wait``, as ``systemctl
# restart`` starts a systemd job: killing the command (its process group) does not stop
# the restart, which goes on in a session of its own; the probe's start/end lines show
# whether two restarts ever overlapped, and whether one was cut short.

SETSID = shutil.which("setsid") or "/usr/bin/setsid"


def detached(log: Path, name: str, pause: float = 0.0) -> list[str]:
    """A restart that runs in a session of its own, as a systemd job does."""
    return [SETSID, "--wait", *probe(log, name, pause)]


def failing_check() -> list[str]:
    return [sys.executable, "-c", "raise SystemExit(1)"]


def lock_key(env: Env) -> str:
    return env.prefix.split("/kube-apiserver-sa-certs/")[0] + "/reload-lock"


def status_prefix(env: Env) -> str:
    return env.prefix.rstrip("/").rsplit("/", 1)[0] + "/kube-apiserver-sa-status/"


@dataclass
class Host:
    """One control plane of a fleet sharing the test's etcd: its own bundle and state."""

    name: str
    state: Path
    bundle: Path

    @property
    def marker(self) -> Path:
        return Path(str(self.bundle) + ".reload-pending")

    def kids(self) -> set[str]:
        return bundle_file_kids(self.bundle)


def fleet_hosts(count: int, site: str = "example.org") -> list[str]:
    return [f"ctrl{1001 + i}.{site}" for i in range(count)]


def make_fleet(
    env: Env,
    names: list[str],
    log: Path,
    pause: float = 0.3,
    index: int = 200,
    **bundle: Any,
) -> tuple[list[Host], list[str]]:
    """Hosts with published, pinned keys; each restarts through a detached probe."""
    kids = [env.publish(private_key("ec256", index + i), h) for i, h in enumerate(names)]
    hosts = []
    for name in names:
        path = env.tmp / f"{name}.pem"
        config: dict[str, Any] = {"path": str(path), "reload": detached(log, name, pause)}
        config.update(bundle.get(name, bundle.get("all", {})))
        config = {k: v for k, v in config.items() if v is not None}  # None: not configured
        data = state_data(
            env.etcd.url,
            env.prefix,
            path,
            list(zip(kids, names, strict=True)),
            etcd={"reload_lock": lock_key(env)},
            fleet=names,
            bundle=config,
        )
        hosts.append(Host(name, write_state(env.tmp / f"{name}.yaml", data), path))
    return hosts, kids


def record(env: Env, host: str) -> dict[str, Any] | None:
    value = env.etcd.get(status_prefix(env) + host)
    return None if value is None else dict(json.loads(value))


def live(env: Env, host: str) -> bool:
    return bool(env.etcd.dump(f"{status_prefix(env)}{host}/{WATCH_KEY}"))


def runs_of(log: Path, name: str) -> list[Reload]:
    return [r for r in reloads(log) if r.name == name]
