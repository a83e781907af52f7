"""bundle.jwks_path: the effective set as a JWKS document, written like the bundle."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from jwt_support import alg_of, sign

from conftest import Env
from support import kid, private_key

AT = "2026-11-22T10:00:00Z"
PLANES = {
    "ctrl1001.example.org": ("ec521", 0),
    "ctrl1002.example.org": ("ec256", 0),
    "ctrl1003.example.org": ("rsa2048", 0),
}
NEWCOMER = ("ctrl1004.example.org", ("ec384", 0))


def keys() -> dict[str, Any]:
    return {host: private_key(*spec) for host, spec in PLANES.items()}


@pytest.fixture
def jwks_env(env: Env) -> Env:
    """Three trusted control planes and a published but not yet trusted fourth."""
    for host, key in keys().items():
        env.publish(key, host)
    env.publish(private_key(*NEWCOMER[1]), NEWCOMER[0])
    trust(env)
    return env


def trust(env: Env, *extra: tuple[str, Any], host: str | None = None, **bundle: Any) -> None:
    trusted = [(kid(k), h) for h, k in keys().items()] + [(kid(k), h) for h, k in extra]
    on_host = {"host": host} if host else {}
    env.state(trusted, bundle={"jwks_path": str(jwks_path(env)), **bundle}, **on_host)


def jwks_path(env: Env) -> Path:
    return env.tmp / "jwks.json"


def document(env: Env) -> dict[str, Any]:
    return dict(json.loads(jwks_path(env).read_text()))


def test_jwks_holds_exactly_the_effective_set_and_verifies_tokens(jwks_env: Env) -> None:
    result = jwks_env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    jwks = document(jwks_env)
    expected = {kid(k): alg_of(k) for k in keys().values()}
    assert [j["kid"] for j in jwks["keys"]] == sorted(expected)  # sorted, no newcomer
    assert json.loads(result.out)["bundle"]["kids_after"] == sorted(expected)
    for entry in jwks["keys"]:
        assert entry["use"] == "sig"
        assert entry["alg"] == expected[entry["kid"]]
        assert entry["kty"] == ("RSA" if entry["alg"] == "RS256" else "EC")
    assert {j["crv"] for j in jwks["keys"] if j["kty"] == "EC"} == {"P-256", "P-521"}

    key_set = jwt.PyJWKSet.from_dict(jwks)
    for key in keys().values():
        token = sign(key)
        jwk = key_set[jwt.get_unverified_header(token)["kid"]]
        claims = jwt.decode(
            token,
            jwk.key,
            algorithms=[jwk.algorithm_name],
            audience="https://kubernetes.default.svc",
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
        assert claims["sub"] == "system:serviceaccount:kube-system:calico-node"
    with pytest.raises(KeyError):
        key_set[kid(private_key(*NEWCOMER[1]))]


def test_jwks_is_written_atomically_and_only_when_it_changes(jwks_env: Env) -> None:
    trust(jwks_env, mode="0640", reload=["true"])
    assert jwks_env.cli("converge", "--at", AT).code == 0
    first = os.stat(jwks_path(jwks_env))
    assert stat.S_IMODE(first.st_mode) == 0o640  # the bundle's mode
    content = jwks_path(jwks_env).read_bytes()
    assert sorted(p.name for p in jwks_env.tmp.iterdir() if p.name.startswith(".")) == []

    again = jwks_env.cli("converge", "--at", AT, "--format", "json", "--detailed-exitcode")
    assert again.code == 0 and json.loads(again.out)["actions"] == []
    second = os.stat(jwks_path(jwks_env))
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert jwks_path(jwks_env).read_bytes() == content

    newcomer = private_key(*NEWCOMER[1])
    trust(jwks_env, (NEWCOMER[0], newcomer), mode="0640")
    plan = json.loads(jwks_env.cli("plan", "--at", AT, "--format", "json").out)
    assert {"target": "jwks", "op": "write"}.items() <= next(
        a for a in plan["actions"] if a["target"] == "jwks"
    ).items()
    assert jwks_path(jwks_env).read_bytes() == content  # plan writes nothing
    assert jwks_env.cli("converge", "--at", AT).code == 0
    third = os.stat(jwks_path(jwks_env))
    assert third.st_ino != first.st_ino  # replaced by rename, never rewritten in place
    assert kid(newcomer) in [j["kid"] for j in document(jwks_env)["keys"]]


def test_lost_or_hand_edited_jwks_is_restored_without_touching_the_bundle(
    jwks_env: Env,
) -> None:
    log = jwks_env.tmp / "reloads.log"
    reload = [sys.executable, "-c", f"open({str(log)!r}, 'a').write('x')"]
    trust(jwks_env, reload=reload)
    assert jwks_env.cli("converge", "--at", AT).code == 0
    good, bundle = jwks_path(jwks_env).read_bytes(), os.stat(jwks_env.bundle)
    for damage in ("delete", "edit"):
        if damage == "delete":
            jwks_path(jwks_env).unlink()
        else:
            jwks_path(jwks_env).write_text('{"keys": []}\n')
        result = jwks_env.cli("converge", "--at", AT, "--format", "json")
        assert result.code == 0, result.err
        assert [a["target"] for a in json.loads(result.out)["actions"]] == ["jwks"]
        assert jwks_path(jwks_env).read_bytes() == good
    after = os.stat(jwks_env.bundle)
    assert (after.st_ino, after.st_mtime_ns) == (bundle.st_ino, bundle.st_mtime_ns)
    assert log.read_text() == "x"  # only the first converge reloaded


def test_jwks_keeps_the_exclude_host_key_that_the_bundle_leaves_out(jwks_env: Env) -> None:
    """OIDC-discovery consumers must verify this host's tokens too."""
    own = "ctrl1001.example.org"
    trust(jwks_env, host=own, exclude_host="self")
    result = jwks_env.cli("converge", "--at", AT, "--format", "json")
    assert result.code == 0, result.err
    own_kid = kid(keys()[own])
    assert own_kid not in json.loads(result.out)["bundle"]["kids_after"]
    assert [j["kid"] for j in document(jwks_env)["keys"]] == sorted(kid(k) for k in keys().values())
    token = sign(keys()[own], namespace="default")
    jwk = next(j for j in document(jwks_env)["keys"] if j["kid"] == own_kid)
    claims = jwt.decode(
        token,
        jwt.PyJWK(jwk).key,
        algorithms=[jwk["alg"]],
        options={"verify_aud": False, "verify_exp": False},
    )
    assert claims["sub"].startswith("system:serviceaccount:default:")
