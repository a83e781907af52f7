"""The documented etcd grants (docs/etcd-rbac.md), run as written against a real etcd
with auth enabled, over http and over https: every control plane works with its own
user, and one host's stolen credentials cannot remove another host's key from any
bundle, restart another host's apiserver, or make ``wait`` pass for another host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fleet_support import AT, Fleet, Plane
from jwt_support import sign
from test_tls_auth import make_pki

from sakeystate.keys import parse_value, render_value

from etcd_server import EtcdServer, etcdctl_binary
from pki import Pki
from support import REPO, run_cli

ROOT_PASSWORD = "root-Pa55-for-the-test-only"
PREFIX = "/rbac/kube-apiserver-sa-certs/"
STATUS = "/rbac/kube-apiserver-sa-status/"
LOCK = "/rbac/kube-apiserver-sa-reload-lock"


@dataclass
class AuthedEtcd:
    server: EtcdServer
    directory: Path
    tls: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url

    def ctl(self, *args: str, user: str = "root", password: str = ROOT_PASSWORD) -> Any:
        return subprocess.run(
            [etcdctl_binary(), "--endpoints", self.url, *self._tls_args(), *args],
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3", "ETCDCTL_USER": f"{user}:{password}"},
            check=False,
        )

    def _tls_args(self) -> list[str]:
        return [f"--cacert={self.tls['ca_file']}"] if self.tls else []

    def put(self, key: str, value: bytes) -> None:
        result = subprocess.run(
            [etcdctl_binary(), "--endpoints", self.url, *self._tls_args(), "put", key],
            input=value,
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3", "ETCDCTL_USER": f"root:{ROOT_PASSWORD}"},
            check=True,
        )
        assert result.returncode == 0

    def get(self, key: str) -> bytes | None:
        out = self.ctl("get", key, "--print-value-only").stdout
        return out[:-1] if out else None

    def dump(self, prefix: str) -> dict[str, bytes]:
        out = self.ctl("get", "--prefix", prefix, "-w", "json").stdout
        import base64

        kvs = json.loads(out).get("kvs", [])
        return {base64.b64decode(k["key"]).decode(): base64.b64decode(k["value"]) for k in kvs}


def _grants(hosts: list[str], directory: Path) -> list[tuple[dict[str, str], str]]:
    """The docs' grant commands as written, each with the HOST it runs for, and the
    test's password files in place of the docs' paths."""
    text = (REPO / "docs" / "etcd-rbac.md").read_text()
    block = re.search(r"## The grants.*?```sh\n(.*?)```", text, re.DOTALL)
    assert block is not None, "docs/etcd-rbac.md lost its grant commands"
    lines = [
        line.replace("/etc/sakeystate/", f"{directory}/").replace("/root/", f"{directory}/")
        for line in block.group(1).splitlines()
        if line.startswith("etcdctl ")
    ]
    per_host = [line for line in lines if "$HOST" in line]
    commands = [({"HOST": name}, line) for name in hosts for line in per_host]
    return commands + [({}, line) for line in lines if "$HOST" not in line]


@pytest.fixture(params=["http", "https"])
def authed(request: pytest.FixtureRequest) -> Iterator[AuthedEtcd]:
    directory = Path(tempfile.mkdtemp(prefix="sakeystate-rbac-"))
    extra: list[str] = []
    tls: dict[str, str] = {}
    if request.param == "https":
        pki = make_pki(directory)
        extra = [f"--cert-file={pki.server_cert}", f"--key-file={pki.server_key}"]
        tls = {"ca_file": str(pki.ca)}
    server = EtcdServer(str(directory), name="rbac", scheme=request.param, extra_args=extra)
    server.start()
    try:
        yield AuthedEtcd(server, directory, tls)
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _enable(etcd: AuthedEtcd, hosts: list[str]) -> None:
    for name in [*hosts, "operator"]:
        path = etcd.directory / (f"etcd-password-{name}" if name != "operator" else "x")
        path.write_text(f"pw-of-{name}\n")
        path.chmod(0o600)
    (etcd.directory / "etcd-operator-password").write_text("pw-of-operator\n")
    (etcd.directory / "etcd-operator-password").chmod(0o600)
    assert etcd.ctl("user", "add", f"root:{ROOT_PASSWORD}", user="", password="").returncode == 0
    assert etcd.ctl("user", "grant-role", "root", "root", user="", password="").returncode == 0
    assert etcd.ctl("auth", "enable", user="", password="").returncode == 0
    variables = {
        "PREFIX": PREFIX,
        "STATUS_PREFIX": STATUS,
        "RELOAD_LOCK": LOCK,
        "ETCDCTL_API": "3",
        "ETCDCTL_ENDPOINTS": etcd.url,
        "ETCDCTL_USER": f"root:{ROOT_PASSWORD}",
    }
    if etcd.tls:
        variables["ETCDCTL_CACERT"] = etcd.tls["ca_file"]
    bindir = str(Path(etcdctl_binary()).parent)
    for extra, command in _grants(hosts, etcd.directory):
        result = subprocess.run(
            ["sh", "-c", command],
            capture_output=True,
            text=True,
            env={**os.environ, **variables, **extra, "PATH": f"{bindir}:{os.environ['PATH']}"},
            check=False,
        )
        assert result.returncode == 0, (command, result.stderr)


def _fleet(etcd: AuthedEtcd, tmp_path: Path) -> Fleet:
    env: Any = SimpleNamespace(etcd=etcd, prefix=PREFIX, tmp=tmp_path)
    settings: dict[str, Any] = {
        "status_prefix": STATUS,
        "reload_lock": LOCK,
        "auth": {"username": "self", "password_file": "PER-HOST"},
    }
    if etcd.tls:
        settings["tls"] = etcd.tls
    fleet = Fleet(env, Pki(), "sa", "sa", etcd=settings)
    for plane in fleet.planes:
        # One shared state file on a real fleet: the password file sits at the same path
        # on every host. Here the hosts share a machine, so each copy names its own.
        text = plane.state.read_text().replace(
            "PER-HOST", str(etcd.directory / f"etcd-password-{plane.name}")
        )
        plane.state.write_text(text)
    return fleet


def _as(etcd: AuthedEtcd, plane: Plane, *args: str) -> Any:
    """etcdctl with this host's credentials: what an attacker holding them can do."""
    return etcd.ctl(*args, user=plane.name, password=f"pw-of-{plane.name}")


