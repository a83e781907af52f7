"""The restart lifecycle with one-shot commands (converge, reload, reload-done), real etcd.

Restart commands are detached with ``setsid --wait`` (as a ``systemctl restart``
starts a systemd job): their start/end log shows every overlap and every restart
cut short.

- ``reload_timeout`` counts from when the lock is held: a host that waited longer
  than it for the lock still restarts (the finding: the lock wait used it up and
  the restart was killed after 0.1 s).
- A restart that outlasts ``reload_timeout`` is never killed and the lock is held
  until its process group is gone: no two restarts overlap (the finding: killed
  after 0.9 s, the lock released, the next host restarted during it); past
  HARD_CAP x reload_timeout its group is killed, and only then is the lock released.
- ``converge --no-reload`` never says "reloaded"; ``sakeystate reload`` performs the
  owed restart under the lock, writes the status record and clears the marker, once:
  a second one, or a concurrent one, restarts nothing.
- ``reload-done`` writes the status record (the Puppet ``restart =>`` finding).
- No restart configured and no caller: a warning on every run, and the record keeps
  saying what the apiserver loaded last.
- SIGTERM while waiting for the lock exits at once, owed; during a restart the
  command is never killed and the restart stays owed.
- A failed restart: one tense in the report, counted in the metrics, recorded for
  ``status``; ``check`` never prints "No changes" over a refusal.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import Env
from support import private_key
from watch_support import (
    SAKEYSTATE,
    detached,
    failing_check,
    lock_key,
    make_fleet,
    overlapping,
    pid_alive,
    probe,
    record,
    reloads,
    runs_of,
    status_prefix,
    wait_for,
)

ME = "ctrl1001.example.org"


def sakeystate(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SAKEYSTATE, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def hold_lock(env: Env, ttl: int = 60) -> object:
    """Another host's lock, held by this test through a lease."""
    lease = env.etcd.client.lease(ttl)
    env.etcd.client.put(lock_key(env), b"ctrl9999.example.org pid 4242 cafe", lease=lease)
    return lease


def test_reload_timeout_counts_from_the_lock_and_a_slow_restart_is_never_killed(
    env: Env,
) -> None:
    log = env.tmp / "restarts.log"
    names = ["ctrl1001.example.org", "ctrl1002.example.org"]
    hosts, _ = make_fleet(
        env,
        names,
        log,
        **{
            names[0]: {"reload": detached(log, names[0], 4.0), "reload_timeout": "2s"},
            names[1]: {"reload": detached(log, names[1], 0.2), "reload_timeout": "2s"},
        },
    )
    lease = hold_lock(env)
    procs = [
        sakeystate("converge", "--state", str(h.state), "--host", h.name, "--lock-timeout", "2m")
        for h in hosts
    ]
    # Both wait longer than their reload_timeout for the lock.
    wait_for("both bundles written", lambda: all(h.marker.exists() for h in hosts))
    time.sleep(3)
    assert reloads(log) == []
    lease.revoke()  # type: ignore[attr-defined]
    results = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    runs = reloads(log)
    assert sorted(r.name for r in runs) == sorted(names)
    assert all(r.end is not None for r in runs), runs  # nothing was killed
    assert overlapping(runs) == []
    # The slow host failed (it took longer than reload_timeout) after holding the lock
    # until its restart ended; the quick one, which waited as long, restarted fine.
    assert codes == [1, 0], results
    assert "more than reload_timeout (2s); the lock was held until it ended" in results[0][1]
    assert hosts[0].marker.exists() and not hosts[1].marker.exists()
    assert record(env, names[1]) is not None and record(env, names[0]) is None
    assert env.etcd.dump(lock_key(env) + "/") == {}  # no waiter key left: released


def test_a_restart_past_the_hard_cap_is_killed_and_only_then_the_lock_released(
    env: Env,
) -> None:
    log = env.tmp / "restarts.log"
    # Not detached: the process group is the restart itself. Cap: 3 x 1s.
    hosts, _ = make_fleet(
        env, [ME], log, all={"reload": probe(log, ME, 120), "reload_timeout": "1s"}
    )
    proc = sakeystate("converge", "--state", str(hosts[0].state), "--host", ME)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "was still running after 3s (3 x reload_timeout), so its process group was killed" in err
    [run] = reloads(log)
    assert run.end is None
    wait_for("the killed restart to be gone", lambda: not pid_alive(run.pid))
    assert env.etcd.dump(lock_key(env) + "/") == {}  # no waiter key left: released
    assert hosts[0].marker.exists()


