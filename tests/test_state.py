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
@given(item=items)
def test_fast_list_check_agrees_with_jsonschema(section: str, item: Any) -> None:
    array_schema = state._validator().schema["properties"][section]
    reference = jsonschema.Draft202012Validator(array_schema["items"])
    assert state._fast_lists()[section](item) == reference.is_valid(item)


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
