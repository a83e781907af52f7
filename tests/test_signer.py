"""``sakeystate signer``: the ExternalJWTSigner API over its socket, with a real gRPC client.

What kube-apiserver depends on (its plugin and key cache,
``pkg/serviceaccount/externaljwt/plugin``): FetchKeys never answers an empty set,
states a refresh hint above 0 and a valid data timestamp that moves only when the
set changes; Sign returns a header of exactly alg, kid and typ JWT, and a signature
that verifies with the served key of that kid; Metadata states the token lifetime.
And the served set follows the converge loop against a real etcd: a publish, a
revocation, and a refused plan (which keeps the last good set).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_der_public_key

from sakeystate.keys import parse_pem_bundle
from sakeystate.metrics import SignerStats
from sakeystate.signer import KeySet, Signer, listen, load_signing_key, served_keys
from sakeystate.state import load_state

from conftest import Env
from signer_support import (
    HOST,
    PEER,
    Client,
    SignerHost,
    SignerProcess,
    claims,
    signer_host,
    socket_dir,
    wait_for_kids,
    wait_for_socket,
)
from support import REPO, kid, private_key, run_cli
from watch_support import wait_for

ALGORITHMS = {"ec256": "ES256", "ec384": "ES384", "ec521": "ES512", "rsa2048": "RS256"}


@pytest.fixture
def sockets() -> Iterator[Path]:
    with socket_dir() as path:
        yield path


def _host(env: Env, sockets: Path, kind: str = "ec256") -> SignerHost:
    return signer_host(env.tmp, sockets, private_key(kind, 40))


def _state(env: Env, me: SignerHost, trusted: list[Any], **overrides: Any) -> Path:
    signer = overrides.pop("signer", {})
    return env.state(
        trusted,
        own_cert=str(me.cert_file),
        signer=me.signer_section(**signer),
        **overrides,
    )


# --- the service, in-process over a real socket -------------------------------------------


@pytest.fixture
def service(env: Env, sockets: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A Signer serving one key set (its own key and a peer's) on a socket, no etcd."""
    kind = getattr(request, "param", "ec256")
    me = _host(env, sockets, kind)
    path = _state(env, me, [], retention={"max_token_lifetime": "48h", "superseded_grace": "48h"})
    desired = load_state(path, HOST)
    assert desired.signer is not None
    key = load_signing_key(str(me.key_file))
    signer = Signer(desired, desired.signer, key, SignerStats(), lambda: datetime.now(UTC))
    listener = listen(desired.signer, signer.handlers())
    client = Client(me.socket)
    try:
        yield signer, client, me
    finally:
        client.close()
        listener.close()


def _peer_info() -> Any:
    from sakeystate.keys import parse_key_pem

    from support import public_pem

    return parse_key_pem(public_pem(private_key("ec384", 41)))


def test_fetch_keys_answers_unavailable_until_there_is_a_set_never_an_empty_one(
    service: Any,
) -> None:
    signer, client, _me = service
    with pytest.raises(grpc.RpcError) as caught:
        client.fetch_keys()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    signer.serve(KeySet(served_keys([], signer.key), datetime(2026, 1, 1, tzinfo=UTC), "test"))
    answer = client.fetch_keys()
    assert [k.key_id for k in answer.keys] == [signer.key.kid]
    with pytest.raises(ValueError, match="never empty"):
        KeySet((), datetime(2026, 1, 1, tzinfo=UTC), "test")


@pytest.mark.parametrize("service", list(ALGORITHMS), indirect=True)
def test_sign_returns_header_and_signature_that_verify_with_the_served_key(service: Any) -> None:
    signer, client, me = service
    peer = _peer_info()
    signer.serve(KeySet(served_keys([peer], signer.key), datetime.now(UTC), "test"))
    payload = claims(exp=int(time.time()) + 600, aud=["https://kubernetes.default.svc"])
    answer = client.sign(payload)
    header = json.loads(base64.urlsafe_b64decode(answer.header + "=" * (-len(answer.header) % 4)))
    # Exactly what kube-apiserver accepts (it decodes with DisallowUnknownFields).
    assert header == {"alg": signer.key.algorithm, "kid": me.kid, "typ": "JWT"}
    assert signer.key.algorithm == ALGORITHMS[_kind_of(me.key)]
    token = f"{answer.header}.{payload}.{answer.signature}"
    served = {k.key_id: k.key for k in client.fetch_keys().keys}
    public = load_der_public_key(served[header["kid"]])
    decoded = jwt.decode(
        token, public, algorithms=[header["alg"]], audience="https://kubernetes.default.svc"
    )
    assert decoded["sub"] == "system:serviceaccount:a:b"
    # The signature covers exactly the claims kube-apiserver sent.
    tampered = f"{answer.header}.{claims(sub='system:serviceaccount:x:y')}.{answer.signature}"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tampered, public, algorithms=[header["alg"]], options={"verify_aud": False})


