"""The state file loader: the fast list check agrees with jsonschema; errors keep their lines."""

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


@pytest.mark.parametrize("section", ["trusted", "revoked"])
@settings(max_examples=300, deadline=None)
@given(listed=st.lists(items, max_size=3))
def test_fast_list_check_agrees_with_jsonschema(section: str, listed: list[Any]) -> None:
    array_schema = state._inlined_schema()["properties"][section]
    reference = jsonschema.Draft202012Validator(array_schema)
    assert state._fast_checks()[1][section](listed) == reference.is_valid(listed)


BASE: dict[str, Any] = {
    "apiVersion": "sakeystate/v1",
    "cluster": "wikikube-eqiad",
    "etcd": {
        "endpoints": ["https://etcd1.example.org:2379", "https://etcd2.example.org:2379"],
        "prefix": "/kube-apiserver-sa-certs/",
        "timeout": "5s",
        "tls": {"ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem"},
        "auth": {"username": "sakeystate", "password_file": "/pw"},
    },
    "bundle": {
        "path": "/b.pem",
        "mode": "0644",
        "owner": "kube",
        "group": "kube",
        "exclude_host": "ctrl1.example.org",
        "reload": ["systemctl", "restart", "x"],
        "reload_timeout": "5m",
        "jwks_path": "/j.json",
    },
    "trusted": [{"fingerprint": KID, "host": "ctrl1.example.org", "note": "n"}],
    "revoked": [{"fingerprint": "sha256:" + "ab" * 32, "reason": "r"}],
    "retention": {
        "expired_grace": "24h",
        "superseded_grace": "8760h",
        "min_keys": 1,
        "max_removals": 2,
        "max_token_lifetime": "8760h",
    },
}
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


@settings(max_examples=600, deadline=None)
@given(doc=documents())
def test_document_fast_path_never_accepts_what_jsonschema_rejects(doc: Any) -> None:
    document_check = state._fast_checks()[0]
    assert document_check is not None
    if document_check(doc):
        assert jsonschema.Draft202012Validator(state.load_schema()).is_valid(doc), doc


def test_document_fast_path_accepts_the_valid_examples() -> None:
    import yaml

    document_check = state._fast_checks()[0]
    assert document_check is not None and document_check(BASE)
    for example in Path(__file__).parent.parent.glob("state/*.yaml"):
        assert document_check(yaml.safe_load(example.read_text())), example


def test_a_valid_state_loads_without_importing_jsonschema(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from sakeystate.state import load_state; "
        "load_state(sys.argv[1]); print('jsonschema' in sys.modules)"
    )
    example = Path(__file__).parent.parent / "state" / "wikikube-eqiad.yaml"
    out = subprocess.run(
        [sys.executable, "-c", code, str(example)], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


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
