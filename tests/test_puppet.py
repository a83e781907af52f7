"""The Puppet module (puppet/sakeystate) under real `puppet apply`, against real etcd.

Debian's puppet runs with its conf/var/code dirs under tmp_path (one set per node
certname, so three nodes are three separate Puppet agents), so nothing on the
machine is touched. Without puppet the tests fail when $CI is set (CI must run
them) and skip with the reason otherwise. kube-apiserver is a real Puppet
`service` (the `base` provider, whose start and status commands touch and test a
file), so the graph Puppet builds is the one a node has.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from ansible_support import OLD_VERSION, old_sakeystate
from conftest import Env
from support import (
    REPO,
    bundle_file_kids,
    free_port,
    kid,
    make_cert,
    private_key,
    public_pem,
    run_cli,
    run_sakeystate,
    state_data,
    write_state,
)

MODULEPATH = REPO / "puppet"
MODULE = MODULEPATH / "sakeystate"
SAKEYSTATE = Path(sys.executable).parent / "sakeystate"
NOW = datetime.now(UTC)
# Puppet's guard and converge evaluate policy at the real current time, so the certificates
# are valid around now (no assertion depends on how long anything takes).
VALID_NOW = {"not_before": NOW - timedelta(days=1), "not_after": NOW + timedelta(days=365)}
GUARDS = ["plan", "check"]


def puppet_binary() -> str:
    found = shutil.which("puppet")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("puppet is not installed; CI must run the Puppet tests (.ci/run installs it)")
    pytest.skip("puppet is not installed (apt-get install puppet); CI installs it and runs these")


def pp(value: str | Path) -> str:
    """A Puppet single-quoted string literal."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def puppet_apply(
    tmp: Path,
    manifest: str,
    *args: str,
    modulepath: Path = MODULEPATH,
    node: str | None = None,
    environ: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`puppet apply --detailed-exitcodes` (0 same, 2 changed, 4/6 failed) of ``manifest``.

    ``node`` is the certname; each node has its own Puppet directories (vardir...).
    """
    base = tmp / ("puppet" if node is None else f"puppet-{node}")
    dirs = {name: base / name for name in ("confdir", "vardir", "codedir", "logdir", "rundir")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [
            puppet_binary(),
            "apply",
            "--detailed-exitcodes",
            "--color=false",
            *(f"--{name}={path}" for name, path in dirs.items()),
            f"--hiera_config={base / 'hiera.yaml'}",
            f"--modulepath={modulepath}",
            *((f"--certname={node}",) if node else ()),
            *args,
            "-e",
            manifest,
        ],
        cwd=tmp,
        env={**os.environ, "HOME": str(base), **(environ or {})},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def sakeystate_class(state_file: Path, sakeystate: Path = SAKEYSTATE, **params: str) -> str:
    """``class { 'sakeystate': ... }`` with string parameters (others passed pre-rendered)."""
    rendered = {"state_file": pp(state_file), "sakeystate_path": pp(sakeystate), **params}
    body = ", ".join(f"{name} => {value}" for name, value in rendered.items())
    return f"class {{ 'sakeystate': {body} }}"


def broken_sakeystate(tmp: Path) -> Path:
    """A sakeystate whose Python cannot import cryptography, as after a broken upgrade."""
    wrapper = tmp / "broken-sakeystate"
    code = (
        "import sys; sys.modules['cryptography'] = None; "
        "from sakeystate.cli import main; sys.exit(main())"
    )
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -c "{code}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def drifted(env: Env) -> Path:
    """Two trusted keys published in etcd, no bundle yet; the state path holds a space."""
    kids = [
        (env.publish(private_key("ec256", 20 + i), host, **VALID_NOW), host)
        for i, host in enumerate(("ctrl1001.example.org", "ctrl1002.example.org"))
    ]
    directory = env.tmp / "state dir"
    directory.mkdir()
    # A restart that succeeds: with none, every key-set change stays owed (test_restart.py).
    data = state_data(env.etcd.url, env.prefix, env.bundle, kids, bundle={"reload": ["true"]})
    return write_state(directory / "state.yaml", data)


CONVERGED = "Sakeystate_converge[sakeystate]/converged: converged: "
PUBLISHED = "Sakeystate_converge[sakeystate]/published: published this host's certificate"


@pytest.mark.parametrize("guard", GUARDS)
def test_first_apply_converges_second_apply_changes_nothing(env: Env, guard: str) -> None:
    state = drifted(env)
    manifest = sakeystate_class(state, guard=pp(guard))

    first = puppet_apply(env.tmp, manifest)
    assert first.returncode == 2, first.stdout + first.stderr
    assert CONVERGED in first.stdout
    written = env.bundle_bytes()
    assert written is not None
    assert public_pem(private_key("ec256", 20)) in written
    etcd_after_first = env.dump()

    second = puppet_apply(env.tmp, manifest)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Sakeystate_converge[sakeystate]" not in second.stdout
    assert env.bundle_bytes() == written
    assert env.dump() == etcd_after_first


def unreachable(env: Env, state: Path) -> None:
    """Point ``state`` at an etcd nobody listens on (1 s timeout)."""
    data = yaml.safe_load(state.read_text())
    data["etcd"] = {
        **data["etcd"],
        "endpoints": [f"http://127.0.0.1:{free_port()}"],
        "timeout": "1s",
    }
    write_state(state, data)


@pytest.mark.parametrize("guard", GUARDS)
def test_apply_fails_loudly_when_etcd_is_unreachable(env: Env, guard: str) -> None:
    state = drifted(env)
    unreachable(env, state)

    run = puppet_apply(env.tmp, sakeystate_class(state, guard=pp(guard)))
    assert run.returncode in (4, 6), run.stdout + run.stderr
    # The guard failed, so the converge ran and failed with the tool's own message.
    assert "Sakeystate_converge[sakeystate]/converged: change from " in run.stderr
    assert "sakeystate converge failed: " in run.stderr
    assert "from etcd failed within the 1s timeout" in run.stderr
    assert env.bundle_bytes() is None


@pytest.mark.parametrize("guard", GUARDS)
def test_broken_install_with_drift_fails_the_run(env: Env, guard: str) -> None:
    state = drifted(env)
    run = puppet_apply(
        env.tmp, sakeystate_class(state, broken_sakeystate(env.tmp), guard=pp(guard))
    )
    assert run.returncode in (4, 6), run.stdout + run.stderr
    assert "sakeystate converge failed: " in run.stderr
    assert "cryptography" in run.stderr
    assert env.bundle_bytes() is None


@pytest.mark.parametrize("guard", GUARDS)
def test_noop_logs_would_converge_or_cannot_plan_at_notice_level(env: Env, guard: str) -> None:
    state = drifted(env)
    manifest = sakeystate_class(state, guard=pp(guard))
    drift = puppet_apply(env.tmp, manifest, "--noop")
    assert drift.returncode == 0, drift.stdout + drift.stderr
    notice = next(x for x in drift.stdout.splitlines() if "/converged: current_value" in x)
    assert notice.startswith("Notice: "), drift.stdout
    assert "/converged: current_value 'would converge: " in notice
    assert "bundle key(s)" in notice and notice.endswith("should be in_sync (noop)")
    assert env.bundle_bytes() is None

    unreachable(env, state)
    down = puppet_apply(env.tmp, manifest, "--noop")
    notice = next(x for x in down.stdout.splitlines() if "/converged: current_value" in x)
    assert notice.startswith("Notice: "), down.stdout
    assert "/converged: current_value 'cannot plan: " in notice
    assert "from etcd failed within the 1s timeout" in notice
    assert "would converge" not in down.stdout
    assert env.bundle_bytes() is None


def test_state_content_is_validated_before_it_replaces_the_file(env: Env) -> None:
    kid = env.publish(private_key("ec256", 23), "ctrl1001.example.org", **VALID_NOW)
    data = state_data(env.etcd.url, env.prefix, env.bundle, [(kid, "ctrl1001.example.org")])
    state = env.tmp / "managed.yaml"
    invalid = yaml.safe_dump({**data, "colour": "blue"})

    refused = puppet_apply(env.tmp, sakeystate_class(state, state_content=pp(invalid)))
    assert refused.returncode in (4, 6), refused.stdout + refused.stderr
    assert "colour: unknown field" in refused.stdout + refused.stderr
    assert not state.exists()
    # The converge is ordered after the state file (autorequire) and skipped.
    assert "Sakeystate_converge[sakeystate]: Skipping because of failed dependencies" in (
        refused.stdout + refused.stderr
    )
    assert env.bundle_bytes() is None

    valid = yaml.safe_dump(data)
    applied = puppet_apply(env.tmp, sakeystate_class(state, state_content=pp(valid)))
    assert applied.returncode == 2, applied.stdout + applied.stderr
    assert state.read_text() == valid
    assert env.bundle_bytes() is not None


def test_publish_publishes_once(env: Env) -> None:
    host = "ctrl1001.example.org"
    key = private_key("ec256", 24)
    cert = env.tmp / "sa.pem"
    cert.write_bytes(make_cert(key, host, **VALID_NOW))
    state = env.state([(kid(key), host)], bundle={"reload": ["true"]})
    manifest = sakeystate_class(state, host=pp(host), publish="true", cert=pp(cert))

    first = puppet_apply(env.tmp, manifest)
    assert first.returncode == 2, first.stdout + first.stderr
    assert PUBLISHED in first.stdout, first.stdout + first.stderr
    assert [k for k in env.dump() if k.endswith(kid(key))], env.dump()

    second = puppet_apply(env.tmp, manifest)
    assert "Sakeystate_converge" not in second.stdout, second.stdout + second.stderr
    assert second.returncode == 0


# --- nodes: one certname and one vardir each ---------------------------------------------


@dataclass
class Node:
    """A control plane: its certname, its own files under ``tmp/<name>``, its key."""

    name: str
    root: Path
    key: Any
    cert_pem: str = ""

    def __post_init__(self) -> None:
        # One certificate per node (a new one each run would be a renewal every run).
        self.cert_pem = make_cert(self.key, self.name, **VALID_NOW).decode()

    @property
    def cert(self) -> Path:
        return self.root / "pki" / "sa.pem"

    @property
    def bundle(self) -> Path:
        return self.root / "pki" / "sa-certs.pem"

    @property
    def state(self) -> Path:
        return self.root / "state.yaml"

    def bundle_kids(self) -> set[str]:
        return bundle_file_kids(self.bundle)


def nodes(env: Env, count: int, seed: int) -> list[Node]:
    found = []
    for i in range(count):
        name = f"ctrl10{i + 1:02d}.example.org"
        root = env.tmp / name
        (root / "pki").mkdir(parents=True)
        found.append(Node(name, root, private_key("ec256", seed + i)))
    return found


def node_manifest(env: Env, node: Node, fleet: list[Node], **params: str) -> str:
    """The natural order: the class first, the certificate it publishes declared after it.

    One state for the whole cluster (its bundle path per node, as a template renders it):
    every node's kid pinned, exclude_host self, own_cert the node's certificate.
    """
    data = state_data(
        env.etcd.url,
        env.prefix,
        node.bundle,
        [(kid(n.key), n.name) for n in fleet],
        host="self",
        own_cert=str(node.cert),
        bundle={"exclude_host": "self"},
    )
    cert = node.cert_pem
    return (
        sakeystate_class(
            node.state,
            state_content=pp(yaml.safe_dump(data, sort_keys=False)),
            host=pp(node.name),
            publish="true",
            **params,
        )
        + f"\nfile {{ {pp(node.root / 'pki')}: ensure => directory }}"
        + f"\nfile {{ {pp(node.cert)}: ensure => file, content => {pp(cert)} }}\n"
    )


def run_node(env: Env, node: Node, manifest: str, *args: str) -> int:
    run = puppet_apply(env.tmp, manifest, *args, node=node.name)
    assert run.returncode in (0, 2), f"{node.name}:\n{run.stdout}\n{run.stderr}"
    return run.returncode


def test_reimaged_node_converges_in_one_run_whatever_the_manifest_order(env: Env) -> None:
    fleet = nodes(env, 3, 60)
    for n in fleet:
        if n.name != fleet[1].name:
            env.publish(n.key, n.name, **VALID_NOW)
    reimaged = fleet[1]  # fresh: no certificate, state file or bundle on disk yet
    manifest = node_manifest(env, reimaged, fleet)

    first = puppet_apply(env.tmp, manifest, node=reimaged.name)
    assert first.returncode == 2, first.stdout + first.stderr
    # Ordered by the type itself: the certificate file, then publish, then converge.
    lines = first.stdout.splitlines()
    order = [
        next(i for i, x in enumerate(lines) if f"File[{reimaged.cert}]/ensure" in x),
        next(i for i, x in enumerate(lines) if PUBLISHED in x),
        next(i for i, x in enumerate(lines) if CONVERGED in x),
    ]
    assert order == sorted(order), first.stdout
    assert reimaged.bundle_kids() == {kid(fleet[0].key), kid(fleet[2].key)}
    assert [k for k in env.dump() if k.endswith(kid(reimaged.key))]

    second = puppet_apply(env.tmp, manifest, node=reimaged.name)
    assert second.returncode == 0, second.stdout + second.stderr


def test_new_cluster_publish_stage_then_one_converge_run_per_node(env: Env) -> None:
    """The documented bootstrap: `converge => false` everywhere, then one run per node."""
    fleet = nodes(env, 3, 70)
    publish_only = [run_node(env, n, node_manifest(env, n, fleet, converge="false")) for n in fleet]
    assert publish_only == [2, 2, 2]
    assert all(not n.bundle.exists() for n in fleet)

    converged = [run_node(env, n, node_manifest(env, n, fleet)) for n in fleet]
    assert converged == [2, 2, 2]
    for n in fleet:
        assert n.bundle_kids() == {kid(m.key) for m in fleet if m is not n}
    # Settled: one more round changes nothing anywhere.
    assert [run_node(env, n, node_manifest(env, n, fleet)) for n in fleet] == [0, 0, 0]


def test_new_cluster_settles_in_natural_order_with_every_run_green(env: Env) -> None:
    """No stage: each node publishes and converges in its first run, every run green;
    the nodes that ran before a peer published pick its key up in their second run."""
    fleet = nodes(env, 3, 80)
    assert [run_node(env, n, node_manifest(env, n, fleet)) for n in fleet] == [2, 2, 2]
    assert [run_node(env, n, node_manifest(env, n, fleet)) for n in fleet] == [2, 2, 0]
    assert [run_node(env, n, node_manifest(env, n, fleet)) for n in fleet] == [0, 0, 0]
    for n in fleet:
        # The first run was green thanks to R19 (its own key while it was alone); settled,
        # it leaves its own key out again (its apiserver loads it from its own flag).
        assert n.bundle_kids() == {kid(m.key) for m in fleet if m is not n}


def apiserver_service(env: Env) -> tuple[str, Path]:
    """A real Puppet service for kube-apiserver (base provider: a file says it runs)."""
    running = env.tmp / "kube-apiserver.running"
    manifest = (
        "service { 'kube-apiserver': ensure => running, provider => 'base', "
        f"start => {pp(f'/usr/bin/touch {running}')}, "
        f"stop => {pp(f'/bin/rm -f {running}')}, "
        f"status => {pp(f'/usr/bin/test -e {running}')} }}\n"
    )
    return manifest, running


@pytest.mark.parametrize("restart_service", [None, "kube-apiserver"])
def test_apiserver_service_kept_running_through_an_etcd_outage(
    env: Env, restart_service: str | None
) -> None:
    state = drifted(env)
    unreachable(env, state)
    service, running = apiserver_service(env)
    params = {"restart_service": pp(restart_service)} if restart_service else {}
    run = puppet_apply(env.tmp, service + sakeystate_class(state, **params))
    output = run.stdout + run.stderr
    assert run.returncode in (4, 6), output  # the converge failed, loudly
    assert "from etcd failed within the 1s timeout" in output
    assert running.exists(), output  # and Puppet still started the apiserver
    assert "Service[kube-apiserver]/ensure: ensure changed 'stopped' to 'running'" in output
    assert "Service[kube-apiserver]: Skipping because of failed dependencies" not in output
    if restart_service:
        assert "Exec[sakeystate reload]: Skipping because of failed dependencies" in output


def test_broken_install_never_stops_puppet_from_running_the_apiserver(env: Env) -> None:
    state = drifted(env)
    service, running = apiserver_service(env)
    manifest = service + sakeystate_class(
        state, broken_sakeystate(env.tmp), restart_service=pp("kube-apiserver")
    )
    run = puppet_apply(env.tmp, manifest)
    assert run.returncode in (4, 6), run.stdout + run.stderr
    assert running.exists()
    assert "Service[kube-apiserver]: Skipping" not in run.stdout + run.stderr


def test_restart_service_restarts_once_through_sakeystate_reload(env: Env) -> None:
    restarts = env.tmp / "restarts"
    keys = [private_key("ec256", 25 + i) for i in range(2)]
    kids = [env.publish(keys[0], "ctrl1001.example.org", **VALID_NOW)]
    reload = ["sh", "-c", f"echo restart >> {restarts}"]
    state = env.state([(kids[0], "ctrl1001.example.org")], bundle={"reload": reload})
    service, running = apiserver_service(env)
    manifest = service + sakeystate_class(
        state, restart_service=pp("kube-apiserver"), host=pp("ctrl1001.example.org")
    )

    def count() -> int:
        return len(restarts.read_text().splitlines()) if restarts.exists() else 0

    first = puppet_apply(env.tmp, manifest)
    assert first.returncode == 2, first.stdout + first.stderr
    assert "Exec[sakeystate reload]: Triggered 'refresh' from 1 event" in first.stdout, first.stdout
    assert count() == 1 and running.exists()
    # The restart wrote the status record (R18): the fleet view sees this host.
    assert env.cli("status", "--host", "ctrl1001.example.org").code in (0, 2)
    status_prefix = env.prefix.rstrip("/").rsplit("/", 1)[0] + "/kube-apiserver-sa-status/"
    assert env.etcd.get(status_prefix + "ctrl1001.example.org") is not None
    assert puppet_apply(env.tmp, manifest).returncode == 0
    assert count() == 1  # done: not repeated

    kids.append(env.publish(keys[1], "ctrl1002.example.org", **VALID_NOW))
    env.state(
        [(kids[0], "ctrl1001.example.org"), (kids[1], "ctrl1002.example.org")],
        bundle={"reload": reload},
    )
    assert puppet_apply(env.tmp, manifest).returncode == 2
    assert count() == 2
    assert puppet_apply(env.tmp, manifest).returncode == 0
    assert count() == 2


def test_old_sakeystate_fails_with_the_minimum_version_message(env: Env) -> None:
    old = old_sakeystate(env.tmp)
    state = drifted(env)
    service, running = apiserver_service(env)
    manifest = service + sakeystate_class(state, old, publish="true")
    run = puppet_apply(env.tmp, manifest)
    output = run.stdout + run.stderr
    assert run.returncode in (4, 6), output
    assert (
        f"the sakeystate Puppet module requires sakeystate >= 0.3.0, found {OLD_VERSION} ({old})"
    ) in output
    assert "unrecognized arguments" not in output and "invalid choice" not in output
    assert running.exists()  # the apiserver is kept running all the same
    noop = puppet_apply(env.tmp, manifest, "--noop")
    assert (
        "current_value 'cannot plan: the sakeystate Puppet module requires sakeystate >= 0.3.0"
        in (noop.stdout)
    )
    assert env.bundle_bytes() is None


# --- the fact ---------------------------------------------------------------------------


def fact_reader(env: Env, state: Path, host: str) -> Callable[[], str]:
    """The ``sakeystate`` fact as a real `puppet apply` sees it (one notice line)."""
    environ = {
        "SAKEYSTATE_STATE": str(state),
        "SAKEYSTATE_PATH": str(SAKEYSTATE),
        "SAKEYSTATE_HOST": host,
    }
    show = "notice(\"sakeystate fact: ${facts['sakeystate']}\")"

    def fact() -> str:
        run = puppet_apply(env.tmp, show, environ=environ)
        assert run.returncode == 0, run.stdout + run.stderr
        return next(x for x in run.stdout.splitlines() if "sakeystate fact: " in x)

    return fact


def test_fact_reports_bundle_kids_and_reload_owed(env: Env) -> None:
    host = "ctrl1001.example.org"
    state = drifted(env)
    fact = fact_reader(env, state, host)
    before = fact()
    assert "bundle_kids => []" in before and "reload_owed => false" in before
    assert "version => 0.3.0" in before
    assert "status_record_since" not in before and "error" not in before

    assert run_cli("converge", "--state", str(state), "--no-reload", "--host", host).code == 0
    owed = fact()
    kids = sorted(k["fingerprint"] for k in yaml.safe_load(state.read_text())["trusted"])
    assert f"bundle_kids => [{kids[0]}, {kids[1]}]" in owed
    assert "reload_owed => true" in owed

    assert run_cli("reload-done", "--state", str(state), "--host", host).code == 0
    assert "reload_owed => false" in fact()

    unreachable(env, state)
    down = fact()
    assert "error => status: " in down  # etcd is down: the local parts are still there
    assert f"bundle_kids => [{kids[0]}, {kids[1]}]" in down and "reload_owed => false" in down


def test_fact_reports_the_status_record_age_after_a_reload(env: Env) -> None:
    host = "ctrl1001.example.org"
    state = drifted(env)
    data = yaml.safe_load(state.read_text())
    data["bundle"]["reload"] = ["true"]
    write_state(state, data)
    assert run_cli("converge", "--state", str(state), "--no-reload", "--host", host).code == 0
    assert run_sakeystate("reload", "--state", str(state), "--host", host).code == 0
    done = fact_reader(env, state, host)()
    assert re.search(r"status_record_age_seconds => \d+", done), done
    assert "status_record_since => 20" in done and "reload_owed => false" in done


# --- sakeystate::watch and sakeystate::boot ---------------------------------------------

UNITS = REPO / "examples" / "systemd"
FILES = MODULE / "files"


def test_watch_class_installs_the_shipped_unit_and_a_host_drop_in(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    manifest = (
        "class { 'sakeystate::watch': "
        f"sakeystate_path => {pp(SAKEYSTATE)}, host => 'ctrl1002.example.org', "
        f"unit_dir => {pp(unit_dir)}, manage_service => false, "
        "read_write_paths => ['/etc/kubernetes/pki', '-/var/lib/prom dir'], "
        "extra_args => ['--debounce', '2s'] }"
    )
    run = puppet_apply(tmp_path, manifest)
    assert run.returncode == 2, run.stdout + run.stderr
    unit = unit_dir / "sakeystate-watch.service"
    assert unit.read_bytes() == (UNITS / "sakeystate-watch.service").read_bytes()
    dropin = (unit_dir / "sakeystate-watch.service.d" / "puppet.conf").read_text()
    assert (
        f'ExecStart="{SAKEYSTATE}" "watch" "--state" "/etc/sakeystate/state.yaml" '
        '"--host" "ctrl1002.example.org" "--metrics-textfile" '
        '"/var/lib/prometheus/node-exporter/sakeystate.prom" "--debounce" "2s"\n'
    ) in dropin
    assert 'ReadWritePaths=\nReadWritePaths="/etc/kubernetes/pki" "-/var/lib/prom dir"\n' in dropin
    verify_units(unit_dir, unit)
    assert puppet_apply(tmp_path, manifest).returncode == 0


def test_boot_class_installs_the_boot_unit_with_this_host(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    manifest = (
        "class { 'sakeystate::boot': "
        f"sakeystate_path => {pp(SAKEYSTATE)}, host => 'ctrl1003.example.org', "
        f"unit_dir => {pp(unit_dir)}, manage_service => false }}"
    )
    run = puppet_apply(tmp_path, manifest)
    assert run.returncode == 2, run.stdout + run.stderr
    unit = unit_dir / "sakeystate-boot.service"
    assert unit.read_bytes() == (FILES / "sakeystate-boot.service").read_bytes()
    dropin = (unit_dir / "sakeystate-boot.service.d" / "puppet.conf").read_text()
    assert (
        f'ExecStart="{SAKEYSTATE}" "converge" "--no-reload" "--state" '
        '"/etc/sakeystate/state.yaml" "--host" "ctrl1003.example.org"\n'
    ) in dropin
    done = unit_dir / "sakeystate-boot-done.service"
    assert done.read_bytes() == (FILES / "sakeystate-boot-done.service").read_bytes()
    assert (
        f'ExecStart="{SAKEYSTATE}" "reload-done" "--wait-ready" "--state" '
        '"/etc/sakeystate/state.yaml" "--host" "ctrl1003.example.org"\n'
    ) in (unit_dir / "sakeystate-boot-done.service.d" / "puppet.conf").read_text()
    text = unit.read_text()
    assert "Before=kube-apiserver.service" in text and "Type=oneshot" in text
    verify_units(unit_dir, unit)


def verify_units(unit_dir: Path, unit: Path) -> None:
    """``systemd-analyze verify`` of the unit with its drop-in (which it must load)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is not installed; CI must run it (.ci/run installs it)")
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(
        [analyze, "verify", str(unit)],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The drop-in is loaded: a drop-in naming a missing executable fails verification.
    dropin = next((unit_dir / f"{unit.name}.d").glob("*.conf"))
    original = dropin.read_text()
    dropin.write_text(original.replace(f'"{SAKEYSTATE}"', '"/nonexistent/sakeystate"'))
    broken = subprocess.run(
        [analyze, "verify", str(unit)],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"},
        capture_output=True,
        text=True,
        check=False,
    )
    dropin.write_text(original)
    assert broken.returncode != 0 and "/nonexistent/sakeystate" in broken.stdout + broken.stderr


def test_module_files_are_the_shipped_watch_unit() -> None:
    assert (FILES / "sakeystate-watch.service").read_bytes() == (
        UNITS / "sakeystate-watch.service"
    ).read_bytes(), "cp examples/systemd/sakeystate-watch.service puppet/sakeystate/files/"


@pytest.mark.parametrize("name", ["sakeystate-boot.service", "sakeystate-boot-done.service"])
def test_module_files_are_the_shipped_boot_units(name: str) -> None:
    assert (FILES / name).read_bytes() == (UNITS / name).read_bytes(), (
        f"cp examples/systemd/{name} puppet/sakeystate/files/"
    )


def test_manifests_pass_parser_validate_and_puppet_lint() -> None:
    manifests = sorted(str(p) for p in MODULE.rglob("*.pp"))
    assert manifests
    parsed = subprocess.run(
        [puppet_binary(), "parser", "validate", *manifests],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HOME": "/nonexistent"},
    )
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    templates = sorted(str(p) for p in MODULE.rglob("*.epp"))
    epp = subprocess.run(
        [puppet_binary(), "epp", "validate", *templates],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HOME": "/nonexistent"},
    )
    assert templates and epp.returncode == 0, epp.stdout + epp.stderr
    ruby = sorted(str(p) for p in (MODULE / "lib").rglob("*.rb"))
    for source in ruby:
        compiled = subprocess.run(["ruby", "-c", source], capture_output=True, text=True)
        assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    lint = shutil.which("puppet-lint")
    if lint is None:
        if os.environ.get("CI"):
            pytest.fail("puppet-lint is not installed; CI must run it (.ci/run installs it)")
        pytest.skip("puppet-lint is not installed (apt-get install puppet-lint)")
    linted = subprocess.run(
        [lint, "--fail-on-warnings", *manifests], capture_output=True, text=True, check=False
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def ruby_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed; CI must run it (.ci/run installs {package})")
    pytest.skip(f"{name} is not installed (apt-get install {package})")


def module_copy(tmp: Path) -> Path:
    """The module in a scratch module path (rspec-puppet and puppet-strings write beside it)."""
    target = tmp / "modules" / "sakeystate"
    shutil.copytree(MODULE, target, ignore=shutil.ignore_patterns(".yardoc", "doc"))
    return target


def test_rspec_puppet_passes(tmp_path: Path) -> None:
    rspec = ruby_tool("rspec", "ruby-rspec-puppet")
    root = module_copy(tmp_path)
    proc = subprocess.run(
        [rspec, "spec"],
        cwd=root,
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"^(\d+) examples, 0 failures", proc.stdout, re.M)
    assert found and int(found.group(1)) >= 20, proc.stdout


def test_reference_is_generated_from_the_manifests_and_current(tmp_path: Path) -> None:
    helped = subprocess.run([puppet_binary(), "help", "strings"], capture_output=True, check=False)
    if helped.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("puppet strings is not installed; CI must run it (.ci/run installs it)")
        pytest.skip("puppet strings is not installed (apt-get install puppet-strings)")
    root = module_copy(tmp_path)
    (root / "REFERENCE.md").unlink()
    proc = subprocess.run(
        [puppet_binary(), "strings", "generate", "--format", "markdown", "--out", "REFERENCE.md"],
        cwd=root,
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (root / "REFERENCE.md").read_text() == (MODULE / "REFERENCE.md").read_text(), (
        "puppet/sakeystate/REFERENCE.md is stale: run `make puppet-reference`"
    )
    reference = (MODULE / "REFERENCE.md").read_text()
    for documented in ("sakeystate::watch", "sakeystate::boot", "sakeystate_converge"):
        assert f"`{documented}`" in reference
    assert '##### <a name="restart_service"></a>`restart_service`' in reference


def test_puppet_lint_fails_on_a_warning(tmp_path: Path) -> None:
    lint = shutil.which("puppet-lint")
    if lint is None:
        if os.environ.get("CI"):
            pytest.fail("puppet-lint is not installed; CI must run it (.ci/run installs it)")
        pytest.skip("puppet-lint is not installed")
    bad = tmp_path / "init.pp"
    bad.write_text((MODULE / "manifests" / "init.pp").read_text().replace("'plan'", '"plan"'))
    linted = subprocess.run([lint, "--fail-on-warnings", str(bad)], capture_output=True, text=True)
    assert linted.returncode != 0


def test_metadata_names_the_licence_and_the_package_version() -> None:
    import json

    from sakeystate import __version__

    metadata = json.loads((MODULE / "metadata.json").read_text())
    assert metadata["name"] == "sakeystate-sakeystate"
    assert metadata["version"] == __version__
    assert metadata["license"] == "Apache-2.0"
    # The project has no public URL yet: none is invented (docs/configuration-management.md).
    assert not {"project_page", "issues_url"} & set(metadata)


def test_missing_puppet_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the Puppet tests"):
        puppet_binary()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="puppet is not installed"):
        puppet_binary()
