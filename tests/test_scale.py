"""10,000 keys: every key read across pages, deletes batched, the bundle complete.

Correctness at scale only, never wall-clock time: the timings live in
bench/bench.py (`make bench`) and docs/BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sakeystate import etcd as etcd_module
from sakeystate.etcd import MAX_TXN_OPS, EtcdStore
from sakeystate.keys import format_time, parse_pem_bundle
from sakeystate.state import EtcdConfig

from conftest import Env
from support import T0, entry_value, kid

KEYS = 10_000
# Revoked keys of many hosts: prune deletes them from etcd, in more deletes than one
# transaction may hold. (Certificate expiry deletes nothing, R1; converge deletes only
# its own host's entries, R13.)
REVOKED = 3 * MAX_TXN_OPS + 1
GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024

Published = list[tuple[str, bytes]]


def _published(count: int, **cert: Any) -> Published:
    out = []
    for index in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        host = f"ctrl{index:05d}.scale.example.org"
        out.append((kid(key), entry_value(key, host, **cert)))
    return out


@pytest.fixture(scope="module")
def valid() -> Published:
    return _published(KEYS)


@pytest.fixture(scope="module")
def revoked() -> Published:
    return _published(REVOKED)


def _load(env: Env, items: Sequence[tuple[str, bytes]]) -> None:
    client = env.etcd.client
    for start in range(0, len(items), MAX_TXN_OPS):
        batch = items[start : start + MAX_TXN_OPS]
        puts = [client.transactions.put(env.prefix + k, v) for k, v in batch]
        client.transaction(compare=[], success=puts, failure=[])


def _config(env: Env) -> EtcdConfig:
    return EtcdConfig(endpoints=(env.etcd.url,), prefix=env.prefix, timeout=60.0)


def test_read_returns_all_10000_keys_page_by_page(env: Env, valid: Published) -> None:
    _load(env, valid)
    with EtcdStore(_config(env), page_size=1000) as store:
        observed = store.read(env.prefix)
        assert store.requests == KEYS // 1000
    assert {e.key: e.value for e in observed.entries} == {env.prefix + k: v for k, v in valid}
    assert all(e.mod_revision <= observed.revision for e in observed.entries)


def test_read_halves_pages_over_the_grpc_message_limit(
    env: Env, valid: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    _load(env, valid)
    assert sum(len(v) for _k, v in valid) > GRPC_DEFAULT_MAX_MESSAGE
    # A client with gRPC's default receive limit, asked for all 10,000 keys in one page:
    # refused (RESOURCE_EXHAUSTED), then read in two halves.
    monkeypatch.setattr(etcd_module, "MAX_MESSAGE_BYTES", GRPC_DEFAULT_MAX_MESSAGE)
    with EtcdStore(_config(env), page_size=KEYS) as store:
        observed = store.read(env.prefix)
        assert store.requests == 3
    assert len(observed.entries) == KEYS
    assert {e.key for e in observed.entries} == {env.prefix + k for k, _v in valid}


def test_converge_bundles_10000_keys_and_prune_batches_deletes(
    env: Env, valid: Published, revoked: Published
) -> None:
    _load(env, valid + revoked)
    # Fingerprints only: with hosts, 10,000 entries would not fit the 1 MiB state file
    # limit; each value's Host header names the host instead.
    env.state(
        [k for k, _v in valid],
        etcd={"timeout": "60s"},
        revoked=[{"fingerprint": k} for k, _v in revoked],
        bundle={"reload": ["true"]},
    )
    at = ("--at", format_time(T0))

    result = env.cli("converge", "--detailed-exitcode", "--quiet", *at)

    assert result.code == 2, result.err
    keys, problems = parse_pem_bundle(env.bundle.read_bytes())
    assert problems == []
    assert sorted(k.kid for k in keys) == sorted(k for k, _v in valid)
    assert env.cli("check", "--quiet", *at).code == 1  # in sync
    # prune deletes the revoked keys, in several transactions: etcd refuses more than 128
    # operations in one. (env.dump() cannot read this much: its client keeps gRPC's 4 MiB.)
    pruned = env.cli("prune", "--detailed-exitcode", "--quiet", *at)
    assert pruned.code == 2, pruned.err
    with EtcdStore(_config(env)) as store:
        left = store.read(env.prefix)
    assert {e.key for e in left.entries} == {env.prefix + k for k, _v in valid}
