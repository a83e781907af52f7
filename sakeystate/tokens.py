"""verify-token: would this service-account token verify now, and after the pending plan?

A token maps to its key by the ``kid`` header alone (the kid *is* the key's
fingerprint). The signature is checked by PyJWT, only with the one algorithm
kube-apiserver uses for that key (RS256 for RSA, ES256/ES384/ES512 by curve),
so ``alg: none`` or an algorithm swap never verifies. Time claims are checked
against ``--at`` (default now), not the wall clock, with the one-minute leeway
kube-apiserver allows. The token itself is a credential: it is never printed.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import jwt
from cryptography.hazmat.primitives import serialization

from sakeystate.errors import SakeystateError
from sakeystate.escape import for_terminal
from sakeystate.keys import KeyInfo, format_time, parse_pem_bundle
from sakeystate.model import BundleObservation, EtcdObservation
from sakeystate.plan import BundledKey, LocalFacts, Plan, jwk_of, plan
from sakeystate.state import DesiredState

MAX_TOKEN_BYTES = 64 * 1024
# kube-apiserver validates exp/nbf with go-jose's default leeway.
LEEWAY = timedelta(minutes=1)
_TIME_CLAIMS = (("iat", "issued at"), ("nbf", "not before"), ("exp", "expires"))
# NumericDates beyond what datetime holds (year 9999's end, RFC 5280's "no expiry",
# or 1e400 = inf) saturate to these instead of overflowing.
LATEST = datetime.max.replace(tzinfo=UTC)
EARLIEST = datetime.min.replace(tzinfo=UTC)


class TokenError(SakeystateError):
    """The input is not a JWT that could be checked at all."""


@dataclass(frozen=True)
class Token:
    """A JWT, decoded but not yet verified."""

    raw: str
    header: Mapping[str, Any]
    claims: Mapping[str, Any]

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) and kid else None

    @property
    def alg(self) -> str:
        return str(self.header.get("alg", ""))


@dataclass(frozen=True)
class Check:
    verified: bool
    reason: str


@dataclass(frozen=True)
class Verification:
    token: Token
    at: datetime
    key_host: str | None
    time: Check
    now: Check
    after: Check

    @property
    def ok(self) -> bool:
        return self.now.verified and self.after.verified


def read_token(source: str, stdin: TextIO) -> str:
    """The token from the argument, or from stdin for ``-``; an ``Authorization`` prefix is ok."""
    text = stdin.read(MAX_TOKEN_BYTES + 1) if source == "-" else source
    if len(text) > MAX_TOKEN_BYTES:
        raise TokenError(f"the token is longer than {MAX_TOKEN_BYTES} bytes; not a JWT")
    text = text.strip()
    if text.lower().startswith("bearer "):
        text = text[len("bearer ") :].strip()
    if not text:
        raise TokenError("no token given (pass it as an argument, or - to read stdin)")
    return text


def decode(raw: str) -> Token:
    """Header and claims, without verifying anything yet; TokenError when it is not a JWT."""
    try:
        header = jwt.get_unverified_header(raw)
        claims = jwt.decode(raw, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenError(f"not a JWT: {for_terminal(str(exc))}") from None
    except RecursionError:
        raise TokenError("not a JWT: its JSON is nested too deeply") from None
    if not isinstance(claims, dict):
        raise TokenError("not a JWT: the claims are not a JSON object")
    return Token(raw, header, claims)


def _public_key(key: KeyInfo) -> Any:
    return serialization.load_pem_public_key(key.public_pem)


def check_signature(token: Token, key: KeyInfo | None, where: str) -> Check:
    """Verify with PyJWT against ``key`` (the one under the token's kid in ``where``)."""
    if token.kid is None:
        return Check(False, "the token has no kid header, so no key can be chosen")
    if key is None:
        return Check(False, f"kid {token.kid} is not in {where}")
    expected = jwk_of(BundledKey(key.kid, None, key))["alg"]
    if token.alg != expected:
        return Check(
            False, f"token alg {token.alg or 'none'} does not match the key ({expected} expected)"
        )
    try:
        jwt.decode(
            token.raw,
            _public_key(key),
            algorithms=[expected],
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except jwt.InvalidSignatureError:
        return Check(False, f"signature does not verify with key {key.kid} in {where}")
    except jwt.PyJWTError as exc:
        return Check(False, f"rejected by {where}: {exc}")
    return Check(True, f"signature verifies with key {key.kid} in {where}")


def _moment(value: Any) -> datetime | None:
    """A NumericDate as a datetime, saturated at the ends of datetime's range; None if not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return LATEST if value > 0 else EARLIEST


def _shifted(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta``, saturated: the leeway must not overflow a saturated date."""
    try:
        return moment + delta
    except OverflowError:
        return LATEST if delta > timedelta(0) else EARLIEST


def check_times(claims: Mapping[str, Any], at: datetime) -> Check:
    """exp and nbf as kube-apiserver checks them; a token without exp never expires."""
    for name in ("exp", "nbf", "iat"):
        if name in claims and _moment(claims[name]) is None:
            shown = for_terminal(repr(claims[name])[:80])
            return Check(False, f"claim {name} is not a NumericDate: {shown}")
    expires = _moment(claims.get("exp"))
    not_before = _moment(claims.get("nbf"))
    if expires is not None and at >= _shifted(expires, LEEWAY):
        return Check(False, f"expired {format_time(expires)} (checked at {format_time(at)})")
    if not_before is not None and _shifted(at, LEEWAY) < not_before:
        return Check(False, f"not valid before {format_time(not_before)}")
    if expires is None:
        return Check(True, "no exp claim: the token never expires")
    return Check(True, f"valid until {format_time(expires)}")


def _excluded_key(current: Plan, kid: str) -> KeyInfo | None:
    """The key of exclude_host that its own apiserver loads: not in the bundle, trusted."""
    excluded = current.excluded
    if excluded is None or excluded.kid != kid:
        return None
    if not any(k.kid == kid and k.status == "excluded" for k in current.keys):
        return None
    return excluded.key


def verify(
    token: Token,
    desired: DesiredState,
    observed: EtcdObservation,
    found: BundleObservation,
    at: datetime,
    local: LocalFacts | None = None,
) -> Verification:
    """Check ``token`` against the bundle on disk and the one the pending plan would write.

    The pending plan is computed as with ``--allow-removals``: a refused plan is
    still what the next reviewed converge would write.
    """
    pending = plan(desired, observed, found, at, allow_removals=True, local=local)
    kid = token.kid or ""
    on_disk, _problems = parse_pem_bundle(found.content or b"")
    now_keys = {k.kid: k for k in on_disk}
    after_keys = {b.kid: b.key for b in pending.bundle_keys}
    now_where = f"the current bundle {found.path}" if found.content is not None else None
    after_where = "the bundle the pending plan would write"
    if not pending.changed:
        after_where += " (no changes pending)"
    excluded = _excluded_key(pending, kid)
    if excluded is not None:
        own = "this host's own key (exclude_host), loaded by its apiserver beside the bundle"
        now_keys[kid] = after_keys[kid] = excluded
        now_where = after_where = own
    time = check_times(token.claims, at)
    if now_where is None:
        now = Check(False, f"the bundle {found.path} does not exist")
    else:
        now = check_signature(token, now_keys.get(kid), now_where)
    after = check_signature(token, after_keys.get(kid), after_where)
    if not time.verified:
        now = Check(False, f"{now.reason}, but the token {time.reason}")
        after = Check(False, f"{after.reason}, but the token {time.reason}")
    host = next((k.host for k in pending.keys if k.kid == kid and k.host), None)
    return Verification(token, at, host, time, now, after)


def _pod(claims: Mapping[str, Any]) -> str | None:
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        return None
    pod = k8s.get("pod")
    if not isinstance(pod, dict) or "name" not in pod:
        return None
    text = f"{k8s.get('namespace', '?')}/{pod['name']}"
    return f"{text} (uid {pod['uid']})" if pod.get("uid") else text


def _warnafter(claims: Mapping[str, Any]) -> Any:
    k8s = claims.get("kubernetes.io")
    return k8s.get("warnafter") if isinstance(k8s, dict) else None


def _when(value: Any) -> str | None:
    if value is None:
        return None
    moment = _moment(value)
    return format_time(moment) if moment else repr(value)


def as_dict(result: Verification) -> dict[str, Any]:
    claims = result.token.claims
    return {
        "version": 1,
        "verified": result.ok,
        "at": format_time(result.at),
        "kid": result.token.kid,
        "alg": result.token.alg,
        "key_host": result.key_host,
        "issuer": claims.get("iss"),
        "subject": claims.get("sub"),
        "pod": _pod(claims),
        "iat": _when(claims.get("iat")),
        "nbf": _when(claims.get("nbf")),
        "exp": _when(claims.get("exp")),
        "warnafter": _when(_warnafter(claims)),
        "time": {"verified": result.time.verified, "reason": result.time.reason},
        "now": {"verified": result.now.verified, "reason": result.now.reason},
        "after_plan": {"verified": result.after.verified, "reason": result.after.reason},
    }


def render(result: Verification, fmt: str = "text") -> str:
    data = as_dict(result)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    rows = [
        ("kid", data["kid"]),
        ("alg", data["alg"]),
        ("key host", data["key_host"]),
        ("issuer", data["issuer"]),
        ("subject", data["subject"]),
        ("pod", data["pod"]),
        *((label, data[name]) for name, label in _TIME_CLAIMS),
        ("warn after", data["warnafter"]),
        ("now", _verdict(result.now)),
        ("after plan", _verdict(result.after)),
    ]
    lines = [f"{label + ':':<12}{_shown(value)}" for label, value in rows]
    if result.ok:
        lines.append("token verifies now and after the pending plan")
    else:
        failing = [
            n for n, c in (("now", result.now), ("after the plan", result.after)) if not c.verified
        ]
        lines.append(f"token does NOT verify {' and '.join(failing)}")
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    """A claim or header as one escaped line: the token's author chose every byte of it."""
    return "-" if value is None else for_terminal(str(value))


def _verdict(check: Check) -> str:
    return f"{'ok' if check.verified else 'FAILS'}: {check.reason}"


def verify_token(
    source: str, desired: DesiredState, at: datetime, snapshot_path: str | None = None
) -> Verification:
    """Read, decode and check one token: the whole ``verify-token`` command."""
    token = decode(read_token(source, sys.stdin))
    from sakeystate.apply import local_facts, observe

    observed, found, _status = observe(desired, snapshot_path)
    return verify(token, desired, observed, found, at, local_facts(desired))
