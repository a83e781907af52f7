"""A fleet of five control planes on a 3-member etcd, one per deployment style, through
a reimage; and a host returning after a long absence (the boot units).

Styles, each with its restart detached with setsid as a systemd job is:

- ctrl1001, ctrl1002: ``watch`` (ctrl1002 is the one reimaged);
- ctrl1003: a caller running ``converge --no-reload`` then ``sakeystate reload``
  (an Ansible handler, a Puppet refresh-only exec);
- ctrl1004: ``converge`` with its own restart;
- ctrl1005: ``converge --no-reload``, a restart of its own outside sakeystate (a
  Puppet ``service``), then ``reload-done``.

The reimage follows docs/reimage.md: the host's watch stopped, its disk wiped, a
new key issued by the cluster PKI, ``publish``, the boot units' commands (converge
before the apiserver starts, ``reload-done --wait-ready`` after), its controller
manager gated on ``wait`` (the shipped drop-in's command). After one green run of
each peer: ``wait --cert`` exits 0 and ``status`` exits 0, every host restarted
exactly once, and no two restarts under the lock overlapped.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_cluster_faults import Cluster

from sakeystate.keys import parse_pem_bundle

from pki import Leaf, Pki
from support import REPO, state_data, write_state
from watch_support import (
    SAKEYSTATE,
    WatchProcess,
    detached,
    fleet_hosts,
    overlapping,
    reloads,
    wait_for,
)

NAMES = fleet_hosts(5, "eqiad.example.org")
WATCHED, REIMAGED, CALLER, CONVERGE, OUTSIDE = (
    NAMES[0],
    NAMES[1],
    NAMES[2],
    NAMES[3],
    NAMES[4],
)
PREFIX = "/fleet/kube-apiserver-sa-certs/"


def unit_command(unit: str, key: str = "ExecStart") -> list[str]:
    """A shipped unit's command line, as systemd would run it (binary from this venv)."""
    path = REPO / "examples" / "systemd" / unit
    line = next(line for line in path.read_text().splitlines() if line.startswith(f"{key}="))
    return shlex.split(line.split("=", 1)[1].replace("/usr/local/bin/sakeystate", SAKEYSTATE))


@dataclass
class Plane:
    name: str
    root: Path
    log: Path

    @property
    def state(self) -> Path:
        return self.root / "state.yaml"

    @property
    def bundle(self) -> Path:
        return self.root / "pki" / "kube-apiserver-sa-certs.pem"

    @property
    def own_cert(self) -> Path:
        return self.root / "pki" / "sa.pem"

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        args = [a.replace("/etc/sakeystate/state.yaml", str(self.state)) for a in argv]
        args = [a.replace("/etc/kubernetes/pki/sa.pem", str(self.own_cert)) for a in args]
        args = [self.name if a == "${SAKEYSTATE_HOST}" else a for a in args]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(SAKEYSTATE, *args, "--state", str(self.state), "--host", self.name)

    def apiserver_start(self) -> None:
        """The restart (or start) that is not sakeystate's: systemd's, Puppet's service."""
        subprocess.run(detached(self.log, self.name, 0.3), check=True)


