"""A read-only export of the etcd prefix, so review CI can plan without reaching etcd.

It also carries the bundle of the host it was taken on (public keys only, with
its mode, owner, group and pending-reload mark), so ``plan --observed`` on a
review machine, which has no bundle, plans exactly what the host would.

A snapshot holds public material only: a value that contains a private key, a
binary value (a DER private key, say) and a value over the size limit are
replaced by stand-ins that the planner rejects for the same reason it rejects
the original, so an offline plan equals the live plan at that moment.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from typing import Any

from sakeystate.errors import SakeystateError
from sakeystate.files import read_capped
from sakeystate.keys import MAX_VALUE_BYTES, format_time
from sakeystate.model import BundleObservation, EtcdEntry, EtcdObservation

SNAPSHOT_VERSION = 1
REDACTED = (
    b"-----BEGIN PRIVATE KEY-----\n(redacted by sakeystate snapshot)\n-----END PRIVATE KEY-----\n"
)
MAX_SNAPSHOT_BYTES = 512 * 1024 * 1024
_PRIVATE_BLOCK_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.*?-----END \1-----\r?\n?", re.S
)


def _public(value: bytes) -> bytes:
    if len(value) > MAX_VALUE_BYTES:
        return b"\xff" * len(value)  # rejected for its size alone
    if b"PRIVATE KEY" in value:
        return REDACTED
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return b"\xff" * len(value)  # rejected as not UTF-8 text, whatever the bytes were
    return value


def _public_bundle(content: bytes) -> bytes:
    """The bundle with any private-key block replaced by a stub the planner rejects alike."""
    content = _PRIVATE_BLOCK_RE.sub(
        lambda m: b"-----BEGIN " + m.group(1) + b"-----\nAA==\n-----END " + m.group(1) + b"-----\n",
        content,
    )
    return REDACTED if b"PRIVATE KEY" in _PRIVATE_BLOCK_RE.sub(b"", content) else content


def _encoded(name: str, data: bytes) -> dict[str, str]:
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_base64": base64.b64encode(data).decode("ascii")}


def _decoded(item: dict[str, Any], name: str) -> bytes | None:
    if f"{name}_base64" in item:
        return base64.b64decode(item[f"{name}_base64"], validate=True)
    value = item.get(name)
    return None if value is None else str(value).encode("utf-8")


def to_json(
    observed: EtcdObservation,
    cluster: str,
    at: datetime,
    bundle: BundleObservation | None = None,
) -> str:
    entries = []
    for entry in observed.entries:
        item: dict[str, Any] = {
            "key": entry.key,
            "mod_revision": entry.mod_revision,
            "create_revision": entry.create_revision,
            **_encoded("value", _public(entry.value)),
        }
        entries.append(item)
    document = {
        "version": SNAPSHOT_VERSION,
        "cluster": cluster,
        "prefix": observed.prefix,
        "revision": observed.revision,
        "taken_at": format_time(at),
        "entries": entries,
    }
    if bundle is not None:
        found: dict[str, Any] = {
            "path": bundle.path,
            "mode": bundle.mode,
            "owner": bundle.owner,
            "group": bundle.group,
            "reload_pending": bundle.reload_pending,
        }
        if bundle.content is not None:
            found.update(_encoded("content", _public_bundle(bundle.content)))
        if bundle.jwks_content is not None:
            found.update(_encoded("jwks", _public_bundle(bundle.jwks_content)))
        document["bundle"] = found
    return json.dumps(document, indent=1) + "\n"


def load(path: str, prefix: str) -> EtcdObservation:
    """The etcd part of a snapshot taken of ``prefix``."""
    return load_with_bundle(path, prefix)[0]


def load_with_bundle(path: str, prefix: str) -> tuple[EtcdObservation, BundleObservation | None]:
    """Read a snapshot taken of ``prefix``; errors name the file and what is wrong."""
    raw = read_capped(path, MAX_SNAPSHOT_BYTES, "snapshot")
    try:
        document = json.loads(raw)
        if document.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"version {document.get('version')!r}, expected {SNAPSHOT_VERSION}")
        if document["prefix"] != prefix:
            raise ValueError(f"it is of prefix {document['prefix']}, the state file uses {prefix}")
        entries = []
        for item in document["entries"]:
            value = _decoded(item, "value")
            if value is None:
                raise ValueError(f"entry {item.get('key')!r} has no value")
            entries.append(
                EtcdEntry(
                    str(item["key"]),
                    value,
                    int(item["mod_revision"]),
                    int(item.get("create_revision", 0)),
                )
            )
        found = document.get("bundle")
        bundle = None
        if found is not None:
            bundle = BundleObservation(
                path=str(found["path"]),
                content=_decoded(found, "content"),
                mode=None if found.get("mode") is None else int(found["mode"]),
                owner=found.get("owner"),
                group=found.get("group"),
                reload_pending=bool(found.get("reload_pending", False)),
                jwks_content=_decoded(found, "jwks"),
            )
        return EtcdObservation(prefix, int(document["revision"]), tuple(entries)), bundle
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SakeystateError(f"snapshot {path} is not a sakeystate snapshot: {exc}") from None
