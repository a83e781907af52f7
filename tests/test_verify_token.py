"""verify-token: RS256 and ES256 tokens checked now and after the pending plan."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from jwt_support import sign

from conftest import Env
from support import T0, kid, private_key

AT = "2026-11-22T10:00:00Z"
A, B = "ctrl1001.example.org", "ctrl1002.example.org"
KINDS = {"RS256": "rsa2048", "ES256": "ec256"}


@pytest.fixture
def cluster(env: Env) -> Env:
    """Two control planes, one RSA and one P-256, converged: the bundle holds both."""
    kids = [env.publish(private_key(KINDS["RS256"], 0), A), env.publish(private_key("ec256", 0), B)]
    env.state(list(zip(kids, (A, B), strict=True)), bundle={"reload": ["true"]})
    assert env.cli("converge", "--at", AT).code == 0
    return env


def verify(env: Env, token: str, *args: str) -> tuple[int, str, str]:
    """verify-token with the token in a file, as an operator passes it."""
    path = env.tmp / "token.jwt"
    path.write_text(token)
    result = env.cli("verify-token", "--at", AT, *args, str(path))
    return result.code, result.out, result.err


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_valid_token_verifies_now_and_after_the_plan_and_shows_its_claims(
    cluster: Env, alg: str
) -> None:
    token = sign(private_key(KINDS[alg], 0), pod="coredns-5d78c9869d-abcde")
    code, out, err = verify(cluster, token)
    assert code == 0, out + err
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["kid"] == kid(private_key(KINDS[alg], 0))
    assert fields["alg"] == alg
    assert fields["key host"] == (A if alg == "RS256" else B)
    assert fields["issuer"] == "https://kubernetes.default.svc"
    assert fields["subject"] == "system:serviceaccount:kube-system:calico-node"
    assert fields["pod"].startswith("kube-system/coredns-5d78c9869d-abcde (uid ")
    assert fields["issued at"] == fields["not before"] == AT
    assert fields["expires"] == "2027-11-22T10:00:00Z"
    assert fields["warn after"] == "2026-11-22T11:00:07Z"
    assert fields["now"].startswith("ok: signature verifies with key")
    assert fields["after plan"].startswith("ok: ") and "no changes pending" in fields["after plan"]
    assert token not in out + err  # a token is a credential: never echoed

    report = json.loads(cluster.cli("verify-token", "--at", AT, "--format", "json", token).out)
    assert report["verified"] is True and report["alg"] == alg
    assert report["now"]["verified"] and report["after_plan"]["verified"]


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_expired_token_fails_with_its_expiry(cluster: Env, alg: str) -> None:
    token = sign(
        private_key(KINDS[alg], 0), issued=T0 - timedelta(days=2), lifetime=timedelta(hours=1)
    )
    code, out, _err = verify(cluster, token)
    assert code == 1
    assert "expired 2026-11-20T11:00:00Z" in out
    assert "token does NOT verify now and after the plan" in out
    # The signature itself is fine: the message says so, so nobody hunts a missing key.
    assert "signature verifies" in out


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_unknown_kid_fails_naming_the_kid(cluster: Env, alg: str) -> None:
    stranger = private_key(KINDS[alg], 5)
    code, out, _err = verify(cluster, sign(stranger))
    assert code == 1
    assert f"kid {kid(stranger)} is not in the current bundle" in out
    assert f"kid {kid(stranger)} is not in the bundle the pending plan would write" in out


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_wrong_signature_fails(cluster: Env, alg: str) -> None:
    """Signed by another key but claiming a trusted key's kid."""
    trusted = private_key(KINDS[alg], 0)
    forged = sign(private_key(KINDS[alg], 6), kid=kid(trusted))
    code, out, _err = verify(cluster, forged)
    assert code == 1
    assert f"signature does not verify with key {kid(trusted)}" in out


def test_unsigned_and_algorithm_swapped_tokens_never_verify(cluster: Env) -> None:
    rsa_kid = kid(private_key("rsa2048", 0))
    claims = {"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:x:y"}
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": rsa_kid})
    code, out, _err = verify(cluster, unsigned)
    assert code == 1 and "token alg none does not match the key (RS256 expected)" in out
    swapped = sign(private_key("ec256", 0), kid=rsa_kid)  # ES256 under the RSA key's kid
    code, out, _err = verify(cluster, swapped)
    assert code == 1 and "token alg ES256 does not match the key (RS256 expected)" in out


