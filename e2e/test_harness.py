"""The harness itself: the flags it gives kube-apiserver exist in the built release."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import binaries
from etcd_server import EtcdServer
from harness import QUIET_FLAGS, Cluster


@pytest.mark.parametrize("version", binaries.kube_versions())
def test_every_flag_the_harness_gives_is_in_the_binarys_help(version: str, tmp_path: Path) -> None:
    kube = binaries.binary("kube-apiserver", version)
    shown = subprocess.run([str(kube), "--help"], capture_output=True, text=True, check=False)
    text = shown.stdout + shown.stderr
    cluster = Cluster(tmp_path, kube, etcd=EtcdServer(str(tmp_path)))
    argv = cluster.planes[0].apiserver_argv()
    cluster.planes[1].mode = "signer"  # restart-free mode's flags (test_signer_mode.py)
    signer_argv = cluster.planes[1].apiserver_argv()
    assert not [a for a in signer_argv if a.startswith("--service-account-key-file")]
    assert not [a for a in signer_argv if a.startswith("--service-account-signing-key-file")]
    flags = {arg.split("=", 1)[0] for arg in argv[1:] + signer_argv[1:]}
    assert "--service-account-signing-endpoint" in flags
    assert set(QUIET_FLAGS) <= set(argv)
    missing = sorted(flag for flag in flags if f"  {flag} " not in text)
    assert not missing, f"kube-apiserver {version} --help does not list {missing}"
