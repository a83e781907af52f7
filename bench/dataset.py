"""The benchmark's keys: EC P-256 certificates as `sakeystate publish` writes them, cached on disk.

Generating 10,000 certificates takes a few seconds; the etcd values are kept in
bench/.cache/ (gitignored) so repeated runs load them instead. Certificates are
valid for ten years from 2025, so `openssl x509 -checkend 0` passes on them and
no `--at` is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CACHE = Path(__file__).resolve().parent / ".cache"
# Bump when the shape of a value changes, so a stale cache is regenerated.
VERSION = 1
NOT_BEFORE = datetime(2025, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2035, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Entry:
    kid: str
    host: str
    value: bytes


def host_name(index: int) -> str:
    return f"ctrl{index:05d}.bench.example.org"


def new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def certificate(
    key: Any, host: str, not_before: datetime, not_after: datetime, serial: int
) -> bytes:
    """A self-signed certificate PEM for ``key`` (a renewal: same key, new dates and serial)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _generate(count: int) -> list[Entry]:
    from sakeystate.keys import kid_of

    entries = []
    for index in range(count):
        key = new_key()
        host = host_name(index)
        cert = certificate(key, host, NOT_BEFORE, NOT_AFTER, index + 1)
        header = f"Host: {host}\nPublished: 2025-01-01T00:00:00Z\n".encode()
        entries.append(Entry(kid_of(key.public_key()), host, header + cert))
    return entries


def entries(count: int) -> list[Entry]:
    """The first ``count`` entries of the cached pool, generating (and caching) it as needed."""
    path = CACHE / f"p256-v{VERSION}.jsonl"
    pool: list[Entry] = []
    if path.exists():
        with path.open(encoding="ascii") as handle:
            for line in handle:
                item = json.loads(line)
                pool.append(Entry(item["kid"], item["host"], item["value"].encode("ascii")))
    if len(pool) < count:
        pool = _generate(count)
        CACHE.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="ascii") as handle:
            for entry in pool:
                item = {"kid": entry.kid, "host": entry.host, "value": entry.value.decode("ascii")}
                handle.write(json.dumps(item) + "\n")
        tmp.rename(path)
    return pool[:count]
