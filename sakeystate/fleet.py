"""The fleet view: which apiserver verifies which key, from what the hosts say in etcd.

Under the status prefix each host keeps its status record at ``<prefix><host>``
and, under ``<prefix><host>/``, a liveness key while its ``watch`` runs
(``watch``, attached to a lease: gone within seconds of the watcher's death) and
the last failures of its restarts (``restart``). ``read_seen`` turns one read of
the prefix into a ``Seen``; everything else here is pure.

A fleet host that does not (yet) verify a key is, in that order:

- **unknown**: no status record, or one that cannot be read: nothing is known,
  so ``wait --absent`` never counts it as absent;
- **lagging**: its ``watch`` is live, or its record changed within ``down_after``:
  it is converging, waiting for its restart, or failing (``restart`` says);
- **down**: no live ``watch`` and no record change for ``down_after``: an
  operator who knows it is down passes it with ``wait --skip HOST``.

Records of hosts outside the fleet are ignored (listed once, with ``prune`` as
the cure): a decommissioned host can keep nothing at "needs attention".
"""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sakeystate.escape import for_terminal
from sakeystate.keys import format_time, parse_time
from sakeystate.model import EtcdEntry, EtcdObservation
from sakeystate.plan import Plan

FLEET_VERSION = 1
# Keys a host keeps under <status_prefix><host>/.
WATCH_KEY = "watch"  # a lease-bound liveness key while `watch` runs
RESTART_KEY = "restart"  # its restarts' last failures, removed by the next success
# A host with no live watch whose record has not changed for this long is "down".
DOWN_AFTER = 900.0
# A record stamped further than this ahead of this clock is reported as clock skew.
SKEW_LIMIT = 60.0


@dataclass(frozen=True)
class Record:
    """One host's status record, as read (``problem`` when it is unusable)."""

    host: str
    kids: frozenset[str] = frozenset()
    since: datetime | None = None
    problem: str | None = None
    mode: str | None = None  # "file" or "signer"; None: written before modes existed


@dataclass(frozen=True)
class Failure:
    """A host's restarts keep failing (``<status_prefix><host>/restart``)."""

    count: int
    since: datetime | None
    error: str


@dataclass(frozen=True)
class Seen:
    """Everything under the status prefix, by host."""

    records: dict[str, Record] = field(default_factory=dict)
    live: frozenset[str] = frozenset()  # hosts whose watch holds its liveness key
    failures: dict[str, Failure] = field(default_factory=dict)


@dataclass(frozen=True)
class Lag:
    """A fleet host that has not reached what is waited for, and what is known of it."""

    host: str
    state: str  # "unknown" | "lagging" | "down" | "skipped"
    detail: str


@dataclass(frozen=True)
class FleetStatus:
    at: datetime
    cluster: str
    hosts: tuple[str, ...]
    effective: tuple[str, ...]
    seen: Seen
    down_after: float = DOWN_AFTER
    items: tuple[str, ...] = ()  # what lags or needs a person
    awaiting_review: tuple[str, ...] = ()
    lingering: dict[str, tuple[str, ...]] = field(default_factory=dict)  # kid -> hosts
    ignored: tuple[str, ...] = ()  # hosts outside the fleet that have a status record

    @property
    def in_order(self) -> bool:
        return not self.items

    @property
    def records(self) -> dict[str, Record]:
        return self.seen.records

    def verifies(self, host: str, kid: str) -> bool:
        record = self.records.get(host)
        return record is not None and record.problem is None and kid in record.kids

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": FLEET_VERSION,
            "cluster": self.cluster,
            "at": format_time(self.at),
            "in_order": self.in_order,
            "hosts": [self._host_dict(h) for h in self.hosts],
            "effective_kids": list(self.effective),
            "awaiting_review": list(self.awaiting_review),
            "lingering": {k: list(v) for k, v in self.lingering.items()},
            "ignored_records": list(self.ignored),
            "items": list(self.items),
        }

    def _host_dict(self, host: str) -> dict[str, Any]:
        record = self.records.get(host)
        failure = self.seen.failures.get(host)
        in_sync = all(self.verifies(host, k) for k in self.effective)
        return {
            "host": host,
            "state": "in sync" if in_sync else classify(self.seen, host, self.at, self.down_after),
            "record_since": format_time(record.since) if record and record.since else None,
            "skew_seconds": skew(record, self.at),
            "mode": record.mode if record else None,
            "watch_live": host in self.seen.live,
            "problem": record.problem if record else "no record",
            "restart_failures": failure.count if failure else 0,
            "verifies": {k: self.verifies(host, k) for k in self.effective},
        }


