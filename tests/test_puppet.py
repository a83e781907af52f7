"""The Puppet module (puppet/sakeystate) under real `puppet apply`, against real etcd.

Debian's puppet runs with its conf/var/code dirs under tmp_path, so nothing on
the machine is touched. Without puppet the tests fail when $CI is set (CI must
run them) and skip with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from conftest import Env
from support import (
    REPO,
    free_port,
    kid,
    make_cert,
    private_key,
    public_pem,
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
    tmp: Path, manifest: str, *args: str, modulepath: Path = MODULEPATH
) -> subprocess.CompletedProcess[str]:
    """`puppet apply --detailed-exitcodes` (0 same, 2 changed, 4/6 failed) of ``manifest``."""
    base = tmp / "puppet"
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
            *args,
            "-e",
            manifest,
        ],
        cwd=tmp,
        env={**os.environ, "HOME": str(base)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def sakeystate_class(state_file: Path, sakeystate: Path = SAKEYSTATE, **params: str) -> str:
    """``class { 'sakeystate': ... }`` with string parameters (others passed pre-rendered)."""
    rendered = {"state_file": pp(state_file), "sakeystate": pp(sakeystate), **params}
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
    return write_state(
        directory / "state.yaml", state_data(env.etcd.url, env.prefix, env.bundle, kids)
    )


@pytest.mark.parametrize("guard", GUARDS)
def test_first_apply_converges_second_apply_changes_nothing(env: Env, guard: str) -> None:
    state = drifted(env)
    manifest = sakeystate_class(state, guard=pp(guard))

    first = puppet_apply(env.tmp, manifest)
    assert first.returncode == 2, first.stdout + first.stderr
    assert "Exec[sakeystate converge]/returns: executed successfully" in first.stdout
    written = env.bundle_bytes()
    assert written is not None
    assert public_pem(private_key("ec256", 20)) in written
    etcd_after_first = env.dump()

    second = puppet_apply(env.tmp, manifest)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Exec[sakeystate converge]" not in second.stdout
    assert env.bundle_bytes() == written
    assert env.dump() == etcd_after_first


@pytest.mark.parametrize("guard", GUARDS)
def test_apply_fails_loudly_when_etcd_is_unreachable(env: Env, guard: str) -> None:
    key = private_key("ec256", 22)
    kid = env.publish(key, "ctrl1001.example.org", **VALID_NOW)
    state = env.state(
        [(kid, "ctrl1001.example.org")],
        etcd={"endpoints": [f"http://127.0.0.1:{free_port()}"], "timeout": "1s"},
    )

    run = puppet_apply(env.tmp, sakeystate_class(state, guard=pp(guard)))
    assert run.returncode in (4, 6), run.stdout + run.stderr
    # The guard failed, so the converge ran and failed with the tool's own message.
    assert "Exec[sakeystate converge]/returns: change from 'notrun' to ['0'] failed" in run.stderr
    assert "from etcd failed within the 1s timeout" in run.stdout
    assert env.bundle_bytes() is None


@pytest.mark.parametrize("guard", GUARDS)
def test_broken_install_with_drift_fails_the_run(env: Env, guard: str) -> None:
    state = drifted(env)
    run = puppet_apply(
        env.tmp, sakeystate_class(state, broken_sakeystate(env.tmp), guard=pp(guard))
    )
    assert run.returncode in (4, 6), run.stdout + run.stderr
    assert "Exec[sakeystate converge]/returns: change from 'notrun' to ['0'] failed" in run.stderr
    assert env.bundle_bytes() is None


def test_noop_debug_tells_a_drift_from_a_failure(env: Env) -> None:
    state = drifted(env)
    manifest = sakeystate_class(state)
    drift = puppet_apply(env.tmp, manifest, "--noop", "--debug")
    assert drift.returncode == 0, drift.stdout + drift.stderr
    assert "Exec[sakeystate converge]/returns: current_value 'notrun'" in drift.stdout
    assert "Exec[sakeystate converge]/unless: bundle add" in drift.stdout

    state_data_down = yaml.safe_load(state.read_text())
    state_data_down["etcd"] = {"endpoints": [f"http://127.0.0.1:{free_port()}"], "timeout": "1s"}
    write_state(state, state_data_down)
    down = puppet_apply(env.tmp, manifest, "--noop", "--debug")
    assert "Exec[sakeystate converge]/unless: sakeystate: error: " in down.stdout
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
    assert "Exec[sakeystate converge]" in refused.stdout + refused.stderr  # skipped: dependency
    assert env.bundle_bytes() is None

    valid = yaml.safe_dump(data)
    applied = puppet_apply(env.tmp, sakeystate_class(state, state_content=pp(valid)))
    assert applied.returncode == 2, applied.stdout + applied.stderr
    assert state.read_text() == valid
    assert env.bundle_bytes() is not None


def test_publish_exec_publishes_once(env: Env) -> None:
    host = "ctrl1001.example.org"
    key = private_key("ec256", 24)
    cert = env.tmp / "sa.pem"
    cert.write_bytes(make_cert(key, host, **VALID_NOW))
    state = env.state([(kid(key), host)])
    manifest = sakeystate_class(state, host=pp(host), publish="true", cert=pp(cert))

    first = puppet_apply(env.tmp, manifest)
    assert first.returncode == 2, first.stdout + first.stderr
    assert "Exec[sakeystate publish]/returns: executed successfully" in first.stdout, (
        first.stdout + first.stderr
    )
    assert len(env.dump()) == 1

    second = puppet_apply(env.tmp, manifest)
    assert "Exec[sakeystate publish]" not in second.stdout, second.stdout + second.stderr
    assert second.returncode == 0


def test_subscribed_service_restarts_once_per_key_set_change(env: Env) -> None:
    restarts, failing = env.tmp / "restarts", env.tmp / "restart-fails"
    keys = [private_key("ec256", 25 + i) for i in range(2)]
    kids = [env.publish(k, "ctrl1001.example.org", **VALID_NOW) for k in keys[:1]]
    state = env.state([(kids[0], "ctrl1001.example.org")])
    service = (
        "exec { 'fake kube-apiserver restart': refreshonly => true, command => "
        f"['/bin/sh', '-c', 'if [ -e {failing} ]; then exit 1; fi; echo restart >> {restarts}'] }}"
    )
    manifest = (
        service + "\n" + sakeystate_class(state, restart="Exec['fake kube-apiserver restart']")
    )

    def count() -> int:
        return len(restarts.read_text().splitlines()) if restarts.exists() else 0

    first = puppet_apply(env.tmp, manifest)
    assert first.returncode == 2, first.stdout + first.stderr
    assert count() == 1, first.stdout + first.stderr
    assert puppet_apply(env.tmp, manifest).returncode == 0
    assert count() == 1  # confirmed: not repeated

    # The key set changes while the restart fails: it stays owed, then happens once.
    kids.append(env.publish(keys[1], "ctrl1002.example.org", **VALID_NOW))
    env.state([(kids[0], "ctrl1001.example.org"), (kids[1], "ctrl1002.example.org")])
    failing.touch()
    failed = puppet_apply(env.tmp, manifest)
    assert failed.returncode in (4, 6), failed.stdout + failed.stderr
    assert count() == 1
    failing.unlink()
    assert puppet_apply(env.tmp, manifest).returncode == 2
    assert count() == 2
    assert puppet_apply(env.tmp, manifest).returncode == 0
    assert count() == 2

    # An etcd-only cleanup (a stray key revoked) converges without a restart.
    stray = env.publish(private_key("ec256", 29), "ctrl1009.example.org", **VALID_NOW)
    env.state(
        [(kids[0], "ctrl1001.example.org"), (kids[1], "ctrl1002.example.org")],
        revoked=[{"fingerprint": stray, "reason": "never ours"}],
    )
    cleaned = puppet_apply(env.tmp, manifest)
    assert cleaned.returncode == 2, cleaned.stdout + cleaned.stderr
    assert env.prefix + stray not in env.dump()
    assert count() == 2


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
    lint = shutil.which("puppet-lint")
    if lint is None:
        if os.environ.get("CI"):
            pytest.fail("puppet-lint is not installed; CI must run it (.ci/run installs it)")
        pytest.skip("puppet-lint is not installed (apt-get install puppet-lint)")
    linted = subprocess.run(
        [lint, "--fail-on-warnings", *manifests], capture_output=True, text=True, check=False
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


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


def test_missing_puppet_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the Puppet tests"):
        puppet_binary()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="puppet is not installed"):
        puppet_binary()
