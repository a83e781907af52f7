"""Configuration management restarts through ``sakeystate reload``: real ansible-playbook
and puppet apply, real etcd, restarts detached with setsid (as systemd jobs are).

- An Ansible play with ``serial: 2``: converge (``run_reload: false``) notifies a
  handler that runs ``sakeystate reload`` (``ansible.builtin.command``); the two
  hosts' handlers run at once, and their restarts never overlap (the finding: the
  documented handler pattern restarted two apiservers 30 ms apart).
- Two Puppet runs at once, each an exec of ``converge --no-reload`` guarded by
  ``check`` that notifies a refresh-only exec of ``sakeystate reload``: no overlap,
  one restart per host, and the next run changes nothing.
- ``watch`` on a host and the Ansible play for one change: one restart.
"""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_fleet_view
import yaml
from test_puppet import pp, puppet_apply

from ansible_support import ansible_tool
from conftest import Env
from etcd_server import EtcdServer
from support import entry_value, kid, private_key, state_data, write_state
from watch_support import (
    SAKEYSTATE,
    Host,
    WatchProcess,
    detached,
    fleet_hosts,
    make_fleet,
    overlapping,
    record,
    reloads,
    runs_of,
    wait_for,
)


def play(env: Env, hosts: list[Host], serial: int) -> subprocess.CompletedProcess[str]:
    inventory = env.tmp / "inventory.ini"
    inventory.write_text(
        "[kube_control_plane]\n"
        + "".join(
            f"{h.name} ansible_connection=local ansible_python_interpreter={sys.executable} "
            f"state_file={h.state}\n"
            for h in hosts
        )
    )
    playbook = [
        {
            "name": "Service-account keys, restarts under the cluster's lock",
            "hosts": "kube_control_plane",
            "serial": serial,
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Converge",
                    "sakeystate.sakeystate.converge": {
                        "state_file": "{{ state_file }}",
                        "host": "{{ inventory_hostname }}",
                        "run_reload": False,
                    },
                    "register": "sakeystate_result",
                    "notify": "Restart kube-apiserver",
                }
            ],
            "handlers": [
                {
                    "name": "Restart kube-apiserver",
                    "ansible.builtin.command": {
                        "argv": [
                            SAKEYSTATE,
                            "reload",
                            "--state",
                            "{{ state_file }}",
                            "--host",
                            "{{ inventory_hostname }}",
                            "--format",
                            "json",
                        ]
                    },
                    "register": "reload_result",
                    "changed_when": "(reload_result.stdout | from_json).changed",
                    "when": "sakeystate_result.reload_needed",
                }
            ],
        }
    ]
    path = env.tmp / "play.yml"
    path.write_text(yaml.safe_dump(playbook, sort_keys=False))
    return ansible_tool(env.tmp, "ansible-playbook", "-i", str(inventory), str(path))


def test_the_ansible_handler_restarts_two_hosts_at_once_never_overlapping(env: Env) -> None:
    log = env.tmp / "restarts.log"
    hosts, kids = make_fleet(env, fleet_hosts(2), log, pause=1.5, index=500)
    first = play(env, hosts, serial=2)
    assert first.returncode == 0, first.stdout + first.stderr
    runs = reloads(log)
    assert sorted(r.name for r in runs) == sorted(h.name for h in hosts)
    assert all(r.end is not None for r in runs)
    assert overlapping(runs) == [], runs
    for host in hosts:
        assert not host.marker.exists()
        assert (record(env, host.name) or {}).get("kids") == sorted(kids)
    again = play(env, hosts, serial=2)
    assert again.returncode == 0, again.stdout
    assert len(reloads(log)) == 2
    assert "changed=0" in again.stdout