@pytest.mark.parametrize(
    "text",
    ["not-a-token", "a.b.c", "eyJhbGciOiJFUzI1NiJ9.e30", "Bearer ", "x" * 70000],
    ids=["word", "three-garbage-parts", "two-parts", "empty-bearer", "huge"],
)
def test_malformed_input_is_a_clear_error_without_traceback(cluster: Env, text: str) -> None:
    path = cluster.tmp / "token.jwt"
    path.write_text(text)
    result = cluster.cli("verify-token", "--at", AT, str(path))
    assert result.code == 1
    assert result.err.startswith("sakeystate: error: ")
    assert any(w in result.err for w in ("not a JWT", "no token given", "larger than"))
    assert "Traceback" not in result.err and result.out == ""


def test_token_from_stdin_in_a_real_process_and_malformed_stdin(cluster: Env) -> None:
    exe = Path(sys.executable).parent / "sakeystate"
    argv = [str(exe), "verify-token", "--state", str(cluster.state_path), "--at", AT, "-"]
    token = sign(private_key("ec256", 0))
    good = subprocess.run(argv, input=f"Bearer {token}\n", capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    bad = subprocess.run(argv, input="{garbage}\n", capture_output=True, text=True)
    assert bad.returncode == 1
    assert "not a JWT" in bad.stderr and "Traceback" not in bad.stderr


def test_stdin_is_the_default_source(cluster: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(sign(private_key("rsa2048", 0))))
    result = cluster.cli("verify-token", "--at", AT)
    assert result.code == 0, result.out + result.err


def test_token_of_a_key_the_plan_removes_verifies_now_but_fails_after(cluster: Env) -> None:
    rsa, ec = private_key("rsa2048", 0), private_key("ec256", 0)
    cluster.state([(kid(ec), B)], revoked=[{"fingerprint": kid(rsa), "reason": "exposed"}])
    code, out, _err = verify(cluster, sign(rsa))
    assert code == 1
    assert "now:        ok: signature verifies" in out
    assert f"after plan: FAILS: kid {kid(rsa)} is not in the bundle the pending plan" in out
    assert "token does NOT verify after the plan" in out


def test_token_of_a_newly_trusted_key_fails_now_and_verifies_after(cluster: Env) -> None:
    new = private_key("ec256", 1)
    trusted = [(kid(private_key("rsa2048", 0)), A), (kid(private_key("ec256", 0)), B)]
    cluster.publish(new, "ctrl1003.example.org")
    cluster.state([*trusted, (kid(new), "ctrl1003.example.org")])
    code, out, _err = verify(cluster, sign(new))
    assert code == 1
    assert "now:        FAILS" in out and "after plan: ok" in out
    assert cluster.cli("converge", "--at", AT).code == 0
    assert verify(cluster, sign(new))[0] == 0


def test_exclude_host_key_verifies_as_the_hosts_own_key(cluster: Env) -> None:
    trusted = [(kid(private_key("rsa2048", 0)), A), (kid(private_key("ec256", 0)), B)]
    cluster.state(trusted, host=B, bundle={"exclude_host": "self"})
    assert cluster.cli("converge", "--at", AT).code == 0
    code, out, _err = verify(cluster, sign(private_key("ec256", 0)))
    assert code == 0, out
    assert "this host's own key (exclude_host)" in out


def test_missing_bundle_fails_now(env: Env) -> None:
    key_id = env.publish(private_key("ec256", 0), B)
    env.state([(key_id, B)])
    code, out, _err = verify(env, sign(private_key("ec256", 0)))
    assert code == 1
    assert f"the bundle {env.bundle} does not exist" in out and "after plan: ok" in out


def test_token_is_read_from_a_file_or_stdin_and_argv_is_warned_about(cluster: Env) -> None:
    """A token in argv lands in ps and shell history: a file or stdin is the default way."""
    token = sign(private_key(KINDS["ES256"], 0))
    path = cluster.tmp / "token"
    path.write_text(token + "\n")
    from_file = cluster.cli("verify-token", "--at", AT, str(path))
    assert from_file.code == 0, from_file.err
    assert "command line" not in from_file.err
    in_argv = cluster.cli("verify-token", "--at", AT, token)
    assert in_argv.code == 0 and "lands in ps and shell history" in in_argv.err


def test_stderr_lines_carry_syslog_priorities_under_systemd(
    cluster: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.publish(private_key("ec384", 7), "stranger.example.org")
    plain = cluster.cli("plan", "--at", AT)
    assert plain.err.startswith("sakeystate: warning: ")
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    journald = cluster.cli("plan", "--at", AT)
    assert journald.err.startswith("<4>sakeystate: warning: ")
    broken = cluster.cli("plan", "--at", "yesterday")
    assert broken.err.startswith("<3>sakeystate: error: ")
