"""Chaos: ``watch`` on 3 hosts over a 3-member etcd for five minutes of faults.

The faults, one at a time so that quorum is always there, chosen by a seeded random
schedule (the seed is printed; ``SAKEYSTATE_CHAOS_SEED`` replays one): a member
killed with SIGKILL and restarted, a member frozen (SIGSTOP) and thawed, a member's
client traffic stalled by a loopback proxy (connections open, nothing forwarded: a
network that hangs), a leader change (``move-leader``) and a compaction; each kind
at least once. A key is published every few seconds throughout.

Asserted: every publish reaches every bundle within 10 s; no watcher ever prints
"internal error"; no reload is lost (each host's last reload saw its final bundle,
nothing owed) or repeated (two reloads of one host never saw the same bundle); no
two reloads ever overlap. ``SAKEYSTATE_CHAOS_SECONDS`` (default 300) sets the length;
the version is etcd 3.5 (``SAKEYSTATE_CHAOS_ETCD`` picks another of the matrix).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from etcd_cluster import Cluster, require_etcd
from support import bundle_file_kids, entry_value, kid, private_key, state_data, write_state
from watch_support import WatchProcess, wait_for

pytestmark = pytest.mark.slow

PREFIX = "/chaos/kube-apiserver-sa-certs/"
HOSTS = ("ctrl1.example.org", "ctrl2.example.org", "ctrl3.example.org")
SECONDS = float(os.environ.get("SAKEYSTATE_CHAOS_SECONDS", "300"))
PUBLISH_EVERY = 7.0
DEADLINE = 10.0
KINDS = ("kill", "freeze", "stall", "leader", "compact")

# The reload command: logs "<host> <start> <end> <sha256 of the bundle it reloaded>".
PROBE = """
import hashlib, sys, time
log, host, bundle = sys.argv[1:4]
start = time.time()
digest = hashlib.sha256(open(bundle, "rb").read()).hexdigest()
time.sleep(0.2)
with open(log, "a") as out:
    out.write(f"{host} {start} {time.time()} {digest}\\n")
