"""The cluster-wide reload lock (etcd.reload_lock), against real etcd.

- The reload and its reload_check run while this host holds a lease-backed key
  exactly at the configured key, naming the holder; the key is gone once the
  converge ended.
- A lock held by another host makes the reload wait; past --lock-timeout the
  converge fails (exit 1, naming the holder), the bundle is written and the reload
  stays owed, and the next converge, with the lock free, reloads and clears it.
- ``reload_lock: null`` takes no lock.
- Three hosts converging at once reload one after the other, never two at once
  (from the start/end times the reload command logs).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from sakeystate.bundle import PENDING_SUFFIX

from conftest import Env
from etcd_server import etcdctl_binary
from support import private_key, state_data, write_state
from watch_support import SAKEYSTATE, overlapping, probe, reloads

HOSTS = ("ctrl1.example.org", "ctrl2.example.org", "ctrl3.example.org")


def lock_key(env: Env) -> str:
    return env.prefix.split("/kube-apiserver-sa-certs/")[0] + "/reload-lock"


def planes(env: Env, **bundle: Any) -> list[tuple[str, str]]:
    """Three published, pinned keys; the state's lock at this test's own key."""
    kids = [env.publish(private_key("ec256", 40 + i), h) for i, h in enumerate(HOSTS)]
    trusted = list(zip(kids, HOSTS, strict=True))
    env.state(trusted, etcd={"reload_lock": lock_key(env)}, bundle=bundle)
    return trusted


def test_the_lock_is_held_through_reload_check_at_the_configured_key(env: Env) -> None:
    during_reload, during_check = env.tmp / "reload.json", env.tmp / "check.json"
    ctl = (
        f"ETCDCTL_API=3 '{etcdctl_binary()}' --endpoints {env.etcd.url} get --prefix "
        f"{lock_key(env)}/"
    )
    planes(
        env,
        reload=["sh", "-c", f"{ctl} -w json > '{during_reload}'"],
        reload_check=["sh", "-c", f"{ctl} -w json > '{during_check}'"],
    )
    result = env.cli("converge", "--host", HOSTS[0])
    assert result.code == 0, result.err
    for seen in (during_reload, during_check):
        kvs = json.loads(seen.read_text())["kvs"]
        assert len(kvs) == 1 and kvs[0]["lease"] != 0  # lease-backed: SIGKILL frees it
        # The waiter key of the fair lock: <reload_lock>/<host>/<lease hex>.
        key = base64.b64decode(kvs[0]["key"]).decode()
        assert key == f"{lock_key(env)}/{HOSTS[0]}/{kvs[0]['lease']:x}"
        holder = base64.b64decode(kvs[0]["value"]).decode()
        assert holder.startswith(f"{HOSTS[0]} pid {os.getpid()} ")
    assert env.etcd.dump(lock_key(env)) == {}


def test_a_held_lock_fails_the_reload_in_time_and_the_reload_stays_owed(env: Env) -> None:
    log = env.tmp / "reloads.log"
    planes(env, reload=probe(log, "me"), reload_timeout="2s")
    lease = env.etcd.client.lease(60)
    env.etcd.client.put(lock_key(env), b"ctrl2.example.org pid 4242 cafe", lease=lease)
    try:
        held = env.cli("converge", "--host", HOSTS[0], "--lock-timeout", "2s")
        assert held.code == 1
        assert "ctrl2.example.org pid 4242" in held.err and "gave up after 2s" in held.err
        assert env.bundle_bytes() is not None
        assert Path(str(env.bundle) + PENDING_SUFFIX).exists()
        assert reloads(log) == []
    finally:
        lease.revoke()
    free = env.cli("converge", "--host", HOSTS[0])
    assert free.code == 0, free.err
    assert [r.name for r in reloads(log)] == ["me"]
    assert not Path(str(env.bundle) + PENDING_SUFFIX).exists()


def test_reload_lock_null_takes_no_lock(env: Env) -> None:
    log = env.tmp / "reloads.log"
    key = env.publish(private_key("ec256", 50), HOSTS[0])
    env.state([(key, HOSTS[0])], etcd={"reload_lock": None}, bundle={"reload": probe(log, "me")})
    # Held at the default key, which a disabled lock must not look at.
    lease = env.etcd.client.lease(60)
    env.etcd.client.put("/kube-apiserver-sa-reload-lock", b"someone", lease=lease)
    try:
        result = env.cli("converge", "--host", HOSTS[0])
    finally:
        lease.revoke()
    assert result.code == 0, result.err
    assert [r.name for r in reloads(log)] == ["me"]


def test_three_hosts_converging_at_once_reload_one_at_a_time(env: Env) -> None:
    log = env.tmp / "reloads.log"
    trusted = planes(env)
    states = []
    for host in HOSTS:
        data = state_data(
            env.etcd.url,
            env.prefix,
            env.tmp / f"{host}.pem",
            trusted,
            etcd={"reload_lock": lock_key(env)},
            bundle={"reload": probe(log, host, 0.5), "reload_timeout": "60s"},
        )
        states.append(write_state(env.tmp / f"{host}.yaml", data))
    procs = [
        subprocess.Popen(
            [SAKEYSTATE, "converge", "--state", str(state), "--host", host],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for state, host in zip(states, HOSTS, strict=True)
    ]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    runs = reloads(log)
    assert sorted(r.name for r in runs) == sorted(HOSTS)
    assert all(r.end is not None for r in runs)
    assert overlapping(runs) == []
    assert env.etcd.dump(lock_key(env)) == {}
