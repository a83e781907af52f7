"""Fixtures: one real etcd per test session, a fresh key prefix and directory per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from support import (
    T0,
    Etcd,
    Result,
    entry_value,
    kid,
    run_cli,
    running_etcd,
    state_data,
    write_state,
)

_prefixes = itertools.count(1)

# The longest files first (`make test` keeps this order: --no-loadscope-reorder): each
# xdist worker takes one file at a time, so the five-minute chaos test runs beside the
# rest of the suite instead of after it, and short files fill the end.
LONGEST_FIRST = (
    "test_etcd_chaos.py",
    "test_ansible.py",
    "test_puppet.py",
    "test_watch.py",
    "test_etcd_matrix.py",
    "test_restart_watch.py",
    "test_restart_cm.py",
    "test_ansible_sanity.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every other test keeps its order


@pytest.fixture(scope="session")
def etcd() -> Iterator[Etcd]:
    with running_etcd() as server:
        yield server


@dataclass
class Env:
    """One test's cluster: a prefix in the shared etcd, a bundle path, a state file."""

    etcd: Etcd
    prefix: str
    tmp: Path
    bundle: Path
    state_path: Path

    def state(self, trusted: list[Any], **overrides: Any) -> Path:
        data = state_data(self.etcd.url, self.prefix, self.bundle, trusted, **overrides)
        return write_state(self.state_path, data)

    def publish(self, key: Any, host: str, published: datetime | None = T0, **cert: Any) -> str:
        """Put a value exactly as `sakeystate publish` would, under ``<prefix><host>/<kid>``."""
        key_id = kid(key)
        self.etcd.put(self.key(host, key_id), entry_value(key, host, published, **cert))
        return key_id

    def publish_flat(
        self, key: Any, host: str, published: datetime | None = T0, **cert: Any
    ) -> str:
        """Put a value as revision 2 did, under ``<prefix><kid>`` (the flat layout)."""
        key_id = kid(key)
        self.etcd.put(self.prefix + key_id, entry_value(key, host, published, **cert))
        return key_id

    def key(self, host: str, key_id: str) -> str:
        """Where a host's key lives in etcd (the per-host layout)."""
        return f"{self.prefix}{host}/{key_id}"

    def cli(self, command: str, *args: str) -> Result:
        return run_cli(command, "--state", str(self.state_path), *args)

    def dump(self) -> dict[str, bytes]:
        return self.etcd.dump(self.prefix)

    def bundle_bytes(self) -> bytes | None:
        return self.bundle.read_bytes() if self.bundle.exists() else None


@pytest.fixture
def env(etcd: Etcd, tmp_path: Path) -> Env:
    prefix = f"/t{next(_prefixes)}/kube-apiserver-sa-certs/"
    return Env(etcd, prefix, tmp_path, tmp_path / "sa-certs.pem", tmp_path / "state.yaml")