"""


@dataclass
class Reload:
    host: str
    start: float
    end: float
    digest: str


@dataclass
class Seen:
    """When each kid first appeared in each bundle (the test's own clock)."""

    first: dict[tuple[str, str], float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)


def _kids(path: Path) -> set[str]:
    return bundle_file_kids(path)


def _monitor(bundles: dict[str, Path], seen: Seen) -> None:
    while not seen.stop.is_set():
        now = time.time()
        for host, path in bundles.items():
            for key_id in _kids(path):
                seen.first.setdefault((host, key_id), now)
        seen.stop.wait(0.05)


def _reloads(log: Path) -> list[Reload]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        host, start, end, digest = line.split()
        out.append(Reload(host, float(start), float(end), digest))
    return sorted(out, key=lambda r: r.start)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    version = os.environ.get("SAKEYSTATE_CHAOS_ETCD", "3.5")
    directory = Path(tempfile.mkdtemp(prefix="sakeystate-chaos-"))
    chaos = Cluster(directory, require_etcd(version), proxies=True)
    try:
        yield chaos.start()
    finally:
        chaos.stop()
        shutil.rmtree(directory, ignore_errors=True)


class Faults:
    """One fault at a time, each undone before the next."""

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.done: list[str] = []

    def _move_leader(self) -> bool:
        for _attempt in range(3):
            if self.cluster.move_leader():
                return True
            time.sleep(1)
        return False

    def one(self, kind: str) -> None:
        member_index = self.rng.randrange(3)
        member = self.cluster.members[member_index]
        hold = self.rng.uniform(3, 8)
        if kind == "kill":
            member.kill()
            time.sleep(hold)
            member.start()
            self.cluster.wait_ready()
        elif kind == "freeze":
            member.pause()
            time.sleep(hold)
            member.resume()
        elif kind == "stall":
            assert member.proxy is not None
            member.proxy.stall()
            time.sleep(hold)
            member.proxy.resume()
        elif kind == "leader":
            if not self._move_leader():
                # move-leader refused (an election under way, a slow member): a leader
                # killed and restarted changes the leader too.
                leader = self.cluster.leader()
                if leader is None:
                    return
                member_index, member = leader, self.cluster.members[leader]
                member.kill()
                time.sleep(hold)
                member.start()
                self.cluster.wait_ready()
        elif kind == "compact":
            self.cluster.compact()
        self.done.append(f"{kind} m{member_index} {hold:.1f}s")


def test_watchers_survive_five_minutes_of_member_faults(cluster: Cluster, tmp_path: Path) -> None:
    seed = int(os.environ.get("SAKEYSTATE_CHAOS_SEED", str(random.randrange(1 << 30))))
    print(f"chaos seed {seed} (SAKEYSTATE_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    count = int(SECONDS / PUBLISH_EVERY) + 4
    keys = [private_key("ec256", 500 + i) for i in range(count)]
    owners = [HOSTS[i % 3] for i in range(count)]
    trusted = [(kid(k), h) for k, h in zip(keys, owners, strict=True)]
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    log = tmp_path / "reloads.log"
    bundles = {host: tmp_path / f"{host}.pem" for host in HOSTS}
    cluster.put(PREFIX + kid(keys[0]), entry_value(keys[0], owners[0]))
    watchers = []
    for host in HOSTS:
        data = state_data(
            cluster.endpoints()[0],
            PREFIX,
            bundles[host],
            trusted,
            host=host,
            etcd={
                "endpoints": cluster.endpoints(),
                # The default: under load a 2 s read fails, and watch backs off.
                "timeout": "5s",
                "status_prefix": "/chaos/kube-apiserver-sa-status/",
                "reload_lock": "/chaos/kube-apiserver-sa-reload-lock",
            },
            bundle={
                "reload": [sys.executable, str(probe), str(log), host, str(bundles[host])],
                "reload_timeout": "60s",
            },
        )
        state = write_state(tmp_path / f"{host}.yaml", data)
        watchers.append(
            WatchProcess(state, host, tmp_path / f"watch-{host}.log", "--debounce", "0.2s")
        )
    seen = Seen()
    monitor = threading.Thread(target=_monitor, args=(bundles, seen), daemon=True)
    monitor.start()
    faults = Faults(cluster, rng)
    published: dict[str, float] = {}
    try:
        wait_for(
            "three start passes",
            lambda: all(kid(keys[0]) in _kids(b) for b in bundles.values()),
            60,
        )
        published[kid(keys[0])] = time.time()
        publisher = _Publisher(cluster, keys, owners, published)
        publisher.start()
        kinds = list(KINDS)
        rng.shuffle(kinds)  # each kind once, in random order, then random ones
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            kind = kinds.pop() if kinds else rng.choice(KINDS)
            faults.one(kind)
            time.sleep(rng.uniform(2, 6))
        publisher.stop()
        everything = set(published)
        wait_for(
            "every bundle complete",
            lambda: all(_kids(b) >= everything for b in bundles.values()),
            30,
        )
        wait_for(
            "nothing owed",
            lambda: not any(Path(f"{b}.reload-pending").exists() for b in bundles.values()),
            60,
        )
    finally:
        seen.stop.set()
        for watcher in watchers:
            watcher.stop()
    print(f"chaos: {len(published)} publishes; faults: {'; '.join(faults.done)}")
    assert {f.split()[0] for f in faults.done} == set(KINDS), faults.done
    late = [
        f"{key_id} on {host}: {seen.first.get((host, key_id), float('inf')) - at:.1f}s"
        for key_id, at in published.items()
        for host in HOSTS
        if seen.first.get((host, key_id), float("inf")) - at > DEADLINE
    ]
    assert late == [], late
    for watcher in watchers:
        assert "internal error" not in watcher.output, watcher.output[-3000:]
        assert "Traceback" not in watcher.output
    runs = _reloads(log)
    for before, after in itertools.pairwise(runs):
        assert after.start >= before.end, f"reloads overlap: {before} {after}"
    for host in HOSTS:
        mine = [r for r in runs if r.host == host]
        digests = [r.digest for r in mine]
        repeated = [d for d, n in itertools.pairwise(digests) if d == n]
        assert repeated == [], f"{host} reloaded the same bundle twice in a row"
        final = hashlib.sha256(bundles[host].read_bytes()).hexdigest()
        assert digests and digests[-1] == final, f"{host}'s last bundle was never reloaded"


class _Publisher(threading.Thread):
    """Publishes the next key every PUBLISH_EVERY seconds (retrying through elections)."""

    def __init__(
        self, cluster: Cluster, keys: list[object], owners: list[str], published: dict[str, float]
    ) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.keys = keys
        self.owners = owners
        self.published = published
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        index = 1
        try:
            while not self._halt.wait(PUBLISH_EVERY) and index < len(self.keys):
                key = self.keys[index]
                self.cluster.put(PREFIX + kid(key), entry_value(key, self.owners[index]))
                self.published[kid(key)] = time.time()
                index += 1
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(60)
        assert self.error is None, self.error