def test_a_puppet_refresh_of_sakeystate_reload_restarts_under_the_lock(env: Env) -> None:
    log = env.tmp / "restarts.log"
    hosts, kids = make_fleet(env, fleet_hosts(2), log, pause=1.5, index=510)

    def manifest(host: Host) -> str:
        state = f"--state {host.state} --host {host.name}"
        return f"""
        exec {{ 'sakeystate converge':
          command => {pp(f"{SAKEYSTATE} converge --no-reload {state}")},
          onlyif  => {pp(f"{SAKEYSTATE} check {state}")},
          logoutput => true,
        }}
        ~> exec {{ 'sakeystate reload':
          command     => {pp(f"{SAKEYSTATE} reload {state}")},
          refreshonly => true,
          logoutput   => true,
        }}
        """

    def apply_all() -> list[int]:
        procs = []
        for host in hosts:
            work = env.tmp / f"puppet-{host.name}"
            work.mkdir(exist_ok=True)
            procs.append((work, manifest(host)))
        # Two Puppet agents on two hosts, at the same moment.
        with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
            done = list(pool.map(lambda item: puppet_apply(item[0], item[1]), procs))
        for result in done:
            assert result.returncode in (0, 2), result.stdout + result.stderr
        return [r.returncode for r in done]

    assert apply_all() == [2, 2]
    runs = reloads(log)
    assert sorted(r.name for r in runs) == sorted(h.name for h in hosts)
    assert all(r.end is not None for r in runs)
    assert overlapping(runs) == [], runs
    for host in hosts:
        assert (record(env, host.name) or {}).get("kids") == sorted(kids)
    assert apply_all() == [0, 0]
    assert len(reloads(log)) == 2


@pytest.fixture
def watcher(env: Env) -> Iterator[list[WatchProcess]]:
    started: list[WatchProcess] = []
    yield started
    for proc in started:
        proc.kill()
        proc.stop(signal.SIGKILL)


def test_watch_and_an_ansible_handler_restart_one_apiserver_once(
    env: Env, watcher: list[WatchProcess]
) -> None:
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, fleet_hosts(1), log, pause=2.0, index=520)
    newcomer = private_key("ec256", 521)
    data = yaml.safe_load(host.state.read_text())
    data["trusted"].append({"fingerprint": kid(newcomer), "host": "ctrl1009.example.org"})
    host.state.write_text(yaml.safe_dump(data, sort_keys=False))
    assert play(env, [host], serial=1).returncode == 0  # in sync, restarted once
    assert len(reloads(log)) == 1
    proc = WatchProcess(host.state, host.name, env.tmp / "watch.log", "--debounce", "0.2s")
    watcher.append(proc)
    wait_for("the watcher's start pass", lambda: "pass 1" in proc.output)
    env.publish(newcomer, "ctrl1009.example.org")
    result = play(env, [host], serial=1)  # at once: both see the change
    assert result.returncode == 0, result.stdout
    wait_for("the restart", lambda: len(reloads(log)) >= 2 and reloads(log)[-1].end is not None)
    wait_for("the record", lambda: kid(newcomer) in (record(env, host.name) or {})["kids"])
    assert proc.stop() == 0
    assert len(runs_of(log, host.name)) == 2, (proc.output, result.stdout)
    assert not host.marker.exists()


def test_puppet_restart_mode_writes_the_status_record_through_reload_done(env: Env) -> None:
    """The Puppet ``restart =>`` shape: converge --no-reload, the service restarted by
    Puppet (outside sakeystate), then reload-done, which writes the status record."""
    log = env.tmp / "restarts.log"
    [host], kids = make_fleet(env, fleet_hosts(1), log, index=530)
    state = f"--state {host.state} --host {host.name}"
    manifest = f"""
    exec {{ 'sakeystate converge':
      command => {pp(f"{SAKEYSTATE} converge --no-reload {state}")},
      onlyif  => {pp(f"{SAKEYSTATE} check {state}")},
    }}
    ~> exec {{ 'restart kube-apiserver':
      command     => {pp(" ".join(detached(log, host.name, 0.2)))},
      refreshonly => true,
    }}
    ~> exec {{ 'sakeystate reload-done':
      command     => {pp(f"{SAKEYSTATE} reload-done {state}")},
      refreshonly => true,
    }}
    """
    first = puppet_apply(env.tmp, manifest)
    assert first.returncode == 2, first.stdout + first.stderr
    assert (record(env, host.name) or {}).get("kids") == kids
    waited = subprocess.run(
        [SAKEYSTATE, "wait", *state.split(), "--kid", kids[0], "--timeout", "5s"], check=False
    )
    assert waited.returncode == 0
    assert puppet_apply(env.tmp, manifest).returncode == 0
    assert len(reloads(log)) == 1