def _kind_of(key: Any) -> str:
    return next(k for k in ALGORITHMS if private_key(k, 40) is key)


@pytest.mark.parametrize(
    "payload",
    ["", "not base64!", "bm90IGpzb24", "WzEsMl0", "a" * 300_000],
    ids=["empty", "not-base64url", "not-json", "json-array", "too-long"],
)
def test_sign_refuses_what_is_not_a_jwt_payload(service: Any, payload: str) -> None:
    _signer, client, _me = service
    with pytest.raises(grpc.RpcError) as caught:
        client.sign(payload)
    assert caught.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert payload[:20] not in (caught.value.details() or "") or not payload


def test_metadata_states_max_token_lifetime(service: Any) -> None:
    _signer, client, _me = service
    assert client.metadata().max_token_expiration_seconds == 48 * 3600


def test_served_keys_are_pkix_der_whose_sha256_is_their_kid(service: Any) -> None:
    signer, client, _me = service
    signer.serve(KeySet(served_keys([_peer_info()], signer.key), datetime.now(UTC), "test"))
    answer = client.fetch_keys()
    assert len(answer.keys) == 2
    for item in answer.keys:
        digest = base64.urlsafe_b64encode(hashlib.sha256(item.key).digest()).rstrip(b"=")
        assert digest.decode() == item.key_id
        load_der_public_key(item.key)
        assert item.exclude_from_oidc_discovery is False
    assert [k.key_id for k in answer.keys] == sorted(k.key_id for k in answer.keys)


# --- the signer process against a real etcd -----------------------------------------------


@pytest.fixture
def fleet(env: Env, sockets: Path) -> tuple[SignerHost, str]:
    """This host and one peer, both published and pinned."""
    me = _host(env, sockets)
    env.publish(me.key, HOST)
    peer_kid = env.publish(private_key("ec384", 41), PEER)
    return me, peer_kid


def _run(env: Env, *args: str) -> SignerProcess:
    return SignerProcess(env.state_path, HOST, env.tmp / "signer.log", *args)


def test_fetch_keys_serves_the_effective_set_plus_own_key_with_the_refresh_hint(
    env: Env, fleet: tuple[SignerHost, str]
) -> None:
    me, peer_kid = fleet
    # exclude_host: self leaves the own key out of the bundle; the signer serves it anyway.
    _state(
        env,
        me,
        [(me.kid, HOST), (peer_kid, PEER)],
        bundle={"exclude_host": "self"},
        signer={"refresh_hint": "7s"},
    )
    process = _run(env)
    try:
        wait_for_socket(me.socket, process)
        client = Client(me.socket)
        wait_for_kids(client, {me.kid, peer_kid})
        answer = client.fetch_keys()
        assert answer.refresh_hint_seconds == 7
        stamp = answer.data_timestamp
        assert stamp.seconds > 0 and 0 <= stamp.nanos < 10**9
        assert abs(stamp.seconds - time.time()) < 600
        assert os.stat(me.socket).st_mode & 0o777 == 0o600
        # The bundle and JWKS are still written (file mode's bundle without the own key).
        loaded = {k.kid for k in parse_pem_bundle(env.bundle_bytes() or b"")[0]}
        assert kid(me.key) not in loaded and peer_kid in loaded
        client.close()
    finally:
        assert process.stop() == 0
    assert not me.socket.exists()
    assert "reloaded" not in process.output


