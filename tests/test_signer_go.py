"""The signer's answers, read by the API's own Go code the way kube-apiserver reads them.

tests/go/externaljwt is a client built on ``k8s.io/externaljwt/apis/v1`` (the API's
published Go package) and go-jose (what kube-apiserver verifies tokens with): it
holds Metadata, FetchKeys and Sign to the checks of kube-apiserver's external
signer plugin and key cache, assembles the token and verifies it with the fetched
key of its kid. So the descriptors sakeystate writes from the API's facts are
proven wire-compatible with the generated code. Built once per session; without
Go the test skips, except under $CI, where a missing toolchain fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sakeystate.keys import parse_key_pem
from sakeystate.metrics import SignerStats
from sakeystate.signer import KeySet, Signer, listen, load_signing_key, served_keys
from sakeystate.state import load_state

from conftest import Env
from signer_support import HOST, PEER, SignerProcess, signer_host, socket_dir, wait_for_socket
from support import REPO, kid, private_key, public_pem
from watch_support import wait_for


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI"):
            pytest.fail("go is not installed; CI must run the Go client of the signer")
        pytest.skip("go is not installed; CI runs this test")
    out = tmp_path_factory.mktemp("externaljwt") / "externaljwt"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    subprocess.run(
        [go, "build", "-o", str(out), "."],
        cwd=REPO / "tests" / "go" / "externaljwt",
        env=env,
        check=True,
        capture_output=True,
        timeout=1200,
    )
    return out


def _read(go_client: Path, socket: Path) -> dict[str, Any]:
    result = subprocess.run(
        [str(go_client), str(socket)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def sockets() -> Iterator[Path]:
    with socket_dir() as path:
        yield path


@pytest.mark.parametrize(
    ("kind", "alg"),
    [("ec256", "ES256"), ("ec384", "ES384"), ("ec521", "ES512"), ("rsa2048", "RS256")],
)
def test_kube_apiserver_s_checks_accept_every_answer_and_the_token_verifies(
    env: Env, sockets: Path, go_client: Path, kind: str, alg: str
) -> None:
    me = signer_host(env.tmp, sockets, private_key(kind, 60))
    path = env.state(
        [],
        own_cert=str(me.cert_file),
        signer=me.signer_section(refresh_hint="45s"),
        retention={"max_token_lifetime": "24h", "superseded_grace": "24h"},
    )
    desired = load_state(path, HOST)
    assert desired.signer is not None
    key = load_signing_key(str(me.key_file))
    signer = Signer(desired, desired.signer, key, SignerStats(), lambda: datetime.now(UTC))
    peer = parse_key_pem(public_pem(private_key("ec384", 61)))
    changed = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)
    signer.serve(KeySet(served_keys([peer], key), changed, "test"))
    listener = listen(desired.signer, signer.handlers())
    try:
        answer = _read(go_client, me.socket)
    finally:
        listener.close()
    assert answer["kids"] == sorted([me.kid, peer.kid])
    assert answer["header"] == {"alg": alg, "kid": me.kid, "typ": "JWT"}
    assert answer["subject"] == "system:serviceaccount:go:client"
    assert answer["refresh_hint_seconds"] == 45
    assert answer["max_token_expiration_seconds"] == 24 * 3600
    assert datetime.fromisoformat(answer["data_timestamp"]) == changed


def test_the_go_client_reads_the_converged_set_of_a_running_signer(
    env: Env, sockets: Path, go_client: Path
) -> None:
    me = signer_host(env.tmp, sockets, private_key("ec256", 62))
    env.publish(me.key, HOST)
    peer_kid = env.publish(private_key("rsa2048", 63), PEER)
    env.state(
        [(me.kid, HOST), (peer_kid, PEER)],
        own_cert=str(me.cert_file),
        signer=me.signer_section(),
        bundle={"exclude_host": "self"},
    )
    process = SignerProcess(env.state_path, HOST, env.tmp / "signer.log")
    try:
        wait_for_socket(me.socket, process)
        wait_for("the first pass", lambda: "serving 2 key(s), converged" in process.output)
        answer = _read(go_client, me.socket)
    finally:
        assert process.stop() == 0
    assert answer["kids"] == sorted([me.kid, peer_kid])
    assert answer["header"]["kid"] == kid(me.key)
    assert answer["refresh_hint_seconds"] == 60
