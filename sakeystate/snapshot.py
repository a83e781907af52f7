"""A read-only export of the etcd prefix, so review CI can plan without reaching etcd.

It also carries the bundle of the host it was taken on (public keys only, with
its mode, owner, group and pending-reload mark), so ``plan --observed`` on a
review machine, which has no bundle, plans exactly what the host would.

A snapshot holds public material only. Whether a value holds a private key is
decided structurally, not by its text: a PEM label naming a private key, any
base64 run or the raw bytes that cryptography loads as a private key (PKCS#8,
PKCS#1, SEC1, encrypted or not), or a JSON object with a private JWK member
(``d``, ``p``, ``q``, ``k``...). Such a value, a binary value and a value over
the size limit are not copied: each is recorded as skipped, with its size, and
read back as a stand-in the planner rejects for the same reason it rejects the
original, so an offline plan equals the live plan at that moment. Values over
the limit are never copied at all, which keeps a snapshot of a prefix full of
megabyte values as small as its keys.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_der_private_key

from sakeystate.anchors import Anchor
from sakeystate.errors import KeyRejected, SakeystateError
from sakeystate.files import read_capped
from sakeystate.keys import MAX_VALUE_BYTES, format_time, parse_key_pem
from sakeystate.model import BundleObservation, EtcdEntry, EtcdObservation
from sakeystate.plan import LocalFacts

SNAPSHOT_VERSION = 1
REDACTED = (
    b"-----BEGIN PRIVATE KEY-----\n(redacted by sakeystate snapshot)\n-----END PRIVATE KEY-----\n"
)
# The stand-in for private material that was not in PEM form: like the original,
# the planner finds no PEM block in it (and it names no "PRIVATE KEY").
REDACTED_TEXT = b"(private key material redacted by sakeystate snapshot)\n"
MAX_SNAPSHOT_BYTES = 512 * 1024 * 1024
# etcd revisions are int64.
MAX_REVISION = 2**63 - 1
# The largest value a skipped entry may claim: gRPC refuses larger messages when
# reading etcd (etcd.MAX_MESSAGE_BYTES), so no live value can be bigger.
MAX_SKIPPED_SIZE = 16 * 1024 * 1024
_PRIVATE_BLOCK_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.*?-----END \1-----\r?\n?", re.S
)
# Base64 (standard or url-safe, possibly wrapped) long enough to hold a key's DER.
_BASE64_RUNS = (re.compile(rb"[A-Za-z0-9+/=\r\n]{80,}"), re.compile(rb"[A-Za-z0-9_\-=\r\n]{80,}"))
# JWK members that only private (or symmetric) keys have (RFC 7518 section 6).
_PRIVATE_JWK_MEMBERS = frozenset(("d", "p", "q", "dp", "dq", "qi", "oth", "k"))


def _is_private_der(der: bytes) -> bool:
    """Whether cryptography reads ``der`` as a private key (TypeError: an encrypted one)."""
    try:
        load_der_private_key(der, password=None)
    except TypeError:
        return True
    except UnsupportedAlgorithm:
        return True  # a private key of a kind this cryptography cannot use is still one
    except ValueError:
        return False
    return True


def _base64_candidates(data: bytes) -> Iterator[bytes]:
    for pattern, decode in zip(
        _BASE64_RUNS, (base64.b64decode, base64.urlsafe_b64decode), strict=True
    ):
        for run in pattern.findall(data):
            text = run.replace(b"\r", b"").replace(b"\n", b"").rstrip(b"=")
            try:
                yield decode(text + b"=" * (-len(text) % 4))
            except (binascii.Error, ValueError):
                continue


def _has_private_jwk(data: bytes) -> bool:
    """Whether ``data`` is JSON holding an object with a private JWK member, at any depth."""
    if data.lstrip()[:1] not in (b"{", b"["):
        return False
    try:
        document = json.loads(data)
    except RecursionError:
        return True  # too deep to look inside: not copied
    except ValueError:
        return False
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if _PRIVATE_JWK_MEMBERS & item.keys():
                return True
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    return False


def holds_private_key(data: bytes) -> bool:
    """Whether ``data`` contains private-key material in any form we can recognise."""
    if b"PRIVATE KEY" in data or _is_private_der(data) or _has_private_jwk(data):
        return True
    return any(_is_private_der(der) for der in _base64_candidates(data))


def _skipped(value: bytes) -> dict[str, Any] | None:
    """Why a value is not copied into the snapshot (with its size), or None to copy it."""
    if len(value) > MAX_VALUE_BYTES:
        return {"skipped": "too-large", "size": len(value)}
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return {"skipped": "binary", "size": len(value)}
    if holds_private_key(value):
        pem = b"-----BEGIN" in value or b"PRIVATE KEY" in value
        return {"skipped": "private-key" if pem else "private-material", "size": len(value)}
    return None


def _stand_in(kind: str, size: int) -> bytes:
    """What the planner rejects for the reason it rejected the value that was skipped."""
    if kind == "too-large":
        # bytes(n) is calloc'd: rejected for its length before a page is touched.
        return bytes(size)
    if kind == "binary":
        return b"\xff" * size
    if kind == "private-key":
        return REDACTED
    if kind == "private-material":
        return REDACTED_TEXT
    raise ValueError(f"unknown skipped kind {kind!r}")


def _public_bundle(content: bytes) -> bytes:
    """The bundle with any private-key block replaced by a stub the planner rejects alike."""
    content = _PRIVATE_BLOCK_RE.sub(
        lambda m: b"-----BEGIN " + m.group(1) + b"-----\nAA==\n-----END " + m.group(1) + b"-----\n",
        content,
    )
    return REDACTED if holds_private_key(_PRIVATE_BLOCK_RE.sub(b"", content)) else content


def _encoded(name: str, data: bytes) -> dict[str, str]:
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_base64": base64.b64encode(data).decode("ascii")}


def _decoded(item: dict[str, Any], name: str) -> bytes | None:
    if f"{name}_base64" in item:
        return base64.b64decode(_string(item, f"{name}_base64"), validate=True)
    value = item.get(name)
    return None if value is None else _string(item, name).encode("utf-8")


def to_json(
    observed: EtcdObservation,
    cluster: str,
    at: datetime,
    bundle: BundleObservation | None = None,
    local: LocalFacts | None = None,
) -> str:
    entries = []
    for entry in observed.entries:
        item: dict[str, Any] = {
            "key": entry.key,
            "mod_revision": entry.mod_revision,
            "create_revision": entry.create_revision,
        }
        item.update(_skipped(entry.value) or _encoded("value", entry.value))
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
            "reload_unowned": bundle.reload_unowned,
        }
        if bundle.content is not None:
            found.update(_encoded("content", _public_bundle(bundle.content)))
        if bundle.jwks_content is not None:
            found.update(_encoded("jwks", _public_bundle(bundle.jwks_content)))
        document["bundle"] = found
    if local is not None:
        # What the host adds to its plan (its own kid, its anchors' CA certificates, the
        # failures its writes would hit), so review plans exactly what the host would.
        document["local"] = {
            "own_kid": local.own_kid,
            "own_public_key": (
                local.own_key.public_pem.decode("ascii") if local.own_key is not None else None
            ),
            "problems": list(local.problems),
            "anchors": [
                {
                    "name": a.name,
                    "ca_pem": a.ca_pems.decode("ascii", "replace"),
                    "hosts": list(a.hosts),
                    "common_name": a.common_name,
                    "clock_skew_seconds": int(a.clock_skew.total_seconds()),
                }
                for a in local.anchors
            ],
        }
    return json.dumps(document, indent=1) + "\n"


def load_local(path: str) -> LocalFacts | None:
    """The host's local facts a snapshot carries, or None (an older snapshot)."""
    raw = read_capped(path, MAX_SNAPSHOT_BYTES, "snapshot")
    try:
        local = _object(json.loads(raw), "the document").get("local")
        if local is None:
            return None
        local = _object(local, "local")
        anchors = []
        for item in local.get("anchors") or []:
            item = _object(item, "an anchor")
            hosts = item.get("hosts")
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise ValueError("an anchor's hosts is not a list of names")
            anchors.append(
                Anchor(
                    _string(item, "name"),
                    _string(item, "ca_pem").encode("ascii"),
                    tuple(hosts),
                    _optional_string(item, "common_name"),
                    timedelta(seconds=_int(item, "clock_skew_seconds", 300, 36500 * 86400)),
                )
            )
        problems = local.get("problems") or []
        if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
            raise ValueError("local.problems is not a list of strings")
        own_pem = _optional_string(local, "own_public_key")
        own_key = parse_key_pem(own_pem.encode("ascii")) if own_pem else None
        return LocalFacts(
            _optional_string(local, "own_kid"), tuple(problems), tuple(anchors), own_key
        )
    except RecursionError:
        raise SakeystateError(f"snapshot {path}: its JSON is nested too deeply") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeError, KeyRejected) as exc:
        raise SakeystateError(f"snapshot {path} is not a sakeystate snapshot: {exc}") from None