def test_an_ansible_converge_with_no_restart_configured_warns_every_run(env: Env) -> None:
    """run_reload: true (the default) and no bundle.reload: every run warns, and the
    status record never claims a set the apiserver did not load."""
    log = env.tmp / "restarts.log"
    [host], _ = make_fleet(env, fleet_hosts(1), log, index=540, all={"reload": None})
    playbook = [
        {
            "name": "Converge only",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars": {"ansible_python_interpreter": sys.executable},
            "tasks": [
                {
                    "name": "Converge",
                    "sakeystate.sakeystate.converge": {
                        "state_file": str(host.state),
                        "host": host.name,
                    },
                }
            ],
        }
    ]
    path = env.tmp / "converge.yml"
    path.write_text(yaml.safe_dump(playbook, sort_keys=False))
    for _run in range(2):
        result = ansible_tool(env.tmp, "ansible-playbook", "-i", "localhost,", str(path))
        assert result.returncode == 0, result.stdout
        assert "no bundle.reload is configured" in result.stdout + result.stderr
        assert record(env, host.name) is None
    assert reloads(log) == [] and host.marker.exists()


denying_etcd = test_fleet_view.denying_etcd  # the module-scoped fixture, shared
PASSWORD = test_fleet_view.PASSWORD


def _denied_manifest(denying_etcd: EtcdServer, tmp_path: Path) -> str:
    name = "ctrl1001.example.org"
    key = private_key("ec256", 550)
    prefix = "/deny/kube-apiserver-sa-certs/"
    denying_etcd.etcdctl(
        f"--user=root:{PASSWORD}-root", "put", prefix + kid(key), stdin=entry_value(key, name)
    )
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    auth = {"username": "ctrl1001", "password_file": str(password)}
    data = state_data(
        denying_etcd.url,
        prefix,
        tmp_path / "bundle.pem",
        [(kid(key), name)],
        etcd={"reload_lock": "/deny/reload-lock", "auth": auth},
        bundle={"reload": ["true"]},
    )
    state = write_state(tmp_path / "state.yaml", data)
    args = f"--state {state} --host {name}"
    return f"""
    exec {{ 'sakeystate converge':
      command   => {pp(f"{SAKEYSTATE} converge {args}")},
      onlyif    => {pp(f"{SAKEYSTATE} check {args}")},
      logoutput => true,
    }}
    """


def test_a_denied_status_write_fails_the_puppet_run_naming_key_and_user(
    denying_etcd: EtcdServer, tmp_path: Path
) -> None:
    applied = puppet_apply(tmp_path, _denied_manifest(denying_etcd, tmp_path))
    assert applied.returncode in (4, 6), applied.stdout + applied.stderr
    out = applied.stdout + applied.stderr
    assert "the status record /deny/kube-apiserver-sa-status/ctrl1001.example.org" in out
    assert "(etcd user ctrl1001)" in out


def test_a_denied_status_write_never_leaves_puppet_green(
    denying_etcd: EtcdServer, tmp_path: Path
) -> None:
    manifest = _denied_manifest(denying_etcd, tmp_path)
    puppet_apply(tmp_path, manifest)
    again = puppet_apply(tmp_path, manifest)
    assert again.returncode in (4, 6), again.stdout + again.stderr
