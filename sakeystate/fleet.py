"""The fleet view: which apiserver verifies which key, from the hosts' status records.

``fleet_status`` is pure: the effective set (a plan with nothing excluded), the
status records read from etcd, and the fleet's hosts in; rows and problems out.
``status`` prints it; ``wait`` blocks on an etcd watch until a key reached every
fleet host (or, with ``--absent``, left every one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sakeystate.keys import format_time, parse_time
from sakeystate.model import EtcdObservation
from sakeystate.plan import Plan

FLEET_VERSION = 1


@dataclass(frozen=True)
class Record:
    """One host's status record, as read (``problem`` when it is unusable)."""

    host: str
    kids: frozenset[str] = frozenset()
    since: datetime | None = None
    problem: str | None = None


@dataclass(frozen=True)
class FleetStatus:
    at: datetime
    cluster: str
    hosts: tuple[str, ...]
    effective: tuple[str, ...]
    records: dict[str, Record]
    items: tuple[str, ...] = ()  # what lags or needs a person
    awaiting_review: tuple[str, ...] = ()
    lingering: dict[str, tuple[str, ...]] = field(default_factory=dict)  # kid -> hosts

    @property
    def in_order(self) -> bool:
        return not self.items

    def verifies(self, host: str, kid: str) -> bool:
        record = self.records.get(host)
        return record is not None and kid in record.kids

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": FLEET_VERSION,
            "cluster": self.cluster,
            "at": format_time(self.at),
            "in_order": self.in_order,
            "hosts": [
                {
                    "host": h,
                    "record_since": _since(self.records.get(h)),
                    "problem": self.records[h].problem if h in self.records else "no record",
                    "verifies": {k: self.verifies(h, k) for k in self.effective},
                }
                for h in self.hosts
            ],
            "effective_kids": list(self.effective),
            "awaiting_review": list(self.awaiting_review),
            "lingering": {k: list(v) for k, v in self.lingering.items()},
            "items": list(self.items),
        }


def _since(record: Record | None) -> str | None:
    return format_time(record.since) if record and record.since else None


def read_records(observed: EtcdObservation, status_prefix: str) -> dict[str, Record]:
    """Every host's record under the status prefix; a broken one says why."""
    records = {}
    for entry in observed.entries:
        name = entry.key[len(status_prefix) :].lower()
        records[name] = _record(name, entry.value)
    return records


def _record(host: str, value: bytes) -> Record:
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        return Record(host, problem="record is not JSON")
    if not isinstance(data, dict) or data.get("version") != 1:
        return Record(host, problem="record is not a version 1 status record")
    kids = data.get("kids")
    if not isinstance(kids, list) or not all(isinstance(k, str) for k in kids):
        return Record(host, problem="record has no list of kids")
    since = None
    if isinstance(data.get("since"), str):
        try:
            since = parse_time(data["since"])
        except ValueError:
            return Record(host, frozenset(kids), problem="record's since is not RFC 3339")
    return Record(host, frozenset(kids), since)


def record_age(record: Record, at: datetime) -> str:
    if record.since is None:
        return "age unknown"
    seconds = max(0, int((at - record.since).total_seconds()))
    return f"since {format_time(record.since)} ({seconds // 3600}h{seconds % 3600 // 60:02d}m ago)"


def fleet_status(
    plan: Plan, hosts: tuple[str, ...], records: dict[str, Record], revoked: set[str]
) -> FleetStatus:
    """``plan`` is planned with nothing excluded: its bundle is the effective set."""
    effective = plan.kids_after
    items: list[str] = []
    for host in hosts:
        record = records.get(host)
        if record is None:
            items.append(f"{host}: no status record")
            continue
        if record.problem:
            items.append(f"{host}: {record.problem}")
            continue
        missing = [k for k in effective if k not in record.kids]
        if missing:
            age = record_age(record, plan.at)
            items.append(f"{host} does not verify {', '.join(missing)} yet (record {age})")
    awaiting = tuple(k.kid for k in plan.keys if k.status == "untrusted" and k.kid and k.etcd_key)
    items += [f"key {kid} awaits review" for kid in awaiting]
    items += [w for w in plan.warnings if "expired" in w and "current key" in w]
    # With nothing excluded, the effective set holds every host's current key, so a
    # recorded kid outside it is a revoked or removed key that an apiserver still trusts.
    lingering: dict[str, tuple[str, ...]] = {}
    for host, record in sorted(records.items()):
        for kid in sorted(record.kids - set(effective)):
            lingering[kid] = (*lingering.get(kid, ()), host)
    for kid, where in sorted(lingering.items()):
        label = "revoked" if kid in revoked else "removed"
        items.append(f"{label} key {kid} is still verified by {', '.join(where)}")
    return FleetStatus(
        at=plan.at,
        cluster=plan.cluster,
        hosts=hosts,
        effective=effective,
        records=records,
        items=tuple(items),
        awaiting_review=awaiting,
        lingering=lingering,
    )


def reached(
    records: dict[str, Record], hosts: tuple[str, ...], kid: str, absent: bool
) -> list[str]:
    """The fleet hosts that do not yet verify ``kid`` (with ``absent``: that still do)."""
    lagging = []
    for host in hosts:
        record = records.get(host)
        has = record is not None and record.problem is None and kid in record.kids
        if has == absent:
            lagging.append(host)
    return lagging


def render_status(status: FleetStatus) -> str:
    """A kids x hosts table, then one line per item that lags or needs a person."""
    header = ["KID", *status.hosts]
    rows = [header]
    for kid in status.effective:
        rows.append([kid, *("yes" if status.verifies(h, kid) else "NO" for h in status.hosts)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for host in status.hosts:
        record = status.records.get(host)
        lines.append(
            f"{host}: " + (record_age(record, status.at) if record else "no status record")
        )
    lines += [f"- {item}" for item in status.items]
    verdict = "in order" if status.in_order else f"{len(status.items)} item(s) need attention"
    lines.append(f"Fleet {status.cluster} at {format_time(status.at)}: {verdict}.")
    return "\n".join(lines) + "\n"