def test_data_timestamp_moves_only_when_the_set_changes(
    env: Env, fleet: tuple[SignerHost, str]
) -> None:
    me, peer_kid = fleet
    newer = private_key("rsa2048", 42)
    _state(env, me, [(me.kid, HOST), (peer_kid, PEER), (kid(newer), PEER)])
    process = _run(env)
    try:
        wait_for_socket(me.socket, process)
        client = Client(me.socket)
        wait_for_kids(client, {me.kid, peer_kid})
        first = client.fetch_keys().data_timestamp
        assert client.fetch_keys().data_timestamp == first  # fetching changes nothing
        passes = process.passes()
        env.publish(private_key("ec256", 43), PEER)  # untrusted: the set stays the same
        process.wait_passes(passes + 1)
        assert client.fetch_keys().data_timestamp == first
        env.publish(newer, PEER)
        wait_for_kids(client, {me.kid, peer_kid, kid(newer)})
        second = client.fetch_keys().data_timestamp
        assert (second.seconds, second.nanos) > (first.seconds, first.nanos)
        client.close()
    finally:
        assert process.stop() == 0


def test_served_set_follows_a_publish_and_a_revocation(
    env: Env, fleet: tuple[SignerHost, str]
) -> None:
    me, peer_kid = fleet
    reimaged = private_key("ec521", 44)
    _state(env, me, [(me.kid, HOST), (peer_kid, PEER), (kid(reimaged), PEER)])
    process = _run(env)
    try:
        wait_for_socket(me.socket, process)
        client = Client(me.socket)
        wait_for_kids(client, {me.kid, peer_kid})
        env.publish(reimaged, PEER, published=datetime.now(UTC))
        wait_for_kids(client, {me.kid, peer_kid, kid(reimaged)})
        # Revoking the peer's old key: the state file changes, the signer re-plans.
        _state(
            env,
            me,
            [(me.kid, HOST), (kid(reimaged), PEER)],
            revoked=[{"fingerprint": peer_kid, "reason": "test"}],
        )
        wait_for_kids(client, {me.kid, kid(reimaged)})
        client.close()
    finally:
        assert process.stop() == 0


def test_a_refused_plan_keeps_serving_the_last_good_set(
    env: Env, fleet: tuple[SignerHost, str]
) -> None:
    me, peer_kid = fleet
    _state(env, me, [(me.kid, HOST), (peer_kid, PEER)], retention={"max_removals": 0})
    process = _run(env)
    try:
        wait_for_socket(me.socket, process)
        client = Client(me.socket)
        wait_for_kids(client, {me.kid, peer_kid})
        before = client.fetch_keys()
        # Untrusting the peer's only key: a removal beyond max_removals 0, refused.
        _state(env, me, [(me.kid, HOST)], retention={"max_removals": 0})
        wait_for("a refused pass", lambda: ": refused" in process.output)
        after = client.fetch_keys()
        assert [k.key_id for k in after.keys] == [k.key_id for k in before.keys]
        assert after.data_timestamp == before.data_timestamp
        client.close()
    finally:
        assert process.stop() == 0


def test_before_the_first_pass_the_bundle_on_disk_is_served(
    env: Env, fleet: tuple[SignerHost, str]
) -> None:
    me, peer_kid = fleet
    _state(env, me, [(me.kid, HOST), (peer_kid, PEER)], bundle={"exclude_host": "self"})
    assert env.cli("converge", "--host", HOST).code == 0
    mtime = os.stat(env.bundle).st_mtime
    # etcd unreachable: no pass can succeed; the last good set is the bundle on disk.
    _state(
        env,
        me,
        [(me.kid, HOST), (peer_kid, PEER)],
        bundle={"exclude_host": "self"},
        etcd={"endpoints": ["http://127.0.0.1:9"], "timeout": "1s"},
    )
    process = _run(env)
    try:
        wait_for_socket(me.socket, process)
        client = Client(me.socket)
        wait_for_kids(client, {me.kid, peer_kid})
        stamp = client.fetch_keys().data_timestamp
        assert abs(stamp.seconds + stamp.nanos / 1e9 - mtime) < 0.001
        client.close()
    finally:
        assert process.stop() == 0


