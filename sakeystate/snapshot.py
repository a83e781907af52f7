"""A read-only export of the etcd prefix, so review CI can plan without reaching etcd.

A snapshot holds public material only: a value that contains a private key is
replaced by a redaction marker that the planner rejects for the same reason it
rejects the original, so an offline plan equals the live plan at that moment.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from sakeystate.errors import SakeystateError
from sakeystate.keys import format_time
from sakeystate.model import EtcdEntry, EtcdObservation

SNAPSHOT_VERSION = 1
REDACTED = (
    b"-----BEGIN PRIVATE KEY-----\n(redacted by sakeystate snapshot)\n-----END PRIVATE KEY-----\n"
)
MAX_SNAPSHOT_BYTES = 512 * 1024 * 1024


def _public(value: bytes) -> bytes:
    return REDACTED if b"PRIVATE KEY" in value else value


def to_json(observed: EtcdObservation, cluster: str, at: datetime) -> str:
    entries = []
    for entry in observed.entries:
        value = _public(entry.value)
        item: dict[str, Any] = {
            "key": entry.key,
            "mod_revision": entry.mod_revision,
            "create_revision": entry.create_revision,
        }
        try:
            item["value"] = value.decode("utf-8")
        except UnicodeDecodeError:
            item["value_base64"] = base64.b64encode(value).decode("ascii")
        entries.append(item)
    document = {
        "version": SNAPSHOT_VERSION,
        "cluster": cluster,
        "prefix": observed.prefix,
        "revision": observed.revision,
        "taken_at": format_time(at),
        "entries": entries,
    }
    return json.dumps(document, indent=1) + "\n"


def load(path: str, prefix: str) -> EtcdObservation:
    """Read a snapshot taken of ``prefix``; errors name the file and what is wrong."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_SNAPSHOT_BYTES + 1)
    except OSError as exc:
        raise SakeystateError(f"cannot read snapshot {path}: {exc.strerror}") from None
    if len(raw) > MAX_SNAPSHOT_BYTES:
        raise SakeystateError(f"snapshot {path} is larger than {MAX_SNAPSHOT_BYTES} bytes")
    try:
        document = json.loads(raw)
        if document.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"version {document.get('version')!r}, expected {SNAPSHOT_VERSION}")
        if document["prefix"] != prefix:
            raise ValueError(f"it is of prefix {document['prefix']}, the state file uses {prefix}")
        entries = []
        for item in document["entries"]:
            if "value_base64" in item:
                value = base64.b64decode(item["value_base64"], validate=True)
            else:
                value = item["value"].encode("utf-8")
            entries.append(
                EtcdEntry(
                    str(item["key"]),
                    value,
                    int(item["mod_revision"]),
                    int(item.get("create_revision", 0)),
                )
            )
        return EtcdObservation(prefix, int(document["revision"]), tuple(entries))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SakeystateError(f"snapshot {path} is not a sakeystate snapshot: {exc}") from None
