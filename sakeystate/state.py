"""The desired state: one YAML file, checked against the JSON Schema, then semantically.

Every problem names the file, the line and the field path, and says what
would be valid. Loading never executes YAML tags (safe loading only), refuses
aliases (no alias bombs) and refuses files over MAX_STATE_BYTES.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from sakeystate.errors import SakeystateError, StateError
from sakeystate.files import read_capped
from sakeystate.keys import normalize_fingerprint

MAX_STATE_BYTES = 1024 * 1024
SCHEMA_NAME = "sakeystate-v1.schema.json"
_DURATION_RE = re.compile(r"^(?=\d)(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")

FieldPath = tuple[str | int, ...]


def parse_duration(text: str) -> timedelta:
    """``90s``, ``1h30m``, ``2d``: numbers with units s/m/h/d, largest unit first."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a duration: use a number and a unit (s, m, h, d), e.g. 24h or 1h30m"
        )
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """Hours and below, as retention is usually written (24h, 8760h, 1h30m)."""
    seconds = int(delta.total_seconds())
    parts = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...]
    prefix: str = "/kube-apiserver-sa-certs/"
    timeout: float = 5.0
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_file: str | None = None


@dataclass(frozen=True)
class BundleConfig:
    path: str
    mode: int = 0o644
    owner: str | None = None
    group: str | None = None
    exclude_host: str | None = None
    reload: tuple[str, ...] | None = None
    reload_timeout: float = 300.0
    jwks_path: str | None = None


@dataclass(frozen=True)
class Retention:
    expired_grace: timedelta = timedelta(hours=24)
    superseded_grace: timedelta = timedelta(hours=8760)
    min_keys: int = 1
    max_removals: int = 2
    max_token_lifetime: timedelta = timedelta(hours=8760)


@dataclass(frozen=True)
class TrustedKey:
    kid: str
    host: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class DesiredState:
    """A validated state file. Fingerprints are normalized to kids."""

    source: str
    cluster: str
    etcd: EtcdConfig
    bundle: BundleConfig
    trusted: Mapping[str, TrustedKey]
    revoked: Mapping[str, str] = field(default_factory=dict)
    retention: Retention = field(default_factory=Retention)


# libyaml when PyYAML was built with it (12x faster on a 10,000-key state file); both
# are safe loaders: no tags are ever executed.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(message)


_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"