def test_with_no_set_yet_fetch_keys_is_unavailable_then_served_after_the_first_pass(
    env: Env, fleet: tuple[SignerHost, str], etcd: Any
) -> None:
    me, peer_kid = fleet
    good = etcd.url
    _state(
        env,
        me,
        [(me.kid, HOST), (peer_kid, PEER)],
        etcd={"endpoints": ["http://127.0.0.1:9"], "timeout": "1s"},
    )
    process = _run(env)
    try:
        wait_for_socket(me.socket, process)
        client = Client(me.socket)
        with pytest.raises(grpc.RpcError) as caught:
            client.fetch_keys()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        _state(env, me, [(me.kid, HOST), (peer_kid, PEER)], etcd={"endpoints": [good]})
        wait_for_kids(client, {me.kid, peer_kid})
        client.close()
    finally:
        assert process.stop() == 0


def test_signer_needs_its_section_and_own_cert(env: Env, sockets: Path) -> None:
    me = _host(env, sockets)
    env.state([])
    result = env.cli("signer", "--host", HOST)
    assert result.code == 1
    assert "no signer section" in result.err
    env.state([], signer=me.signer_section())
    result = env.cli("signer", "--host", HOST)
    assert result.code == 1
    assert "needs own_cert" in result.err
    assert not me.socket.exists()


def test_signer_refuses_a_private_key_that_is_not_own_certs(env: Env, sockets: Path) -> None:
    me = _host(env, sockets)
    (env.tmp / "other").mkdir()
    other = signer_host(env.tmp / "other", sockets, private_key("ec256", 45))
    env.state([], own_cert=str(other.cert_file), signer=me.signer_section())
    result = env.cli("signer", "--host", HOST)
    assert result.code == 1
    assert f"holds the key {me.kid}, but own_cert" in result.err
    assert kid(other.key) in result.err
    assert not me.socket.exists()


def test_state_limits_kube_apiserver_puts_on_a_signer(env: Env, sockets: Path) -> None:
    me = _host(env, sockets)
    env.state(
        [],
        signer=me.signer_section(refresh_hint="0s"),
        retention={"max_token_lifetime": "5m", "superseded_grace": "5m"},
    )
    result = run_cli("validate", str(env.state_path))
    assert result.code == 1
    assert "signer.refresh_hint: must be at least 1s" in result.err
    assert "retention.max_token_lifetime: below 10m" in result.err
    env.state([], signer={**me.signer_section(), "socket": "/run/" + "s" * 120})
    result = run_cli("validate", str(env.state_path))
    assert result.code == 1
    assert "limit of a unix socket path" in result.err
    env.state([], signer={**me.signer_section(), "port": 1})
    result = run_cli("validate", str(env.state_path))
    assert result.code == 1
    assert "signer.port: unknown field" in result.err


def test_a_reload_owed_from_file_mode_is_dropped_and_none_is_run(
    env: Env, fleet: tuple[SignerHost, str]
) -> None:
    me, peer_kid = fleet
    marker = Path(str(env.bundle) + ".reload-pending")
    ran = env.tmp / "reload-ran"
    _state(
        env,
        me,
        [(me.kid, HOST), (peer_kid, PEER)],
        bundle={"reload": ["touch", str(ran)]},
    )
    assert env.cli("converge", "--host", HOST, "--no-reload").code == 0
    assert marker.exists()
    process = _run(env)
    try:
        wait_for_socket(me.socket, process)
        process.wait_passes(1)
        env.publish(private_key("rsa2048", 42), PEER)
        _state(
            env,
            me,
            [(me.kid, HOST), (peer_kid, PEER), (kid(private_key("rsa2048", 42)), PEER)],
            bundle={"reload": ["touch", str(ran)]},
        )
        client = Client(me.socket)
        wait_for_kids(client, {me.kid, peer_kid, kid(private_key("rsa2048", 42))})
        client.close()
    finally:
        assert process.stop() == 0
    assert not marker.exists()
    assert not ran.exists(), "signer mode ran bundle.reload"
    assert "restart owed from file mode is dropped" in process.output


def test_a_signer_that_cannot_start_keeps_the_owed_reload(
    env: Env, fleet: tuple[SignerHost, str]
) -> None:
    me, peer_kid = fleet
    marker = Path(str(env.bundle) + ".reload-pending")
    _state(env, me, [(me.kid, HOST), (peer_kid, PEER)], bundle={"reload": ["true"]})
    assert env.cli("converge", "--host", HOST, "--no-reload").code == 0
    assert marker.exists()
    me.socket.write_text("not a socket")
    result = env.cli("signer", "--host", HOST)
    assert result.code == 1
    assert "exists and is not a socket" in result.err
    assert marker.exists(), "the host stays in file mode: its restart is still owed"
    me.socket.unlink()


