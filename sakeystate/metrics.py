"""Prometheus metrics of converge, check and watch, with prometheus_client.

``samples(plan, owed)`` is pure: the gauges one run's Plan says. ``Metrics``
keeps them with the counters (runs by result, reloads, failed reloads), the
restart's view of the cluster lock (``LockWait``: waiting, for how long, held by
whom) and the time of the last success, and exposes them as a node_exporter
textfile (rendered by prometheus_client, written with the bundle's safe atomic
writer) and, for ``watch``, over HTTP. A one-shot command starts its counters from
the previous textfile, so they count across runs as Prometheus counters must.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sakeystate.errors import SakeystateError

if TYPE_CHECKING:
    from sakeystate.plan import Plan
    from sakeystate.restart import Outcome

RESULTS = ("changed", "unchanged", "refused", "error")
MAX_TEXTFILE_BYTES = 4 * 1024 * 1024
Labels = tuple[tuple[str, str], ...]

_HELP = {
    "sakeystate_bundle_keys": "Keys in the bundle after the run",
    "sakeystate_key_not_after_timestamp_seconds": (
        "Certificate notAfter of each key this host's apiserver verifies (expiry removes "
        "nothing: renew before it)"
    ),
    "sakeystate_keys_awaiting_review": "Keys published in etcd that nothing trusts yet",
    "sakeystate_current_key_cert_expired": (
        "1 when the certificate of a host's current key has expired"
    ),
    "sakeystate_reload_pending": "1 while a reload of kube-apiserver is owed",
    "sakeystate_last_success_timestamp_seconds": "When a run last succeeded",
    "sakeystate_runs": "Runs, by result (changed, unchanged, refused, error)",
    "sakeystate_reloads": "Reloads of kube-apiserver that succeeded",
    "sakeystate_reload_failures": (
        "Restarts of kube-apiserver that failed (the command, or reload_check within "
        "reload_timeout)"
    ),
    "sakeystate_reload_consecutive_failures": "Failed restarts since the last one that succeeded",
    "sakeystate_reload_lock_waiting": "1 while this host waits for the cluster's reload lock",
    "sakeystate_reload_lock_wait_seconds": (
        "How long this host has waited for the reload lock (the current wait, else the last)"
    ),
    "sakeystate_reload_lock_holder_info": (
        "Who held the reload lock when this host last had to wait for it"
    ),
}


@dataclass(frozen=True)
class Sample:
    name: str
    value: float
    labels: Labels = ()


def samples(plan: Plan, owed: bool) -> list[Sample]:
    """The gauges a run's plan says; ``owed``: a restart is owed after the run."""
    keys = {k.kid: k for k in plan.keys if k.kid}
    out = [Sample("sakeystate_bundle_keys", len(plan.kids_after))]
    for kid in plan.verified_kids:
        report = keys.get(kid)
        if report is not None and report.not_after is not None:
            out.append(
                Sample(
                    "sakeystate_key_not_after_timestamp_seconds",
                    report.not_after.timestamp(),
                    (("host", report.host or ""), ("kid", kid)),
                )
            )
    awaiting = sum(1 for k in plan.keys if k.status == "untrusted" and k.kid and k.etcd_key)
    out.append(Sample("sakeystate_keys_awaiting_review", awaiting))
    for host, kid in plan.current:
        report = keys.get(kid)
        expired = bool(report and report.not_after and report.not_after <= plan.at)
        out.append(Sample("sakeystate_current_key_cert_expired", int(expired), (("host", host),)))
    out.append(Sample("sakeystate_reload_pending", int(owed)))
    return out


@dataclass(frozen=True)
class LockWait:
    """The restart's view of the cluster lock, for the gauges."""

    waiting: bool = False
    seconds: float = 0.0
    holder: str | None = None

    def samples(self, consecutive_failures: int) -> list[Sample]:
        out = [
            Sample("sakeystate_reload_lock_waiting", int(self.waiting)),
            Sample("sakeystate_reload_lock_wait_seconds", round(self.seconds, 3)),
            Sample("sakeystate_reload_consecutive_failures", consecutive_failures),
        ]
        if self.holder:
            out.append(Sample("sakeystate_reload_lock_holder_info", 1, (("holder", self.holder),)))
        return out


