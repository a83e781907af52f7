"""Migrating the legacy FQDN layout: no key is ever missing, no token ever stops verifying.

Each host moves its own entries to ``<prefix><host>/<kid>`` (R12, R13); no host moves or
deletes another host's entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import etcd3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt_support import sign, verifies_with_bundle

from sakeystate.apply import apply_etcd, observe_and_plan
from sakeystate.errors import KeyRejected
from sakeystate.etcd import EtcdStore
from sakeystate.keys import parse_value
from sakeystate.state import load_state

from conftest import Env
from support import T0, kid, make_cert, private_key, state_data, write_state

AT = "2026-11-22T10:00:00Z"
HOSTS = ("ctrl1001.example.org", "ctrl1002.example.org", "ctrl1003.example.org")
# The PKI's default is P-521; one control plane still runs an RSA key.
KEYS = (("ec521", 0), ("ec521", 1), ("rsa2048", 0))


@dataclass
class Legacy:
    """Three control planes as the old publisher and watcher left them."""

    keys: list[Any]
    kids: list[str]
    certs: list[bytes]
    tokens: list[str]

    def legacy_key(self, env: Env, index: int) -> str:
        return env.prefix + HOSTS[index]


def legacy_layout(env: Env) -> Legacy:
    keys = [private_key(kind, index) for kind, index in KEYS]
    certs = [make_cert(key, host) for key, host in zip(keys, HOSTS, strict=True)]
    for host, cert in zip(HOSTS, certs, strict=True):
        env.etcd.put(env.prefix + host, cert)  # the raw certificate, nothing else
    return Legacy(keys, [kid(k) for k in keys], certs, [sign(k) for k in keys])


def status_prefix(env: Env) -> str:
    """This test's status records, apart from every other test's."""
    return env.prefix.replace("sa-certs/", "sa-status/")


def control_plane(env: Env, legacy: Legacy, host: str) -> Path:
    """One control plane's directory: the old watcher's bundle and its own state file."""
    home = env.tmp / host
    home.mkdir()
    bundle = home / "kube-apiserver-sa-certs.pem"
    bundle.write_bytes(b"".join(legacy.certs))
    trusted = list(zip(legacy.kids, HOSTS, strict=True))
    etcd = {"status_prefix": status_prefix(env)}
    data = state_data(env.etcd.url, env.prefix, bundle, trusted, host=host, etcd=etcd)
    return write_state(home / "state.yaml", data)


def kid_locations(env: Env, legacy: Legacy, dump: dict[str, bytes]) -> dict[str, list[str]]:
    """For each kid, the etcd keys that hold a value carrying that key."""
    found: dict[str, list[str]] = {k: [] for k in legacy.kids}
    for index, key_id in enumerate(legacy.kids):
        for name in (env.key(HOSTS[index], key_id), legacy.legacy_key(env, index)):
            value = dump.get(name)
            if value is None:
                continue
            try:
                if parse_value(value).key.kid == key_id:
                    found[key_id].append(name)
            except KeyRejected:
                pass
    return found


def missing(env: Env, legacy: Legacy, dump: dict[str, bytes]) -> list[str]:
    return [k for k, where in kid_locations(env, legacy, dump).items() if not where]


class Sampler(threading.Thread):
    """Reads the prefix over and over while the converges run, recording every sample."""

    def __init__(self, env: Env, legacy: Legacy) -> None:
        super().__init__(daemon=True)
        self.env, self.legacy = env, legacy
        self.client = etcd3.client(host="127.0.0.1", port=env.etcd.server.client_port)
        self.stop = threading.Event()
        self.samples = 0
        self.gaps: list[tuple[int, list[str]]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            response = self.client.get_prefix_response(self.env.prefix)
            dump = {kv.key.decode(): kv.value for kv in response.kvs}
            self.samples += 1
            gap = missing(self.env, self.legacy, dump)
            if gap:
                self.gaps.append((response.header.revision, gap))
            time.sleep(0.005)  # leave the two cores to the converges

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        self.client.close()


def current_revision(env: Env) -> int:
    return int(env.etcd.client.get_response(env.prefix).header.revision)


def dump_at(env: Env, revision: int) -> dict[str, bytes]:
    return {
        meta.key.decode(): value
        for value, meta in env.etcd.client.get_prefix(env.prefix, revision=revision)
    }


# Started together, three processes rarely overlap on their own: the first reads and
# writes before the others have imported gRPC. This sitecustomize, loaded only by
# these test processes, makes each one wait after its first read of etcd until all
# three have read, so all three plan from the same revision and race their
# guarded transactions for real. It also logs each transaction's outcome.
RACE_HOOK = """
import os, sys, time
from sakeystate import etcd

