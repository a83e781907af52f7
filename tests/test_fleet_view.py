"""``status`` and ``wait`` tell in sync, lagging, unknown and down apart; real etcd.

- A record of a host outside the fleet (decommissioned, renamed) never keeps
  ``status`` at 2: it is listed once, with ``prune`` as the cure.
- ``wait --absent`` never counts a host with no record, or an unreadable one, as
  absent.
- A host whose ``watch`` holds its liveness key is lagging; one with no live watch
  whose record has not changed for ``--down-after`` is down; ``wait --skip HOST``
  passes a host an operator knows is down, and says so.
- A record stamped in the future shows its skew, and past a minute it is an item.
- A kid that begins with ``-`` works as ``--kid``'s value.
- A status write etcd denies fails the run, naming the key and the etcd user.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from sakeystate.keys import format_time

from conftest import Env
from etcd_server import EtcdServer
from support import Result, entry_value, kid, private_key, run_cli, state_data, write_state
from watch_support import (
    Host,
    WatchProcess,
    fleet_hosts,
    live,
    make_fleet,
    status_prefix,
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


def synced(env: Env, count: int, index: int) -> tuple[list[Host], list[str]]:
    hosts, kids = make_fleet(env, fleet_hosts(count), env.tmp / "restarts.log", index=index)
    for host in hosts:
        assert run_cli("converge", "--state", str(host.state), "--host", host.name).code == 0
    return hosts, kids


def cli(host: Host, command: str, *args: str) -> Result:
    return run_cli(command, "--state", str(host.state), "--host", host.name, *args)


def put_record(env: Env, host: str, kids: list[str], since: datetime) -> None:
    value = {
        "version": 1,
        "host": host,
        "cluster": "test",
        "kids": kids,
        "since": format_time(since),
    }
    env.etcd.put(status_prefix(env) + host, json.dumps(value))


def test_records_outside_the_fleet_are_listed_once_and_never_keep_status_at_2(env: Env) -> None:
    hosts, kids = synced(env, 2, 400)
    gone = "ctrl0999.example.org"
    put_record(env, gone, [kids[0], "a-revoked-kid-it-once-verified"], datetime.now(UTC))
    status = cli(hosts[0], "status")
    assert status.code == 0, status.out
    assert (
        f"note: ignored the status records of 1 host(s) outside the fleet: {gone} "
        "(`sakeystate prune` removes them)"
    ) in status.out.splitlines()
    assert "a-revoked-kid-it-once-verified" not in status.out
    report = json.loads(cli(hosts[0], "status", "--format", "json").out)
    assert report["ignored_records"] == [gone] and report["in_order"] is True


def test_wait_absent_never_counts_a_host_without_a_record_as_absent(env: Env) -> None:
    hosts, kids = synced(env, 3, 410)
    env.etcd.client.delete(status_prefix(env) + hosts[1].name)
    env.etcd.put(status_prefix(env) + hosts[2].name, b"{not json")
    revoked = kids[0]
    absent = cli(hosts[0], "wait", "--kid", revoked, "--absent", "--timeout", "1s")
    assert absent.code == 1
    err = absent.err
    assert f"unknown: {hosts[1].name} (no status record" in err
    assert f"{hosts[2].name} (unreadable status record: record is not JSON" in err
    report = json.loads(
        cli(
            hosts[0], "wait", "--kid", revoked, "--absent", "--timeout", "1s", "--format", "json"
        ).out
    )
    states = {lag["host"]: lag["state"] for lag in report["lagging"]}
    assert states == {
        hosts[0].name: "lagging",
        hosts[1].name: "unknown",
        hosts[2].name: "unknown",
    }


def test_a_down_host_is_told_from_a_lagging_one_and_can_be_skipped(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    hosts, _ = synced(env, 3, 420)
    one, two, three = hosts
    newcomer = private_key("ec256", 425)
    # Only the first two trust the newcomer yet; the third lags, first with a live watch.
    for host in (one, two):
        data = yaml.safe_load(host.state.read_text())
        data["trusted"].append({"fingerprint": kid(newcomer), "host": one.name})
        host.state.write_text(yaml.safe_dump(data, sort_keys=False))
    env.publish(newcomer, one.name)
    for host in (one, two):
        assert cli(host, "converge").code == 0
    watcher = watchers(three)
    wait_for("the third host's liveness key", lambda: live(env, three.name))
    lagging = cli(one, "wait", "--kid", kid(newcomer), "--timeout", "1s", "--down-after", "1s")
    assert f"lagging: {three.name} (record since" in lagging.err
    assert "watch live" in lagging.err
    status = cli(one, "status", "--down-after", "1s")
    assert f"{three.name} does not verify {kid(newcomer)} yet (lagging: " in status.out

    watcher.kill()  # powered off: no SIGTERM, the lease must expire
    assert watcher.stop(signal.SIGKILL) != 0
    wait_for("the liveness key to expire", lambda: not live(env, three.name), 40)
    down = cli(one, "wait", "--kid", kid(newcomer), "--timeout", "1s", "--down-after", "1s")
    assert down.code == 1
    assert f"down: {three.name} (record since" in down.err
    assert f"can be passed with --skip {three.name}" in down.err
    status = cli(one, "status", "--down-after", "1s", "--format", "json")
    host = {h["host"]: h for h in json.loads(status.out)["hosts"]}
    assert (host[three.name]["state"], host[three.name]["watch_live"]) == ("down", False)
    assert host[one.name]["state"] == "in sync"
    # Not down yet by the default --down-after: its record changed a moment ago.
    assert "lagging: " in cli(one, "wait", "--kid", kid(newcomer), "--timeout", "1s").err

    skipped = cli(one, "wait", "--kid", kid(newcomer), "--timeout", "5s", "--skip", three.name)
    assert skipped.code == 0, skipped.err
    assert (
        skipped.out
        == f"every fleet host verifies {kid(newcomer)} (2 host(s); skipped: {three.name})\n"
    )
    assert f"--skip {three.name}: not waited for, as asked" in skipped.err
    stranger = cli(one, "wait", "--kid", kid(newcomer), "--skip", "ctrl7.example.org")
    assert stranger.code == 1 and "not in the fleet" in stranger.err


def test_a_watcher_stopped_by_sigterm_removes_its_liveness_key_at_once(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    hosts, _ = synced(env, 1, 430)
    watcher = watchers(hosts[0])
    wait_for("the liveness key", lambda: live(env, hosts[0].name))
    assert watcher.stop() == 0
    assert not live(env, hosts[0].name)


def test_a_record_from_the_future_shows_its_skew_and_is_an_item(env: Env) -> None:
    hosts, kids = synced(env, 2, 440)
    now = datetime.now(UTC).replace(microsecond=0)
    ahead = now + timedelta(minutes=15)
    put_record(env, hosts[1].name, [kids[0], kids[1]], ahead)
    status = cli(hosts[0], "status")
    assert status.code == 2
    lines = status.out.splitlines()
    assert any(
        line.startswith(f"{hosts[1].name}: since {format_time(ahead)} (0h1")
        and "in the future: clock skew)" in line
        for line in lines
    ), lines
    assert any(
        line.startswith(f"- {hosts[1].name}'s status record is stamped 0h1")
        and line.endswith(f"in the future ({format_time(ahead)}): its clock or this one is off")
        for line in lines
    ), lines
    report = json.loads(cli(hosts[0], "status", "--format", "json").out)
    skews = {h["host"]: h["skew_seconds"] for h in report["hosts"]}
    assert skews[hosts[0].name] is None and 14 * 60 < skews[hosts[1].name] <= 15 * 60


def _dash_key() -> ec.EllipticCurvePrivateKey:
    for _ in range(5000):
        key = ec.generate_private_key(ec.SECP256R1())
        if kid(key).startswith("-"):
            return key
    raise AssertionError("no kid beginning with - in 5000 keys")


def test_a_kid_that_begins_with_a_dash_is_a_kid_argument(env: Env) -> None:
    key = _dash_key()
    name = "ctrl1001.example.org"
    dash = env.publish(key, name)
    assert dash.startswith("-")
    path = env.tmp / "bundle.pem"
    reload = {"reload": ["true"]}
    data = state_data(env.etcd.url, env.prefix, path, [(dash, name)], fleet=[name], bundle=reload)
    state = write_state(env.tmp / "dash.yaml", data)
    assert run_cli("converge", "--state", str(state), "--host", name).code == 0
    for form in (["--kid", dash], [f"--kid={dash}"]):
        waited = run_cli("wait", "--state", str(state), "--host", name, *form, "--timeout", "5s")
        assert (waited.code, waited.out) == (
            0,
            f"every fleet host verifies {dash} (1 host(s))\n",
        ), waited.err
    # --absent, before --kid, and after it: argparse must not read the kid as an option.
    args = ("--state", str(state), "--kid", dash, "--absent", "--timeout", "1s", "--host", name)
    absent = run_cli("wait", *args)
    assert absent.code == 1
    assert f"timed out waiting until no fleet host verifies {dash}" in absent.err
    assert "a kid that begins with - works" in " ".join(run_cli("wait", "--help").out.split())


# --- a denied status write -----------------------------------------------------------------

PASSWORD = "s3cret-fleet"


@pytest.fixture(scope="module")
def denying_etcd() -> Iterator[EtcdServer]:
    """etcd with auth: the host's user may write its keys but not its status record."""
    directory = tempfile.mkdtemp(prefix="sakeystate-deny-")
    server = EtcdServer(directory, name="deny").start()
    try:
        server.etcdctl("user", "add", f"root:{PASSWORD}-root")
        server.etcdctl("user", "grant-role", "root", "root")
        server.etcdctl("user", "add", f"ctrl1001:{PASSWORD}")
        server.etcdctl("role", "add", "ctrl1001")
        for grant in (
            ("readwrite", "--prefix=true", "/deny/kube-apiserver-sa-certs/"),
            ("read", "--prefix=true", "/deny/kube-apiserver-sa-status/"),
            ("readwrite", "--prefix=true", "/deny/reload-lock"),
        ):
            server.etcdctl("role", "grant-permission", grant[1], "ctrl1001", grant[0], grant[2])
        server.etcdctl("user", "grant-role", "ctrl1001", "ctrl1001")
        server.etcdctl("auth", "enable")
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_denied_status_write_fails_the_run_naming_the_key_and_the_user(
    denying_etcd: EtcdServer, tmp_path: Path
) -> None:
    name = "ctrl1001.example.org"
    key = private_key("ec256", 450)
    prefix = "/deny/kube-apiserver-sa-certs/"
    denying_etcd.etcdctl(
        f"--user=root:{PASSWORD}-root", "put", prefix + kid(key), stdin=entry_value(key, name)
    )
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    data = state_data(
        denying_etcd.url,
        prefix,
        tmp_path / "bundle.pem",
        [(kid(key), name)],
        etcd={
            "reload_lock": "/deny/reload-lock",
            "auth": {"username": "ctrl1001", "password_file": str(password)},
        },
        bundle={"reload": ["true"]},
    )
    state = write_state(tmp_path / "state.yaml", data)
    result = run_cli("converge", "--state", str(state), "--host", name)
    assert result.code == 1
    key_name = f"/deny/kube-apiserver-sa-status/{name}"
    assert f"the status record {key_name} was not written (etcd user ctrl1001)" in result.err
    assert "reloaded" in result.out  # the restart itself was done, and said so
    assert (tmp_path / "bundle.pem").exists()


def test_a_watcher_restarted_after_sigkill_takes_the_liveness_key_once_it_expired(
    env: Env, watchers: Callable[..., WatchProcess]
) -> None:
    hosts, _ = synced(env, 1, 460)
    first = watchers(hosts[0])
    wait_for("the liveness key", lambda: live(env, hosts[0].name))
    first.kill()
    first.stop(signal.SIGKILL)
    second = watchers(hosts[0])
    key = f"{status_prefix(env)}{hosts[0].name}/watch"

    def held_by_the_second() -> bool:
        values = env.etcd.dump(key).values()
        return any(f"pid {second.proc.pid} ".encode() in v for v in values)

    wait_for("the second watcher's liveness key", held_by_the_second, 60)
