"""TLS with client-certificate auth, and username + password_file auth, against real etcd.

The certificates are made here with ``cryptography``; etcd runs with
``--client-cert-auth`` so a client without a certificate from the right CA is
turned away by the server itself. The password test drives the real console
script and looks at what a root shell on the host could see: the process's
argv and environment (read by the reload command from /proc), its stdout and
stderr with gRPC debug logging on, every report format and the snapshot.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etcd_server import EtcdServer, etcdctl_binary
from support import T0, entry_value, kid, make_cert, private_key, run_cli, state_data, write_state

PREFIX = "/tls/kube-apiserver-sa-certs/"
PASSWORD = "s3cr3t-Pa55w0rd-that-must-never-leak"
AUTH_ROOT = "/auth/"


# --- a throwaway PKI ----------------------------------------------------------------------


@dataclass
class Pki:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _write_key(path: Path, key: Any) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _ca(name: str) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = T0.replace(year=2020)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=365 * 30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: Any, ca_cert: x509.Certificate, name: str, usage: x509.ObjectIdentifier
) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = T0.replace(year=2020)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=365 * 30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    ca_key, ca_cert = _ca("sakeystate test etcd CA")
    other_key, other_cert = _ca("some other CA")
    server_key, server_cert = _leaf(ca_key, ca_cert, "etcd", ExtendedKeyUsageOID.SERVER_AUTH)
    client_key, client_cert = _leaf(ca_key, ca_cert, "sakeystate", ExtendedKeyUsageOID.CLIENT_AUTH)
    o_client_key, o_client_cert = _leaf(
        other_key, other_cert, "sakeystate", ExtendedKeyUsageOID.CLIENT_AUTH
    )
    pki = Pki(
        directory,
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        other_ca=directory / "other-ca.pem",
        other_client_cert=directory / "other-client.pem",
        other_client_key=directory / "other-client-key.pem",
    )
    pem = serialization.Encoding.PEM
    pki.ca.write_bytes(ca_cert.public_bytes(pem))
    pki.other_ca.write_bytes(other_cert.public_bytes(pem))
    pki.server_cert.write_bytes(server_cert.public_bytes(pem))
    pki.client_cert.write_bytes(client_cert.public_bytes(pem))
    pki.other_client_cert.write_bytes(o_client_cert.public_bytes(pem))
    _write_key(pki.server_key, server_key)
    _write_key(pki.client_key, client_key)
    _write_key(pki.other_client_key, o_client_key)
    return pki


def _wait_for(server: EtcdServer, *etcdctl_args: str) -> None:
    """Wait until etcdctl (with the given credentials) sees a healthy member."""
    deadline = time.monotonic() + 20
    while True:
        result = subprocess.run(
            [etcdctl_binary(), "--endpoints", server.url, *etcdctl_args, "endpoint", "health"],
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"etcd at {server.url} not healthy: {result.stderr!r}")
        time.sleep(0.1)


@dataclass
class TlsEtcd:
    server: EtcdServer
    pki: Pki

    def tls_args(self) -> list[str]:
        return [
            f"--cacert={self.pki.ca}",
            f"--cert={self.pki.client_cert}",
            f"--key={self.pki.client_key}",
        ]

    def put(self, key: str, value: bytes) -> None:
        self.server.etcdctl(*self.tls_args(), "put", key, stdin=value)

    def keys(self, prefix: str) -> list[str]:
        out = self.server.etcdctl(*self.tls_args(), "get", "--prefix", "--keys-only", prefix)
        return [line for line in out.decode().splitlines() if line]


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[TlsEtcd]:
    directory = Path(tempfile.mkdtemp(prefix="sakeystate-tls-"))
    pki = make_pki(directory)
    server = EtcdServer(
        str(directory),
        name="tls",
        scheme="https",
        extra_args=[
            f"--cert-file={pki.server_cert}",
            f"--key-file={pki.server_key}",
            f"--trusted-ca-file={pki.ca}",
            "--client-cert-auth",
        ],
    )
    server.start()
    try:
        etcd = TlsEtcd(server, pki)
        _wait_for(server, *etcd.tls_args())
        yield etcd
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _tls_state(
    tmp_path: Path, url: str, tls: dict[str, str], trusted: list[Any], timeout: str = "1s"
) -> Path:
    data = state_data(
        url,
        PREFIX,
        tmp_path / "sa-certs.pem",
        trusted,
        etcd={"tls": tls, "timeout": timeout},
    )
    return write_state(tmp_path / "state.yaml", data)


def test_converge_over_tls_with_client_certificate(tls_etcd: TlsEtcd, tmp_path: Path) -> None:
    key = private_key("ec256", 40)
    tls_etcd.put(PREFIX + kid(key), entry_value(key, "ctrl1001.example.org"))
    pki = tls_etcd.pki
    state = _tls_state(
        tmp_path,
        tls_etcd.server.url,
        {
            "ca_file": str(pki.ca),
            "cert_file": str(pki.client_cert),
            "key_file": str(pki.client_key),
        },
        [(kid(key), "ctrl1001.example.org")],
    )
    result = run_cli("converge", "--state", str(state), "--at", "2026-11-22T10:00:00Z")
    assert result.code == 0, result.err
    assert f"# {kid(key)} ctrl1001.example.org" in (tmp_path / "sa-certs.pem").read_text()
    # publish over TLS too: the key lands under its kid.
    cert = tmp_path / "cert.pem"
    other = private_key("ec384", 41)
    cert.write_bytes(make_cert(other, "ctrl1002.example.org"))
    result = run_cli(
        "publish", "--state", str(state), "--cert", str(cert), "--host", "ctrl1002.example.org"
    )
    assert result.code == 0, result.err
    assert f"{PREFIX}ctrl1002.example.org/{kid(other)}" in tls_etcd.keys(PREFIX)


@pytest.mark.parametrize(
    "case",
    ["wrong-ca", "no-client-cert", "client-cert-from-other-ca", "missing-ca-file"],
)
def test_bad_tls_fails_with_an_error_naming_the_endpoint(
    tls_etcd: TlsEtcd, tmp_path: Path, case: str
) -> None:
    pki = tls_etcd.pki
    key = private_key("ec256", 42)
    tls = {
        "wrong-ca": {
            "ca_file": str(pki.other_ca),
            "cert_file": str(pki.client_cert),
            "key_file": str(pki.client_key),
        },
        "no-client-cert": {"ca_file": str(pki.ca)},
        "client-cert-from-other-ca": {
            "ca_file": str(pki.ca),
            "cert_file": str(pki.other_client_cert),
            "key_file": str(pki.other_client_key),
        },
        "missing-ca-file": {
            "ca_file": str(tmp_path / "nope.pem"),
            "cert_file": str(pki.client_cert),
            "key_file": str(pki.client_key),
        },
    }[case]
    # A deadline long enough for a loaded machine to finish the handshake it refuses.
    state = _tls_state(
        tmp_path, tls_etcd.server.url, tls, [(kid(key), "ctrl1001.example.org")], "3s"
    )
    for command in ("converge", "plan", "inspect"):
        result = run_cli(command, "--state", str(state))
        assert result.code == 1, (command, result)
        assert tls_etcd.server.url in result.err, result.err
        assert result.err.startswith("sakeystate: error: "), result.err
        assert "Traceback" not in result.err
        if case == "missing-ca-file":
            assert "nope.pem" in result.err
        else:
            assert "handshake failed" in result.err.lower(), result.err
    assert not (tmp_path / "sa-certs.pem").exists()
    # check fails open for Puppet (exit 0) but says why, naming the endpoint.
    result = run_cli("check", "--state", str(state))
    assert result.code == 0
    assert tls_etcd.server.url in result.err


# --- username + password_file ------------------------------------------------------------


@dataclass
class AuthEtcd:
    server: EtcdServer
    prefix: str

    def ctl(self, *args: str, stdin: bytes | None = None) -> bytes:
        return self.server.etcdctl(f"--user=root:{PASSWORD}-root", *args, stdin=stdin)


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[AuthEtcd]:
    directory = tempfile.mkdtemp(prefix="sakeystate-auth-")
    server = EtcdServer(directory, name="auth").start()
    prefix = AUTH_ROOT + "kube-apiserver-sa-certs/"
    try:
        # Setting up the users is the test's business; sakeystate itself only ever
        # reads the password from its file.
        server.etcdctl("user", "add", f"root:{PASSWORD}-root")
        server.etcdctl("user", "grant-role", "root", "root")
        server.etcdctl("user", "add", f"sakeystate:{PASSWORD}")
        server.etcdctl("role", "add", "sakeystate")
        # The keys, the status records and the reload lock: everything under /auth/.
        server.etcdctl(
            "role", "grant-permission", "--prefix=true", "sakeystate", "readwrite", AUTH_ROOT
        )
        # The reload lock (etcd.reload_lock, default key): a lease-backed key of its own.
        server.etcdctl(
            "role", "grant-permission", "sakeystate", "readwrite", "/kube-apiserver-sa-reload-lock"
        )
        server.etcdctl("user", "grant-role", "sakeystate", "sakeystate")
        server.etcdctl("auth", "enable")
        yield AuthEtcd(server, prefix)
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _auth_state(tmp_path: Path, etcd: AuthEtcd, password_file: Path, trusted: list[Any]) -> Path:
    data = state_data(
        etcd.server.url,
        etcd.prefix,
        tmp_path / "sa-certs.pem",
        trusted,
        etcd={"auth": {"username": "sakeystate", "password_file": str(password_file)}},
    )
    return write_state(tmp_path / "state.yaml", data)


def _no_password(*texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        assert PASSWORD.encode() not in data


def test_password_file_auth_converges_and_never_shows_the_password(
    auth_etcd: AuthEtcd, tmp_path: Path
) -> None:
    key = private_key("ec521", 43)
    auth_etcd.ctl("put", auth_etcd.prefix + kid(key), stdin=entry_value(key, "ctrl1.example.org"))
    password_file = tmp_path / "etcd-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    seen = tmp_path / "seen-by-reload"
    # The reload command runs as a child of sakeystate and records what anyone on the
    # host could read about its parent: argv and environment.
    spy = (
        "import os,sys;p=os.getppid();"
        "d=open(f'/proc/{p}/cmdline','rb').read()+b'\\n'+open(f'/proc/{p}/environ','rb').read();"
        "d+=b'\\n'+open('/proc/self/cmdline','rb').read()+b'\\n'+open('/proc/self/environ','rb').read();"
        f"open({str(seen)!r},'wb').write(d)"
    )
    data = state_data(
        auth_etcd.server.url,
        auth_etcd.prefix,
        tmp_path / "sa-certs.pem",
        [(kid(key), "ctrl1.example.org")],
        host="ctrl1.example.org",
        etcd={
            "auth": {"username": "sakeystate", "password_file": str(password_file)},
            "status_prefix": AUTH_ROOT + "kube-apiserver-sa-status/",
            "reload_lock": AUTH_ROOT + "kube-apiserver-sa-reload-lock",
        },
        bundle={"reload": [sys.executable, "-c", spy]},
    )
    state = write_state(tmp_path / "state.yaml", data)
    _no_password(state.read_text())

    exe = str(Path(sys.executable).parent / "sakeystate")
    environment = {**os.environ, "GRPC_VERBOSITY": "DEBUG", "GRPC_TRACE": "api,call_error"}
    outputs: list[bytes] = []
    for argv in (
        [exe, "converge", "--state", str(state)],
        [exe, "plan", "--state", str(state), "--format", "json"],
        [exe, "plan", "--state", str(state), "--format", "markdown"],
        [exe, "inspect", "--state", str(state), "--format", "json"],
        [exe, "check", "--state", str(state)],
        [exe, "snapshot", "--state", str(state)],
    ):
        _no_password(*argv)
        proc = subprocess.run(argv, capture_output=True, env=environment, timeout=60, check=False)
        assert b"Traceback" not in proc.stderr
        outputs += [proc.stdout, proc.stderr]
        if argv[1] == "converge":
            assert proc.returncode == 0, proc.stderr.decode()
    _no_password(*outputs)
    assert b"sakeystate" in seen.read_bytes()  # the spy did read the parent's argv
    _no_password(seen.read_bytes())
    assert f"# {kid(key)} ctrl1.example.org" in (tmp_path / "sa-certs.pem").read_text()
    snapshot = json.loads(outputs[10])
    # ctrl1's own entry, moved to its path by its own converge (R12).
    assert [e["key"] for e in snapshot["entries"]] == [
        f"{auth_etcd.prefix}ctrl1.example.org/{kid(key)}"
    ]
    # The status record was written with the same credentials.
    status = auth_etcd.ctl("get", AUTH_ROOT + "kube-apiserver-sa-status/ctrl1.example.org")
    assert f'"kids": ["{kid(key)}"]'.encode() in status
    for path in tmp_path.iterdir():
        if path != password_file and path.is_file():
            _no_password(path.read_bytes())


def test_wrong_password_is_refused_without_echoing_it(
    auth_etcd: AuthEtcd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    key = private_key("ec256", 44)
    wrong = tmp_path / "wrong-password"
    wrong.write_text(PASSWORD + "-but-wrong\n")
    state = _auth_state(tmp_path, auth_etcd, wrong, [(kid(key), "ctrl1.example.org")])
    for command in ("converge", "plan", "snapshot"):
        result = run_cli(command, "--state", str(state))
        assert result.code == 1, result
        assert auth_etcd.server.url in result.err
        assert "authentication failed" in result.err
        assert "Traceback" not in result.err
        _no_password(result.out, result.err)
        assert "-but-wrong" not in result.out + result.err
    assert "-but-wrong" not in caplog.text
    _no_password(caplog.text)
    assert not (tmp_path / "sa-certs.pem").exists()


def test_outside_the_granted_prefix_is_a_clean_permission_error(
    auth_etcd: AuthEtcd, tmp_path: Path
) -> None:
    password_file = tmp_path / "etcd-password"
    password_file.write_text(PASSWORD)
    key = private_key("ec256", 45)
    data = state_data(
        auth_etcd.server.url,
        "/elsewhere/",
        tmp_path / "sa-certs.pem",
        [kid(key)],
        etcd={"auth": {"username": "sakeystate", "password_file": str(password_file)}},
    )
    state = write_state(tmp_path / "state.yaml", data)
    result = run_cli("converge", "--state", str(state))
    assert result.code == 1
    assert auth_etcd.server.url in result.err
    assert "PERMISSION_DENIED" in result.err
    _no_password(result.out, result.err)


@pytest.mark.parametrize("problem", ["missing", "empty", "not-utf8"])
def test_unusable_password_file_is_a_clear_error(
    auth_etcd: AuthEtcd, tmp_path: Path, problem: str
) -> None:
    password_file = tmp_path / "etcd-password"
    if problem == "empty":
        password_file.write_text("\n")
    elif problem == "not-utf8":
        password_file.write_bytes(b"\xff\xfe" + PASSWORD.encode())
    key = private_key("ec256", 46)
    state = _auth_state(tmp_path, auth_etcd, password_file, [kid(key)])
    result = run_cli("converge", "--state", str(state))
    assert result.code == 1
    assert f"password_file {password_file}" in result.err
    assert {"missing": "No such file", "empty": "is empty", "not-utf8": "not UTF-8"}[
        problem
    ] in result.err
    _no_password(result.out, result.err)
