"""A real 3-member etcd cluster on loopback, with members killed under sakeystate.

- One member down (each of the three in turn, the first listed endpoint
  included), or hung (stopped, still accepting connections): converge
  succeeds through the others.
- Quorum lost: converge exits 1 with the timeout in its message, the bundle is
  untouched, no reload runs, and once quorum is back etcd holds exactly what it
  held before (nothing half-written).
- A member SIGKILLed at a random moment during converges, round after round:
  every run ends in success or a clean error, the bundle is always the old or
  the new one, no trusted key ever leaves etcd, and the next run completes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sakeystate.bundle import PENDING_SUFFIX
from sakeystate.etcd import EtcdStore
from sakeystate.keys import parse_pem_bundle
from sakeystate.state import EtcdConfig

from conftest import Env
from etcd_server import EtcdServer, etcdctl_binary, free_port
from support import entry_value, kid, kids_held, private_key, state_data, write_state

pytestmark = pytest.mark.slow

AT = "2026-11-22T10:00:00Z"
HOSTS = ["ctrl1.example.org", "ctrl2.example.org", "ctrl3.example.org"]
KILL_ROUNDS = 12
TALLY = {"faults": 0, "lost": 0}


class Cluster:
    def __init__(self, directory: str) -> None:
        ports = [(free_port(), free_port()) for _ in range(3)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
        self.members = [
            EtcdServer(
                directory,
                name=f"m{i}",
                client_port=client,
                peer_port=peer,
                initial_cluster=initial,
                extra_args=["--initial-cluster-token", f"sakeystate-{os.getpid()}"],
            )
            for i, (client, peer) in enumerate(ports)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self) -> None:
        for member in self.members:
            if member.proc is None:
                member.start(wait=False)
        for member in self.members:
            member.wait_ready(timeout=30)

    def kill(self, index: int) -> None:
        TALLY["faults"] += 1
        self.members[index].stop(signal.SIGKILL)

    def ctl(self, *args: str) -> bytes:
        result = subprocess.run(
            [etcdctl_binary(), "--endpoints", ",".join(self.endpoints), *args],
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=True,
        )
        return result.stdout

    def put(self, key: str, value: bytes) -> None:
        subprocess.run(
            [etcdctl_binary(), "--endpoints", ",".join(self.endpoints), "put", key],
            input=value,
            capture_output=True,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=True,
        )

    def dump(self, prefix: str) -> dict[str, bytes]:
        config = EtcdConfig(endpoints=tuple(self.endpoints), timeout=20)
        with EtcdStore(config) as store:
            return {e.key: e.value for e in store.read(prefix).entries}

    def stop(self) -> None:
        for member in self.members:
            member.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    directory = tempfile.mkdtemp(prefix="sakeystate-cluster-")
    cluster = Cluster(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
        print(
            f"\ncluster faults: {TALLY['faults']} member faults injected (kill -9, SIGSTOP); "
            f"{TALLY['lost']} ended with anything lost"
        )


class Scenario:
    """Three trusted hosts, a revoked key and a legacy copy to clean up, two policies.

    The converging host is ctrl3: the revoked key and the legacy copy are its own (a
    host deletes only its own entries, R13)."""

    def __init__(self, env: Env, cluster: Cluster, name: str, timeout: str = "5s") -> None:
        self.env, self.cluster = env, cluster
        self.prefix = f"/{name}/kube-apiserver-sa-certs/"
        self.keys = [private_key("ec384", 110 + i) for i in range(3)]
        self.revoked = private_key("ec256", 113)
        for key, host in zip(self.keys, HOSTS, strict=True):
            cluster.put(self.prefix + kid(key), entry_value(key, host))
        self.trusted = {kid(k) for k in self.keys}
        self.reload_log = env.tmp / f"{name}-reloads.log"
        self.states = []
        for index, count in enumerate((2, 3)):
            data = state_data(
                cluster.endpoints[0],
                self.prefix,
                env.bundle,
                [(kid(k), h) for k, h in list(zip(self.keys, HOSTS, strict=True))[:count]],
                etcd={"endpoints": cluster.endpoints, "timeout": timeout},
                bundle={"reload": ["sh", "-c", f"echo reloaded >> '{self.reload_log}'"]},
                revoked=[{"fingerprint": kid(self.revoked), "reason": "exposed"}],
                host=HOSTS[2],
            )
            self.states.append(write_state(env.tmp / f"{name}-{index}.yaml", data))
        self.expected: dict[int, bytes] = {}

    def dirty(self) -> None:
        self.cluster.put(self.prefix + kid(self.revoked), entry_value(self.revoked, HOSTS[2]))
        self.cluster.put(
            self.prefix + HOSTS[2], entry_value(self.keys[2], HOSTS[2], published=None)
        )

    def converge(self, index: int) -> Any:
        return self.env.cli(
            "converge", "--state", str(self.states[index]), "--at", AT, "--allow-removals"
        )

    def trusted_present(self) -> bool:
        """Every trusted key is held by some etcd entry (in whichever layout)."""
        return self.trusted <= kids_held(self.cluster.dump(self.prefix))

    def reloads(self) -> int:
        return len(self.reload_log.read_text().splitlines()) if self.reload_log.exists() else 0


def test_one_member_down_converge_succeeds_through_the_others(env: Env, cluster: Cluster) -> None:
    scenario = Scenario(env, cluster, "one-down")
    for index in range(3):
        target = index % 2
        scenario.dirty()
        cluster.kill(index)
        try:
            result = scenario.converge(target)
            assert result.code == 0, result
            keys, problems = parse_pem_bundle(env.bundle.read_bytes())
            assert not problems
            assert {k.kid for k in keys} == {kid(k) for k in scenario.keys[: 2 + target]}
            dump = cluster.dump(scenario.prefix)
            assert scenario.prefix + kid(scenario.revoked) not in dump
            assert scenario.prefix + HOSTS[2] not in dump
            lost = not scenario.trusted_present()
            TALLY["lost"] += lost
            assert not lost
        finally:
            cluster.start()


def test_a_hung_member_does_not_use_up_the_deadline(env: Env, cluster: Cluster) -> None:
    """A member that accepts connections but never answers (SIGSTOP: a stalled disk,
    a frozen VM), listed first: the others still serve the converge in time."""
    scenario = Scenario(env, cluster, "hung")
    scenario.dirty()
    member = cluster.members[0]
    assert member.proc is not None
    TALLY["faults"] += 1
    os.kill(member.proc.pid, signal.SIGSTOP)
    try:
        result = scenario.converge(1)
        assert result.code == 0, result
        keys, problems = parse_pem_bundle(env.bundle.read_bytes())
        assert not problems
        assert {k.kid for k in keys} == scenario.trusted
        lost = not scenario.trusted_present()
        TALLY["lost"] += lost
        assert not lost
    finally:
        os.kill(member.proc.pid, signal.SIGCONT)
    cluster.start()


def test_quorum_lost_fails_within_the_timeout_and_writes_nothing(
    env: Env, cluster: Cluster
) -> None:
    scenario = Scenario(env, cluster, "no-quorum", timeout="2s")
    scenario.dirty()
    assert scenario.converge(0).code == 0
    scenario.dirty()  # work for the next run: a delete and a migration
    before_etcd = cluster.dump(scenario.prefix)
    before_bundle = env.bundle.read_bytes()
    before_stat = os.stat(env.bundle)
    reloads = scenario.reloads()
    cluster.kill(1)
    cluster.kill(2)
    try:
        for command in ("converge", "plan", "inspect"):
            result = env.cli(command, "--state", str(scenario.states[1]), "--at", AT)
            assert result.code == 1, (command, result)
            assert "within the 2s timeout" in result.err, result.err
            assert cluster.endpoints[0] in result.err
            assert "Traceback" not in result.err
        check = env.cli("check", "--state", str(scenario.states[1]))
        assert check.code == 0 and "within the 2s timeout" in check.err
        assert env.bundle.read_bytes() == before_bundle
        assert os.stat(env.bundle).st_ino == before_stat.st_ino  # not even rewritten
        assert not Path(str(env.bundle) + PENDING_SUFFIX).exists()
        assert scenario.reloads() == reloads
    finally:
        cluster.start()
    after = cluster.dump(scenario.prefix)
    lost = after != before_etcd
    TALLY["lost"] += lost
    assert after == before_etcd, "nothing may be half-written while quorum is lost"
    # With quorum back, the same run completes.
    result = scenario.converge(1)
    assert result.code == 0, result
    assert scenario.reloads() == reloads + 1
    assert scenario.trusted_present()


def test_member_killed_during_converges_never_loses_a_key_or_tears_the_bundle(
    env: Env, cluster: Cluster
) -> None:
    rng = random.Random(int(os.environ.get("SAKEYSTATE_FAULT_SEED", "7")))
    scenario = Scenario(env, cluster, "kill-during")
    for index in (0, 1):
        scenario.dirty()
        assert scenario.converge(index).code == 0
        scenario.expected[index] = env.bundle.read_bytes()
    outcomes = {"succeeded": 0, "failed cleanly": 0, "kill landed mid-run": 0}
    current = 1
    for _round in range(KILL_ROUNDS):
        target = 1 - current
        scenario.dirty()
        old = env.bundle.read_bytes()
        victim = rng.randrange(3)
        killed = threading.Event()

        def kill(index: int = victim, done: threading.Event = killed) -> None:
            cluster.kill(index)
            done.set()

        timer = threading.Timer(rng.uniform(0, 0.08), kill)
        timer.start()
        try:
            result = scenario.converge(target)
            outcomes["kill landed mid-run"] += killed.is_set()
        finally:
            timer.join()
        if result.code == 0:
            outcomes["succeeded"] += 1
            assert env.bundle.read_bytes() == scenario.expected[target]
        else:
            outcomes["failed cleanly"] += 1
            assert result.code == 1
            assert result.err.startswith("sakeystate: error: "), result.err
            assert "Traceback" not in result.err
        content = env.bundle.read_bytes()
        keys, problems = parse_pem_bundle(content)
        bad = content not in (old, scenario.expected[target]) or bool(problems)
        with contextlib.suppress(Exception):
            bad |= not scenario.trusted_present()
        TALLY["lost"] += bad
        assert content in (old, scenario.expected[target])
        assert not problems and keys
        assert scenario.trusted_present()
        cluster.start()
        result = scenario.converge(target)
        assert result.code == 0, result
        assert env.bundle.read_bytes() == scenario.expected[target]
        assert scenario.trusted_present()
        current = target
    print(f"\nmember kills during converge: {KILL_ROUNDS} rounds, {outcomes}")
