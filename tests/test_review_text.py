"""What a reviewer reads must be true: the texts of plan actions and warnings that the fleet
trials found wrong (messages an operator can act on), against a real etcd."""

from __future__ import annotations

import json
from datetime import timedelta

from conftest import Env
from pki import Pki
from support import T0, kid, make_cert, private_key, run_cli

AT = "2026-11-22T10:00:00Z"
A, B = "ctrl1001.example.org", "ctrl1002.example.org"


def test_leaving_out_this_hosts_own_new_key_says_its_apiserver_still_loads_it(env: Env) -> None:
    """A host switches keys: its new key leaves its bundle because its own apiserver
    loads it from sa.pem, not because its tokens "stop validating"."""
    own = env.tmp / "sa.pem"
    old_key, new_key = private_key("ec256", 1), private_key("ec256", 2)
    own.write_bytes(make_cert(old_key, "sa"))
    old = env.publish(old_key, A, published=T0 - timedelta(days=30))
    new = env.publish(new_key, A, published=T0 - timedelta(days=1))
    other = env.publish(private_key("ec256", 3), B)
    shared = {"host": A, "own_cert": str(own), "bundle": {"exclude_host": "self"}}
    env.state([(old, A), (new, A), (other, B)], **shared)
    assert env.cli("converge", "--at", AT).code == 0  # own_cert: the old key, left out
    own.write_bytes(make_cert(new_key, "sa"))
    plan = json.loads(env.cli("plan", "--at", AT, "--format", "json").out)
    removal = next(a for a in plan["actions"] if a["op"] == "remove")
    assert removal["kid"] == new
    assert removal["reason"] == (
        "this host's own key: its apiserver loads it from its own --service-account-key-file"
    )
    added = next(a for a in plan["actions"] if a["op"] == "add")
    assert added["kid"] == old


def test_a_returning_host_is_not_warned_about_keys_it_removes_as_superseded(env: Env) -> None:
    """Down for long: its old key's entry was pruned meanwhile, and the key is now
    superseded. It leaves the bundle; no "not published in etcd" warning for it."""
    first, second = private_key("ec256", 10), private_key("ec256", 11)
    k1 = env.publish(first, A, published=T0 - timedelta(days=100))
    other = env.publish(private_key("ec256", 12), B, published=T0 - timedelta(days=100))
    state = {"retention": {"superseded_grace": "30d", "max_token_lifetime": "30d"}}
    k2 = kid(second)
    env.state([(k1, A), (k2, A), (other, B)], **state)
    assert env.cli("converge", "--at", "2026-08-20T10:00:00Z").code == 0
    env.etcd.client.delete(env.key(A, k1))  # pruned while the host was down
    env.publish(second, A, published=T0 - timedelta(days=60))
    result = env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    removal = next(a for a in report["actions"] if a["op"] == "remove")
    assert removal["kid"] == k1 and "superseded by" in removal["reason"]
    assert not [w for w in report["warnings"] if k1 in w], report["warnings"]


def test_a_leaf_without_its_intermediate_says_what_to_publish(env: Env) -> None:
    """Issue 22 item 2: the verifier only says "candidates exhausted"."""
    pki = Pki()
    ca = env.tmp / "ca.pem"
    ca.write_bytes(pki.ca_file())  # the root only
    env.state([], host=A, trust_anchors=[{"name": "pki", "ca_file": str(ca), "hosts": [A]}])
    lone = env.tmp / "leaf.pem"
    lone.write_bytes(pki.sa_named(A).pem)  # not the chained file
    refused = run_cli("publish", "--state", str(env.state_path), "--cert", str(lone))
    assert refused.code == 1
    assert "no issuer of 'CN=" in refused.err
    assert (
        "publish the chained file (leaf, then intermediate) or add the intermediate to ca_file"
        in refused.err
    )