# --- reading ------------------------------------------------------------------------------


def read_seen(observed: EtcdObservation, status_prefix: str) -> Seen:
    """Every host's record, liveness and restart failures under the status prefix."""
    records: dict[str, Record] = {}
    live: set[str] = set()
    failures: dict[str, Failure] = {}
    for entry in observed.entries:
        host, sep, sub = entry.key[len(status_prefix) :].partition("/")
        host = host.lower()
        if not sep:
            records[host] = _record(host, entry.value)
        elif sub == WATCH_KEY or sub.startswith(WATCH_KEY + "/"):
            live.add(host)
        elif sub == RESTART_KEY:
            failures[host] = failure_of(entry)
    return Seen(records, frozenset(live), failures)


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
    mode = data.get("mode") if isinstance(data.get("mode"), str) else None
    since = None
    if isinstance(data.get("since"), str):
        try:
            since = parse_time(data["since"])
        except ValueError:
            return Record(host, frozenset(kids), problem="record's since is not RFC 3339")
    return Record(host, frozenset(kids), since, mode=mode)


def failure_of(entry: EtcdEntry) -> Failure:
    """A ``<host>/restart`` key as ``status`` shows it (whatever it holds)."""
    try:
        data = json.loads(entry.value)
    except (ValueError, RecursionError):
        data = None
    data = data if isinstance(data, dict) else {}
    count, error, since_text = data.get("failures"), data.get("error"), data.get("since")
    since = None
    if isinstance(since_text, str):
        with suppress(ValueError):
            since = parse_time(since_text)
    return Failure(
        count if isinstance(count, int) else 0,
        since,
        error if isinstance(error, str) else "no error recorded",
    )


# --- ages, skew and the state of a host -------------------------------------------------


def span(seconds: float) -> str:
    whole = int(abs(seconds))
    if whole < 60:
        return f"{whole}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def skew(record: Record | None, at: datetime) -> float | None:
    """Seconds the record is stamped ahead of ``at`` (this clock); None when it is not."""
    if record is None or record.since is None or record.since <= at:
        return None
    return (record.since - at).total_seconds()


def record_age(record: Record, at: datetime) -> str:
    if record.since is None:
        return "age unknown"
    ahead = skew(record, at)
    if ahead is not None:
        return f"since {format_time(record.since)} ({span(ahead)} in the future: clock skew)"
    return f"since {format_time(record.since)} ({span((at - record.since).total_seconds())} ago)"


def classify(seen: Seen, host: str, at: datetime, down_after: float) -> str:
    """unknown, lagging or down (see the module docstring), for a host not yet there."""
    record = seen.records.get(host)
    if record is None or record.problem is not None:
        return "unknown"
    if host in seen.live:
        return "lagging"
    if record.since is not None and (at - record.since).total_seconds() < down_after:
        return "lagging"
    return "down"


def describe(seen: Seen, host: str, at: datetime) -> str:
    """What is known of a host, for people: its record, its watch, its restarts."""
    record = seen.records.get(host)
    if record is None:
        parts = ["no status record"]
    elif record.problem is not None:
        parts = [f"unreadable status record: {record.problem}"]
    else:
        parts = [f"record {record_age(record, at)}"]
    parts.append("watch live" if host in seen.live else "no live watch")
    failure = seen.failures.get(host)
    if failure is not None:
        parts.append(_failing(failure))
    return "; ".join(parts)


def _failing(failure: Failure) -> str:
    since = f" since {format_time(failure.since)}" if failure.since else ""
    return f"restart failed {failure.count} time(s){since}, last: {for_terminal(failure.error)}"


