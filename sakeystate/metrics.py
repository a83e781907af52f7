"""Prometheus metrics of converge, check and watch, with prometheus_client.

``samples(plan, reloaded)`` is pure: the gauges one run's Plan says. ``Metrics``
keeps them with the counters (runs by result, reloads) and the time of the last
success, and exposes them as a node_exporter textfile (written atomically by
prometheus_client's ``write_to_textfile``) and, for ``watch``, over HTTP. A
one-shot command starts its counters from the previous textfile, so they count
across runs as Prometheus counters must.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sakeystate.errors import SakeystateError

if TYPE_CHECKING:
    from sakeystate.plan import Plan

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
}


@dataclass(frozen=True)
class Sample:
    name: str
    value: float
    labels: Labels = ()


def samples(plan: Plan, reloaded: bool) -> list[Sample]:
    """The gauges a run's plan says; ``reloaded``: the run's reload succeeded."""
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
    pending = plan.reload is not None and not reloaded
    out.append(Sample("sakeystate_reload_pending", int(pending)))
    return out


@dataclass
class _Values:
    gauges: list[Sample] = field(default_factory=list)
    runs: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0.0))
    reloads: float = 0.0
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

    def record(
        self, result: str, at: datetime, plan: Plan | None = None, reloaded: bool = False
    ) -> None:
        """One run's outcome; without a plan (etcd unreadable) the gauges stay as they were."""
        old = self._values
        runs = {**old.runs, result: old.runs.get(result, 0.0) + 1}
        self._values = _Values(
            gauges=samples(plan, reloaded) if plan is not None else old.gauges,
            runs=runs,
            reloads=old.reloads + (1 if reloaded else 0),
            last_success=at.timestamp() if result in ("changed", "unchanged") else old.last_success,
        )
        if self.textfile:
            try:
                write_to_textfile(self.textfile, self._registry)
            except OSError as exc:
                raise SakeystateError(
                    f"cannot write --metrics-textfile {self.textfile}: {exc.strerror}"
                ) from None

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
            elif sample.name == "sakeystate_last_success_timestamp_seconds":
                values.last_success = float(sample.value)
            elif sample.name in _HELP:
                labels = tuple(sorted(sample.labels.items()))
                gauges.append(Sample(sample.name, float(sample.value), labels))
    values.gauges = gauges
    return values
