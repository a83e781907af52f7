"""The restart lifecycle under ``watch``, against real etcd; restarts detached with setsid.

- Five watchers, one of whose ``reload_check`` fails forever: every healthy host's
  restart completes within 2 x reload_timeout of a publish, no two overlap, none is
  cut short; the failing host backs off, and its failures show in its metrics and
  in ``status``.
- ``watch`` and a caller (the Ansible handler's ``converge --no-reload`` then
  ``reload``) on one host restart its apiserver once for one change, whichever
  goes first.
- A publish that arrives while a pass waits for the lock reaches the bundle at
  once; only the restart waits, and one restart covers both changes.
- SIGTERM while waiting for the lock: exit 0 at once, the restart still owed.
- Pass lines say what was done ("added", "reload owed"), and the restart has its
  own line; "reloaded" only after a restart this watcher ran.
- No fully qualified name: ``watch`` exits 1 at start; the shipped units pass
  ``--host`` from /etc/default/sakeystate and pass ``systemd-analyze verify``.
- The Watcher hook for signer mode: ``on_pass`` sees every plan applied, before
  the status record; restart-free never restarts and records ``"mode": "signer"``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sakeystate.plan import Plan
from sakeystate.state import DesiredState, load_state
from sakeystate.watch import Options, Watcher

from conftest import Env
from support import REPO, kid, private_key, run_cli
from watch_support import (
    SAKEYSTATE,
    Host,
    WatchProcess,
    failing_check,
    fleet_hosts,
    lock_key,
    make_fleet,
    overlapping,
    record,
    reloads,
    runs_of,
    wait_for,
)


@pytest.fixture
def watchers(tmp_path: Path) -> Iterator[Callable[..., WatchProcess]]:
    started: list[WatchProcess] = []

    def start(host: Host, *args: str) -> WatchProcess:
        log = tmp_path / f"watch-{host.name}-{len(started)}.log"
        started.append(WatchProcess(host.state, host.name, log, "--debounce", "0.2s", *args))
        return started[-1]

    yield start
    for watcher in started:
        watcher.kill()
        watcher.stop(signal.SIGKILL)


def in_sync_without_restart(env: Env, hosts: list[Host]) -> None:
    """Each host converged and confirmed, as a fleet that has run for a while is."""
    for host in hosts:
        state = ("--state", str(host.state), "--host", host.name)
        assert run_cli("converge", *state, "--no-reload").code == 0
        assert run_cli("reload-done", *state).code == 0


def trust(host: Host, kid_: str, owner: str) -> None:
    import yaml

    data = yaml.safe_load(host.state.read_text())
    data["trusted"].append({"fingerprint": kid_, "host": owner})
    host.state.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.slow
def test_one_unready_apiserver_does_not_starve_the_fleet(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    log = env.tmp / "restarts.log"
    names = fleet_hosts(5)
    sick = names[2]
    timeout = 20.0
    overrides = {n: {"reload_timeout": f"{timeout:g}s"} for n in names}
    overrides[sick] = {"reload_timeout": f"{timeout:g}s", "reload_check": failing_check()}
    hosts, _ = make_fleet(env, names, log, pause=0.2, index=300, **overrides)
    newcomer = private_key("ec256", 310)
    for host in hosts:
        trust(host, kid(newcomer), names[0])
    in_sync_without_restart(env, hosts)
    metrics = {h.name: env.tmp / f"{h.name}.prom" for h in hosts}
    procs = {h.name: watchers(h, "--metrics-textfile", str(metrics[h.name])) for h in hosts}
    wait_for("every watcher live", lambda: all(m.exists() for m in metrics.values()))

    published = time.time()
    env.publish(newcomer, names[0])
    healthy = [n for n in names if n != sick]

    def restarted(name: str) -> bool:
        return any(r.start > published and r.end is not None for r in runs_of(log, name))

    wait_for("every healthy host's restart", lambda: all(restarted(n) for n in healthy), 120)
    wait_for("the sick host's failure", lambda: "restart failed" in procs[sick].output, 120)
    last_done = max(
        r.end for n in healthy for r in runs_of(log, n) if r.start > published and r.end
    )
    for proc in procs.values():
        assert proc.stop() == 0
    runs = reloads(log)
    assert overlapping(runs) == [], runs
    assert all(r.end is not None for r in runs), runs  # no restart was cut short
    assert last_done - published <= 2 * timeout, (last_done - published, runs)
    assert all(len([r for r in runs_of(log, n) if r.start > published]) == 1 for n in healthy)
    # The sick host backed off: a handful of attempts, not one a second.
    assert 1 <= len([r for r in runs_of(log, sick) if r.start > published]) <= 3
    assert all(kid(newcomer) in h.kids() for h in hosts)
    families = {f.name: f for f in text_string_to_metric_families(metrics[sick].read_text())}
    assert families["sakeystate_reload_failures"].samples[0].value >= 1
    assert families["sakeystate_reload_consecutive_failures"].samples[0].value >= 1
    status = run_cli("status", "--state", str(hosts[0].state), "--host", names[0])
    assert status.code == 2
    assert f"{sick} does not verify {kid(newcomer)} yet (" in status.out
    assert "restart failed" in status.out
    for name in healthy:
        assert kid(newcomer) in (record(env, name) or {}).get("kids", [])


def test_watch_and_a_caller_restart_one_apiserver_once_caller_first(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, ["ctrl1001.example.org"], log, pause=2.0, index=320)
    newcomer = private_key("ec256", 321)
    trust(host, kid(newcomer), "ctrl1002.example.org")
    in_sync_without_restart(env, [host])
    watcher = watchers(host, "--debounce", "1s")
    wait_for("the watcher's start pass", lambda: "pass 1" in watcher.output)
    env.publish(newcomer, "ctrl1002.example.org")
    state = ("--state", str(host.state), "--host", host.name)
    # The handler pattern, at once: converge leaves the restart owed, reload performs it.
    converged = subprocess.run([SAKEYSTATE, "converge", *state, "--no-reload"], check=False)
    assert converged.returncode == 0
    reloaded = subprocess.run(
        [SAKEYSTATE, "reload", *state], capture_output=True, text=True, check=False
    )
    assert reloaded.returncode == 0, reloaded.stderr
    wait_for("the watcher's pass after the change", lambda: "pass 2" in watcher.output)
    time.sleep(2)  # a repeated restart would have started by now
    assert watcher.stop() == 0
    assert [r.name for r in reloads(log)] == [host.name], watcher.output
    assert kid(newcomer) in (record(env, host.name) or {})["kids"]


def test_watch_and_a_caller_restart_one_apiserver_once_watch_first(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, ["ctrl1001.example.org"], log, pause=2.0, index=330)
    newcomer = private_key("ec256", 331)
    trust(host, kid(newcomer), "ctrl1002.example.org")
    in_sync_without_restart(env, [host])
    watcher = watchers(host)
    wait_for("the watcher's start pass", lambda: "pass 1" in watcher.output)
    env.publish(newcomer, "ctrl1002.example.org")
    wait_for("the watcher's restart", lambda: len(reloads(log)) == 1)
    state = ("--state", str(host.state), "--host", host.name)
    converged = subprocess.run(
        [SAKEYSTATE, "converge", *state, "--no-reload", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert converged.returncode == 0, converged.stderr
    reloaded = subprocess.run(
        [SAKEYSTATE, "reload", *state], capture_output=True, text=True, check=False
    )
    assert reloaded.returncode == 0, reloaded.stderr
    # The caller waited for the watcher's restart (the local lock), then found it done.
    assert json.loads(converged.stdout)["reload_needed"] is False
    assert reloaded.stdout == "no reload is owed; nothing was run\n"
    assert watcher.stop() == 0
    assert [r.name for r in reloads(log)] == [host.name]
    assert "restart: reloaded: kube-apiserver restarted and reload_check passed" in watcher.output


def test_a_publish_during_the_lock_wait_reaches_the_bundle_and_one_restart_covers_both(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, ["ctrl1001.example.org"], log, index=340)
    first, second = private_key("ec256", 341), private_key("ec256", 342)
    trust(host, kid(first), "ctrl1002.example.org")
    trust(host, kid(second), "ctrl1003.example.org")
    in_sync_without_restart(env, [host])
    watcher = watchers(host)
    wait_for("the watcher's start pass", lambda: "pass 1" in watcher.output)
    lease = env.etcd.client.lease(120)
    env.etcd.client.put(lock_key(env), b"ctrl1009.example.org pid 1 cafe", lease=lease)
    try:
        env.publish(first, "ctrl1002.example.org")
        wait_for("the first key in the bundle", lambda: kid(first) in host.kids())
        wait_for("the restart waiting", lambda: "waiting for the reload lock" in watcher.output)
        assert "held by ctrl1009.example.org pid 1 cafe" in watcher.output
        env.publish(second, "ctrl1003.example.org")
        wait_for(
            "the second key in the bundle, lock still held", lambda: kid(second) in host.kids()
        )
        assert reloads(log) == []
        assert env.etcd.get(lock_key(env)) == b"ctrl1009.example.org pid 1 cafe"
    finally:
        lease.revoke()
    wait_for("one restart", lambda: len(reloads(log)) == 1 and reloads(log)[0].end is not None)
    wait_for("the record", lambda: kid(second) in (record(env, host.name) or {}).get("kids", []))
    time.sleep(1)
    assert watcher.stop() == 0
    assert len(reloads(log)) == 1
    assert {kid(first), kid(second)} <= set(record(env, host.name)["kids"])  # type: ignore[index]


def test_sigterm_while_waiting_for_the_lock_exits_0_and_the_restart_stays_owed(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, ["ctrl1001.example.org"], log, index=350)
    lease = env.etcd.client.lease(120)
    env.etcd.client.put(lock_key(env), b"ctrl1009.example.org pid 1 cafe", lease=lease)
    try:
        watcher = watchers(host)
        wait_for("the restart waiting", lambda: "waiting for the reload lock" in watcher.output)
        assert watcher.stop(signal.SIGTERM, timeout=20) == 0
        assert env.etcd.get(lock_key(env)) == b"ctrl1009.example.org pid 1 cafe"
    finally:
        lease.revoke()
    assert reloads(log) == [] and host.marker.exists()
    assert "stopped" in watcher.output


def test_pass_lines_say_what_was_done_and_reloaded_only_after_a_restart(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    log = env.tmp / "restarts.log"
    [host], kids = make_fleet(env, ["ctrl1001.example.org"], log, index=360)
    watcher = watchers(host)
    wait_for("the restart", lambda: "restart: reloaded" in watcher.output)
    assert watcher.stop() == 0
    lines = [line for line in watcher.output.splitlines() if "pass 1" in line]
    assert lines == [
        f"sakeystate watch: pass 1 (start): changed: added 1 bundle key(s); reload owed "
        f"(0 -> 1 bundle keys); kids={kids[0]}"
    ]
    assert "would" not in watcher.output


def test_watch_without_a_fully_qualified_name_exits_at_start(env: Env, tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        if os.environ.get("CI"):
            pytest.fail("unshare (util-linux) is missing under CI")
        pytest.skip("unshare is not installed")
    key = env.publish(private_key("ec256", 370), "ctrl1001.example.org")
    env.state([(key, "ctrl1001.example.org")], host="self")
    # A machine named "ctrl" (no domain), and --host "" as the unit passes it when
    # SAKEYSTATE_HOST is unset.
    script = f'hostname ctrl && exec {SAKEYSTATE} watch --state {env.state_path} --host ""'
    result = subprocess.run(
        [unshare, "--uts", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert "cannot tell which control plane this is" in result.stderr
    assert not env.bundle.exists()


def _verify(analyze: str, tmp_path: Path, names: list[str]) -> None:
    sakeystate = str(Path(sys.executable).parent / "sakeystate")
    for name in names:
        unit = (REPO / "examples/systemd" / name).read_text()
        (tmp_path / name).write_text(unit.replace("/usr/local/bin/sakeystate", sakeystate))
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not any(n in result.stderr for n in names), result.stderr


def test_the_shipped_units_pass_the_host_and_order_the_boot(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing under CI (.ci/run installs systemd)")
        pytest.skip("systemd-analyze is not installed")
    units = ["sakeystate-watch.service", "sakeystate-boot.service", "sakeystate-boot-done.service"]
    _verify(analyze, tmp_path, units)
    texts = {n: (REPO / "examples/systemd" / n).read_text() for n in units}
    for text in texts.values():
        assert "EnvironmentFile=-/etc/default/sakeystate" in text
        assert "--host ${SAKEYSTATE_HOST}" in text
    boot, done = texts["sakeystate-boot.service"], texts["sakeystate-boot-done.service"]
    assert "Before=kube-apiserver.service" in boot and "converge --no-reload" in boot
    assert "After=kube-apiserver.service" in done and "reload-done --wait-ready" in done
    assert "WantedBy=kube-apiserver.service" in boot and "WantedBy=kube-apiserver.service" in done
    assert "sakeystate-boot-done.service" in texts["sakeystate-watch.service"]


# --- the Watcher hook for signer mode ----------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def test_the_watcher_hook_sees_every_plan_and_restart_free_never_restarts(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], kids = make_fleet(env, ["ctrl1001.example.org"], log, index=380)
    newcomer = private_key("ec256", 381)
    trust(host, kid(newcomer), "ctrl1002.example.org")
    seen: list[tuple[tuple[str, ...], Any]] = []

    def on_pass(plan: Plan, desired: DesiredState) -> None:
        # Before the status record: it must not claim a set the signer does not serve yet.
        seen.append((plan.kids_after, (record(env, host.name) or {}).get("kids")))
        assert desired.host == host.name

    desired = load_state(str(host.state), host.name)
    options = Options(str(host.state), host.name, 0.0, 600.0)
    watcher = Watcher(options, desired, None, _now, on_pass=on_pass, restart_free=True)
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            watcher._pass()
            env.publish(newcomer, "ctrl1002.example.org")
            watcher._pass()
            watcher._pass()
    finally:
        watcher._drop_watch()
        watcher.liveness.release()
        watcher.store.close()
    both = tuple(sorted([kids[0], kid(newcomer)]))
    assert seen == [((kids[0],), None), (both, kids), (both, list(both))]
    assert reloads(log) == [] and not host.marker.exists()
    value = record(env, host.name)
    assert value is not None and value["mode"] == "signer" and value["kids"] == list(both)
    assert "reload" not in err.getvalue().split("kids=")[0]


def test_a_failing_hook_fails_the_pass_and_the_record_waits(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, ["ctrl1001.example.org"], log, index=390)

    def on_pass(_plan: Plan, _desired: DesiredState) -> None:
        from sakeystate.errors import SakeystateError

        raise SakeystateError("signer: cannot serve the set")

    desired = load_state(str(host.state), host.name)
    options = Options(str(host.state), host.name, 0.0, 600.0)
    watcher = Watcher(options, desired, None, _now, on_pass=on_pass, restart_free=True)
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            watcher._pass()
    finally:
        watcher.store.close()
    assert "error: signer: cannot serve the set; retrying in 1s" in err.getvalue()
    assert record(env, host.name) is None
