"""A stand-in for systemd running one kube-apiserver unit: ``supervisor.py UNIT.json``.

The end-to-end harness starts one supervisor per control plane; the supervisor owns
that control plane's kube-apiserver process, as systemd owns a ``Type=notify`` unit:

- ``start``: spawn the process with ``NOTIFY_SOCKET`` set and wait for its
  ``READY=1`` (kube-apiserver sends it once it serves and has started its
  post-start hooks, which is before ``/readyz`` passes); a process that exits
  first, or sends nothing within ``start_timeout``, is a failed start;
- ``stop``: SIGTERM, then SIGKILL after ``stop_timeout``;
- ``restart``: stop (if running), then start: what ``systemctl restart`` does;
- ``status``: ``running <pid>`` or ``stopped``.

Each start reads the command line again from ``UNIT.json`` (systemd's
``daemon-reload`` then ``start``): the harness switches an apiserver between file
mode and signer mode by rewriting its unit and restarting it.

Commands arrive one line at a time on a unix stream socket (``control``) and are
run one after another, like jobs on one unit; the reply (``ok ...`` or
``failed ...``) is sent when the job finished. A process that exits on its own
is not restarted (``Restart=no``): the harness sees it as ``exited``.

Every step is one JSON line appended to ``events`` (``stopping``, ``stopped``,
``spawned``, ``ready``, ``failed``, ``exited``, each with the wall-clock ``t``),
from which the harness counts restarts and proves that no two overlap. With
``readyz`` set, a thread also polls the new process's ``/readyz`` every 50 ms from
its ``READY=1`` on and logs ``readyz`` when it first passes (for measurements only:
the job does not wait for it, as systemd would not). The supervisor itself stops
its process and exits on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


def note(events: str, event: str, **fields: Any) -> None:
    """One event line, appended with a single write (several writers share the file)."""
    line = json.dumps({"t": time.time(), "event": event, **fields}) + "\n"
    fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Unit:
    def __init__(self, config: dict[str, Any], path: Path | None = None) -> None:
        self.path = path
        self.argv: list[str] = config["argv"]
        self.log: str = config["log"]
        self.events: str = config["events"]
        self.start_timeout = float(config.get("start_timeout", 90))
        self.stop_timeout = float(config.get("stop_timeout", 90))
        self.proc: subprocess.Popen[bytes] | None = None
        self.readyz: dict[str, str] | None = config.get("readyz")
        self.notify_path = config["notify"]
        self.notify = _bind(socket.SOCK_DGRAM, self.notify_path)

    # --- the jobs ---------------------------------------------------------------------------

    def start(self) -> str:
        if self.running():
            return f"ok already running {self.proc.pid}"  # type: ignore[union-attr]
        self._drain_notify()
        if self.path is not None:  # daemon-reload: the unit as it is now
            self.argv = json.loads(self.path.read_text())["argv"]
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path)
        with open(self.log, "ab") as log:
            log.write(f"--- supervisor: start at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        note(self.events, "spawned", pid=self.proc.pid)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.notify], [], [], 0.05)
            if readable and b"READY=1" in self.notify.recv(4096):
                note(self.events, "ready", pid=self.proc.pid)
                if self.readyz is not None:
                    poll = threading.Thread(target=self._poll_readyz, args=(self.proc,))
                    poll.daemon = True
                    poll.start()
                return f"ok {self.proc.pid}"
            code = self.proc.poll()
            if code is not None:
                note(self.events, "failed", pid=self.proc.pid, rc=code, why="exited before READY=1")
                self.proc = None
                return f"failed: exited {code} before READY=1 (see {self.log})"
        note(self.events, "failed", pid=self.proc.pid, why="no READY=1 within start_timeout")
        self.stop()
        return f"failed: no READY=1 within {self.start_timeout:g}s"

    def stop(self) -> str:
        if self.proc is None:
            return "ok already stopped"
        pid = self.proc.pid
        if self.proc.poll() is None:
            note(self.events, "stopping", pid=pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        note(self.events, "stopped", pid=pid, rc=self.proc.returncode)
        self.proc = None
        return "ok stopped"

    def restart(self) -> str:
        self.stop()
        return self.start()

    def status(self) -> str:
        return f"running {self.proc.pid}" if self.running() else "stopped"  # type: ignore[union-attr]

    # --- helpers ------------------------------------------------------------------------------

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reap(self) -> None:
        """A process that exited on its own: recorded once, not restarted."""
        if self.proc is not None and self.proc.poll() is not None:
            note(self.events, "exited", pid=self.proc.pid, rc=self.proc.returncode)
            self.proc = None

    def _poll_readyz(self, proc: subprocess.Popen[bytes]) -> None:
        assert self.readyz is not None
        context = ssl.create_default_context(cafile=self.readyz["ca"])
        context.check_hostname = False
        deadline = time.monotonic() + self.start_timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    self.readyz["url"] + "/readyz", context=context, timeout=2
                ) as answer:
                    if answer.status == 200:
                        note(self.events, "readyz", pid=proc.pid)
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    def _drain_notify(self) -> None:
        while select.select([self.notify], [], [], 0)[0]:
            self.notify.recv(4096)


def _bind(kind: int, path: str) -> socket.socket:
    Path(path).unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(path)
    return sock


def serve(unit: Unit, control_path: str) -> None:
    control = _bind(socket.SOCK_STREAM, control_path)
    control.listen(8)
    stopping = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    jobs = {"start": unit.start, "stop": unit.stop, "restart": unit.restart, "status": unit.status}
    while not stopping:
        try:
            readable, _, _ = select.select([control], [], [], 0.2)
        except InterruptedError:
            continue
        unit.reap()
        if not readable:
            continue
        conn, _ = control.accept()
        with conn:
            conn.settimeout(5)
            try:
                command = conn.makefile("r").readline().strip()
            except OSError:
                continue
            job = jobs.get(command)
            reply = job() if job is not None else f"failed: unknown command {command!r}"
            # A client that gave up: the job ran all the same, as with systemctl.
            with contextlib.suppress(OSError):
                conn.sendall((reply + "\n").encode())
    unit.stop()


def main(argv: list[str]) -> int:
    path = Path(argv[1])
    config = json.loads(path.read_text())
    serve(Unit(config, path), config["control"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
