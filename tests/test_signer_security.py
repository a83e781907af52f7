"""The signer's security: the socket is the only way in, the private key never leaves.

- a local user who is neither root nor ``signer.group`` cannot connect (a real
  unprivileged user, ``nobody``, through setpriv), and one in the group can;
- the socket is refused in a directory another user could write to (or under
  one), and what is at its path is replaced only when it is a stale socket of
  root's, never through a symlink, never while another signer listens;
- ``signer.private_key_file`` is refused unless it is a root-owned regular file
  nobody else may read, holding a key kube-apiserver can sign with;
- the private key appears in no output: logs (text and JSON), metrics (textfile
  and HTTP), the bundle, the JWKS, etcd (status record included), snapshot,
  inspect, status, nor any error; core dumps are off;
- a hostile etcd cannot change what FetchKeys serves except as the bundle rules
  allow: over the planner's generated clusters (poisoned, garbage and deleted
  entries), the served set is exactly the plan's bundle plus the host's own key,
  never empty, and keeps every key that can still verify an unexpired token.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from test_plan_properties import SETTINGS, _protected, clusters

from sakeystate.errors import SakeystateError
from sakeystate.metrics import SignerStats
from sakeystate.signer import (
    KeySet,
    Signer,
    SigningKey,
    listen,
    load_signing_key,
    plan_keys,
    served_keys,
)
from sakeystate.state import load_state

from conftest import Env
from signer_support import (
    HOST,
    PEER,
    Client,
    SignerProcess,
    claims,
    key_pem,
    signer_host,
    socket_dir,
    wait_for_kids,
    wait_for_socket,
)
from support import free_port, kid, private_key, run_cli
from watch_support import wait_for

NOBODY, NOGROUP = 65534, 65534
DAEMON_GID = 1
_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    sys.exit(13)
print("connected")
"""
_FETCH = """
import sys, grpc
from sakeystate import externaljwt
calls = externaljwt.client(grpc.insecure_channel("unix:" + sys.argv[1]))
answer = calls["FetchKeys"](externaljwt.FetchKeysRequest(), timeout=10)
print(",".join(k.key_id for k in answer.keys))
"""


def _as(uid: int, gid: int, program: str, *args: str) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if os.environ.get("CI"):
            pytest.fail("setpriv (util-linux) is missing; CI must run the permission tests")
        pytest.skip("setpriv (util-linux) is missing")
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as nobody")
    identity = [f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    return subprocess.run(
        [setpriv, *identity, sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
    )


@pytest.fixture
def host_files(tmp_path: Path) -> Iterator[Any]:
    with socket_dir() as sockets:
        yield signer_host(tmp_path, sockets, private_key("ec256", 50))


def _serving(env: Env, me: Any, **section: Any) -> tuple[Signer, Any]:
    path = env.state([], own_cert=str(me.cert_file), signer=me.signer_section(**section))
    desired = load_state(path, HOST)
    assert desired.signer is not None
    key = load_signing_key(str(me.key_file))
    signer = Signer(desired, desired.signer, key, SignerStats(), lambda: datetime.now(UTC))
    signer.serve(KeySet(served_keys([], key), datetime.now(UTC), "test"))
    return signer, listen(desired.signer, signer.handlers())


# --- who can connect --------------------------------------------------------------------------


def test_a_user_who_is_not_root_cannot_connect(env: Env, host_files: Any) -> None:
    _signer, listener = _serving(env, host_files)
    try:
        st = os.stat(host_files.socket)
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0)
        denied = _as(NOBODY, NOGROUP, _CONNECT, str(host_files.socket))
        assert denied.returncode == 13, denied
        assert Client(host_files.socket).kids() == [host_files.kid]  # root can
    finally:
        listener.close()


def test_the_configured_group_can_connect_and_no_other(env: Env, host_files: Any) -> None:
    _signer, listener = _serving(env, host_files, group="nogroup")
    try:
        st = os.stat(host_files.socket)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, NOGROUP)
        member = _as(NOBODY, NOGROUP, _FETCH, str(host_files.socket))
        assert member.returncode == 0, member
        assert member.stdout.strip() == host_files.kid
        other = _as(NOBODY, DAEMON_GID, _CONNECT, str(host_files.socket))
        assert other.returncode == 13, other
    finally:
        listener.close()


def test_an_unknown_group_is_refused(env: Env, host_files: Any) -> None:
    with pytest.raises(SakeystateError, match=r"signer\.group no-such-group: no such group"):
        _serving(env, host_files, group="no-such-group")
    assert not host_files.socket.exists()


# --- where the socket may be -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "owner", "why"),
    [
        (0o777, 0, "writable by group or others"),
        (0o775, 0, "writable by group or others"),
        (0o755, NOBODY, "owned by uid 65534"),
    ],
)
def test_a_socket_directory_another_user_controls_is_refused(
    env: Env, host_files: Any, mode: int, owner: int, why: str
) -> None:
    directory = host_files.socket.parent
    directory.chmod(mode)
    os.chown(directory, owner, 0)
    try:
        with pytest.raises(SakeystateError, match=why):
            _serving(env, host_files)
    finally:
        os.chown(directory, 0, 0)
    assert not host_files.socket.exists()