def test_converge_no_reload_then_reload_restarts_once_under_the_lock(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], kids = make_fleet(env, [ME], log)
    state = ["--state", str(host.state), "--host", ME]
    converged = env.cli("converge", *state, "--no-reload")
    assert converged.code == 0, converged.err
    assert "reloaded" not in converged.out
    assert converged.out.splitlines()[-1].endswith(
        ": added 1 bundle key(s); reload owed (0 -> 1 bundle keys)."
    )
    assert host.marker.exists() and record(env, ME) is None and reloads(log) == []

    reloaded = env.cli("reload", *state, "--format", "json")
    assert reloaded.code == 0, reloaded.err
    answer = json.loads(reloaded.out)
    assert (answer["version"], answer["changed"], answer["owed"]) == (1, True, False)
    assert [r.name for r in reloads(log)] == [ME]
    assert not host.marker.exists()
    assert record(env, ME) is not None and record(env, ME)["kids"] == kids  # type: ignore[index]
    assert record(env, ME)["mode"] == "file"  # type: ignore[index]

    again = env.cli("reload", *state)
    assert (again.code, again.out) == (0, "no reload is owed; nothing was run\n")
    assert env.cli("reload", *state, "-q").out == ""
    assert len(reloads(log)) == 1


def test_concurrent_reloads_of_one_host_restart_it_once(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, [ME], log, pause=1.0)
    assert env.cli("converge", "--state", str(host.state), "--host", ME, "--no-reload").code == 0
    procs = [sakeystate("reload", "--state", str(host.state), "--host", ME) for _ in range(3)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert len(reloads(log)) == 1
    # The others either found nothing owed or found it done once they held the lock.
    done = [o for o in outs if o.startswith("reloaded")]
    assert len(done) == 1, outs
    assert all(
        o
        in (
            "no reload is owed; nothing was run\n",
            "another run already restarted kube-apiserver; not repeated\n",
        )
        or o.startswith("reloaded")
        for o in outs
    ), outs


def test_owed_but_no_reload_configured_is_an_error_for_reload(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, [ME], log, all={"reload": None})
    assert env.cli("converge", "--state", str(host.state), "--host", ME, "--no-reload").code == 0
    result = env.cli("reload", "--state", str(host.state), "--host", ME, "--format", "json")
    assert result.code == 1
    answer = json.loads(result.out)
    assert (answer["changed"], answer["owed"]) == (False, True)
    assert "no bundle.reload is configured" in result.err


def test_reload_done_writes_the_status_record(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], kids = make_fleet(env, [ME], log)
    state = ["--state", str(host.state), "--host", ME]
    assert env.cli("converge", *state, "--no-reload").code == 0
    assert record(env, ME) is None
    waited = env.cli("wait", *state, "--kid", kids[0], "--timeout", "1s")
    assert waited.code == 1 and "unknown: ctrl1001.example.org (no status record" in waited.err
    # The caller restarts kube-apiserver its own way (Puppet's service restart), then:
    done = env.cli("reload-done", *state)
    assert (done.code, done.out) == (0, "owed reload confirmed and cleared\n")
    assert record(env, ME)["kids"] == kids  # type: ignore[index]
    assert env.cli("wait", *state, "--kid", kids[0], "--timeout", "5s").code == 0
    assert env.cli("status", *state).code == 0
    assert env.cli("plan", *state, "--detailed-exitcode").code == 0


def test_no_restart_configured_warns_every_run_and_keeps_the_record_truthful(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], kids = make_fleet(env, [ME], log)
    state = ["--state", str(host.state), "--host", ME]
    assert env.cli("converge", *state).code == 0
    first = record(env, ME)
    assert first is not None and first["kids"] == kids
    # A second key is trusted, and the restart is no longer configured.
    new = env.publish(private_key("ec256", 260), "ctrl1002.example.org")
    parsed = yaml.safe_load(host.state.read_text())
    del parsed["bundle"]["reload"]
    parsed["trusted"].append({"fingerprint": new, "host": "ctrl1002.example.org"})
    parsed["fleet"] = [ME]
    host.state.write_text(yaml.safe_dump(parsed))
    for _run in range(2):
        result = env.cli("converge", *state)
        assert result.code == 0, result.err
        assert "no bundle.reload is configured and no caller restarts kube-apiserver" in result.err
        assert "reloaded" not in result.out
        assert record(env, ME) == first  # still what the apiserver loaded
    assert new in host.kids()
    assert env.cli("wait", *state, "--kid", new, "--timeout", "1s").code == 1
    assert env.cli("reload-done", *state).code == 0
    assert record(env, ME)["kids"] == sorted([*kids, new])  # type: ignore[index]
    quiet = env.cli("converge", *state)
    assert "no bundle.reload" not in quiet.err


def test_a_failed_reload_is_reported_in_one_tense_and_counted(env: Env) -> None:
    log = env.tmp / "restarts.log"
    metrics = env.tmp / "sakeystate.prom"
    [host], _ = make_fleet(
        env, [ME], log, all={"reload_check": failing_check(), "reload_timeout": "2s"}
    )
    result = env.cli(
        "converge", "--state", str(host.state), "--host", ME, "--metrics-textfile", str(metrics)
    )
    assert result.code == 1
    last = result.out.splitlines()[-1]
    assert last.startswith("Converged for test at ")
    assert last.endswith(": added 1 bundle key(s); reload failed, still owed (0 -> 1 bundle keys).")
    assert "would" not in result.out
    assert "did not succeed within reload_timeout (2s)" in result.err
    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    assert families["sakeystate_reload_failures"].samples[0].value == 1
    assert families["sakeystate_reload_pending"].samples[0].value == 1
    assert families["sakeystate_reload_consecutive_failures"].samples[0].value == 1
    assert families["sakeystate_reload_lock_wait_seconds"].samples[0].value >= 0
    # For `status`: the failure is recorded under the host's own subtree.
    failure = json.loads(env.etcd.get(f"{status_prefix(env)}{ME}/restart") or b"{}")
    assert failure["failures"] == 1 and "reload_check" in failure["error"]
    status = env.cli("status", "--state", str(host.state), "--host", ME)
    assert status.code == 2
    assert "restart failed 1 time(s) since" in status.out


def test_check_never_says_no_changes_over_a_refusal(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, [ME], log)
    state = ["--state", str(host.state), "--host", ME]
    assert env.cli("converge", *state).code == 0
    parsed = yaml.safe_load(host.state.read_text())
    parsed["own_cert"] = str(env.tmp / "missing-sa.pem")
    host.state.write_text(yaml.safe_dump(parsed))
    checked = env.cli("check", *state)
    assert checked.code == 0
    assert checked.out == "Refused: converge would write nothing (1 refusal(s), on stderr).\n"
    assert "converge would be refused" in checked.err and "missing-sa.pem" in checked.err


def test_sigterm_while_waiting_for_the_lock_exits_and_the_reload_stays_owed(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, [ME], log)
    lease = hold_lock(env)
    try:
        proc = sakeystate("converge", "--state", str(host.state), "--host", ME)
        wait_for("the bundle written", host.marker.exists)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        lease.revoke()  # type: ignore[attr-defined]
    assert proc.returncode == 1
    assert "stopped by a signal before the restart completed; the reload stays owed" in err
    assert host.marker.exists() and reloads(log) == []


def test_sigterm_during_a_restart_never_kills_it_and_the_reload_stays_owed(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, [ME], log, pause=3.0)
    proc = sakeystate("converge", "--state", str(host.state), "--host", ME)
    wait_for("the restart", lambda: len(reloads(log)) == 1)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    # It ran to its end (never killed), and since reload_check was not seen through,
    # the restart stays owed.
    [run] = runs_of(log, ME)
    assert run.end is not None
    assert host.marker.exists()
    assert env.etcd.dump(lock_key(env) + "/") == {}  # no waiter key left: released


def test_the_status_record_says_what_the_apiserver_verifies_and_its_mode(env: Env) -> None:
    log = env.tmp / "restarts.log"
    [host], kids = make_fleet(env, [ME], log)
    assert env.cli("converge", "--state", str(host.state), "--host", ME).code == 0
    value = record(env, ME)
    assert value is not None
    assert (value["host"], value["kids"], value["mode"], value["version"]) == (ME, kids, "file", 1)