def test_metrics_count_fetches_signs_and_the_last_set_change(
    env: Env, fleet: tuple[SignerHost, str]
) -> None:
    me, peer_kid = fleet
    _state(env, me, [(me.kid, HOST), (peer_kid, PEER)])
    textfile = env.tmp / "sakeystate.prom"
    process = _run(env, "--metrics-textfile", str(textfile))
    try:
        wait_for_socket(me.socket, process)
        client = Client(me.socket)
        wait_for_kids(client, {me.kid, peer_kid})
        client.fetch_keys()
        client.sign(claims())
        with pytest.raises(grpc.RpcError):
            client.sign("x")
        changed = client.fetch_keys().data_timestamp.seconds
        passes = process.passes()
        env.publish(private_key("ec256", 43), PEER)  # a pass, which writes the textfile
        process.wait_passes(passes + 1)
        wait_for("the textfile", lambda: "sakeystate_signer_fetch_keys_total" in _text(textfile))
        text = _text(textfile)
        assert _value(text, "sakeystate_signer_fetch_keys_total") >= 3
        assert _value(text, 'sakeystate_signer_sign_requests_total{result="signed"}') == 1
        assert _value(text, 'sakeystate_signer_sign_requests_total{result="refused"}') == 1
        assert _value(text, "sakeystate_signer_keys") == 2
        assert int(_value(text, "sakeystate_signer_set_changed_timestamp_seconds")) == changed
        client.close()
    finally:
        assert process.stop() == 0


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in\n{text}")


def test_json_log_lines_carry_the_served_kids(env: Env, fleet: tuple[SignerHost, str]) -> None:
    me, peer_kid = fleet
    _state(env, me, [(me.kid, HOST), (peer_kid, PEER)])
    process = _run(env, "--format", "json")
    try:
        wait_for_socket(me.socket, process)
        wait_for("a keys line", lambda: '"event": "keys"' in process.output)
    finally:
        assert process.stop() == 0
    events = [json.loads(line) for line in process.output.splitlines() if line.startswith("{")]
    keys = next(e for e in events if e.get("event") == "keys")
    assert keys["version"] == 1 and set(keys["kids"]) == {me.kid, peer_kid}
    assert (
        timedelta(0)
        <= datetime.now(UTC) - datetime.fromisoformat(keys["at"])
        < timedelta(minutes=10)
    )


def test_systemd_is_told_ready_once_fetch_keys_has_a_set(
    env: Env, fleet: tuple[SignerHost, str]
) -> None:
    """Type=notify: kube-apiserver, ordered after the unit, starts only once READY=1."""
    me, peer_kid = fleet
    _state(env, me, [(me.kid, HOST), (peer_kid, PEER)])
    notify = env.tmp / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify))
    receiver.settimeout(60)
    os.environ["NOTIFY_SOCKET"] = str(notify)
    try:
        process = _run(env)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        message = receiver.recv(4096).decode()
        assert message == "READY=1"
        # By then FetchKeys answers with the converged set.
        client = Client(me.socket)
        assert set(client.kids()) == {me.kid, peer_kid}
        client.close()
    finally:
        assert process.stop() == 0
        assert receiver.recv(4096).decode() == "STOPPING=1"
        receiver.close()


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing under CI (.ci/run installs systemd)")
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "examples/systemd/sakeystate-signer.service").read_text()
    for line in (
        "Type=notify",
        "Before=kube-apiserver.service",
        "Restart=always",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "LimitCORE=0",
        "RuntimeDirectory=sakeystate",
        "ExecStart=/usr/bin/sakeystate signer --state /etc/sakeystate/state.yaml",
    ):
        assert line in unit, line
    # Never Requires=/BindsTo= kube-apiserver: restarting the signer must not restart it.
    assert "Requires" not in unit and "BindsTo" not in unit
    local = tmp_path / "sakeystate-signer.service"
    local.write_text(
        unit.replace("/usr/bin/sakeystate", str(Path(sys.executable).parent / "sakeystate"))
    )
    result = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "sakeystate-signer.service" not in result.stderr, result.stderr
