"""adopt: the first state file, generated from etcd and the old watcher's bundle."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jwt_support import sign, verifies_with_bundle

from sakeystate.keys import parse_pem_bundle
from sakeystate.state import load_state

from conftest import Env
from support import (
    REPO,
    T0,
    Result,
    entry_value,
    kid,
    make_cert,
    private_key,
    run_cli,
    write_state,
)

AT = "2026-11-22T10:00:00Z"
HOSTS = ("ctrl1001.example.org", "ctrl1002.example.org", "ctrl1003.example.org")
KEYS = (("ec521", 0), ("ec521", 1), ("rsa2048", 0))
NOT_AFTER = "2027-11-22T10:00:00Z"


def schema_errors(text: str) -> list[str]:
    """Validation with jsonschema itself, independent of sakeystate's loader."""
    schema = json.loads((REPO / "schema" / "sakeystate-v1.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [e.message for e in validator.iter_errors(yaml.safe_load(text))]


def entries(kids: list[str]) -> list[dict[str, str]]:
    """The trusted entries adopt should write for the three hosts, sorted by kid."""
    return [{"fingerprint": k, "host": h} for k, h in sorted(zip(kids, HOSTS, strict=True))]


def trusted_of(text: str) -> list[dict[str, str]]:
    return list(yaml.safe_load(text)["trusted"])


def comment_above(text: str, kid_: str) -> list[str]:
    """The comment lines directly above the ``fingerprint: kid_`` entry."""
    lines = text.splitlines()
    index = next(i for i, ln in enumerate(lines) if ln.strip().endswith(f"fingerprint: {kid_}"))
    block = []
    for line in reversed(lines[:index]):
        if not line.strip().startswith("#") or "fingerprint:" in line or "host:" in line:
            break
        block.append(line.strip())
    return block[::-1]


def legacy_cluster(env: Env) -> tuple[list[Any], list[str], Path]:
    """The old layout in etcd and the bundle its watcher wrote from it."""
    keys = [private_key(kind, index) for kind, index in KEYS]
    certs = [make_cert(k, h) for k, h in zip(keys, HOSTS, strict=True)]
    for host, cert in zip(HOSTS, certs, strict=True):
        env.etcd.put(env.prefix + host, cert)
    env.bundle.write_bytes(b"".join(certs))
    return keys, [kid(k) for k in keys], env.bundle


def run_adopt(env: Env, *args: str) -> Result:
    return run_cli(
        "adopt",
        "--endpoint",
        env.etcd.url,
        "--prefix",
        env.prefix,
        "--cluster",
        "wikikube-eqiad",
        "--at",
        AT,
        *args,
    )


def test_adopted_state_validates_and_converges_to_the_same_bundle(env: Env) -> None:
    keys, kids, bundle = legacy_cluster(env)
    reimaged = private_key("ec521", 9)  # published, never picked up by the old watcher
    env.publish(reimaged, "ctrl1004.example.org")
    env.etcd.put(env.prefix + "ctrl1005.example.org", b"half-written garbage")
    original = bundle.read_bytes()
    tokens = [sign(k) for k in keys]
    output = env.tmp / "adopted.yaml"

    result = run_adopt(env, "--from-bundle", str(bundle), "-o", str(output))
    assert result.code == 0, result.err
    assert "wrote" in result.out and "3 trusted key(s), 3 of them bundled" in result.out
    text = output.read_text()
    assert schema_errors(text) == []
    validate = run_cli("validate", str(output))
    assert validate.code == 0, validate.err

    assert trusted_of(text) == entries(kids)
    for key_id, host in zip(kids, HOSTS, strict=True):
        comment = comment_above(text, key_id)
        assert any(f"not after {NOT_AFTER}" in line for line in comment), comment
        assert any(f"{env.prefix}{host} (legacy layout" in line for line in comment), comment
    # The key only etcd knows is offered for review, not trusted.
    assert f"# - fingerprint: {kid(reimaged)}" in text
    assert "ctrl1005.example.org: rejected" in result.err
    assert "ctrl1004.example.org) is in etcd but not in the bundle" in result.err

    converge = run_cli("converge", "--state", str(output), "--at", AT, "--format", "json")
    assert converge.code == 0, converge.err
    report = json.loads(converge.out)
    assert report["bundle"]["kids_before"] == report["bundle"]["kids_after"] == sorted(kids)
    after, _ = parse_pem_bundle(bundle.read_bytes())
    before, _ = parse_pem_bundle(original)
    assert sorted(k.kid for k in after) == sorted(k.kid for k in before)
    assert all(verifies_with_bundle(t, bundle.read_bytes()) for t in tokens)
    # Certificates become public keys; no key is added or removed.
    assert {a["op"] for a in report["actions"] if a["target"] == "bundle"} == {"write"}
    # R13: each legacy entry is moved by its own host, to its path, and by no other.
    assert all(env.prefix + h in env.dump() for h in HOSTS)
    for key_id, host in zip(kids, HOSTS, strict=True):
        moved = run_cli("converge", "--state", str(output), "--host", host, "--at", AT)
        assert moved.code == 0, moved.err
        assert env.prefix + host not in env.dump() and env.key(host, key_id) in env.dump()


def test_adopt_from_etcd_alone_trusts_every_valid_key_and_nothing_else(env: Env) -> None:
    fresh = [private_key("ec521", 0), private_key("ec384", 0), private_key("ec256", 0)]
    kids = [env.publish(k, h) for k, h in zip(fresh, HOSTS, strict=True)]
    long_expired = private_key("ec256", 3)
    env.publish(
        long_expired,
        "ctrl1009.example.org",
        not_before=T0 - timedelta(days=400),
        not_after=T0 - timedelta(days=30),
    )
    # A value stored under another key's kid: never trusted, so never adopted.
    env.etcd.put(env.prefix + kid(private_key("ec256", 4)), entry_value(fresh[0], HOSTS[0]))

    result = run_adopt(env, "--bundle-path", str(env.bundle))
    assert result.code == 0, result.err
    assert schema_errors(result.out) == []
    # R1: an expired certificate's key still verifies tokens (kube-apiserver ignores the
    # dates, and a late renewal keeps signing with it), so it is adopted, with a note.
    expected = [*entries(kids), {"fingerprint": kid(long_expired), "host": "ctrl1009.example.org"}]
    assert trusted_of(result.out) == sorted(expected, key=lambda e: e["fingerprint"])
    assert "certificate expired: still trusted" in "\n".join(
        comment_above(result.out, kid(long_expired))
    )
    assert "poisoned" in result.err

    env.state_path.write_text(result.out)
    converge = env.cli("converge", "--at", AT, "--format", "json")
    assert converge.code == 0, converge.err
    report = json.loads(converge.out)
    assert report["bundle"]["kids_after"] == sorted([*kids, kid(long_expired)])
    assert (
        f"the certificate of ctrl1009.example.org's current key {kid(long_expired)} expired "
        in converge.err
    )


def test_adopt_from_the_bundle_alone_takes_hosts_from_the_certificates(env: Env) -> None:
    _keys, kids, bundle = legacy_cluster(env)
    result = run_adopt(env, "--no-etcd", "--from-bundle", str(bundle))
    assert result.code == 0, result.err
    assert schema_errors(result.out) == []
    assert trusted_of(result.out) == entries(kids)
    data = yaml.safe_load(result.out)
    assert data["bundle"] == {"path": str(bundle)}
    assert data["retention"]["superseded_grace"] == data["retention"]["max_token_lifetime"]
    assert all(f"not after {NOT_AFTER}" in " ".join(comment_above(result.out, k)) for k in kids)


def test_adopt_takes_the_connection_and_bundle_settings_from_a_skeleton_state(env: Env) -> None:
    _keys, kids, bundle = legacy_cluster(env)
    skeleton = {
        "apiVersion": "sakeystate/v1",
        "cluster": "wikikube-codfw",
        "etcd": {"endpoints": [env.etcd.url], "prefix": env.prefix, "timeout": "3s"},
        "bundle": {"path": str(bundle), "mode": "0640", "reload": ["/bin/true"]},
        "trusted": [],
        "revoked": [{"fingerprint": kids[2], "reason": "private key exposed"}],
        "retention": {"min_keys": 2, "max_removals": 1},
    }
    write_state(env.state_path, skeleton)
    sections = ("cluster", "etcd", "bundle", "revoked", "retention")
    for source in ((), ("--from-bundle", str(bundle))):
        result = run_cli("adopt", "--state", str(env.state_path), "--at", AT, *source)
        assert result.code == 0, result.err
        data = yaml.safe_load(result.out)
        assert {k: data[k] for k in sections} == {k: skeleton[k] for k in sections}
        assert [t["fingerprint"] for t in data["trusted"]] == sorted(kids[:2])
        assert f"{kids[2]}" in result.err and "revoked" in result.err
        adopted = env.tmp / "adopted.yaml"
        adopted.write_text(result.out)
        assert sorted(load_state(adopted).trusted) == sorted(kids[:2])


def test_adopt_errors_are_clear_and_write_nothing(env: Env) -> None:
    _keys, _kids, bundle = legacy_cluster(env)
    missing = run_cli("adopt", "--cluster", "c", "--from-bundle", str(bundle))
    assert missing.code == 1 and "--endpoint URL" in missing.err

    output = env.tmp / "state.yaml"
    output.write_text("keep me\n")
    exists = run_adopt(env, "--from-bundle", str(bundle), "-o", str(output))
    assert exists.code == 1 and "exists; not overwriting it (use --force)" in exists.err
    assert output.read_text() == "keep me\n"
    forced = run_adopt(env, "--from-bundle", str(bundle), "-o", str(output), "--force")
    assert forced.code == 0 and schema_errors(output.read_text()) == []

    both = run_cli("adopt", "--state", str(output), "--endpoint", env.etcd.url)
    assert both.code == 1 and "not both" in both.err
    unreadable = run_adopt(env, "--from-bundle", str(env.tmp / "nope.pem"))
    assert unreadable.code == 1 and "cannot read --from-bundle" in unreadable.err
    down = run_cli("adopt", "--cluster", "c", "--endpoint", "http://127.0.0.1:1", "--timeout", "1s")
    assert down.code == 1 and "http://127.0.0.1:1" in down.err
    for result in (missing, exists, both, unreadable, down):
        assert "Traceback" not in result.err
        assert re.match(r"sakeystate: error: ", result.err)