def test_a_socket_under_a_directory_another_user_can_write_is_refused(
    env: Env, host_files: Any
) -> None:
    parent = host_files.socket.parent
    inner = parent / "inner"
    inner.mkdir(mode=0o755)
    parent.chmod(0o777)  # anyone could rename inner/ away and put their own in its place
    host_files.socket = inner / "signer.sock"
    try:
        with pytest.raises(SakeystateError, match=f"{parent} is writable by group or others"):
            _serving(env, host_files)
    finally:
        parent.chmod(0o755)
        inner.rmdir()


def test_a_sticky_root_directory_is_accepted(env: Env, host_files: Any) -> None:
    host_files.socket.parent.chmod(0o1777)
    _signer, listener = _serving(env, host_files)
    listener.close()


def test_the_command_refuses_an_unsafe_socket_directory_naming_it(
    env: Env, host_files: Any
) -> None:
    env.state([], own_cert=str(host_files.cert_file), signer=host_files.signer_section())
    host_files.socket.parent.chmod(0o777)
    result = run_cli("signer", "--state", str(env.state_path), "--host", HOST)
    assert result.code == 1
    assert f"signer.socket {host_files.socket}" in result.err
    assert "refusing to serve there" in result.err
    assert "Traceback" not in result.err


def test_a_stale_socket_is_replaced(env: Env, host_files: Any) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(host_files.socket))
    stale.close()  # the file stays, nobody listens
    _signer, listener = _serving(env, host_files)
    try:
        assert Client(host_files.socket).kids() == [host_files.kid]
    finally:
        listener.close()
    assert not host_files.socket.exists()


def test_a_socket_another_process_listens_on_is_refused(env: Env, host_files: Any) -> None:
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(host_files.socket))
    live.listen(1)
    identity = os.lstat(host_files.socket).st_ino
    try:
        with pytest.raises(SakeystateError, match="is in use: another signer"):
            _serving(env, host_files)
        assert os.lstat(host_files.socket).st_ino == identity
    finally:
        live.close()
        host_files.socket.unlink()


@pytest.mark.parametrize("kind", ["symlink", "file", "directory"])
def test_what_is_not_a_stale_socket_is_never_replaced(
    env: Env, host_files: Any, tmp_path: Path, kind: str
) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me")
    if kind == "symlink":
        host_files.socket.symlink_to(target)
    elif kind == "file":
        host_files.socket.write_text("keep me")
    else:
        host_files.socket.mkdir()
    try:
        with pytest.raises(SakeystateError, match="exists and is not a socket"):
            _serving(env, host_files)
        assert target.read_text() == "keep me"
        if kind == "file":
            assert host_files.socket.read_text() == "keep me"
        if kind == "symlink":
            assert host_files.socket.is_symlink()
    finally:
        if kind == "directory":
            host_files.socket.rmdir()
        else:
            host_files.socket.unlink()


# --- the private key file ---------------------------------------------------------------------


def _refused(path: Path, why: str) -> None:
    with pytest.raises(SakeystateError, match=why) as caught:
        load_signing_key(str(path))
    assert str(path) in str(caught.value)


def test_a_private_key_owned_by_another_user_is_refused(host_files: Any) -> None:
    os.chown(host_files.key_file, NOBODY, 0)
    _refused(host_files.key_file, "owned by uid 65534, not root")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_a_private_key_group_or_others_may_touch_is_refused(host_files: Any, mode: int) -> None:
    host_files.key_file.chmod(mode)
    _refused(host_files.key_file, f"mode {mode:04o}: group or others")


def test_a_fifo_at_the_private_key_path_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "sa.key"
    os.mkfifo(fifo, 0o600)
    _refused(fifo, "not a regular file")


@pytest.mark.parametrize("kind", ["encrypted", "ed25519", "rsa1024", "public", "garbage"])
def test_a_key_kube_apiserver_cannot_sign_with_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "sa.key"
    key = private_key("ec256", 51)
    if kind == "encrypted":
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    elif kind in ("ed25519", "rsa1024"):
        data = key_pem(private_key(kind, 51))
    elif kind == "public":
        data = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        data = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(SakeystateError) as caught:
        load_signing_key(str(path))
    message = str(caught.value)
    assert str(path) in message
    for line in data.decode().splitlines()[1:-1]:
        assert line not in message


def test_signing_key_repr_never_shows_the_key(host_files: Any) -> None:
    key = load_signing_key(str(host_files.key_file))
    assert "_private" not in repr(key)
    assert all(secret not in repr(key) for secret in _secrets(host_files.key))


# --- the key never leaves ---------------------------------------------------------------------