def test_the_documented_grants_let_each_host_work_and_no_host_reach_another(
    authed: AuthedEtcd, tmp_path: Path
) -> None:
    fleet = _fleet(authed, tmp_path)
    _enable(authed, fleet.hosts)
    one, two, three = fleet.planes
    for plane in fleet.planes:
        fleet.publish(plane)
    for plane in fleet.planes:
        fleet.converge(plane)
    assert fleet.cli(one, "status", "--at", AT).code == 0
    token = sign(one.leaf.key)
    bundles = {p.name: p.bundle.read_bytes() for p in fleet.planes}
    reloads = [p.reloads for p in fleet.planes]

    # ctrl1002's credentials, stolen.
    target = f"{PREFIX}{one.name}/{one.leaf.kid}"
    value = authed.get(target)
    assert value is not None
    parsed = parse_value(value)
    forged = render_value(parsed.key, two.name, parsed.published, parsed.intermediates)
    for args in (
        ("del", target),
        ("put", target, forged.decode()),
        ("del", f"{STATUS}{one.name}"),
        ("put", f"{STATUS}{one.name}", '{"version": 1, "kids": []}'),
        ("del", "--prefix", f"{PREFIX}{one.name}/"),
    ):
        denied = _as(authed, two, *args)
        assert denied.returncode != 0 and b"permission denied" in denied.stderr, args
    # What it may do: write under its own path (a copy of ctrl1001's certificate).
    copied = _as(authed, two, "put", f"{PREFIX}{two.name}/{one.leaf.kid}", forged.decode())
    assert copied.returncode == 0, copied.stderr
    for plane in fleet.planes:
        report = fleet.converge(plane)
        assert "bundle" not in {a["target"] for a in report["actions"]}
    assert {p.name: p.bundle.read_bytes() for p in fleet.planes} == bundles
    assert [p.reloads for p in fleet.planes] == reloads
    for plane in fleet.planes:
        assert fleet.verifies(plane, token)

    # wait cannot be made to pass for another host: ctrl1003 is reimaged, and only its
    # own record (written by its own converge) can say it verifies the new key.
    fleet.reimage(three)
    waited = fleet.cli(three, "wait", "--cert", str(three.own_cert), "--timeout", "1s")
    assert waited.code == 1 and one.name in waited.err
    for plane in fleet.planes:
        fleet.converge(plane)
    assert fleet.cli(three, "wait", "--cert", str(three.own_cert), "--timeout", "5s").code == 0

    # prune needs the operator: a host's user may not delete another host's entries.
    fleet.edit_state(revoked=[{"fingerprint": one.leaf.kid, "reason": "test"}])
    as_host = run_cli(
        "prune",
        "--state",
        str(two.state),
        "--at",
        AT,
        "--etcd-user",
        two.name,
        "--etcd-password-file",
        str(authed.directory / f"etcd-password-{two.name}"),
    )
    assert as_host.code == 1 and "PERMISSION_DENIED" in as_host.err
    operator = run_cli(
        "prune",
        "--state",
        str(two.state),
        "--at",
        AT,
        "--etcd-user",
        "sakeystate-operator",
        "--etcd-password-file",
        str(authed.directory / "etcd-operator-password"),
        "--format",
        "json",
    )
    assert operator.code == 0, operator.err
    assert target not in authed.dump(PREFIX)


def test_username_self_is_the_hosts_name_and_unresolved_it_is_a_clear_error(
    tmp_path: Path,
) -> None:
    from sakeystate.state import load_state

    from support import state_data, write_state

    password = tmp_path / "pw"
    password.write_text("x\n")
    data = state_data(
        "http://127.0.0.1:1",
        PREFIX,
        tmp_path / "b.pem",
        [],
        etcd={"auth": {"username": "self", "password_file": str(password)}},
    )
    state = write_state(tmp_path / "state.yaml", data)
    assert load_state(state, "ctrl1001.example.org").etcd.username == "ctrl1001.example.org"
    from sakeystate import state as state_module

    if state_module.machine_fqdn() is None:
        result = run_cli("plan", "--state", str(state))
        assert result.code == 1
        assert "etcd.auth.username is self, but this host's name is unknown" in result.err