class Fleet:
    def __init__(self, root: Path, cluster: Cluster) -> None:
        self.root, self.cluster = root, cluster
        self.pki = Pki()
        self.ca = root / "ca.pem"
        self.ca.write_bytes(self.pki.ca_file())
        self.log = root / "restarts.log"
        self.planes = {n: Plane(n, root / n, self.log) for n in NAMES}
        self.watchers: dict[str, WatchProcess] = {}

    def issue(self, plane: Plane) -> Leaf:
        now = datetime.now(UTC)
        leaf = self.pki.sa(
            curve="p256", not_before=now - timedelta(days=1), not_after=now + timedelta(days=365)
        )
        plane.own_cert.parent.mkdir(parents=True, exist_ok=True)
        plane.own_cert.write_bytes(leaf.chained)
        return leaf

    def write_state(self, plane: Plane) -> None:
        overrides: dict[str, Any] = {
            "host": "self",
            "own_cert": str(plane.own_cert),
            "fleet": list(NAMES),
            "etcd": {
                "endpoints": self.cluster.endpoints,
                "timeout": "5s",
                "reload_lock": "/fleet/reload-lock",
                "status_prefix": "/fleet/kube-apiserver-sa-status/",
            },
            "bundle": {
                "path": str(plane.bundle),
                "exclude_host": "self",
                "reload": detached(self.log, plane.name, 0.3),
                "reload_check": ["test", "-s", str(plane.bundle)],
                "reload_timeout": "30s",
            },
            "trust_anchors": [
                {"name": "pki", "ca_file": str(self.ca), "hosts": list(NAMES), "common_name": "sa"}
            ],
        }
        data = state_data(self.cluster.endpoints[0], PREFIX, plane.bundle, [], **overrides)
        write_state(plane.state, data)

    def watch(self, name: str) -> None:
        plane = self.planes[name]
        self.watchers[name] = WatchProcess(
            plane.state,
            name,
            self.root / f"watch-{name}-{time.time():.0f}.log",
            "--debounce",
            "0.2s",
        )

    def green_run(self, name: str) -> None:
        """One run of a one-shot deployment style."""
        plane = self.planes[name]
        if name == CALLER:
            assert plane.cli("converge", "--no-reload").returncode == 0
            done = plane.cli("reload")
            assert done.returncode == 0, done.stderr
        elif name == CONVERGE:
            done = plane.cli("converge")
            assert done.returncode == 0, done.stderr
        elif name == OUTSIDE:
            converged = plane.cli("converge", "--no-reload", "--format", "json")
            assert converged.returncode == 0, converged.stderr
            if '"reload_needed": true' in converged.stdout:
                plane.apiserver_start()  # Puppet's service restart, notified by the exec
                assert plane.cli("reload-done").returncode == 0

    def restarts(self, since: float) -> dict[str, int]:
        counts = dict.fromkeys(NAMES, 0)
        for run in reloads(self.log):
            if run.start > since:
                counts[run.name] += 1
        return counts


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    directory = tempfile.mkdtemp(prefix="sakeystate-fleet-")
    cluster = Cluster(directory)
    cluster.start()
    result = Fleet(tmp_path, cluster)
    try:
        yield result
    finally:
        for watcher in result.watchers.values():
            watcher.kill()
            watcher.stop(signal.SIGKILL)
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def in_sync(fleet: Fleet, kid: str) -> bool:
    probe = fleet.planes[WATCHED].cli("wait", "--kid", kid, "--timeout", "1s")
    return probe.returncode == 0


