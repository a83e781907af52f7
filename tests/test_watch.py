"""``sakeystate watch`` against real etcd, as a separate process, never restarted.

- One watcher follows, in turn, a time-based removal (a superseded key whose grace
  ends seconds after start), a publish, a revocation and a state-file edit: each
  lands in the bundle with exactly one reload, and its metrics endpoint says so.
- A watch whose start revision was compacted reads everything again.
- An invalid state file is reported and the last good state kept (it still
  follows etcd); a valid one is taken up again.
- SIGKILL of a watcher holding the reload lock mid-reload: another host's watcher
  reloads once the lease expired, never while the killed reload ran.
- SIGTERM during a restart: exit 0 within seconds, the restart never killed; the
  lock released once it ended, or left to its lease while it still runs; the reload
  owed (marker kept).
- Quorum lost for 20 s on a 3-member cluster, then restored: the bundle is untouched
  during the outage and the watcher converges afterwards, no key lost (slow).
- Three watchers and 20 key-set changes: no two reloads ever overlap, every host
  ends in sync with nothing owed (slow).
- The shipped systemd unit passes ``systemd-analyze verify``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sakeystate.bundle import PENDING_SUFFIX
from sakeystate.etcd import PrefixWatch
from sakeystate.keys import parse_pem_bundle
from sakeystate.state import load_state
from sakeystate.watch import Options, Watcher

from conftest import Env
from etcd_server import free_port
from support import REPO, entry_value, kid, private_key, state_data, write_state
from watch_support import WatchProcess, overlapping, pid_alive, probe, reloads, wait_for

HOSTS = ("ctrl1.example.org", "ctrl2.example.org", "ctrl3.example.org")
ME = "ctrl9.example.org"


def bundle_kids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {k.kid for k in parse_pem_bundle(path.read_bytes())[0]}


def lock_key(env: Env) -> str:
    return env.prefix.split("/kube-apiserver-sa-certs/")[0] + "/reload-lock"


def pending(bundle: Path) -> bool:
    return Path(str(bundle) + PENDING_SUFFIX).exists()


@pytest.fixture
def watchers(tmp_path: Path) -> Iterator[Callable[..., WatchProcess]]:
    """Start watchers; whatever is still running (and any probe) is killed at the end."""
    started: list[WatchProcess] = []

    def start(state: Path, host: str = ME, *args: str) -> WatchProcess:
        log = tmp_path / f"watch-{host}-{len(started)}.log"
        started.append(WatchProcess(state, host, log, "--debounce", "0.2s", *args))
        return started[-1]

    yield start
    for watcher in started:
        watcher.kill()
        watcher.stop(signal.SIGKILL)


def published(env: Env, key: Any, host: str, at: datetime) -> str:
    env.etcd.put(env.prefix + kid(key), entry_value(key, host, at))
    return kid(key)


def test_watch_follows_time_publish_revocation_and_state_edits_without_restart(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    grace = timedelta(seconds=30)
    log = env.tmp / "reloads.log"
    a1, a2, b1, c1, d1 = (private_key("ec256", 60 + i) for i in range(5))
    # a2 supersedes a1; a1's grace ends 8 s from now.
    k_a1 = published(env, a1, HOSTS[0], now - timedelta(seconds=100))
    k_a2 = published(env, a2, HOSTS[0], now - grace + timedelta(seconds=8))
    k_b1 = published(env, b1, HOSTS[1], now - timedelta(seconds=100))
    k_d1 = published(env, d1, "ctrl4.example.org", now - timedelta(seconds=100))
    k_c1 = kid(c1)
    trusted = [(k_a1, HOSTS[0]), (k_a2, HOSTS[0]), (k_b1, HOSTS[1]), (k_c1, HOSTS[2])]
    overrides: dict[str, Any] = {
        "etcd": {"reload_lock": lock_key(env)},
        "bundle": {"reload": probe(log, "me")},
        "retention": {"superseded_grace": "30s", "min_keys": 1, "max_removals": 2},
    }
    env.state(trusted, **overrides)
    port = free_port()
    watcher = watchers(env.state_path, ME, "--metrics-listen", f"127.0.0.1:{port}")

    wait_for("the start pass", lambda: bundle_kids(env.bundle) == {k_a1, k_a2, k_b1})
    wait_for("a1's removal when its grace ends", lambda: bundle_kids(env.bundle) == {k_a2, k_b1})
    assert env.prefix + k_a1 in env.dump()  # R13: prune deletes it from etcd, never a host
    published(env, c1, HOSTS[2], datetime.now(UTC))
    wait_for("the publish", lambda: bundle_kids(env.bundle) == {k_a2, k_b1, k_c1})
    revoked = [{"fingerprint": k_b1, "reason": "exposed"}]
    trusted.remove((k_b1, HOSTS[1]))
    env.state(trusted, revoked=revoked, **overrides)
    wait_for("the revocation", lambda: bundle_kids(env.bundle) == {k_a2, k_c1})
    env.state([*trusted, (k_d1, "ctrl4.example.org")], revoked=revoked, **overrides)
    wait_for("the state edit", lambda: bundle_kids(env.bundle) == {k_a2, k_c1, k_d1})

    assert watcher.proc.poll() is None

    def families() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {f.name: f for f in text_string_to_metric_families(text)}

    # A restart is counted once it is done (its reload_check passed, its record written).
    wait_for("five restarts done", lambda: families()["sakeystate_reloads"].samples[0].value >= 5)
    assert len(reloads(log)) == 5, watcher.output  # one per key-set change
    assert families()["sakeystate_bundle_keys"].samples[0].value == 3
    assert families()["sakeystate_reloads"].samples[0].value == 5
    assert watcher.stop() == 0
    assert "stopped" in watcher.output


def test_a_compacted_watch_revision_reads_everything_again(env: Env) -> None:
    first = env.publish(private_key("ec256", 70), HOSTS[0])
    late = kid(private_key("ec256", 71))
    env.state([(first, HOSTS[0]), (late, HOSTS[1])])
    desired = load_state(str(env.state_path), ME)
    watcher = Watcher(Options(str(env.state_path), ME, 0.0, 600.0), desired, None, _now)
    err = io.StringIO()
    with redirect_stderr(err):
        watcher._pass()
        read = watcher.store.revisions[env.prefix]
        watcher._drop_watch()
        env.publish(private_key("ec256", 71), HOSTS[1])
        newest = env.etcd.client.put(env.prefix.rstrip("/") + "-marker", b"x").header.revision
        env.etcd.client.compact(newest)
        # As if the watch had started from the revision the pass read, too late.
        watcher.watch = PrefixWatch(watcher.store, [env.prefix], read + 1)
        for _ in range(10):
            watcher._step()
            if late in bundle_kids(env.bundle):
                break
    watcher._drop_watch()
    watcher.store.close()
    assert bundle_kids(env.bundle) == {first, late}
    assert "compacted" in err.getvalue()


def _now() -> datetime:
    return datetime.now(UTC)


def test_an_invalid_state_file_keeps_the_last_good_state(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    first = env.publish(private_key("ec256", 72), HOSTS[0])
    second = kid(private_key("ec256", 73))
    env.state([(first, HOSTS[0]), (second, HOSTS[1])])
    good = env.state_path.read_text()
    watcher = watchers(env.state_path)
    wait_for("the start pass", lambda: bundle_kids(env.bundle) == {first})
    env.state_path.write_text(good.replace("apiVersion: sakeystate/v1", "apiVersion: nope"))
    wait_for("the report", lambda: "state file invalid" in watcher.output)
    env.publish(private_key("ec256", 73), HOSTS[1])
    wait_for("the publish, under the last good state", lambda: second in bundle_kids(env.bundle))
    third = env.publish(private_key("ec256", 79), HOSTS[2])  # not trusted yet
    env.state([(first, HOSTS[0]), (second, HOSTS[1]), (third, HOSTS[2])])
    wait_for("the valid edit", lambda: bundle_kids(env.bundle) == {first, second, third})
    assert watcher.proc.poll() is None


def test_sighup_re_reads_what_the_state_points_to(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    from pki import Pki

    now = datetime.now(UTC).replace(microsecond=0)
    pki, stranger = Pki(), Pki(org="Another Org")
    leaf = pki.sa(not_before=now - timedelta(days=1), not_after=now + timedelta(days=30))
    pinned = env.publish(private_key("ec256", 78), HOSTS[1])
    header = f"Host: {HOSTS[0]}\nPublished: {now:%Y-%m-%dT%H:%M:%SZ}\n".encode()
    env.etcd.put(env.prefix + leaf.kid, header + leaf.chained)
    ca_file = env.tmp / "ca.pem"
    ca_file.write_bytes(stranger.ca_file())  # the wrong CA: the leaf is not trusted yet
    anchor = {"name": "pki", "ca_file": str(ca_file), "hosts": [HOSTS[0]], "common_name": "sa"}
    env.state([(pinned, HOSTS[1])], trust_anchors=[anchor])
    watcher = watchers(env.state_path, ME, "--format", "json")
    wait_for("the start pass", lambda: bundle_kids(env.bundle) == {pinned})
    ca_file.write_bytes(pki.ca_file())  # the state file itself is unchanged
    watcher.send(signal.SIGHUP)
    wait_for("the SIGHUP pass", lambda: bundle_kids(env.bundle) == {pinned, leaf.kid})
    assert watcher.stop() == 0
    lines = [json.loads(line) for line in watcher.output.splitlines()]
    assert all(line["version"] == 1 for line in lines)
    assert any(line.get("triggers") == ["SIGHUP"] and line["result"] == "changed" for line in lines)


def _two_hosts(env: Env, log: Path, pauses: tuple[float, float]) -> list[Path]:
    keys = [env.publish(private_key("ec256", 74 + i), h) for i, h in enumerate(HOSTS[:2])]
    states = []
    for host, pause in zip(HOSTS[:2], pauses, strict=True):
        data = state_data(
            env.etcd.url,
            env.prefix,
            env.tmp / f"{host}.pem",
            list(zip(keys, HOSTS, strict=False)),
            etcd={"reload_lock": lock_key(env)},
            bundle={"reload": probe(log, host, pause), "reload_timeout": "60s"},
        )
        states.append(write_state(env.tmp / f"{host}.yaml", data))
    return states


def test_sigkill_of_the_lock_holder_frees_the_lock_by_lease_expiry(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    log = env.tmp / "reloads.log"
    state_a, state_b = _two_hosts(env, log, (120.0, 0.0))
    holder = watchers(state_a, HOSTS[0])
    wait_for("A's reload", lambda: len(reloads(log)) == 1)
    other = watchers(state_b, HOSTS[1])
    wait_for("B waiting for the lock", lambda: (env.tmp / f"{HOSTS[1]}.pem").exists())
    assert [r.name for r in reloads(log)] == [HOSTS[0]]
    killed_reload = reloads(log)[0].pid
    holder.kill()  # SIGKILL: no release, the lease must expire
    os.kill(killed_reload, signal.SIGKILL)
    killed_at = time.time()
    wait_for("the killed reload to be gone", lambda: not pid_alive(killed_reload))
    wait_for("B's reload after the lease expired", lambda: len(reloads(log)) == 2, 40)
    wait_for("B's reload to end", lambda: reloads(log)[1].end is not None)
    assert [r.name for r in reloads(log)] == [HOSTS[0], HOSTS[1]]
    assert reloads(log)[1].start > killed_at  # B waited for the lock all along
    wait_for("B in sync", lambda: not pending(env.tmp / f"{HOSTS[1]}.pem"))
    assert other.stop() == 0
    assert env.etcd.dump(lock_key(env) + "/") == {}


def test_sigterm_during_a_short_restart_waits_for_it_and_the_reload_stays_owed(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    log = env.tmp / "reloads.log"
    state_a, _ = _two_hosts(env, log, (3.0, 0.0))
    watcher = watchers(state_a, HOSTS[0])
    wait_for("the reload", lambda: len(reloads(log)) == 1)
    held = lock_key(env) + "/"  # the fair lock's waiter keys
    assert env.etcd.dump(held) != {}
    assert watcher.stop(signal.SIGTERM, timeout=30) == 0
    # The restart ran to its end (never killed), then the lock was released by the
    # watcher itself; reload_check was not seen through, so the reload stays owed.
    assert reloads(log)[0].end is not None
    assert env.etcd.dump(held) == {}
    assert pending(env.tmp / f"{HOSTS[0]}.pem")
    assert "stopped during the restart; the reload stays owed" in watcher.output


def test_sigterm_during_a_long_restart_never_kills_it_nor_releases_the_lock_under_it(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    log = env.tmp / "reloads.log"
    state_a, _ = _two_hosts(env, log, (120.0, 0.0))
    watcher = watchers(state_a, HOSTS[0])
    wait_for("the reload", lambda: len(reloads(log)) == 1)
    restart = reloads(log)[0].pid
    held = lock_key(env) + "/"  # the fair lock's waiter keys
    try:
        assert env.etcd.dump(held) != {}  # the lock is held
        # Exits within seconds (the restart is waited for 10 s at most)...
        assert watcher.stop(signal.SIGTERM, timeout=30) == 0
        # ...leaving the restart running and the lock to its lease, never released by
        # hand while a restart may be restarting an apiserver.
        assert pid_alive(restart)
        assert env.etcd.dump(held) != {}
        wait_for("the lease to expire", lambda: env.etcd.dump(held) == {}, 40)
        assert pending(env.tmp / f"{HOSTS[0]}.pem")
        assert "stopped during the restart; the reload stays owed" in watcher.output
    finally:
        os.kill(restart, signal.SIGKILL)


@pytest.mark.slow
def test_watch_converges_after_quorum_was_lost_for_20s(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    from test_cluster_faults import Cluster

    directory = tempfile.mkdtemp(prefix="sakeystate-watch-cluster-")
    cluster = Cluster(directory)
    try:
        cluster.start()
        _quorum_scenario(env, cluster, watchers)
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _quorum_scenario(env: Env, cluster: Any, watchers: Callable[..., WatchProcess]) -> None:
    prefix = "/quorum/kube-apiserver-sa-certs/"
    keys = [private_key("ec256", 80 + i) for i in range(3)]
    for key, host in zip(keys[:2], HOSTS, strict=False):
        cluster.put(prefix + kid(key), entry_value(key, host))
    data = state_data(
        cluster.endpoints[0],
        prefix,
        env.bundle,
        [(kid(k), h) for k, h in zip(keys, HOSTS, strict=True)],
        etcd={"endpoints": cluster.endpoints, "timeout": "2s", "reload_lock": "/quorum/lock"},
        bundle={"reload": probe(env.tmp / "reloads.log", "me")},
    )
    state = write_state(env.tmp / "quorum.yaml", data)
    watcher = watchers(state)
    two = {kid(k) for k in keys[:2]}
    log = env.tmp / "reloads.log"
    wait_for("the start pass", lambda: bundle_kids(env.bundle) == two)
    wait_for("its reload", lambda: len(reloads(log)) == 1 and not pending(env.bundle))
    before = env.bundle.read_bytes()
    cluster.kill(0)
    cluster.members[1].proc.send_signal(signal.SIGSTOP)  # two of three gone: no quorum
    try:
        wait_for("the outage to be noticed", lambda: "error" in watcher.output, 30)
        deadline = datetime.now(UTC) + timedelta(seconds=20)
        while datetime.now(UTC) < deadline:
            assert env.bundle.read_bytes() == before
            assert watcher.proc.poll() is None
            time.sleep(1)
    finally:
        cluster.members[1].proc.send_signal(signal.SIGCONT)
    cluster.start()
    restored = time.time()
    cluster.put(prefix + kid(keys[2]), entry_value(keys[2], HOSTS[2]))
    wait_for(
        "the watcher to converge after the outage",
        lambda: bundle_kids(env.bundle) == {kid(k) for k in keys},
        60,
    )
    # The key-set change after the outage is reloaded: once, and nothing stays owed.
    try:
        wait_for("the reload after the outage", lambda: len(reloads(log)) >= 2, 60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {reloads(log)}\n{watcher.output[-4000:]}") from None
    wait_for("the reload to end", lambda: reloads(log)[1].end is not None, 60)
    wait_for("nothing owed", lambda: not pending(env.bundle), 60)
    assert reloads(log)[1].start > restored
    assert len(reloads(log)) == 2, reloads(log)
    assert "internal error" not in watcher.output, watcher.output
    assert set(cluster.dump(prefix)) == {prefix + kid(k) for k in keys}
    assert watcher.proc.poll() is None


@pytest.mark.slow
def test_three_watchers_and_twenty_set_changes_never_reload_two_hosts_at_once(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    log = env.tmp / "reloads.log"
    keys = [private_key("ec256", 90 + i) for i in range(21)]
    owners = [HOSTS[i % 3] for i in range(21)]
    trusted = [(kid(k), h) for k, h in zip(keys, owners, strict=True)]
    env.publish(keys[0], owners[0])
    bundles = []
    for host in HOSTS:
        bundle = env.tmp / f"{host}.pem"
        data = state_data(
            env.etcd.url,
            env.prefix,
            bundle,
            trusted,
            etcd={"reload_lock": lock_key(env)},
            bundle={"reload": probe(log, host, 0.3), "reload_timeout": "120s"},
        )
        watchers(write_state(env.tmp / f"{host}.yaml", data), host)
        bundles.append(bundle)
    wait_for("three start passes", lambda: all(bundle_kids(b) == {kid(keys[0])} for b in bundles))
    for key, host in zip(keys[1:], owners[1:], strict=True):
        env.publish(key, host)
        wait_for("the change to reach one bundle", lambda k=key: kid(k) in bundle_kids(bundles[0]))
    everything = {kid(k) for k in keys}
    wait_for(
        "every host in sync, nothing owed",
        lambda: all(bundle_kids(b) == everything and not pending(b) for b in bundles),
        120,
    )
    runs = reloads(log)
    assert overlapping(runs) == []
    assert all(r.end is not None for r in runs)
    assert {r.name for r in runs} == set(HOSTS)
    assert len(runs) >= 3 * 2  # the start and at least one change per host


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing under CI (.ci/run installs systemd)")
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "examples/systemd/sakeystate-watch.service").read_text()
    assert "ProtectSystem=strict" in unit and "Restart=on-failure" in unit
    assert "NoNewPrivileges=yes" in unit and "ReadWritePaths=/etc/kubernetes/pki" in unit
    # verify checks that ExecStart's binary exists: point it at this checkout's.
    sakeystate = str(Path(sys.executable).parent / "sakeystate")
    local = tmp_path / "sakeystate-watch.service"
    local.write_text(unit.replace("/usr/local/bin/sakeystate", sakeystate))
    result = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "sakeystate-watch.service" not in result.stderr, result.stderr
