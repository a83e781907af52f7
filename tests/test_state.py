"""The state file loader: jsonschema decides validity, the rev-2 rules hold, errors keep lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sakeystate import state
from sakeystate.errors import StateError

KID = "8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E"
texts = st.one_of(
    st.sampled_from(
        [
            KID,
            "sha256:" + "ab" * 32,
            "sha256:" + "AB:" * 31 + "CD",
            "ctrl1.example.org",
            "",
            "x" * 43,
            "sha256:zz",
            "host_with_underscore",
            "-bad.example.org",
            "a" * 300,
        ]
    ),
    st.text(max_size=50),
)
values = st.one_of(
    texts, st.integers(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2)
)
items = st.one_of(
    st.dictionaries(
        st.sampled_from(["fingerprint", "host", "note", "reason", "extra"]), values, max_size=4
    ),
    st.integers(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)


BASE: dict[str, Any] = {
    "apiVersion": "sakeystate/v1",
    "cluster": "wikikube-eqiad",
    "host": "self",
    "own_cert": "/etc/kubernetes/pki/sa.pem",
    "fleet": ["ctrl1.example.org", "ctrl2.example.org"],
    "etcd": {
        "endpoints": ["https://etcd1.example.org:2379", "https://etcd2.example.org:2379"],
        "prefix": "/kube-apiserver-sa-certs/",
        "status_prefix": "/kube-apiserver-sa-status/",
        "reload_lock": "/kube-apiserver-sa-reload-lock",
        "timeout": "5s",
        "tls": {"ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem"},
        "auth": {"username": "sakeystate", "password_file": "/pw"},
    },
    "bundle": {
        "path": "/b.pem",
        "mode": "0644",
        "owner": "kube",
        "group": "kube",
        "exclude_host": "self",
        "reload": ["systemctl", "restart", "x"],
        "reload_check": ["curl", "-fsk", "https://localhost:6443/readyz"],
        "reload_timeout": "5m",
        "jwks_path": "/j.json",
    },
    "trust_anchors": [
        {
            "name": "pki",
            "ca_file": "/ca-sa.pem",
            "hosts": ["ctrl1.example.org", "ctrl2.example.org"],
            "common_name": "sa",
        }
    ],
    "trusted": [{"fingerprint": KID, "host": "ctrl1.example.org", "note": "n"}],
    "revoked": [{"fingerprint": "sha256:" + "ab" * 32, "reason": "r"}],
    "decommissioned": [{"host": "ctrl0.example.org", "at": "2026-11-01T00:00:00Z"}],
    "retention": {
        "superseded_grace": "8760h",
        "min_keys": 1,
        "max_removals": 2,
        "max_token_lifetime": "8760h",
    },
}
HOST = "ctrl1.example.org"


def _loads(doc: Any, host: str | None = HOST) -> bool:
    """Whether the loader accepts ``doc``; any exception but StateError fails the test."""
    try:
        state.state_from_data(doc, "state.yaml", host=host)
    except StateError:
        return False
    return True


def _schema_valid(doc: Any) -> bool:
    return bool(jsonschema.Draft202012Validator(state.load_schema()).is_valid(doc))


@pytest.mark.parametrize("section", ["trusted", "revoked"])
@settings(max_examples=200, deadline=None)
@given(listed=st.lists(items, max_size=3))
def test_list_sections_never_load_what_jsonschema_rejects(section: str, listed: list[Any]) -> None:
    """jsonschema decides validity (no hand-written fast path, issue 12): what it rejects
    never loads, and whatever a list holds, only StateError comes out (R11)."""
    doc = {**BASE, section: listed}
    if _loads(doc):
        assert _schema_valid(doc), doc


leaves = st.one_of(
    values,
    st.floats(allow_nan=False),
    st.integers(-2, 3),
    st.sampled_from(
        [
            "5s",
            "1h30m",
            "0644",
            "644",
            "/abs",
            "rel",
            "http://a:1",
            "sakeystate/v1",
            "/p/",
            "p/",
            1.0,
            True,
        ]
    ),
    st.lists(st.sampled_from(["x", "x", "http://a:1", 1]), max_size=3),
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """BASE with a few random edits: a value replaced, a field dropped or an unknown one added."""
    import copy

    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(doc) or [("apiVersion",)]))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(leaves)
        elif action == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "Host", "note", "reason", "min_keys"]))] = draw(
                leaves
            )
    return doc


@settings(max_examples=300, deadline=None)
@given(doc=documents())
def test_a_document_never_loads_when_jsonschema_rejects_it(doc: Any) -> None:
    if _loads(doc):
        assert _schema_valid(doc), doc


def test_the_full_example_and_the_repository_examples_load() -> None:
    loaded = state.state_from_data(BASE, "state.yaml", host=HOST)
    assert loaded.host == HOST and loaded.bundle.exclude_host == HOST
    assert loaded.fleet == ("ctrl1.example.org", "ctrl2.example.org")
    assert loaded.decommissioned and loaded.trust_anchors[0].common_name == "sa"
    examples = sorted(Path(__file__).parent.parent.glob("state/*.yaml"))
    assert examples
    for example in examples:
        assert state.load_state(example, host=HOST).host == HOST, example


def _problems(doc: Any, host: str | None = HOST) -> list[str]:
    with pytest.raises(StateError) as excinfo:
        state.state_from_data(doc, "state.yaml", host=host)
    return list(excinfo.value.problems)


def _edit(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    import copy

    doc = copy.deepcopy(BASE)
    parent: Any = doc
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        (("cluster",), "cluster"),
        (("trusted", 0, "note"), "trusted[0].note"),
        (("revoked", 0, "reason"), "revoked[0].reason"),
        (("bundle", "reload", 2), "bundle.reload[2]"),
        (("bundle", "owner"), "bundle.owner"),
        (("trust_anchors", 0, "common_name"), "trust_anchors[0].common_name"),
        (("trusted", 0, "fingerprint"), "trusted[0].fingerprint"),
    ],
)
@pytest.mark.parametrize("char", ["\x1b", "\n", "\r", "\x00", "\x7f", "\x85"])
def test_a_control_character_in_any_string_is_refused(
    path: tuple[Any, ...], shown: str, char: str
) -> None:
    """R11: a string from the state file may reach a terminal, a log or a YAML comment."""
    value = "sa" + char + "x" if path[-1] != "fingerprint" else KID + char
    problems = _problems(_edit(path, value))
    assert f"state.yaml: {shown}: contains the control character {char!r}; no string may" in (
        problems
    )


def test_a_control_character_in_a_mapping_key_is_refused() -> None:
    doc = {**BASE, "bundle": {**BASE["bundle"], "own\x1bner": "kube"}}
    assert any("contains the control character '\\x1b'" in p for p in _problems(doc))


def test_host_self_is_the_host_flag_and_a_written_host_must_match_it() -> None:
    assert state.state_from_data(BASE, "s", host="CTRL2.example.org.").host == "ctrl2.example.org"
    pinned = _edit(("host",), "ctrl1.example.org")
    assert state.state_from_data(pinned, "s", host=HOST).host == HOST
    assert _problems(pinned, host="ctrl2.example.org") == [
        "state.yaml: host: this state file is for ctrl1.example.org, but --host is "
        "ctrl2.example.org; use host: self to share one file between control planes"
    ]
    assert _problems(BASE, host="localhost") == [
        "--host 'localhost' is not a fully qualified host name"
    ]
    assert any(
        "host: 'ctrl 1' is not valid: expected self or" in p
        for p in _problems(_edit(("host",), "ctrl 1"))
    )


def test_exclude_host_self_is_this_host_and_another_host_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for host in ("ctrl1.example.org", "ctrl2.example.org"):
        loaded = state.state_from_data(BASE, "s", host=host)
        assert loaded.bundle.exclude_host == host
    monkeypatch.setattr(state, "machine_fqdn", lambda: "ctrl2.example.org")
    assert state.state_from_data(BASE, "s").bundle.exclude_host == "ctrl2.example.org"
    # On a review machine the host is unknown: self stays unresolved (the planner refuses).
    monkeypatch.setattr(state, "machine_fqdn", lambda: None)
    unknown = state.state_from_data(BASE, "s")
    assert unknown.host is None and unknown.bundle.exclude_host == "self"
    named = _edit(("bundle", "exclude_host"), "CTRL1.example.org")
    assert state.state_from_data(named, "s", host=HOST).bundle.exclude_host == HOST
    assert _problems(named, host="ctrl2.example.org") == [
        "state.yaml: bundle.exclude_host: names ctrl1.example.org, but this host is "
        "ctrl2.example.org; use exclude_host: self (one file serves every control plane)"
    ]


@pytest.mark.parametrize(
    ("path", "value", "accepted"),
    [
        (("retention", "max_token_lifetime"), "36500d", True),
        (("retention", "max_token_lifetime"), "36501d", False),
        (("retention", "superseded_grace"), "876000h", True),
        (("retention", "superseded_grace"), "876001h", False),
        (("etcd", "timeout"), "99999999999999999999s", False),
        (("bundle", "reload_timeout"), "0s", False),
    ],
)
def test_durations_are_capped_at_100_years_and_timeouts_above_zero(
    path: tuple[Any, ...], value: str, accepted: bool
) -> None:
    doc = _edit(path, value)
    if accepted:
        assert _loads(doc)
        return
    shown = ".".join(str(p) for p in path)
    assert any(p.startswith(f"state.yaml: {shown}: ") for p in _problems(doc))


@pytest.mark.parametrize(
    ("endpoint", "accepted"),
    [
        ("http://127.0.0.1:1", True),
        ("http://127.0.0.1:65535", True),
        ("http://[::1]:2379", True),
        ("http://127.0.0.1:0", False),
        ("http://127.0.0.1:65536", False),
        ("http://127.0.0.1:99999", False),
        ("http://127.0.0.1:123456", False),
        ("http://127.0.0.1", False),
    ],
)
def test_endpoint_ports_are_1_to_65535(endpoint: str, accepted: bool) -> None:
    doc = _edit(("etcd", "endpoints"), [endpoint])
    if accepted:
        assert _loads(doc)
    else:
        assert any(p.startswith("state.yaml: etcd.endpoints[0]: ") for p in _problems(doc))


@pytest.mark.parametrize(
    ("mode", "accepted"),
    [
        ("0644", True),
        ("0640", True),
        ("0600", True),
        ("0444", True),
        ("644", True),
        ("0664", False),
        ("0646", False),
        ("0622", False),
        ("0777", False),
        ("4755", False),
        ("0o644", False),
    ],
)
def test_the_bundle_mode_is_never_writable_by_group_or_others(mode: str, accepted: bool) -> None:
    doc = _edit(("bundle", "mode"), mode)
    if accepted:
        assert state.state_from_data(doc, "s", host=HOST).bundle.mode == int(mode, 8)
    else:
        assert _problems(doc) == [
            f"state.yaml: bundle.mode: {mode!r} is not valid: expected an octal mode that "
            'group and others cannot write, e.g. "0644" or "0640"'
        ]


def test_expired_grace_is_an_error_that_explains_why_it_is_gone() -> None:
    doc = _edit(("retention", "expired_grace"), "24h")
    (problem,) = _problems(doc)
    assert problem.startswith("state.yaml: retention.expired_grace: expired_grace was removed: ")
    assert "certificate expiry never removes a key" in problem
    assert "kube-apiserver ignores certificate dates" in problem


def _big_state(tmp_path: Path, bad_at: int | None = None) -> Path:
    lines = [
        "apiVersion: sakeystate/v1",
        "cluster: big",
        "etcd:",
        "  endpoints: [http://127.0.0.1:2379]",
        "bundle:",
        "  path: /tmp/x.pem",
        "trusted:",
    ]
    for i in range(2000):
        fingerprint = "not-a-kid" if i == bad_at else f"sha256:{i:064x}"
        lines += [f"  - fingerprint: {fingerprint}", f"    host: ctrl{i}.example.org"]
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_long_trusted_list_loads_and_one_bad_entry_is_named_with_its_line(tmp_path: Path) -> None:
    assert len(state.load_state(_big_state(tmp_path)).trusted) == 2000
    with pytest.raises(StateError) as excinfo:
        state.load_state(_big_state(tmp_path, bad_at=1500))
    assert excinfo.value.problems == [
        f"{tmp_path / 'big.yaml'}:{8 + 2 * 1500}: trusted[1500].fingerprint: 'not-a-kid' is not "
        "valid: expected a kid (43 base64url characters) or sha256:<64 hex digits>"
    ]


def test_aliases_are_refused_where_they_are_used(tmp_path: Path) -> None:
    path = tmp_path / "alias.yaml"
    path.write_text(
        "apiVersion: sakeystate/v1\ncluster: c\netcd: &e\n  endpoints: [http://a:1]\n"
        "bundle:\n  path: /x\ntrusted: []\nother: *e\n"
    )
    with pytest.raises(StateError) as excinfo:
        state.load_state(path)
    assert excinfo.value.problems == [
        f"{path}:8: other: YAML aliases are not allowed in a state file"
    ]
