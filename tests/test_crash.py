"""kill -9 of a converge at random points: the bundle is always the old or the new one.

A converge runs in a real process that is SIGKILLed after a random delay drawn
over the measured length of an uninterrupted converge, so kills land while it
reads etcd, deletes a revoked key, migrates a legacy entry, marks the reload
as owed, writes the bundle, runs the reload or clears the mark. To afford
enough trials on two cores, the processes are forked from a warm parent that
has already imported sakeystate (a plain fork, no gRPC channel open in the
parent); the child then runs exactly the console script's ``main``.

After every kill: the bundle parses and is byte-for-byte the old or the new
content; every trusted key is still in etcd; and if the bundle on disk is not
what the reload command last saw, the reload-pending mark is there. Then one
uninterrupted converge must finish the job, re-running the reload whenever the
mark was left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from sakeystate.bundle import PENDING_SUFFIX
from sakeystate.keys import parse_pem_bundle

from conftest import Env
from support import T0, entry_value, kid, kids_held, private_key

pytestmark = pytest.mark.slow

# Kills that land while the converge runs; runs that finish first are checked too.
KILLS = 100
MAX_ATTEMPTS = 300
LATE_KILLS = 10
AT = "2026-11-22T10:00:00Z"

# A warm parent: imports everything once, then forks one converge per request.
FORK_SERVER = r"""
import json, os, sys
import sakeystate.apply, sakeystate.bundle, sakeystate.etcd, sakeystate.plan, sakeystate.report
import jsonschema, sakeystate.state
from sakeystate.cli import main
sakeystate.state.load_schema()
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os._exit(main(request["argv"]))
    print(pid, flush=True)
    sys.stdin.readline()  # reap only when told: until then the pid cannot be reused
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


class ForkServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, argv: list[str], log: Path, kill_after: float | None) -> tuple[int, float]:
        """Run one converge; SIGKILL it after ``kill_after`` s. Returns (wait status, duration)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        started = time.monotonic()
        if kill_after is not None:
            time.sleep(kill_after)
            # Our own child, unreaped until we say so: at worst a zombie gets the signal.
            os.kill(pid, signal.SIGKILL)
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        status = int(self.proc.stdout.readline())
        return status, time.monotonic() - started

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def fork_server() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_kill_9_at_random_points_never_leaves_a_partial_bundle_or_a_forgotten_reload(
    env: Env, fork_server: ForkServer
) -> None:
    rng = random.Random(int(os.environ.get("SAKEYSTATE_CRASH_SEED", "5")))
    keys = [private_key("ec521", 80), private_key("rsa2048", 81), private_key("ec384", 82)]
    hosts = ["ctrl1.example.org", "ctrl2.example.org", "ctrl3.example.org"]
    revoked = private_key("ec256", 83)
    for key, host in zip(keys, hosts, strict=True):
        env.publish(key, host)
    reload_log = env.tmp / "reloads.log"
    # The reload records the bundle it saw, so "was the reload run for this content?"
    # has an exact answer.
    reload = ["sh", "-c", f"sha256sum < '{env.bundle}' | cut -c1-64 >> '{reload_log}'"]
    trusted_sets = [
        [(kid(keys[0]), hosts[0]), (kid(keys[1]), hosts[1])],
        [(kid(k), h) for k, h in zip(keys, hosts, strict=True)],
    ]
    states = []
    for index, trusted in enumerate(trusted_sets):
        env.state(
            trusted,
            host=hosts[1],  # its own revoked key and legacy copy to clean up (R13)
            bundle={"reload": reload},
            revoked=[{"fingerprint": kid(revoked), "reason": "exposed"}],
            # A run killed while it holds the cluster-wide reload lock leaves it to lease
            # expiry (10 s), which test_reload_lock.py and test_watch.py cover; here it would
            # only make a hundred kills slow.
            etcd={"reload_lock": None},
        )
        states.append(env.state_path.with_name(f"state-{index}.yaml"))
        states[-1].write_bytes(env.state_path.read_bytes())
    all_trusted = {kid(k) for k in keys}
    legacy_key = env.prefix + hosts[1]

    def dirty_etcd() -> None:
        """Give every converge etcd work too: a revoked key to delete, a legacy copy to move."""
        old = T0 - timedelta(days=30)
        env.etcd.put(env.prefix + kid(revoked), entry_value(revoked, hosts[1], published=old))
        env.etcd.put(legacy_key, entry_value(keys[1], hosts[1], published=None))

    def argv(index: int) -> list[str]:
        return ["converge", "--state", str(states[index]), "--allow-removals"]

    def reloaded() -> list[str]:
        return reload_log.read_text().split() if reload_log.exists() else []

    # Calibrate: uninterrupted converges give each state's bundle and a converge's length.
    expected: dict[int, bytes] = {}
    durations = []
    for index in (0, 1, 0, 1, 0, 1):
        dirty_etcd()
        status, took = fork_server.run(argv(index), env.tmp / "calibrate.log", None)
        assert status == 0, (env.tmp / "calibrate.log").read_text()
        durations.append(took)
        expected[index] = env.bundle.read_bytes()
        assert reloaded()[-1] == _sha(expected[index])
    assert expected[0] != expected[1]

    outcomes: Counter[str] = Counter()
    lost = 0
    leftovers = 0
    current = 1
    trial = kills = late_kills = 0
    # Keep going until enough kills landed, some of them after the bundle was replaced.
    while (kills < KILLS or late_kills < LATE_KILLS) and trial < MAX_ATTEMPTS:
        trial += 1
        target = 1 - current
        old = env.bundle.read_bytes()
        dirty_etcd()
        runs_before = len(reloaded())
        # A run's length varies, so scale by one a recent run took: a third of the
        # kills in its first 70%, two thirds after, where the etcd writes, the mark,
        # the bundle write and the reload happen.
        length = rng.choice(durations[-20:])
        delay = length * (rng.uniform(0, 0.7) if trial % 3 == 0 else rng.uniform(0.7, 1.05))
        log = env.tmp / "trial.log"
        status, took = fork_server.run(argv(target), log, delay)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        kills += killed
        if not killed:
            assert status == 0, log.read_text()
            durations.append(took)

        # What a kill may leave behind.
        content = env.bundle.read_bytes()
        keys_found, problems = parse_pem_bundle(content)
        pending = Path(str(env.bundle) + PENDING_SUFFIX).exists()
        owed = not reloaded() or reloaded()[-1] != _sha(content)
        present = kids_held(env.dump()) & all_trusted
        bad = (
            content not in (old, expected[target])
            or bool(problems)
            or (owed and not pending)
            or present != all_trusted
        )
        lost += bad
        assert content in (old, expected[target]), f"trial {trial}: partial bundle"
        assert not problems and keys_found
        assert not owed or pending, f"trial {trial}: bundle changed, reload owed, no mark"
        assert present == all_trusted, f"trial {trial}: a trusted key vanished from etcd"
        late_kills += killed and content == expected[target] and content != old
        outcomes[
            ("finished" if not killed else "killed")
            + (", bundle new" if content == expected[target] and content != old else ", bundle old")
            + (", reload owed (marked)" if owed else "")
            + (", mark left" if pending and not owed else "")
        ] += 1
        # A kill between creating and renaming a temporary file leaves it behind.
        leftovers += sum(1 for p in env.tmp.iterdir() if ".tmp-" in p.name)

        # One uninterrupted run finishes the job and runs an owed reload again.
        recovery = env.cli(
            "converge", "--state", str(states[target]), "--at", AT, "--allow-removals"
        )
        assert recovery.code == 0, recovery
        assert env.bundle.read_bytes() == expected[target]
        assert not Path(str(env.bundle) + PENDING_SUFFIX).exists()
        assert reloaded()[-1] == _sha(expected[target])
        assert not [p.name for p in env.tmp.iterdir() if ".tmp-" in p.name], "not cleaned up"
        if pending:
            assert len(reloaded()) > runs_before, "a reload that may not have run was not re-run"
        dump = env.dump()
        assert env.prefix + kid(revoked) not in dump
        assert legacy_key not in dump
        assert kids_held(dump) >= all_trusted
        current = target

    print(
        f"\ncrash trials: {trial} runs with a kill -9 due at a random point, "
        f"{kills} killed mid-run; {lost} ended with anything lost; "
        f"{leftovers} stray temporary files (removed by the next run); "
        f"uninterrupted runs took {round(min(durations) * 1000)}-{round(max(durations) * 1000)} ms"
    )
    for outcome, count in sorted(outcomes.items()):
        print(f"  {count:4d}  {outcome}")
    assert lost == 0
    assert kills >= KILLS
    # The kills must have landed on both sides of the bundle write, with the mark in between.
    assert any("killed, bundle old" in o for o in outcomes)
    assert any("killed, bundle new" in o for o in outcomes)
