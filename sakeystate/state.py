"""The desired state: one YAML file, checked against the JSON Schema, then semantically.

Every problem names the file, the line and the field path, and says what
would be valid. Loading never executes YAML tags (safe loading only), refuses
aliases (no alias bombs) and refuses files over MAX_STATE_BYTES.
"""

from __future__ import annotations

import json
import re
import socket
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from sakeystate.errors import SakeystateError, StateError
from sakeystate.files import read_capped
from sakeystate.keys import normalize_fingerprint, parse_time

MAX_STATE_BYTES = 1024 * 1024
# Longer durations are typos, and would overflow date arithmetic.
MAX_DURATION_SECONDS = 36500 * 86400
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
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total > MAX_DURATION_SECONDS:
        raise ValueError(f"{text!r} is longer than {MAX_DURATION_SECONDS // 86400}d (100 years)")
    return timedelta(seconds=total)


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
    status_prefix: str = "/kube-apiserver-sa-status/"
    reload_lock: str | None = "/kube-apiserver-sa-reload-lock"


@dataclass(frozen=True)
class BundleConfig:
    path: str
    mode: int = 0o644
    owner: str | None = None
    group: str | None = None
    exclude_host: str | None = None  # resolved: an FQDN equal to the state's host, or None
    reload: tuple[str, ...] | None = None
    reload_check: tuple[str, ...] | None = None
    reload_timeout: float = 300.0
    jwks_path: str | None = None


@dataclass(frozen=True)
class Retention:
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
class AnchorConfig:
    name: str
    ca_file: str
    hosts: tuple[str, ...]
    common_name: str | None = None
    clock_skew: timedelta = timedelta(minutes=5)


@dataclass(frozen=True)
class DesiredState:
    """A validated state file. Fingerprints are normalized to kids, host names lowercased.

    ``host`` is this control plane, resolved (``self`` is ``--host``, else the
    machine's FQDN); None when it could not be determined, which only the commands
    that need it (exclude_host, own_cert, status records, publish) refuse.
    """

    source: str
    cluster: str
    etcd: EtcdConfig
    bundle: BundleConfig
    trusted: Mapping[str, TrustedKey]
    revoked: Mapping[str, str] = field(default_factory=dict)
    retention: Retention = field(default_factory=Retention)
    host: str | None = None
    own_cert: str | None = None
    fleet_hosts: tuple[str, ...] | None = None  # the `fleet` field as written
    trust_anchors: tuple[AnchorConfig, ...] = ()
    decommissioned: Mapping[str, datetime] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # valid, but probably not what the author meant
    signer: SignerConfig | None = None  # restart-free mode (`sakeystate signer`)

    @property
    def fleet(self) -> tuple[str, ...]:
        """``fleet`` when set, else every host named by anchors and trusted, minus
        decommissioned hosts."""
        if self.fleet_hosts is not None:
            named: Iterable[str] = self.fleet_hosts
        else:
            named = [h for a in self.trust_anchors for h in a.hosts]
            named += [t.host for t in self.trusted.values() if t.host]
        return tuple(sorted({h for h in named if h not in self.decommissioned}))


# libyaml when PyYAML was built with it (12x faster on a 10,000-key state file); both
# are safe loaders: no tags are ever executed.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(message)


_STR = "tag:yaml.org,2002:str"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
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
        # Timestamps stay text: the schema checks RFC 3339, and ``at: 2026-11-01T00:00:00Z``
        # is what people write unquoted.
        if node.tag in (_STR, _TIMESTAMP):
            return node.value
        return loader.construct_object(node, deep=True)
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


def _schema_problems(data: Any, src: str, lines: Mapping[FieldPath, int]) -> list[str]:
    validator = _validator()
    problems: list[tuple[int, str]] = [
        (_line_for(path, lines), f"{_dotted(path)}: {why}")
        for path, why in _control_characters(data)
    ]
    for error in validator.iter_errors(data):
        path: FieldPath = tuple(error.absolute_path)
        message = error.message
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = sorted(error.schema.get("properties", {}))
            for extra in sorted(set(error.instance) - set(allowed), key=str):
                at = (*path, extra)
                why = _REMOVED_FIELDS.get(at, f"unknown field; allowed here: {', '.join(allowed)}")
                problems.append((_line_for(at, lines), f"{_dotted(at)}: {why}"))
            continue
        if error.validator == "anyOf" and path and path[-1] in ("host", "exclude_host"):
            message = f"{error.instance!r} is not valid: expected self or {_HINTS['fqdn']}"
        if error.validator == "pattern":
            ref = next((k for k in _HINTS if _schema_is(error.schema, k)), None)
            if ref:
                message = f"{error.instance!r} is not valid: expected {_HINTS[ref]}"
            elif path and path[-1] == "mode":
                message = (
                    f"{error.instance!r} is not valid: expected an octal mode that group and "
                    'others cannot write, e.g. "0644" or "0640"'
                )
        if path and path[-1] == "mode" and error.validator == "type":
            message = f'{error.instance!r} is not a string: quote the mode, e.g. mode: "0644"'
        problems.append((_line_for(path, lines), f"{_dotted(path)}: {message}"))
    return [f"{_where(src, line, lines)}: {text}" for line, text in sorted(problems)]