_barrier = os.environ["SAKEYSTATE_TEST_BARRIER"]
_read, _transaction = etcd.EtcdStore.read, etcd.EtcdStore.transaction
_first = []

def read(self, prefix):
    observed = _read(self, prefix)
    if not _first:
        _first.append(True)
        open(os.path.join(_barrier, f"{os.getpid()}.read"), "w").close()
        deadline = time.monotonic() + 30
        while sum(n.endswith(".read") for n in os.listdir(_barrier)) < 3:
            if time.monotonic() > deadline:
                sys.exit("race barrier: the other runs never read etcd")
            time.sleep(0.01)
    return observed

def transaction(self, guards, writes):
    writes = list(writes)
    ok = _transaction(self, guards, writes)
    with open(os.path.join(_barrier, f"{os.getpid()}.txn"), "a") as log:
        log.write(f"{ok} {len(writes)}\\n")
    return ok

etcd.EtcdStore.read, etcd.EtcdStore.transaction = read, transaction
"""


def racing_converge(state: Path, barrier: Path) -> subprocess.Popen[str]:
    exe = Path(sys.executable).parent / "sakeystate"
    environment = {
        **os.environ,
        "PYTHONPATH": str(barrier / "hook"),
        "SAKEYSTATE_TEST_BARRIER": str(barrier),
    }
    return subprocess.Popen(
        [str(exe), "converge", "--state", str(state), "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def test_three_concurrent_converges_migrate_without_a_key_or_token_ever_missing(
    env: Env,
) -> None:
    legacy = legacy_layout(env)
    states = [control_plane(env, legacy, host) for host in HOSTS]
    bundles = [load_state(s).bundle.path for s in states]
    for path in bundles:
        before = Path(path).read_bytes()
        assert all(verifies_with_bundle(t, before) for t in legacy.tokens)

    barrier = env.tmp / "barrier"
    (barrier / "hook").mkdir(parents=True)
    (barrier / "hook" / "sitecustomize.py").write_text(RACE_HOOK)
    start = current_revision(env)
    sampler = Sampler(env, legacy)
    sampler.start()
    procs = [racing_converge(s, barrier) for s in states]
    reports: dict[int, dict[str, Any]] = {}
    while len(reports) < len(procs):
        for index, proc in enumerate(procs):
            if index in reports or proc.poll() is None:
                continue
            out, err = proc.communicate()
            assert proc.returncode == 0, err
            reports[index] = json.loads(out)
            # After each run: every control plane's bundle (old or new) verifies every token.
            for path in bundles:
                content = Path(path).read_bytes()
                for token in legacy.tokens:
                    assert verifies_with_bundle(token, content), (index, path)
        time.sleep(0.01)
    sampler.finish()
    end = current_revision(env)

    assert sampler.samples > 0 and sampler.gaps == []
    # Stronger than sampling: every revision etcd went through during the run.
    for revision in range(start, end + 1):
        assert missing(env, legacy, dump_at(env, revision)) == [], revision

    dump = env.dump()
    assert sorted(dump) == sorted(env.key(h, k) for k, h in zip(legacy.kids, HOSTS, strict=True))
    for key_id, host in zip(legacy.kids, HOSTS, strict=True):
        value = parse_value(dump[env.key(host, key_id)])
        assert (value.key.kid, value.host) == (key_id, host)
        assert value.published == T0 - timedelta(days=30)  # the certificate's not-before
        assert value.key.certificate_pem is not None  # still `openssl x509`-readable

    # All three planned from one revision; each moved its own entry (a put and a delete
    # in one transaction), none touched another's, and each wrote its status record.
    assert len(list(barrier.glob("*.read"))) == 3
    outcomes = [
        line.split() for log in barrier.glob("*.txn") for line in log.read_text().splitlines()
    ]
    moved, status = ["True", "2"], ["True", "1"]
    assert sorted(outcomes) == sorted([*[moved] * len(HOSTS), *[status] * len(HOSTS)])
    statuses = env.etcd.dump(status_prefix(env))
    assert sorted(statuses) == sorted(status_prefix(env) + h for h in HOSTS)
    for host in HOSTS:
        record = json.loads(statuses[status_prefix(env) + host])
        assert (record["host"], record["kids"]) == (host, sorted(legacy.kids))
    # Each legacy entry was migrated by its own host, and by no other.
    migrated = {
        (r["host"], a["kid"])
        for r in reports.values()
        for a in r["actions"]
        if a["op"] == "migrate"
    }
    assert migrated == set(zip(HOSTS, legacy.kids, strict=True))
    for path in bundles:
        content = Path(path).read_bytes()
        assert b"CERTIFICATE" not in content
        assert all(verifies_with_bundle(t, content) for t in legacy.tokens)

    for state in states:
        exe = Path(sys.executable).parent / "sakeystate"
        again = subprocess.run(
            [str(exe), "converge", "--state", str(state), "--detailed-exitcode"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert again.returncode == 0, again.stdout + again.stderr
        assert "No changes" in again.stdout
    assert env.dump() == dump and env.etcd.dump(status_prefix(env)) == statuses
    assert current_revision(env) == end  # a no-op run writes nothing, status included


def test_untrusted_legacy_key_is_read_but_not_bundled_and_only_its_host_moves_it(
    env: Env,
) -> None:
    legacy = legacy_layout(env)
    env.state(list(zip(legacy.kids[:2], HOSTS[:2], strict=True)))
    result = env.cli("converge", "--at", AT, "--host", HOSTS[0], "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)

    dump = env.dump()
    assert env.key(HOSTS[0], legacy.kids[0]) in dump
    assert legacy.legacy_key(env, 1) in dump and legacy.legacy_key(env, 2) in dump
    assert report["bundle"]["kids_after"] == sorted(legacy.kids[:2])
    bundle = env.bundle_bytes() or b""
    assert not verifies_with_bundle(legacy.tokens[2], bundle)
    assert all(verifies_with_bundle(t, bundle) for t in legacy.tokens[:2])
    untrusted = next(k for k in report["keys"] if k["kid"] == legacy.kids[2])
    assert untrusted["status"] == "untrusted"
    assert untrusted["in_bundle"] is False and untrusted["bundle_after"] is False
    assert any(legacy.kids[2] in w and "untrusted" in w for w in report["warnings"])
    # Its own host moves it, trusted or not: the layout is not a matter of trust.
    own = env.cli("converge", "--at", AT, "--host", HOSTS[2], "--format", "json")
    assert own.code == 0, own.err
    moved = parse_value(env.etcd.get(env.key(HOSTS[2], legacy.kids[2])) or b"")
    assert moved.host == HOSTS[2] and legacy.legacy_key(env, 2) not in env.dump()


def test_malformed_legacy_entries_are_reported_and_left_alone(env: Env) -> None:
    legacy = legacy_layout(env)
    ed = ed25519.Ed25519PrivateKey.generate()
    secret = private_key("ec256", 7).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    bad = {
        "ctrl2001.example.org": b"not a certificate at all\n",
        "ctrl2002.example.org": make_cert(ed, "ctrl2002.example.org"),
        "ctrl2003.example.org": secret,
        "ctrl2004.example.org": legacy.certs[0] + legacy.certs[1],
    }
    for host, value in bad.items():
        env.etcd.put(env.prefix + host, value)
    before = {host: env.etcd.client.get(env.prefix + host)[1].mod_revision for host in bad}
    env.state(list(zip(legacy.kids, HOSTS, strict=True)))

    for name in (*bad, *HOSTS):
        result = env.cli("converge", "--at", AT, "--host", name, "--format", "json")
        assert result.code == 0, result.err
        report = json.loads(result.out)
        for host, value in bad.items():
            stored, meta = env.etcd.client.get(env.prefix + host)
            assert stored == value and meta.mod_revision == before[host]
            entry = next(k for k in report["keys"] if k["etcd_key"] == env.prefix + host)
            assert entry["status"] == "rejected" and entry["trust"] is None
            assert entry["in_bundle"] is False and entry["bundle_after"] is False
            assert any(env.prefix + host in w for w in report["warnings"])
        assert not any(a.get("key") == env.prefix + h for a in report["actions"] for h in bad)
        assert report["bundle"]["kids_after"] == sorted(legacy.kids)
        assert b"PRIVATE" not in (env.bundle_bytes() or b"")
        assert b"PRIVATE" not in result.out.encode() + result.err.encode()
    for host in HOSTS:
        assert env.etcd.get(env.prefix + host) is None


def test_migration_is_visible_in_plan_which_writes_nothing(env: Env) -> None:
    legacy = legacy_layout(env)
    env.state(list(zip(legacy.kids, HOSTS, strict=True)))
    dump, revision = env.dump(), current_revision(env)

    for index, key_id in enumerate(legacy.kids):
        host = HOSTS[index]
        text = env.cli("plan", "--at", AT, "--host", host, "--detailed-exitcode")
        assert text.code == 2, text.err
        lines = [ln for ln in text.out.splitlines() if ln.startswith("etcd   migrate")]
        assert len(lines) == 1 and key_id in lines[0]
        target = env.key(host, key_id)
        assert f"move {legacy.legacy_key(env, index)} to {target} (Host: {host})" in lines[0]
        assert "etcd: 1 migrate" in text.out
        report = json.loads(env.cli("plan", "--at", AT, "--host", host, "--format", "json").out)
        migrations = [a for a in report["actions"] if a["op"] == "migrate"]
        assert [(a["target"], a["kid"], a["host"]) for a in migrations] == [("etcd", key_id, host)]
        markdown = env.cli("plan", "--at", AT, "--host", host, "--format", "markdown").out
        assert markdown.count("| etcd | migrate |") == 1
    assert env.dump() == dump and current_revision(env) == revision


def test_stale_migration_loses_its_guard_and_never_clobbers_a_concurrent_write(
    env: Env,
) -> None:
    """A run that planned before the old publisher renewed a certificate writes nothing."""
    legacy = legacy_layout(env)
    env.state(list(zip(legacy.kids, HOSTS, strict=True)))
    desired = load_state(env.state_path, HOSTS[0])
    renewed = make_cert(legacy.keys[0], HOSTS[0], not_after=T0 + timedelta(days=730), serial=4242)
    with EtcdStore(desired.etcd) as store:
        stale = observe_and_plan(desired, store, T0)
        env.etcd.put(legacy.legacy_key(env, 0), renewed)  # the old publisher, mid-run
        dump = env.dump()
        assert apply_etcd(store, stale) == (False, [])
    assert env.dump() == dump

    result = env.cli("converge", "--at", AT, "--host", HOSTS[0])
    assert result.code == 0, result.err
    migrated = parse_value(env.etcd.get(env.key(HOSTS[0], legacy.kids[0])) or b"")
    assert migrated.key.not_after == T0 + timedelta(days=730)
    assert env.etcd.get(legacy.legacy_key(env, 0)) is None


def test_legacy_copy_of_a_key_already_published_under_its_path_is_removed(env: Env) -> None:
    legacy = legacy_layout(env)
    published = env.publish(legacy.keys[0], HOSTS[0], published=T0 - timedelta(days=10))
    kept = env.etcd.get(env.key(HOSTS[0], published))
    env.state(list(zip(legacy.kids, HOSTS, strict=True)))

    plan = json.loads(env.cli("plan", "--at", AT, "--host", HOSTS[0], "--format", "json").out)
    first = next(a for a in plan["actions"] if a["kid"] == published and a["op"] == "migrate")
    assert "already holds this key" in first["reason"]
    assert env.cli("converge", "--at", AT, "--host", HOSTS[0]).code == 0
    assert env.etcd.get(env.key(HOSTS[0], published)) == kept  # Published date kept
    assert env.etcd.get(legacy.legacy_key(env, 0)) is None
    assert sorted(env.dump()) == sorted(
        [env.key(HOSTS[0], published), legacy.legacy_key(env, 1), legacy.legacy_key(env, 2)]
    )


def test_legacy_key_counts_as_older_than_the_key_its_host_published_since(env: Env) -> None:
    """A host reimaged after sakeystate arrived: its pre-reimage key is still under its FQDN.

    The legacy copy carries no publication time; stamping it "now" would make the old
    key look like the host's current one, so exclude_host would leave the old key out
    of that host's bundle (its tokens fail there) and, a superseded_grace later, the
    real current key would be deleted. The certificate's not-before dates it instead.
    """
    legacy = legacy_layout(env)
    host = HOSTS[0]
    new_key = private_key("ec521", 5)
    new_kid = env.publish(new_key, host, published=T0 - timedelta(days=10))
    trusted = [*zip(legacy.kids, HOSTS, strict=True), (new_kid, host)]
    env.state(trusted, host=host, bundle={"exclude_host": "self"})

    result = env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    excluded = [k["kid"] for k in report["keys"] if k["status"] == "excluded"]
    assert excluded == [new_kid]  # its apiserver loads it from its own key file
    bundle = env.bundle_bytes() or b""
    assert verifies_with_bundle(legacy.tokens[0], bundle)  # the pre-reimage key stays
    migrated = parse_value(env.etcd.get(env.key(host, legacy.kids[0])) or b"")
    assert migrated.published == T0 - timedelta(days=30)  # the certificate's not-before
    later = env.cli("plan", "--at", "2027-11-12T10:00:00Z", "--format", "json")
    removed = [a["kid"] for a in json.loads(later.out)["actions"] if a["op"] == "remove"]
    assert new_kid not in removed