def waiting_on(
    seen: Seen,
    hosts: tuple[str, ...],
    kid: str,
    absent: bool,
    at: datetime,
    down_after: float = DOWN_AFTER,
    skip: frozenset[str] = frozenset(),
) -> list[Lag]:
    """The fleet hosts that do not verify ``kid`` yet (with ``absent``: that may still).

    A host without a usable record is never taken as having reached either goal. The
    result is reached when every entry is ``skipped``.
    """
    lags = []
    for host in hosts:
        record = seen.records.get(host)
        if record is not None and record.problem is None and (kid in record.kids) != absent:
            continue
        state = "skipped" if host in skip else classify(seen, host, at, down_after)
        lags.append(Lag(host, state, describe(seen, host, at)))
    return lags


# --- status ---------------------------------------------------------------------------------


def fleet_status(
    plan: Plan,
    hosts: tuple[str, ...],
    seen: Seen,
    revoked: set[str],
    down_after: float = DOWN_AFTER,
) -> FleetStatus:
    """``plan`` is planned with nothing excluded: its bundle is the effective set."""
    effective = plan.kids_after
    at = plan.at
    items: list[str] = []
    for host in hosts:
        record = seen.records.get(host)
        state = classify(seen, host, at, down_after)
        if record is None:
            items.append(f"{host}: no status record ({state}: {describe(seen, host, at)})")
            continue
        if record.problem:
            items.append(f"{host}: {record.problem} ({state})")
            continue
        missing = [k for k in effective if k not in record.kids]
        if missing:
            items.append(
                f"{host} does not verify {', '.join(missing)} yet "
                f"({state}: {describe(seen, host, at)})"
            )
        elif host in seen.failures:
            items.append(f"{host}: {_failing(seen.failures[host])}")
        ahead = skew(record, at)
        if ahead is not None and ahead > SKEW_LIMIT:
            items.append(
                f"{host}'s status record is stamped {span(ahead)} in the future "
                f"({format_time(record.since or at)}): its clock or this one is off"
            )
    awaiting = tuple(k.kid for k in plan.keys if k.status == "untrusted" and k.kid and k.etcd_key)
    items += [f"key {kid} awaits review" for kid in awaiting]
    items += [w for w in plan.warnings if "expired" in w and "current key" in w]
    # With nothing excluded, the effective set holds every host's current key, so a
    # recorded kid outside it is a revoked or removed key that an apiserver still trusts.
    lingering: dict[str, tuple[str, ...]] = {}
    for host in hosts:
        record = seen.records.get(host)
        for kid in sorted(record.kids - set(effective)) if record else ():
            lingering[kid] = (*lingering.get(kid, ()), host)
    for kid, where in sorted(lingering.items()):
        label = "revoked" if kid in revoked else "removed"
        items.append(f"{label} key {kid} is still verified by {', '.join(where)}")
    return FleetStatus(
        at=at,
        cluster=plan.cluster,
        hosts=hosts,
        effective=effective,
        seen=seen,
        down_after=down_after,
        items=tuple(items),
        awaiting_review=awaiting,
        lingering=lingering,
        ignored=tuple(sorted(set(seen.records) - set(hosts))),
    )


def render_status(status: FleetStatus) -> str:
    """A kids x hosts table, a line per host, then one line per item that needs a person."""
    header = ["KID", *status.hosts]
    rows = [header]
    for kid in status.effective:
        rows.append([kid, *("yes" if status.verifies(h, kid) else "NO" for h in status.hosts)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for host in status.hosts:
        record = status.records.get(host)
        age = record_age(record, status.at) if record else "no status record"
        mode = f"; {record.mode} mode" if record and record.mode == "signer" else ""
        watch = "watch live" if host in status.seen.live else "no live watch"
        lines.append(f"{host}: {age}{mode}; {watch}")
    lines += [f"- {for_terminal(item)}" for item in status.items]
    if status.ignored:
        lines.append(
            f"note: ignored the status records of {len(status.ignored)} host(s) outside the "
            f"fleet: {', '.join(for_terminal(h) for h in status.ignored)} "
            "(`sakeystate prune` removes them)"
        )
    verdict = "in order" if status.in_order else f"{len(status.items)} item(s) need attention"
    lines.append(f"Fleet {status.cluster} at {format_time(status.at)}: {verdict}.")
    return "\n".join(lines) + "\n"