@dataclass
class _Values:
    gauges: list[Sample] = field(default_factory=list)
    runs: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0.0))
    reloads: float = 0.0
    failures: float = 0.0
    consecutive: int = 0
    lock: LockWait = field(default_factory=LockWait)
    last_success: float | None = None


class Metrics(Collector):
    """The metric set, as a prometheus_client collector (one snapshot, replaced whole,
    so the HTTP thread never sees half an update)."""

    def __init__(self, textfile: str | None = None, listen: str | None = None) -> None:
        self.textfile = textfile
        self._values = _previous(textfile) if textfile else _Values()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)
        if listen is not None:
            host, port = _address(listen)
            try:
                start_http_server(port, host, registry=self._registry)
            except OSError as exc:
                raise SakeystateError(
                    f"--metrics-listen {listen}: cannot listen: {exc.strerror}"
                ) from None

    def add(self, collector: Collector) -> None:
        """More metrics in the same textfile and HTTP endpoint (the signer's counters)."""
        self._registry.register(collector)

    def record(
        self,
        result: str,
        at: datetime,
        plan: Plan | None = None,
        restart: Outcome | None = None,
    ) -> None:
        """One run's (or watch pass's) outcome; without a plan (etcd unreadable) the
        gauges stay as they were. ``restart``: what became of its restart, if any."""
        old = self._values
        runs = {**old.runs, result: old.runs.get(result, 0.0) + 1}
        owed = restart.owed if restart is not None else plan is not None and plan.reload is not None
        self._values = replace(
            old,
            gauges=samples(plan, owed) if plan is not None else old.gauges,
            runs=runs,
            last_success=at.timestamp() if result in ("changed", "unchanged") else old.last_success,
        )
        if restart is not None:
            self.restart(restart)
        else:
            self._write()

    def restart(self, outcome: Outcome) -> None:
        """A restart ended (done, failed, or left owed): the counters and lock gauges."""
        old = self._values
        gauges = [
            Sample(g.name, int(outcome.owed)) if g.name == "sakeystate_reload_pending" else g
            for g in old.gauges
        ]
        lock = old.lock
        if outcome.lock_wait is not None:
            lock = LockWait(False, outcome.lock_wait, outcome.holder or old.lock.holder)
        # A run that never got to restart (the lock not obtained) is no failed restart.
        failed = outcome.failed is not None and outcome.attempted
        consecutive = old.consecutive
        if failed:
            consecutive += 1
        elif outcome.restarted:
            consecutive = 0
        self._values = replace(
            old,
            gauges=gauges,
            reloads=old.reloads + (1 if outcome.restarted else 0),
            failures=old.failures + (1 if failed else 0),
            consecutive=consecutive,
            lock=lock,
        )
        self._write()

    def waiting(self, seconds: float, holder: str | None) -> None:
        """While this host waits for the cluster lock (watch): who holds it, how long."""
        self._values = replace(
            self._values, lock=LockWait(True, seconds, holder or self._values.lock.holder)
        )
        self._write()

    def _write(self) -> None:
        if self.textfile:
            self._write_textfile(self.textfile)

    def _write_textfile(self, path: str) -> None:
        """With the bundle's writer: an exclusive, randomly named temporary, never a
        followed link, in a directory no other user can write to. prometheus_client's
        ``write_to_textfile`` opens ``<path>.<pid>.<thread>``, a name a local user can
        plant a symlink under, and root would then overwrite its target."""
        from sakeystate.bundle import write_atomic

        write_atomic(
            path,
            generate_latest(self._registry),
            0o644,
            setting=("--metrics-textfile", path),
            what="metrics textfile",
        )

    def collect(self) -> Iterator[Metric]:
        values = self._values
        families: dict[str, GaugeMetricFamily] = {}
        for sample in values.gauges:
            family = families.get(sample.name)
            if family is None:
                family = GaugeMetricFamily(
                    sample.name, _HELP[sample.name], labels=[k for k, _v in sample.labels]
                )
                families[sample.name] = family
            family.add_metric([v for _k, v in sample.labels], sample.value)
        yield from families.values()
        if values.last_success is not None:
            yield GaugeMetricFamily(
                "sakeystate_last_success_timestamp_seconds",
                _HELP["sakeystate_last_success_timestamp_seconds"],
                value=values.last_success,
            )
        runs = CounterMetricFamily("sakeystate_runs", _HELP["sakeystate_runs"], labels=["result"])
        for result, count in sorted(values.runs.items()):
            runs.add_metric([result], count)
        yield runs
        yield CounterMetricFamily(
            "sakeystate_reloads", _HELP["sakeystate_reloads"], value=values.reloads
        )
        yield CounterMetricFamily(
            "sakeystate_reload_failures",
            _HELP["sakeystate_reload_failures"],
            value=values.failures,
        )
        for sample in values.lock.samples(values.consecutive):
            family = GaugeMetricFamily(
                sample.name, _HELP[sample.name], labels=[k for k, _v in sample.labels]
            )
            family.add_metric([v for _k, v in sample.labels], sample.value)
            yield family