_HINTS = {
    "duration": "a number and a unit (s, m, h, d), e.g. 24h or 1h30m",
    "fingerprint": "a kid (43 base64url characters) or sha256:<64 hex digits>",
    "fqdn": "a host name such as ctrl1001.example.org",
    "abspath": "an absolute path",
    "timestamp": "RFC 3339 with a time zone, e.g. 2026-11-01T00:00:00Z",
}
# Fields that existed once: their error says why they are gone.
_REMOVED_FIELDS: dict[FieldPath, str] = {
    ("retention", "expired_grace"): (
        "expired_grace was removed: certificate expiry never removes a key, because "
        "kube-apiserver ignores certificate dates and a host whose renewal is late still "
        "signs with its key; retention is superseded_grace (after the host's next key) "
        "and decommissioned hosts (after max_token_lifetime)"
    ),
}


def _control_characters(data: Any, path: FieldPath = ()) -> Iterator[tuple[FieldPath, str]]:
    """Every string (keys included) holding a control character, e.g. a block scalar's
    trailing newline that a ``$``-anchored pattern lets through."""
    if isinstance(data, str):
        bad = next((c for c in data if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            yield path, f"contains the control character {bad!r}; no string may"
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _control_characters(key, (*path, key) if isinstance(key, str) else path)
            yield from _control_characters(value, (*path, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _control_characters(value, (*path, index))


def _schema_is(schema: Mapping[str, Any], name: str) -> bool:
    defs = load_schema()["$defs"]
    return name in defs and schema.get("pattern") == defs[name].get("pattern")


@cache
def _validator() -> Any:
    """jsonschema's validator of the inlined schema: the library decides validity."""
    import jsonschema

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


def load_state_text(text: str, source: str, host: str | None = None) -> DesiredState:
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
    return state_from_data(data, source, lines, host)


def state_from_data(
    data: Mapping[str, Any],
    source: str,
    lines: Mapping[FieldPath, int] | None = None,
    host: str | None = None,
) -> DesiredState:
    """Validate an already-parsed mapping (the Ansible module's inline state).

    ``host`` is ``--host``: this control plane, when the caller knows it.
    """
    lines = lines or {}
    problems = _schema_problems(data, source, lines)
    if problems:
        raise StateError(source, problems)
    return _build(data, source, lines, host)


def machine_fqdn() -> str | None:
    """This machine's fully qualified name, or None when it has none (``localhost``)."""
    name = socket.getfqdn().lower().rstrip(".")
    return name if is_fqdn(name) else None


_FQDN_RE = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+\Z"
)


def is_fqdn(name: str) -> bool:
    """A fully qualified host name: at least two labels (``localhost`` is not one)."""
    return bool(_FQDN_RE.match(name.lower())) and name.lower() != "localhost.localdomain"


def load_state(path: str | Path, host: str | None = None) -> DesiredState:
    source = str(path)
    try:
        raw = read_capped(source, MAX_STATE_BYTES, "state file")
    except SakeystateError as exc:
        raise StateError(source, [str(exc)]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateError(source, [f"{source}: not UTF-8 text (byte {exc.start})"]) from None
    return load_state_text(text, source, host)


def _build(
    data: Mapping[str, Any], src: str, lines: Mapping[FieldPath, int], host_flag: str | None
) -> DesiredState:
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
        named = entry.get("host")
        trusted[kid] = TrustedKey(
            kid=kid, host=named.lower().rstrip(".") if named else None, note=entry.get("note")
        )
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
    for index, url in enumerate(etcd["endpoints"]):
        if url.startswith("https://") and not tls.get("ca_file"):
            problems.append(
                f"{where(('etcd', 'endpoints', index))}: https endpoint needs etcd.tls.ca_file"
            )
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        if not 0 < port < 65536:
            problems.append(f"{where(('etcd', 'endpoints', index))}: port {port} is not 1-65535")
    bundle = data["bundle"]
    retention = data.get("retention") or {}
    lifetime = retention.get("max_token_lifetime", "8760h")
    durations: dict[FieldPath, timedelta] = {}
    for path, value in (
        (("etcd", "timeout"), etcd.get("timeout", "5s")),
        (("bundle", "reload_timeout"), bundle.get("reload_timeout", "5m")),
        (("retention", "max_token_lifetime"), lifetime),
        (("retention", "superseded_grace"), retention.get("superseded_grace", lifetime)),
    ):
        try:
            durations[path] = parse_duration(value)
        except ValueError as exc:
            problems.append(f"{where(path)}: {exc}")
    for path in (("etcd", "timeout"), ("bundle", "reload_timeout")):
        if path in durations and durations[path] <= timedelta(0):
            problems.append(f"{where(path)}: must be longer than 0s")
    if bundle.get("jwks_path") is not None and bundle.get("jwks_path") == bundle["path"]:
        problems.append(f"{where(('bundle', 'jwks_path'))}: must not be bundle.path")
    host = _resolve_host(data.get("host", "self"), host_flag, where(("host",)), problems)
    exclude = bundle.get("exclude_host")
    if exclude is not None:
        exclude = exclude.lower().rstrip(".")
        if exclude == "self":
            # Unresolved (no --host, no FQDN on this machine) stays "self": validate on a
            # review machine accepts it, and the planner refuses to guess.
            exclude = host or "self"
        elif not is_fqdn(exclude):
            problems.append(
                f"{where(('bundle', 'exclude_host'))}: {exclude!r} is not a fully qualified "
                "host name; use self"
            )
        elif host is None:
            problems.append(
                f"{where(('bundle', 'exclude_host'))}: names {exclude}, but this host's FQDN "
                "is unknown: pass --host, or use exclude_host: self with host set"
            )
        elif exclude != host:
            problems.append(
                f"{where(('bundle', 'exclude_host'))}: names {exclude}, but this host is "
                f"{host}; use exclude_host: self (one file serves every control plane)"
            )
    decommissioned: dict[str, datetime] = {}
    for index, entry in enumerate(data.get("decommissioned") or []):
        name = entry["host"].lower().rstrip(".")
        try:
            decommissioned[name] = parse_time(entry["at"])
        except ValueError as exc:
            problems.append(f"{where(('decommissioned', index, 'at'))}: {exc}")
    anchors = []
    for index, a in enumerate(data.get("trust_anchors") or []):
        skew = timedelta(minutes=5)
        if "clock_skew" in a:
            try:
                skew = parse_duration(a["clock_skew"])
            except ValueError as exc:
                problems.append(f"{where(('trust_anchors', index, 'clock_skew'))}: {exc}")
        anchors.append(
            AnchorConfig(
                name=a["name"],
                ca_file=a["ca_file"],
                hosts=tuple(h.lower().rstrip(".") for h in a["hosts"]),
                common_name=a.get("common_name"),
                clock_skew=skew,
            )
        )
    signer = _signer_config(data, where, durations, problems)
    names = [a.name for a in anchors]
    for index, name in enumerate(names):
        if names.index(name) != index:
            problems.append(f"{where(('trust_anchors', index, 'name'))}: duplicate anchor {name}")
    if problems:
        raise StateError(src, problems)

    warnings = [
        f"{where(('trust_anchors', i))}: no common_name: any certificate this CA issued "
        f"naming a fleet host (its serving certificate too) makes that key trusted; set "
        "common_name to the service-account profile's CN (e.g. sa)"
        for i, a in enumerate(anchors)
        if a.common_name is None
    ]
    if bundle.get("reload") and not bundle.get("reload_check"):
        warnings.append(
            f"{where(('bundle', 'reload'))}: no reload_check: the reload lock is released when "
            "the restart command returns, which for a Type=notify unit is before "
            "kube-apiserver is ready (/readyz); two apiservers may then be unready at once. "
            "Set reload_check, e.g. [curl, -fsk, https://localhost:6443/readyz]"
        )
    grace = durations[("retention", "superseded_grace")]
    if grace < durations[("retention", "max_token_lifetime")]:
        warnings.append(
            f"{where(('retention', 'superseded_grace'))}: shorter than max_token_lifetime: "
            "tokens a superseded key signed may still be valid when it is dropped"
        )
    fleet = data.get("fleet")
    return DesiredState(
        warnings=tuple(warnings),
        source=src,
        cluster=data["cluster"],
        host=host,
        own_cert=data.get("own_cert"),
        fleet_hosts=tuple(h.lower().rstrip(".") for h in fleet) if fleet is not None else None,
        trust_anchors=tuple(anchors),
        decommissioned=decommissioned,
        signer=signer,
        etcd=EtcdConfig(
            endpoints=tuple(etcd["endpoints"]),
            prefix=etcd.get("prefix", EtcdConfig.prefix),
            timeout=durations[("etcd", "timeout")].total_seconds(),
            ca_file=tls.get("ca_file"),
            cert_file=tls.get("cert_file"),
            key_file=tls.get("key_file"),
            username=_etcd_user(auth.get("username"), host),
            password_file=auth.get("password_file"),
            status_prefix=etcd.get("status_prefix", EtcdConfig.status_prefix),
            reload_lock=etcd.get("reload_lock", EtcdConfig.reload_lock),
        ),
        bundle=BundleConfig(
            path=bundle["path"],
            mode=int(bundle.get("mode", "0644"), 8),
            owner=bundle.get("owner"),
            group=bundle.get("group"),
            exclude_host=exclude,
            reload=tuple(bundle["reload"]) if bundle.get("reload") else None,
            reload_check=tuple(bundle["reload_check"]) if bundle.get("reload_check") else None,
            reload_timeout=durations[("bundle", "reload_timeout")].total_seconds(),
            jwks_path=bundle.get("jwks_path"),
        ),
        trusted=trusted,
        revoked=revoked,
        retention=Retention(
            superseded_grace=durations[("retention", "superseded_grace")],
            min_keys=retention.get("min_keys", 1),
            max_removals=retention.get("max_removals", 2),
            max_token_lifetime=durations[("retention", "max_token_lifetime")],
        ),
    )


def _etcd_user(written: str | None, host: str | None) -> str | None:
    """``etcd.auth.username: self`` is this host's name: one shared state file gives each
    control plane its own etcd user (whose role may write only that host's entries)."""
    if written == "self" and host is not None:
        return host
    return written  # an unresolved self stays "self": connecting refuses it


# --- signer: restart-free mode ---------------------------------------------------------------

# sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107


@dataclass(frozen=True)
class SignerConfig:
    socket: str
    private_key_file: str
    refresh_hint: int = 60  # seconds
    group: str | None = None


def _signer_config(
    data: Mapping[str, Any],
    where: Callable[[FieldPath], str],
    durations: Mapping[FieldPath, timedelta],
    problems: list[str],
) -> SignerConfig | None:
    """The ``signer`` section, with the limits kube-apiserver puts on what a signer says:
    a refresh hint above 0, and a token lifetime (Metadata) of at least 10m."""
    section = data.get("signer")
    if section is None:
        return None
    hint = 60
    try:
        hint = int(parse_duration(section.get("refresh_hint", "60s")).total_seconds())
    except ValueError as exc:
        problems.append(f"{where(('signer', 'refresh_hint'))}: {exc}")
    if hint < 1:
        problems.append(f"{where(('signer', 'refresh_hint'))}: must be at least 1s")
    if len(section["socket"].encode()) > MAX_SOCKET_PATH_BYTES:
        problems.append(
            f"{where(('signer', 'socket'))}: longer than {MAX_SOCKET_PATH_BYTES} bytes, the "
            "limit of a unix socket path"
        )
    lifetime = durations.get(("retention", "max_token_lifetime"))
    if lifetime is not None and lifetime < timedelta(minutes=10):
        problems.append(
            f"{where(('retention', 'max_token_lifetime'))}: below 10m, which kube-apiserver "
            "refuses from a signer (the signer's Metadata states it as the longest token)"
        )
    return SignerConfig(
        socket=section["socket"],
        private_key_file=section["private_key_file"],
        refresh_hint=hint,
        group=section.get("group"),
    )


def _resolve_host(written: str, flag: str | None, where: str, problems: list[str]) -> str | None:
    """``host`` of the state: self is ``--host``, else the machine's FQDN."""
    written = written.lower().rstrip(".")
    given = flag.lower().rstrip(".") if flag else None
    if given is not None and not is_fqdn(given):
        problems.append(f"--host {flag!r} is not a fully qualified host name")
        return None
    if written != "self" and not is_fqdn(written):
        problems.append(f"{where}: {written!r} is not a fully qualified host name (or self)")
        return None
    if written == "self":
        return given or machine_fqdn()
    if given is not None and given != written:
        problems.append(
            f"{where}: this state file is for {written}, but --host is {given}; "
            "use host: self to share one file between control planes"
        )
    return written