@pytest.mark.slow
def test_a_reimage_through_every_deployment_style_restarts_each_host_once(
    fleet: Fleet,
) -> None:
    leaves = {}
    for name, plane in fleet.planes.items():
        leaves[name] = fleet.issue(plane)
        fleet.write_state(plane)
        published = plane.cli("publish")
        assert published.returncode == 0, published.stderr
    # The fleet as it has run for a while: every host converged and restarted once.
    for name in (WATCHED, REIMAGED):
        fleet.watch(name)
    for name in (CALLER, CONVERGE, OUTSIDE):
        fleet.green_run(name)
    status = fleet.planes[WATCHED]
    wait_for(
        "the fleet in order",
        lambda: status.cli("status").returncode == 0,
        120,
    )

    # Reimage ctrl1002: its watch stops, its disk is wiped, its new key is issued.
    reimaged = fleet.planes[REIMAGED]
    assert fleet.watchers.pop(REIMAGED).stop() == 0
    shutil.rmtree(reimaged.root / "pki")
    new = fleet.issue(reimaged)
    before = time.time()
    # Its controller manager may not start (and win leader election with the new key)
    # while a peer would reject the tokens it signs: the shipped drop-in's gate.
    gate = unit_command("kube-controller-manager.service.d/sakeystate-wait.conf", "ExecStartPre")
    gate = [a if a != "30m" else "2s" for a in gate]
    assert reimaged.run(*gate).returncode == 1
    assert reimaged.cli("publish").returncode == 0
    # Boot: converge before kube-apiserver starts, then confirm once it is up.
    booted = reimaged.run(*unit_command("sakeystate-boot.service"))
    assert booted.returncode == 0, booted.stderr
    loaded = {k.kid for k in parse_pem_bundle(reimaged.bundle.read_bytes())[0]}
    assert new.kid not in loaded  # its own key comes from sa.pem
    assert leaves[REIMAGED].kid in loaded  # its old tokens still verify
    reimaged.apiserver_start()
    done = reimaged.run(*unit_command("sakeystate-boot-done.service"))
    assert done.returncode == 0, done.stderr
    fleet.watch(REIMAGED)

    # One green run of every peer's style (watch needs none).
    for name in (CALLER, CONVERGE, OUTSIDE):
        fleet.green_run(name)
    waited = reimaged.cli("wait", "--cert", str(reimaged.own_cert), "--timeout", "2m")
    assert waited.returncode == 0, waited.stderr
    assert reimaged.run(*[a if a != "30m" else "2m" for a in gate]).returncode == 0
    final = status.cli("status")
    assert final.returncode == 0, final.stdout
    time.sleep(2)  # a second restart anywhere would have started by now
    assert fleet.restarts(before) == dict.fromkeys(NAMES, 1)
    runs = [r for r in reloads(fleet.log) if r.start > before]
    assert all(r.end is not None for r in runs)
    # Under the lock (everything but the reimaged host's own boot start and the
    # restart Puppet's service did outside sakeystate): never two at once.
    locked = [r for r in runs if r.name not in (REIMAGED, OUTSIDE)]
    assert overlapping(locked) == [], locked
    for watcher in fleet.watchers.values():
        assert watcher.stop() == 0
    assert re.search(
        r"restart: reloaded", "".join(p.read_text() for p in fleet.root.glob("watch-*"))
    )


@pytest.mark.slow
def test_a_host_back_after_a_day_converges_before_its_apiserver_starts(fleet: Fleet) -> None:
    """The boot units: the returning host's apiserver starts with the current bundle, and
    is not restarted a second time once it is up."""
    planes = [fleet.planes[n] for n in (WATCHED, REIMAGED)]
    for plane in planes:
        fleet.issue(plane)
        fleet.write_state(plane)
        assert plane.cli("publish").returncode == 0
    away, peer = planes
    assert peer.cli("converge").returncode == 0
    assert away.cli("converge").returncode == 0
    stale = away.bundle.read_bytes()
    # While it is down, a third control plane joins the cluster.
    newcomer = fleet.planes[CALLER]
    fleet.issue(newcomer)
    fleet.write_state(newcomer)
    assert newcomer.cli("publish").returncode == 0
    leaf_kid = newcomer.cli("publish", "--check", "--format", "json").stdout
    assert away.bundle.read_bytes() == stale
    before = time.time()
    booted = away.run(*unit_command("sakeystate-boot.service"))
    assert booted.returncode == 0, booted.stderr
    assert away.bundle.read_bytes() != stale  # the apiserver will start with the new key
    away.apiserver_start()
    done = away.run(*unit_command("sakeystate-boot-done.service"))
    assert (done.returncode, done.stdout) == (0, "owed reload confirmed and cleared\n")
    fleet.watch(REIMAGED)
    time.sleep(3)  # watch would restart it now if anything were still owed
    assert fleet.restarts(before)[REIMAGED] == 1  # its own start, nothing more
    kid = json.loads(leaf_kid)["kid"]
    report = json.loads(away.cli("status", "--format", "json").stdout)
    hosts = {h["host"]: h for h in report["hosts"]}
    assert hosts[REIMAGED]["verifies"][kid] is True