def _secrets(key: Any) -> list[str]:
    """Every form in which the private key could leak: its PEM lines, its DER (base64,
    base64url, hex), and its private scalar (hex, decimal, base64url as in a JWK)."""
    pem = key_pem(key).decode()
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    scalar = key.private_numbers().private_value
    size = (scalar.bit_length() + 7) // 8
    forms = [line for line in pem.splitlines()[1:-1] if len(line) >= 16]
    forms += [
        base64.b64encode(der).decode()[:40],
        base64.urlsafe_b64encode(der).decode()[:40],
        der.hex()[:40],
        f"{scalar:x}",
        str(scalar),
        base64.urlsafe_b64encode(scalar.to_bytes(size, "big")).rstrip(b"=").decode(),
    ]
    return forms


def test_the_private_key_appears_in_no_output(env: Env, host_files: Any) -> None:
    me = host_files
    env.publish(me.key, HOST)
    peer_kid = env.publish(private_key("ec384", 52), PEER)
    env.state(
        [(me.kid, HOST), (peer_kid, PEER)],
        own_cert=str(me.cert_file),
        signer=me.signer_section(),
        bundle={"jwks_path": str(env.tmp / "jwks.json")},
    )
    textfile = env.tmp / "sakeystate.prom"
    port = free_port()
    outputs: dict[str, str] = {}
    for log_format in ("text", "json"):
        process = SignerProcess(
            env.state_path,
            HOST,
            env.tmp / f"signer-{log_format}.log",
            "--format",
            log_format,
            "--metrics-textfile",
            str(textfile),
            "--metrics-listen",
            f"127.0.0.1:{port}",
        )
        try:
            wait_for_socket(me.socket, process)
            client = Client(me.socket)
            wait_for_kids(client, {me.kid, peer_kid})
            answers = [client.sign(claims(n=n)) for n in range(3)]
            outputs[f"sign answers {log_format}"] = repr(answers) + repr(client.fetch_keys())
            outputs[f"metadata {log_format}"] = repr(client.metadata())
            limits = Path(f"/proc/{process.proc.pid}/limits").read_text()
            core = next(line for line in limits.splitlines() if "core file size" in line)
            assert core.split()[4:6] == ["0", "0"], core
            wait_for("metrics over HTTP", lambda: _scrape(port) != "")
            outputs[f"metrics http {log_format}"] = _scrape(port)
            client.close()
        finally:
            assert process.stop() == 0
        outputs[f"log {log_format}"] = process.output
    outputs["metrics textfile"] = textfile.read_text()
    outputs["bundle"] = (env.bundle_bytes() or b"").decode()
    outputs["jwks"] = (env.tmp / "jwks.json").read_text()
    status_prefix = env.prefix.rstrip("/").rsplit("/", 1)[0] + "/"
    outputs["etcd"] = repr(env.etcd.dump(status_prefix))
    for command in ("snapshot", "inspect", "status", "plan"):
        result = env.cli(command, "--host", HOST)
        outputs[command] = result.out + result.err
    assert '"version": 1' in outputs["snapshot"]
    assert "kids" in outputs["etcd"]  # the status record is there to search
    for where, text in outputs.items():
        for secret in _secrets(me.key):
            assert secret not in text, f"the private key leaked into {where}"


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text: str = answer.read().decode()
    except OSError:
        return ""
    return text if "sakeystate_signer_fetch_keys_total" in text else ""


# --- a hostile etcd and the served set ------------------------------------------------------


_OWN = private_key("ec256", 53)


def _own_key() -> SigningKey:
    der = _OWN.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SigningKey(kid(_OWN), "ES256", der, _OWN)


@SETTINGS
@given(clusters())
def test_what_fetch_keys_serves_is_the_bundle_plus_the_own_key(case: tuple) -> None:  # type: ignore[type-arg]
    from sakeystate.plan import plan

    desired, observed, bundle, at = case
    result = plan(desired, observed, bundle, at, allow_removals=True)
    own = _own_key()
    served = plan_keys(result, own)
    kids = [k.kid for k in served]
    assert kids and kids == sorted(kids)
    assert set(kids) == set(result.kids_after) | {own.kid}
    for item in served:
        digest = base64.urlsafe_b64encode(hashlib.sha256(item.der).digest())
        assert digest.rstrip(b"=").decode() == item.kid
    excluded = {k.kid for k in result.keys if k.status == "excluded"}
    for protected in _protected(desired, observed, bundle, at) - excluded:
        assert protected in kids, protected


def test_the_api_listens_on_no_tcp_port(env: Env, host_files: Any) -> None:
    """The socket is the only listener: no TCP port serves the API."""
    _signer, listener = _serving(env, host_files)
    try:
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                inodes.add(os.readlink(f"/proc/self/fd/{fd}"))
        inodes = {i for i in inodes if i.startswith("socket:")}
        listening_tcp = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    listening_tcp.add(f"socket:[{fields[9]}]")
        assert inodes and not inodes & listening_tcp
    finally:
        listener.close()
