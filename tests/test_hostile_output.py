"""Hostile text from etcd, certificates and tokens is escaped wherever it is printed (R11).

Terminal output shows control characters as escapes; the markdown review
comment keeps its structure (one line per action and per warning, no raw
HTML, no line a bot would act on) whatever key names, Host headers, reasons or
paths hold; verify-token survives absurd dates and prints claims escaped.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import jwt
import pytest
import yaml

from sakeystate.escape import for_markdown, for_markdown_code, for_terminal, for_yaml_comment
from sakeystate.plan import Action, KeyReport, Plan
from sakeystate.report import render_inspect, render_markdown, render_text

from conftest import Env
from support import T0, kid, make_cert, private_key, run_cli

AT = "2026-11-22T10:00:00Z"
# What a terminal or a renderer would act on: C0 but newline, DEL, C1, bidi controls.
_UNSAFE_RE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
HOSTILE = (
    "ctrl\x1b[2J\x1b]0;pwned\x07\r<!-- hidden\n/approve\n"
    "<img src=x onerror=alert(1)> [click](https://evil.example) ![i](https://evil/x.png) "
    "`code` | cell *em* _em_ \\ &amp; \u202eevil\u2066 \x85\u2028\ud800"
)


def _plan(text: str) -> Plan:
    """A plan with every kind of line, each interpolated value being ``text``."""
    return Plan(
        cluster=f"c{text}",
        at=T0,
        bundle_path=f"/etc/{text}.pem",
        actions=(
            Action("bundle", "add", f"trusted {text}", kid=f"k{text}", host=f"h{text}"),
            Action("etcd", "delete", f"revoked: {text}", kid="A" * 43, key=f"/p/{text}"),
            Action("reload", "run", f"bundle {text} changed"),
        ),
        kids_before=(),
        kids_after=("A" * 43,),
        bundle_keys=(),
        bundle_content=b"",
        write_bundle=True,
        keys=(KeyReport(f"k{text}", f"h{text}", "rejected", f"why {text}", etcd_key=f"/p/{text}"),),
        warnings=(f"etcd key /p/{text}: left alone", f"second {text}"),
        refusals=(f"refusing {text}",),
    )


def _structure(markdown: str) -> list[str]:
    """Each line reduced to how it starts and how many table cells it has."""
    return [f"{line[:2]}{line.count('|')}" for line in markdown.splitlines()]


def test_markdown_comment_keeps_its_structure_whatever_the_values_hold() -> None:
    benign = render_markdown(_plan("plain"))
    hostile = render_markdown(_plan(HOSTILE))

    assert _structure(hostile) == _structure(benign)
    ours = hostile.replace(" -> ", " ").replace("> :no_entry:", "")
    assert "<" not in ours and ">" not in ours
    assert "\r" not in hostile and "](" not in hostile and "![" not in hostile
    assert not [line for line in hostile.splitlines() if line.startswith("/")]
    assert "`code`" not in hostile and "*em*" not in hostile
    # Shown, not dropped: the reviewer still sees what the value held.
    assert "&#60;img src=x" in hostile and "&#92;x1b&#91;2J" in hostile


def test_markdown_code_span_only_for_plain_text() -> None:
    assert for_markdown_code("wikikube-eqiad") == "`wikikube-eqiad`"
    assert for_markdown_code("/etc/kubernetes/pki/sa.pem") == "`/etc/kubernetes/pki/sa.pem`"
    assert for_markdown_code("a`b") == "a&#96;b"
    assert for_markdown("a|b\nc") == "a&#124;b&#92;x0ac"


def test_terminal_renderers_print_no_control_character() -> None:
    hostile = _plan(HOSTILE)
    for output in (render_text(hostile), render_inspect(hostile)):
        assert not _UNSAFE_RE.search(output), output
        assert "\\x1b[2J" in output and "\\u202e" in output
        output.encode("utf-8")  # a lone surrogate would make print() raise
    assert len(render_text(hostile).splitlines()) == len(render_text(_plan("plain")).splitlines())


def test_escapers_are_idempotent_and_leave_plain_text_alone() -> None:
    assert for_terminal("ctrl1001.example.org: ok") == "ctrl1001.example.org: ok"
    once = for_terminal(HOSTILE)
    assert for_terminal(once) == once
    assert "\n" not in for_yaml_comment(HOSTILE) and "\x85" not in for_yaml_comment(HOSTILE)


# What a Host header line can hold: anything but the line breaks that would end it.
HOSTILE_HOST = (
    "ctrl\x1b[2J\x1b]0;pwned\x07 <img src=x onerror=alert(1)> [click](https://evil.example) "
    "![i](https://evil/x.png) `code` | *em* \u202eevil\u2066"
)


def _with_host(key: object, host: str) -> bytes:
    return f"Host: {host}\n".encode() + make_cert(key, "ctrl1001.example.org")


def _hostile_cluster(env: Env) -> None:
    """etcd holding hostile key names, and hostile Host headers on trusted and untrusted keys."""
    trusted = private_key("ec256", 70)
    env.etcd.put(env.prefix + kid(trusted), _with_host(trusted, HOSTILE_HOST))
    env.etcd.put(env.prefix + "x\r<!-- hidden", b"garbage")
    env.etcd.put(env.prefix + "y\n/approve\n<img src=x>", b"garbage")
    untrusted = private_key("ec256", 71)
    env.etcd.put(env.prefix + kid(untrusted), _with_host(untrusted, HOSTILE_HOST))
    # Values with a control character in a header are rejected outright (reported, escaped);
    # one clean trusted key keeps the bundle above min_keys.
    env.publish(private_key("ec256", 73), "ctrl1002.example.org")
    env.state([kid(trusted), kid(private_key("ec256", 73))])


def test_markdown_plan_of_hostile_etcd_has_one_line_per_warning_and_no_html(env: Env) -> None:
    _hostile_cluster(env)
    report = json.loads(env.cli("plan", "--at", AT, "--format", "json").out)

    result = env.cli("plan", "--at", AT, "--format", "markdown")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    warnings = lines[lines.index("**Warnings**") + 2 : -2]
    assert len(warnings) == len(report["warnings"]) >= 3
    assert all(line.startswith("- ") for line in warnings)
    rows = [line for line in lines if line.startswith("| bundle |")]
    assert len(rows) == 1 and rows[0].count("|") == 6
    assert "<" not in result.out and "](" not in result.out and "\r" not in result.out
    assert not [line for line in lines if line.startswith("/")]


def test_text_plan_and_inspect_of_hostile_etcd_print_escapes(env: Env) -> None:
    _hostile_cluster(env)
    for command in ("plan", "inspect"):
        result = env.cli(command, "--at", AT)
        assert result.code == 0, result.err
        assert not _UNSAFE_RE.search(result.out + result.err), result.out + result.err
        assert "\\x1b]0;pwned\\x07" in result.out + result.err


# --- verify-token ----------------------------------------------------------------------


def _token(key: object, claims_json: str, header: dict[str, str] | None = None) -> str:
    """A signed token whose claims are exactly ``claims_json`` (json.dumps cannot write 1e400)."""
    headers = {"kid": kid(key), **(header or {})}
    return jwt.api_jws.encode(claims_json.encode(), key, algorithm="ES256", headers=headers)


@pytest.fixture
def one_key(env: Env) -> Env:
    env.state([env.publish(private_key("ec256", 72), "ctrl1001.example.org")])
    assert env.cli("converge", "--at", AT).code == 0
    return env


@pytest.mark.parametrize(
    ("exp", "verified", "shown"),
    [
        ("253402300799", True, "9999-12-31T23:59:59Z"),
        ("253402300800", True, "9999-12-31T23:59:59Z"),
        ("1e400", True, "9999-12-31T23:59:59Z"),
        ("-1e400", False, "expired"),
        ("-99999999999999", False, "expired"),
        ("1" + "0" * 30, True, "9999-12-31T23:59:59Z"),
    ],
)
def test_verify_token_saturates_absurd_expiry(
    one_key: Env, exp: str, verified: bool, shown: str
) -> None:
    token = _token(private_key("ec256", 72), f'{{"sub": "x", "exp": {exp}, "nbf": -1e400}}')
    for fmt in ("text", "json"):
        result = one_key.cli("verify-token", "--at", AT, "--format", fmt, token)
        assert result.code == (0 if verified else 1), result.err
        assert "Traceback" not in result.err and shown in result.out


def test_verify_token_prints_claims_and_headers_escaped(one_key: Env) -> None:
    claims = {
        "sub": "system:serviceaccount:\x1b]0;owned\x07\x1b[2J",
        "iss": "\u202eevil",
        "kubernetes.io": {"namespace": "ns\r", "pod": {"name": "p\x1b[31m"}},
        "exp": int(datetime(2027, 1, 1, tzinfo=UTC).timestamp()),
    }
    token = _token(private_key("ec256", 72), json.dumps(claims), {"typ": "JWT\x1b[5m"})
    result = one_key.cli("verify-token", "--at", AT, token)
    assert result.code == 0, result.err
    assert not _UNSAFE_RE.search(result.out), result.out
    assert "subject:    system:serviceaccount:\\x1b]0;owned\\x07\\x1b[2J" in result.out
    assert "issuer:     \\u202eevil" in result.out
    assert "pod:        ns\\x0d/p\\x1b[31m" in result.out


def test_verify_token_of_deeply_nested_claims_is_a_clear_error(one_key: Env) -> None:
    token = _token(private_key("ec256", 72), "[" * 20000 + "]" * 20000)
    result = one_key.cli("verify-token", "--at", AT, token)
    assert result.code == 1
    assert "not a JWT" in result.err and "Traceback" not in result.err


# --- adopt: YAML comments ----------------------------------------------------------------


def test_adopt_keeps_a_hostile_key_name_inside_its_comment(env: Env) -> None:
    """A key name with line breaks once added a live ``revoked:`` section that validate accepted."""
    good_kid = env.publish(private_key("ec256", 73), "ctrl1001.example.org")
    injected = f"\nrevoked:\n- fingerprint: {'B' * 43}\n  reason: injected\n#"
    env.etcd.put(env.prefix + "x" + injected, b"garbage")
    output = env.tmp / "adopted.yaml"

    result = run_cli(
        "adopt", "--endpoint", env.etcd.url, "--prefix", env.prefix, "--cluster", "c",
        "--at", AT, "--bundle-path", str(env.bundle), "-o", str(output),
    )  # fmt: skip
    assert result.code == 0, result.err
    data = yaml.safe_load(output.read_text())
    assert "revoked" not in data
    assert [t["fingerprint"] for t in data["trusted"]] == [good_kid]
    assert set(data) == {"apiVersion", "cluster", "etcd", "bundle", "trusted", "retention"}
    assert (
        "# warning: etcd key " + env.prefix + "x\\x0arevoked:\\x0a- fingerprint"
        in output.read_text()
    )
    assert not _UNSAFE_RE.search(result.err.replace("\n", ""))
    assert run_cli("validate", str(output)).code == 0