def load(path: str, prefix: str) -> EtcdObservation:
    """The etcd part of a snapshot taken of ``prefix``."""
    return load_with_bundle(path, prefix)[0]


def _int(
    item: dict[str, Any], name: str, default: int | None = None, limit: int = MAX_REVISION
) -> int:
    """A JSON integer in 0..limit: not a float (1e400 is inf), not a bool, not a string."""
    value = item.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValueError(f"{name} {str(value)[:40]!r} is not an integer from 0 to {limit}")
    return value


def _string(item: dict[str, Any], name: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    return value


def _optional_string(item: dict[str, Any], name: str) -> str | None:
    return None if item.get(name) is None else _string(item, name)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def _entry(item: dict[str, Any], budget: list[int]) -> EtcdEntry:
    key = _string(item, "key")
    if "skipped" in item:
        size = _int(item, "size", limit=MAX_SKIPPED_SIZE)
        budget[0] -= size
        if budget[0] < 0:
            raise ValueError(f"skipped values add up to more than {MAX_SNAPSHOT_BYTES} bytes")
        value = _stand_in(_string(item, "skipped"), size)
    else:
        found = _decoded(item, "value")
        if found is None:
            raise ValueError(f"entry {key[:80]!r} has no value")
        value = found
    return EtcdEntry(key, value, _int(item, "mod_revision"), _int(item, "create_revision", 0))


def _bundle(found: dict[str, Any]) -> BundleObservation:
    return BundleObservation(
        path=_string(found, "path"),
        content=_decoded(found, "content"),
        mode=None if found.get("mode") is None else _int(found, "mode", limit=0o7777),
        owner=_optional_string(found, "owner"),
        group=_optional_string(found, "group"),
        reload_pending=found.get("reload_pending", False) is True,
        jwks_content=_decoded(found, "jwks"),
        reload_unowned=found.get("reload_unowned", False) is True,
    )


def load_with_bundle(path: str, prefix: str) -> tuple[EtcdObservation, BundleObservation | None]:
    """Read a snapshot taken of ``prefix``; errors name the file and what is wrong."""
    raw = read_capped(path, MAX_SNAPSHOT_BYTES, "snapshot")
    try:
        document = _object(json.loads(raw), "the document")
        if document.get("version") != SNAPSHOT_VERSION:
            shown = str(document.get("version"))[:40]
            raise ValueError(f"version {shown!r}, expected {SNAPSHOT_VERSION}")
        if _string(document, "prefix") != prefix:
            shown = document["prefix"][:200]
            raise ValueError(f"it is of prefix {shown!r}, the state file uses {prefix}")
        items = document.get("entries")
        if not isinstance(items, list):
            raise ValueError("entries is not a list")
        budget = [MAX_SNAPSHOT_BYTES]
        entries = tuple(_entry(_object(item, "an entry"), budget) for item in items)
        found = document.get("bundle")
        bundle = None if found is None else _bundle(_object(found, "bundle"))
        return EtcdObservation(prefix, _int(document, "revision"), entries), bundle
    except RecursionError:
        raise SakeystateError(
            f"snapshot {path} is not a sakeystate snapshot: its JSON is nested too deeply"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SakeystateError(f"snapshot {path} is not a sakeystate snapshot: {exc}") from None