def _construct(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: FieldPath,
    lines: dict[FieldPath, int],
    problems: list[str],
    seen_nodes: set[int],
    src: str,
) -> Any:
    """Build the data of ``node`` and record each field's line, in one pass.

    Refuses duplicate keys and aliases. An alias is the same node reached a
    second time, so aliases (and with them alias bombs, which compose into
    shared nodes cheaply) are found by identity before anything is expanded.
    Plain strings are taken as they are; every other scalar goes through
    PyYAML's safe constructor, so values are exactly what safe loading gives.
    """
    if id(node) in seen_nodes:
        raise _Refused(
            lines.get(path, node.start_mark.line + 1),
            f"{_dotted(path)}: YAML aliases are not allowed in a state file",
        )
    seen_nodes.add(id(node))
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        return node.value if node.tag == _STR else loader.construct_object(node, deep=True)
    if isinstance(node, yaml.MappingNode) and node.tag == _MAP:
        mapping: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *anchor` is an alias; an inline `<<: {...}` is refused just the same.
                _construct(loader, value_node, (*path, "<<"), lines, problems, seen_nodes, src)
                raise _Refused(line, f"{_dotted(path)}: YAML merge keys (<<) are not allowed")
            key = _construct(loader, key_node, (*path, "(key)"), {}, problems, seen_nodes, src)
            try:
                hash(key)
            except TypeError:
                raise _Refused(line, f"{_dotted(path)}: a mapping key must be a scalar") from None
            if key in first_line:
                problems.append(
                    f"{src}:{line}: {_dotted((*path, key))}: duplicate key "
                    f"(first defined on line {first_line[key]})"
                )
            first_line[key] = line
            lines[(*path, key)] = line
            mapping[key] = _construct(
                loader, value_node, (*path, key), lines, problems, seen_nodes, src
            )
        return mapping
    if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
        items = []
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            items.append(_construct(loader, item, (*path, index), lines, problems, seen_nodes, src))
        return items
    raise _Refused(node.start_mark.line + 1, f"invalid YAML: tag {node.tag} is not allowed")


def _dotted(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def schema_path() -> Path:
    """The schema: inside the installed package, or at the top of a source checkout."""
    packaged = Path(__file__).parent / "_schema" / SCHEMA_NAME
    if packaged.exists():
        return packaged
    return Path(__file__).resolve().parent.parent / "schema" / SCHEMA_NAME


@cache
def load_schema() -> dict[str, Any]:
    with open(schema_path(), encoding="utf-8") as handle:
        schema: dict[str, Any] = json.load(handle)
    return schema


def _where(src: str, line: int, lines: Mapping[FieldPath, int]) -> str:
    """``file:line``; just the source when it has no lines (an inline Ansible mapping)."""
    return f"{src}:{line}" if lines else src


def _line_for(path: FieldPath, lines: Mapping[FieldPath, int]) -> int:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path, 1)


_ANNOTATIONS = {"description", "default", "title", "$schema", "$id", "$defs"}
Check = Callable[[Any], bool]


def _compile(schema: Mapping[str, Any]) -> Check | None:
    """A predicate that accepts only what jsonschema accepts, or None if it cannot tell.

    Compiled from the (inlined) schema itself, so the schema stays the single
    source of truth. It covers the keywords the state schema uses and is
    conservative: where it is unsure (an unknown keyword, a float where an
    integer is expected, non-string items to compare) it says "not valid" and
    jsonschema, which gives the exact message, decides. tests/test_state.py
    checks it against jsonschema on generated documents.
    """
    keys = set(schema) - _ANNOTATIONS
    kind = schema.get("type")
    checks: list[Check] = []
    if "const" in schema:
        const = schema["const"]
        if type(const) is not str:
            return None
        checks.append(lambda v: type(v) is str and v == const)
    if kind == "object":
        props = {name: _compile(sub) for name, sub in schema.get("properties", {}).items()}
        if any(check is None for check in props.values()):
            return None
        allow_extra = schema.get("additionalProperties", True)
        if allow_extra not in (True, False):
            return None
        required = tuple(schema.get("required", ()))
        dependent = {k: tuple(v) for k, v in schema.get("dependentRequired", {}).items()}

        def valid_object(v: Any) -> bool:
            if type(v) is not dict or any(name not in v for name in required):
                return False
            if any(k in v and any(d not in v for d in deps) for k, deps in dependent.items()):
                return False
            for name, value in v.items():
                check = props.get(name)
                if check is None:
                    if allow_extra:
                        continue
                    return False
                if not check(value):
                    return False
            return True

        checks.append(valid_object)
        keys -= {"type", "properties", "additionalProperties", "required", "dependentRequired"}
    elif kind == "array":
        item_check = _compile(schema.get("items", {}))
        if item_check is None:
            return None
        min_items, unique = schema.get("minItems", 0), schema.get("uniqueItems", False)

        def valid_array(v: Any) -> bool:
            if type(v) is not list or len(v) < min_items or not all(map(item_check, v)):
                return False
            # Only strings are compared here; anything else goes to jsonschema.
            return not unique or (all(type(i) is str for i in v) and len(set(v)) == len(v))

        checks.append(valid_array)
        keys -= {"type", "items", "minItems", "uniqueItems"}
    elif kind == "string":
        pattern = re.compile(schema["pattern"]) if "pattern" in schema else None
        min_length = schema.get("minLength", 0)

        def valid_string(v: Any) -> bool:
            if type(v) is not str or len(v) < min_length:
                return False
            return pattern is None or pattern.search(v) is not None

        checks.append(valid_string)
        keys -= {"type", "pattern", "minLength"}
    elif kind == "integer":
        minimum = schema.get("minimum")
        checks.append(lambda v: type(v) is int and (minimum is None or v >= minimum))
        keys -= {"type", "minimum"}
    elif kind is not None:
        return None
    keys.discard("const")
    if keys:
        return None
    return lambda v: all(check(v) for check in checks)


@cache
def _fast_checks() -> tuple[Check | None, dict[str, Check]]:
    """The whole document's predicate, and each long list's (trusted, revoked)."""
    schema = _inlined_schema()
    properties = schema.get("properties", {})
    lists = {name: _compile(properties[name]) for name in ("trusted", "revoked")}
    return _compile(schema), {name: check for name, check in lists.items() if check}


def _schema_problems(data: Any, src: str, lines: Mapping[FieldPath, int]) -> list[str]:
    document_check, list_checks = _fast_checks()
    if document_check is not None and document_check(data):
        return []  # valid, and jsonschema (85 ms to import) is not needed on this run
    validator = _validator()
    if isinstance(data, dict):
        # A long key list that its predicate accepts is left out, so that jsonschema
        # spends its time only where the problem is.
        data = {k: ([] if k in list_checks and list_checks[k](v) else v) for k, v in data.items()}
    problems: list[tuple[int, str]] = []
    for error in validator.iter_errors(data):
        path: FieldPath = tuple(error.absolute_path)
        message = error.message
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = sorted(error.schema.get("properties", {}))
            for extra in sorted(set(error.instance) - set(allowed)):
                at = (*path, extra)
                problems.append(
                    (
                        _line_for(at, lines),
                        f"{_dotted(at)}: unknown field; allowed here: {', '.join(allowed)}",
                    )
                )
            continue
        if error.validator == "pattern":
            hint = {
                "duration": "a number and a unit (s, m, h, d), e.g. 24h or 1h30m",
                "fingerprint": "a kid (43 base64url characters) or sha256:<64 hex digits>",
                "fqdn": "a host name such as ctrl1001.example.org",
                "abspath": "an absolute path",
            }
            ref = next((k for k in hint if _schema_is(error.schema, k)), None)
            if ref:
                message = f"{error.instance!r} is not valid: expected {hint[ref]}"
        if path and path[-1] == "mode" and error.validator == "type":
            message = f'{error.instance!r} is not a string: quote the mode, e.g. mode: "0644"'
        problems.append((_line_for(path, lines), f"{_dotted(path)}: {message}"))
    return [f"{_where(src, line, lines)}: {text}" for line, text in sorted(problems)]


def _schema_is(schema: Mapping[str, Any], name: str) -> bool:
    defs = load_schema()["$defs"]
    return name in defs and schema.get("pattern") == defs[name].get("pattern")


@cache
def _validator() -> Any:
    """jsonschema's validator of the inlined schema, for the messages of an invalid state."""
    import jsonschema  # only an invalid state pays for it

    return jsonschema.Draft202012Validator(_inlined_schema())


@cache
def _inlined_schema() -> dict[str, Any]:
    """The schema with its local ``$ref``s inlined: the same rules, and resolving a
    ``$ref`` per fingerprint and host was most of what jsonschema spent."""
    schema = load_schema()
    defs = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return {**inline(defs[ref.removeprefix("#/$defs/")]), **rest}
            return {k: inline(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


def _iter_fingerprints(data: Mapping[str, Any], section: str) -> Iterator[tuple[int, Any]]:
    yield from enumerate(data.get(section) or [])


def load_state_text(text: str, source: str) -> DesiredState:
    """Parse and validate state file text; ``source`` names it in every error."""
    lines: dict[FieldPath, int] = {}
    problems: list[str] = []
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise StateError(source, [f"{source}:1: the file is empty"])
        data = _construct(loader, node, (), lines, problems, set(), source)
    except _Refused as exc:
        raise StateError(source, [f"{source}:{exc.line}: {exc}"]) from None
    except RecursionError:
        raise StateError(source, [f"{source}: the YAML is nested too deeply"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise StateError(source, [f"{source}{line}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise StateError(source, [f"{source}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    if problems:
        raise StateError(source, problems)
    if not isinstance(data, dict):
        raise StateError(
            source, [f"{source}:1: the state must be a mapping (apiVersion, cluster, etcd, ...)"]
        )
    return state_from_data(data, source, lines)


def state_from_data(
    data: Mapping[str, Any], source: str, lines: Mapping[FieldPath, int] | None = None
) -> DesiredState:
    """Validate an already-parsed mapping (the Ansible module's inline ``state``)."""
    lines = lines or {}
    problems = _schema_problems(data, source, lines)
    if problems:
        raise StateError(source, problems)
    return _build(data, source, lines)


def load_state(path: str | Path) -> DesiredState:
    source = str(path)
    try:
        raw = read_capped(source, MAX_STATE_BYTES, "state file")
    except SakeystateError as exc:
        raise StateError(source, [str(exc)]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateError(source, [f"{source}: not UTF-8 text (byte {exc.start})"]) from None
    return load_state_text(text, source)


def _build(data: Mapping[str, Any], src: str, lines: Mapping[FieldPath, int]) -> DesiredState:
    problems: list[str] = []

    def where(path: FieldPath) -> str:
        return f"{_where(src, _line_for(path, lines), lines)}: {_dotted(path)}"

    def kid_at(section: str, index: int, entry: Mapping[str, Any]) -> str | None:
        try:
            return normalize_fingerprint(entry["fingerprint"])
        except ValueError as exc:
            problems.append(f"{where((section, index, 'fingerprint'))}: {exc}")
            return None

    trusted: dict[str, TrustedKey] = {}
    first_seen: dict[str, FieldPath] = {}
    for index, entry in _iter_fingerprints(data, "trusted"):
        kid = kid_at("trusted", index, entry)
        if kid is None:
            continue
        if kid in trusted:
            problems.append(
                f"{where(('trusted', index, 'fingerprint'))}: duplicate of "
                f"{_dotted(first_seen[kid])} (kid {kid})"
            )
            continue
        first_seen[kid] = ("trusted", index)
        trusted[kid] = TrustedKey(kid=kid, host=entry.get("host"), note=entry.get("note"))
    revoked: dict[str, str] = {}
    for index, entry in _iter_fingerprints(data, "revoked"):
        kid = kid_at("revoked", index, entry)
        if kid is None:
            continue
        if kid in trusted:
            problems.append(
                f"{where(('revoked', index, 'fingerprint'))}: kid {kid} is also trusted at "
                f"{_dotted(first_seen[kid])}; a key is either trusted or revoked"
            )
            continue
        if kid in revoked:
            problems.append(
                f"{where(('revoked', index, 'fingerprint'))}: duplicate revoked kid {kid}"
            )
            continue
        revoked[kid] = entry.get("reason") or "revoked"

    etcd = data["etcd"]
    tls = etcd.get("tls") or {}
    auth = etcd.get("auth") or {}
    for scheme_path in (("etcd", "endpoints", i) for i in range(len(etcd["endpoints"]))):
        url = etcd["endpoints"][scheme_path[-1]]
        if url.startswith("https://") and not tls.get("ca_file"):
            problems.append(f"{where(scheme_path)}: https endpoint needs etcd.tls.ca_file")
    bundle = data["bundle"]
    retention = data.get("retention") or {}
    durations: dict[FieldPath, timedelta] = {}
    for path, value in (
        (("etcd", "timeout"), etcd.get("timeout", "5s")),
        (("bundle", "reload_timeout"), bundle.get("reload_timeout", "5m")),
        (("retention", "expired_grace"), retention.get("expired_grace", "24h")),
        (("retention", "superseded_grace"), retention.get("superseded_grace", "8760h")),
        (("retention", "max_token_lifetime"), retention.get("max_token_lifetime", "8760h")),
    ):
        durations[path] = parse_duration(value)
    for path in (("etcd", "timeout"), ("bundle", "reload_timeout")):
        if durations[path] <= timedelta(0):
            problems.append(f"{where(path)}: must be longer than 0s")
    if problems:
        raise StateError(src, problems)

    return DesiredState(
        source=src,
        cluster=data["cluster"],
        etcd=EtcdConfig(
            endpoints=tuple(etcd["endpoints"]),
            prefix=etcd.get("prefix", EtcdConfig.prefix),
            timeout=durations[("etcd", "timeout")].total_seconds(),
            ca_file=tls.get("ca_file"),
            cert_file=tls.get("cert_file"),
            key_file=tls.get("key_file"),
            username=auth.get("username"),
            password_file=auth.get("password_file"),
        ),
        bundle=BundleConfig(
            path=bundle["path"],
            mode=int(bundle.get("mode", "0644"), 8),
            owner=bundle.get("owner"),
            group=bundle.get("group"),
            exclude_host=bundle.get("exclude_host"),
            reload=tuple(bundle["reload"]) if bundle.get("reload") else None,
            reload_timeout=durations[("bundle", "reload_timeout")].total_seconds(),
            jwks_path=bundle.get("jwks_path"),
        ),
        trusted=trusted,
        revoked=revoked,
        retention=Retention(
            expired_grace=durations[("retention", "expired_grace")],
            superseded_grace=durations[("retention", "superseded_grace")],
            min_keys=retention.get("min_keys", 1),
            max_removals=retention.get("max_removals", 2),
            max_token_lifetime=durations[("retention", "max_token_lifetime")],
        ),
    )
