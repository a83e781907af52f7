"""Issue 17's acceptance against real 3-member clusters of etcd 3.4, 3.5 and 3.6.

Each version runs one cluster with auth enabled, ``--auth-token-ttl 3`` and clients on
both http and https (``--client-cert-auth``), and the per-host grants of
docs/etcd-rbac.md:

- ``watch`` on two hosts, one over http with a password, one over https with its
  own TLS client certificate (the same state file paths on both), started while a
  member is down (the watch start has to fail over), that member restarted later:
  every publish reaches both bundles within 10 s, with its reload, and no "internal
  error" line, ever;
- ``wait`` over http and over https, each idle across more than three auth-token
  TTLs before its goal is reached, exits 0;
- a read-only role: ``plan`` works, ``converge`` fails naming the operation, the key,
  the endpoint, the user and the missing grant.

The chaos test (tests/test_etcd_chaos.py) runs on one version only: five minutes per
version would not fit ``make test``'s 15 minutes on 2 cores.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from etcd_cluster import Cluster, require_etcd
from support import bundle_file_kids, entry_value, kid, private_key, state_data, write_state
from watch_support import SAKEYSTATE, WatchProcess, probe, reloads, wait_for

pytestmark = pytest.mark.slow

ROOT = "/m/"
PREFIX = ROOT + "kube-apiserver-sa-certs/"
STATUS = ROOT + "kube-apiserver-sa-status/"
LOCK = ROOT + "kube-apiserver-sa-reload-lock"
HOSTS = ("ctrl1.example.org", "ctrl2.example.org")
PASSWORD = "matrix-password"
TOKEN_TTL = 3


def host_grants(host: str) -> list[tuple[str, str, bool]]:
    """The per-host grants of docs/etcd-rbac.md."""
    return [
        ("readwrite", f"{PREFIX}{host}/", True),
        ("read", PREFIX, True),
        ("readwrite", f"{STATUS}{host}", False),
        ("readwrite", f"{STATUS}{host}/", True),
        ("read", STATUS, True),
        ("readwrite", f"{LOCK}/", True),
    ]


@dataclass
class Matrix:
    version: str
    cluster: Cluster
    directory: Path
    cert: tuple[Path, Path]  # ctrl2's client certificate and key


@pytest.fixture(scope="module", params=["3.4", "3.5", "3.6"])
def matrix(request: pytest.FixtureRequest) -> Iterator[Matrix]:
    version = str(request.param)
    binary = require_etcd(version)
    directory = Path(tempfile.mkdtemp(prefix=f"sakeystate-matrix-{version}-"))
    cluster = Cluster(directory, binary, tls=True, extra_args=["--auth-token-ttl", str(TOKEN_TTL)])
    try:
        cluster.start()
        cluster.enable_auth()
        cluster.add_user(HOSTS[0], PASSWORD, host_grants(HOSTS[0]))
        cluster.add_cert_user(HOSTS[1], host_grants(HOSTS[1]))
        cluster.add_user("reader", PASSWORD, [("read", PREFIX, True), ("read", STATUS, True)])
        (directory / "password").write_text(PASSWORD)
        assert cluster.pki is not None
        yield Matrix(version, cluster, directory, cluster.pki.leaf(HOSTS[1]))
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _state(m: Matrix, tmp: Path, host: str, trusted: list[Any], scheme: str) -> Path:
    etcd: dict[str, Any] = {
        "endpoints": m.cluster.endpoints(scheme),
        "prefix": PREFIX,
        "status_prefix": STATUS,
        "reload_lock": LOCK,
        "timeout": "3s",
    }
    assert m.cluster.pki is not None
    if scheme == "https":
        # One shared file layout: each host has its own certificate at the same paths.
        etcd["tls"] = {
            "ca_file": str(m.cluster.pki.ca),
            "cert_file": str(m.cert[0]),
            "key_file": str(m.cert[1]),
        }
    else:
        etcd["auth"] = {"username": host, "password_file": str(m.directory / "password")}
    data = state_data(
        etcd["endpoints"][0],
        PREFIX,
        tmp / f"{host}.pem",
        trusted,
        host=host,
        etcd=etcd,
        bundle={"reload": probe(tmp / "reloads.log", host), "reload_timeout": "60s"},
    )
    data["fleet"] = list(HOSTS)
    return write_state(tmp / f"{host}-{scheme}.yaml", data)


def _kids(path: Path) -> set[str]:
    return bundle_file_kids(path)


def _wait(state: Path, key_id: str, timeout: str = "60s") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SAKEYSTATE, "wait", "--state", str(state), "--kid", key_id, "--timeout", timeout],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_watch_and_wait_with_auth_over_http_and_https_across_member_restarts_and_ttls(
    matrix: Matrix, tmp_path: Path
) -> None:
    cluster = matrix.cluster
    keys = [private_key("ec256", 400 + i) for i in range(4)]
    owners = [HOSTS[0], HOSTS[1], HOSTS[0], HOSTS[1]]
    trusted = [(kid(k), h) for k, h in zip(keys, owners, strict=True)]
    cluster.put(PREFIX + kid(keys[0]), entry_value(keys[0], owners[0]))
    states = [
        _state(matrix, tmp_path, HOSTS[0], trusted, "http"),
        _state(matrix, tmp_path, HOSTS[1], trusted, "https"),
    ]
    bundles = [tmp_path / f"{h}.pem" for h in HOSTS]
    # Finding 1: the first listed member is down while the watchers start their watch.
    cluster.members[0].kill()
    watchers = [
        WatchProcess(state, host, tmp_path / f"watch-{host}.log", "--debounce", "0.2s")
        for state, host in zip(states, HOSTS, strict=True)
    ]
    try:
        wait_for("both start passes", lambda: all(_kids(b) == {kid(keys[0])} for b in bundles), 60)
        cluster.members[0].start()
        cluster.wait_ready()

        def publish(index: int) -> None:
            cluster.put(PREFIX + kid(keys[index]), entry_value(keys[index], owners[index]))
            want = {kid(k) for k in keys[: index + 1]}
            # Within 10 s of the publish (quorum is there all along).
            wait_for(
                f"publish {index} in both bundles",
                lambda: all(_kids(b) == want for b in bundles),
                10,
            )

        publish(1)
        # `wait` over http (password) and over https (certificate), at once.
        for state in states:
            done = _wait(state, kid(keys[1]))
            _out, err = done.communicate(timeout=60)
            assert done.returncode == 0, err
        # Both waits, and both watchers, idle for more than three token TTLs.
        pending = [_wait(state, kid(keys[2])) for state in states]
        time.sleep(3 * TOKEN_TTL + 2)
        publish(2)
        for done in pending:
            _out, err = done.communicate(timeout=60)
            assert done.returncode == 0, err
        # Another member down and back, under the watchers, then a publish.
        cluster.members[1].kill()
        publish(3)
        cluster.members[1].start()
        cluster.wait_ready()
        wait_for(
            "every reload done",
            lambda: (
                sorted(r.name for r in reloads(tmp_path / "reloads.log") if r.end)
                == sorted(HOSTS * 4)
            ),
            60,
        )
    finally:
        for watcher in watchers:
            watcher.stop()
    for watcher in watchers:
        assert "internal error" not in watcher.output, watcher.output
        assert "Traceback" not in watcher.output
    # One reload per key-set change and host: the start and three publishes.
    assert sorted(r.name for r in reloads(tmp_path / "reloads.log")) == sorted(HOSTS * 4)


def test_a_read_only_role_can_plan_and_is_refused_writes_naming_the_grant(
    matrix: Matrix, tmp_path: Path
) -> None:
    cluster = matrix.cluster
    key = private_key("ec256", 410)
    cluster.put(PREFIX + kid(key), entry_value(key, "ctrl9.example.org"))
    data = state_data(
        cluster.endpoints()[0],
        PREFIX,
        tmp_path / "sa.pem",
        [(kid(key), "ctrl9.example.org")],
        host="ctrl9.example.org",
        bundle={"path": str(tmp_path / "sa.pem"), "reload": ["/bin/true"]},
        etcd={
            "endpoints": cluster.endpoints(),
            "status_prefix": STATUS,
            "reload_lock": None,
            "auth": {"username": "reader", "password_file": str(matrix.directory / "password")},
        },
    )
    state = write_state(tmp_path / "reader.yaml", data)
    plan = subprocess.run(
        [SAKEYSTATE, "plan", "--state", str(state)], capture_output=True, text=True, check=False
    )
    assert plan.returncode == 0, plan.stderr
    converge = subprocess.run(
        [SAKEYSTATE, "converge", "--state", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert converge.returncode == 1
    err = converge.stderr
    record = STATUS + "ctrl9.example.org"
    assert f"writing {record} to etcd refused by http://127.0.0.1:" in err, err
    assert "as etcd user 'reader'" in err and "PERMISSION_DENIED" in err
    assert f"needs readwrite on the key {record} (see docs/etcd-rbac.md)" in err
    # Its key stays in the flat layout it was published in: moving it is a write too.
    assert f"etcd key {PREFIX + kid(key)}: this host may not move its key" in err, err
    assert PREFIX + kid(key) in cluster.dump(PREFIX)
    assert "Traceback" not in err


def test_an_idle_watch_stays_live_across_token_ttls(matrix: Matrix) -> None:
    """etcd 3.6 wants a valid token for the Status call a watcher's liveness check
    makes: an expired one is renewed, not taken for a dead member."""
    from sakeystate.etcd import EtcdStore, PrefixWatch
    from sakeystate.state import EtcdConfig

    config = EtcdConfig(
        endpoints=tuple(matrix.cluster.endpoints()),
        prefix=PREFIX,
        username=HOSTS[0],
        password_file=str(matrix.directory / "password"),
    )
    with EtcdStore(config) as store:
        revision = store.read(PREFIX).revision
        with PrefixWatch(store, [PREFIX], revision + 1) as watch:
            assert watch.alive()
            assert watch.wait(TOKEN_TTL + 1.5) is None
            assert watch.alive()
