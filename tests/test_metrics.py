"""``--metrics-textfile``: parsed back with prometheus_client's own parser.

- After a converge the file carries the contract's metric set with the values the
  plan says: keys in the bundle, each verified key's notAfter, keys awaiting
  review, an expired certificate on a host's current key, no reload owed, one run
  "changed", one reload.
- Counters persist across one-shot runs: a second, no-op converge adds an
  "unchanged" run and keeps the rest; a run that cannot read etcd adds an "error"
  run and keeps the gauges and the time of the last success.
- ``converge --no-reload`` and ``check`` report the owed reload.
- The file is replaced atomically: no temporary file stays beside it. A broken
  previous file restarts the counters (what Prometheus reads as a reset); a file
  that cannot be written is a warning, never a failed converge or check.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conftest import Env
from etcd_server import free_port
from support import kid, private_key
from watch_support import probe

A, B, C = "ctrl1.example.org", "ctrl2.example.org", "ctrl3.example.org"
Values = dict[tuple[str, frozenset[tuple[str, str]]], float]


def values(path: Path) -> Values:
    out: Values = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def one(found: Values, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_converge_textfile_carries_the_metric_set_and_counts_across_runs(env: Env) -> None:
    expired_at = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    a, b, untrusted = (private_key("ec256", 100 + i) for i in range(3))
    k_a = env.publish(a, A, not_after=expired_at)
    k_b = env.publish(b, B)
    env.publish(untrusted, C)
    env.state([(k_a, A), (k_b, B)], bundle={"reload": probe(env.tmp / "reloads.log", "me")})
    textfile = env.tmp / "metrics" / "sakeystate.prom"
    textfile.parent.mkdir()

    assert env.cli("converge", "--metrics-textfile", str(textfile)).code == 0
    found = values(textfile)
    assert one(found, "sakeystate_bundle_keys") == 2
    assert one(found, "sakeystate_key_not_after_timestamp_seconds", kid=k_a, host=A) == (
        expired_at.timestamp()
    )
    assert (
        "sakeystate_key_not_after_timestamp_seconds",
        frozenset({("kid", kid(untrusted)), ("host", C)}),
    ) not in found
    assert one(found, "sakeystate_keys_awaiting_review") == 1
    assert one(found, "sakeystate_current_key_cert_expired", host=A) == 1
    assert one(found, "sakeystate_current_key_cert_expired", host=B) == 0
    assert one(found, "sakeystate_reload_pending") == 0
    assert one(found, "sakeystate_runs_total", result="changed") == 1
    assert one(found, "sakeystate_runs_total", result="unchanged") == 0
    assert one(found, "sakeystate_reloads_total") == 1
    success = one(found, "sakeystate_last_success_timestamp_seconds")
    assert [p.name for p in textfile.parent.iterdir()] == ["sakeystate.prom"]

    assert env.cli("converge", "--metrics-textfile", str(textfile)).code == 0
    found = values(textfile)
    assert one(found, "sakeystate_runs_total", result="changed") == 1
    assert one(found, "sakeystate_runs_total", result="unchanged") == 1
    assert one(found, "sakeystate_reloads_total") == 1
    assert one(found, "sakeystate_last_success_timestamp_seconds") >= success
    success = one(found, "sakeystate_last_success_timestamp_seconds")

    env.state(
        [(k_a, A), (k_b, B)],
        etcd={"endpoints": [f"http://127.0.0.1:{free_port()}"], "timeout": "1s"},
        bundle={"reload": probe(env.tmp / "reloads.log", "me")},
    )
    assert env.cli("converge", "--metrics-textfile", str(textfile)).code == 1
    found = values(textfile)
    assert one(found, "sakeystate_runs_total", result="error") == 1
    assert one(found, "sakeystate_runs_total", result="unchanged") == 1
    assert one(found, "sakeystate_bundle_keys") == 2
    assert one(found, "sakeystate_last_success_timestamp_seconds") == success


def test_a_broken_previous_textfile_restarts_the_counters(env: Env) -> None:
    key = env.publish(private_key("ec256", 104), A)
    env.state([(key, A)])
    textfile = env.tmp / "sakeystate.prom"
    textfile.write_bytes(b'sakeystate_runs_total{result="changed" 12\n\xff\x00garbage')
    result = env.cli("converge", "--metrics-textfile", str(textfile))
    assert result.code == 0, result.err
    assert one(values(textfile), "sakeystate_runs_total", result="changed") == 1


def test_an_unwritable_textfile_is_a_warning_not_a_failure(env: Env) -> None:
    key = env.publish(private_key("ec256", 105), A)
    env.state([(key, A)], bundle={"reload": ["true"]})
    missing = env.tmp / "no-such-directory" / "sakeystate.prom"
    result = env.cli("converge", "--metrics-textfile", str(missing))
    assert result.code == 0
    assert "warning: metrics not written" in result.err
    assert env.cli("check", "--metrics-textfile", str(missing)).code == 1  # in sync


def test_an_owed_reload_is_reported_by_converge_no_reload_and_by_check(env: Env) -> None:
    key = env.publish(private_key("ec256", 103), A)
    env.state([(key, A)], bundle={"reload": probe(env.tmp / "reloads.log", "me")})
    converged, checked = env.tmp / "converge.prom", env.tmp / "check.prom"
    assert env.cli("converge", "--no-reload", "--metrics-textfile", str(converged)).code == 0
    found = values(converged)
    assert one(found, "sakeystate_reload_pending") == 1
    assert one(found, "sakeystate_reloads_total") == 0
    assert env.cli("check", "--metrics-textfile", str(checked)).code == 0  # drift: owed
    found = values(checked)
    assert one(found, "sakeystate_reload_pending") == 1
    assert one(found, "sakeystate_runs_total", result="changed") == 1
    assert one(found, "sakeystate_bundle_keys") == 1