class SignerStats(Collector):
    """``sakeystate signer``'s metrics: FetchKeys answered, Sign requests by result, the
    served set's size and when it last changed. The gRPC threads count, the converge
    loop sets the rest; a scrape reads one consistent copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fetches = 0
        self._signs = {"signed": 0, "refused": 0}
        self._keys = 0
        self._changed: float | None = None

    def fetched(self) -> None:
        with self._lock:
            self._fetches += 1

    def signed(self, result: str) -> None:
        with self._lock:
            self._signs[result] += 1

    def served(self, keys: int, changed: datetime) -> None:
        with self._lock:
            self._keys, self._changed = keys, changed.timestamp()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            fetches, signs, keys, changed = (
                self._fetches,
                dict(self._signs),
                self._keys,
                self._changed,
            )
        yield CounterMetricFamily(
            "sakeystate_signer_fetch_keys", "FetchKeys calls answered", value=fetches
        )
        family = CounterMetricFamily(
            "sakeystate_signer_sign_requests", "Sign requests, by result", labels=["result"]
        )
        for result, count in sorted(signs.items()):
            family.add_metric([result], count)
        yield family
        yield GaugeMetricFamily("sakeystate_signer_keys", "Keys FetchKeys serves", value=keys)
        if changed is not None:
            yield GaugeMetricFamily(
                "sakeystate_signer_set_changed_timestamp_seconds",
                "When the served key set last changed (FetchKeys data_timestamp)",
                value=changed,
            )


def _address(listen: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``[V6]:PORT``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SakeystateError(f"--metrics-listen {listen!r} is not HOST:PORT (e.g. :9876)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _previous(path: str) -> _Values:
    """The counters and gauges of the previous textfile; nothing when it is missing or
    unreadable (a broken file restarts the counters, which Prometheus reads as a reset)."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_TEXTFILE_BYTES).decode("utf-8", "replace")
        families = list(text_string_to_metric_families(text))
    except Exception:  # unreadable, or anything the parser chokes on: start afresh
        return _Values()
    values = _Values()
    gauges: list[Sample] = []
    for family in families:
        for sample in family.samples:
            if sample.name == "sakeystate_runs_total":
                result = sample.labels.get("result", "")
                if result in RESULTS:
                    values.runs[result] = float(sample.value)
            elif sample.name == "sakeystate_reloads_total":
                values.reloads = float(sample.value)
            elif sample.name == "sakeystate_reload_failures_total":
                values.failures = float(sample.value)
            elif sample.name == "sakeystate_reload_consecutive_failures":
                values.consecutive = int(sample.value)
            elif sample.name == "sakeystate_reload_lock_wait_seconds":
                values.lock = replace(values.lock, seconds=float(sample.value))
            elif sample.name == "sakeystate_reload_lock_holder_info":
                values.lock = replace(values.lock, holder=sample.labels.get("holder"))
            elif sample.name.startswith("sakeystate_reload_lock_"):
                pass  # "waiting" belongs to the run that wrote it
            elif sample.name == "sakeystate_last_success_timestamp_seconds":
                values.last_success = float(sample.value)
            elif sample.name in _HELP:
                labels = tuple(sorted(sample.labels.items()))
                gauges.append(Sample(sample.name, float(sample.value), labels))
    values.gauges = gauges
    return values
