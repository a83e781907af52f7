"""`make bench` (and `make bench-e2e`): real restarts and the new-key window, measured on
three real kube-apiservers (the end-to-end harness, e2e/harness.py).

Rounds of reimages, one control plane at a time in turn, first by the documented
procedure with converge run by hand (publish, converge, peers converge, wait --cert),
then with `sakeystate watch` on all three (publish, wait --cert). For every restart
sakeystate ran (its `bundle.reload` asks the control plane's supervisor to restart
the apiserver, as `systemctl restart` would):

- stop: SIGTERM until the process exited;
- start: spawn until kube-apiserver's `READY=1` (sd_notify);
- ready: `READY=1` until `/readyz` first passed (polled every 50 ms);
- check: until sakeystate's `reload_check` saw it (it polls once a second);
- down: the whole restart, stop to check (the reload lock is held that long).

The new-key window: from the reimaged apiserver's first TokenRequest token to the
moment every peer's TokenReview accepted it (polled every 100 ms).

The table goes to stdout and into docs/BENCHMARKS.md between the
`bench-e2e:begin`/`bench-e2e:end` markers. `SAKEYSTATE_BENCH_E2E_ROUNDS` (default 3)
reimages per mode.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "e2e"), str(REPO / "tests")]

import benchdoc  # noqa: E402 - bench/ is sys.path[0] when run as a script
import binaries  # noqa: E402 - e2e/ is on sys.path now
from harness import AcceptanceWatch, Cluster, ControlPlane, Restart  # noqa: E402

DOC = benchdoc.DOC
BEGIN, END = "<!-- bench-e2e:begin -->", "<!-- bench-e2e:end -->"
ROUNDS = max(1, int(os.environ.get("SAKEYSTATE_BENCH_E2E_ROUNDS", "3")))


def reimage(cluster: Cluster, target: ControlPlane, watch: bool) -> float:
    """One reimage of ``target``; its new-key window."""
    peers = [p for p in cluster.planes if p is not target]
    own_cert = str(cluster.mount / "pki" / "sa.pem")
    if watch:
        assert target.stop_watch() == 0
    target.stop()
    target.wipe()
    target.install_key(cluster.issue_sa(target.name))
    target.ok("publish")
    if watch:
        target.start_watch(wait=False)  # boots: its first pass starts the apiserver
        deadline = time.monotonic() + 180
        while not target.running():
            assert time.monotonic() < deadline, f"{target.short} did not start"
            time.sleep(0.05)
        target.api.wait_ready(180)
    else:
        target.ok("converge")
    first = target.token("plain")
    with AcceptanceWatch(first, peers) as accepted:
        if not watch:
            for peer in peers:
                peer.ok("converge")
        target.ok("wait", "--cert", own_cert, "--timeout", "10m")
        assert accepted.wait(120), f"peers never accepted {first}: {accepted.accepted}"
    assert accepted.window is not None
    return accepted.window


def p50_max(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {max(values):.2f}"


def anatomy(restarts: list[Restart]) -> dict[str, list[float]]:
    parts: dict[str, list[float]] = {"stop": [], "start": [], "ready": [], "check": [], "down": []}
    for r in restarts:
        if r.ready is None or r.readyz is None or r.checked is None:
            continue
        parts["stop"].append(r.spawned - r.began)
        parts["start"].append(r.ready - r.spawned)
        parts["ready"].append(r.readyz - r.ready)
        parts["check"].append(r.checked - r.readyz)
        parts["down"].append(r.checked - r.began)
    return parts


def render(results: dict[str, object], started: float, load: tuple[str, str]) -> str:
    restarts = results["restarts"]
    windows = results["windows"]
    assert isinstance(restarts, dict) and isinstance(windows, dict)
    lines = [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC ({time.time() - started:.0f} s), "
        f"{ROUNDS} reimage(s) per mode, kube-apiserver {results['kube']}, "
        f"etcd {results['etcd']}, nproc {os.cpu_count()}, load average (start; end) "
        f"{load[0]}; {load[1]}.",
        "",
        "Restart of one apiserver by `bundle.reload` (seconds, p50 / max):",
        "",
        "| apiserver | restarts | stop | start (to READY=1) | READY=1 to /readyz "
        "| /readyz to reload_check | down (stop to check) |",
        "|---|---|---|---|---|---|---|",
    ]
    for host, parts in sorted(restarts.items(), key=lambda item: item[0] == "all"):
        lines.append(
            f"| {host} | {len(parts['down'])} | {p50_max(parts['stop'])} "
            f"| {p50_max(parts['start'])} | {p50_max(parts['ready'])} "
            f"| {p50_max(parts['check'])} | {p50_max(parts['down'])} |"
        )
    lines += [
        "",
        "New-key window: the reimaged apiserver's first token until every peer accepts it "
        "(seconds):",
        "",
        "| mode | reimages | p50 | max | all |",
        "|---|---|---|---|---|",
    ]
    for mode, values in windows.items():
        lines.append(
            f"| {mode} | {len(values)} | {statistics.median(values):.2f} | {max(values):.2f} "
            f"| {', '.join(f'{v:.1f}' for v in values)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    started = time.time()
    load_start = benchdoc.load_average()
    version = binaries.kube_versions()[0]
    kube = binaries.binary("kube-apiserver", version)
    etcd = os.environ.get("SAKEYSTATE_E2E_ETCD", "3.5")
    if etcd != "3.5":
        os.environ["SAKEYSTATE_ETCD"] = str(binaries.binary("etcd", etcd))
    windows: dict[str, list[float]] = {"converge by hand (docs/reimage.md)": [], "watch": []}
    with tempfile.TemporaryDirectory(prefix="sakeystate-bench-e2e-") as tmp:
        cluster = Cluster(Path(tmp), kube)
        try:
            cluster.start()
            mark = time.time()
            for round_ in range(ROUNDS):
                target = cluster.planes[round_ % len(cluster.planes)]
                windows["converge by hand (docs/reimage.md)"].append(
                    reimage(cluster, target, watch=False)
                )
            for plane in cluster.planes:
                plane.start_watch()  # until its first pass (in sync: no restart)
            for round_ in range(ROUNDS):
                target = cluster.planes[(round_ + 1) % len(cluster.planes)]
                windows["watch"].append(reimage(cluster, target, watch=True))
            for plane in cluster.planes:
                assert plane.stop_watch() == 0
            reloads = [r for r in cluster.restarts(mark) if not r.by_harness]
        finally:
            cluster.close()
    per_host = {
        host: anatomy([r for r in reloads if r.host == host])
        for host in sorted({r.host for r in reloads})
    }
    per_host["all"] = anatomy(reloads)
    load_end = benchdoc.load_average()
    results: dict[str, object] = {
        "kube": version,
        "etcd": etcd,
        "restarts": per_host,
        "windows": windows,
    }
    table = render(results, started, (load_start, load_end))
    print(table)
    print(f"python {platform.python_version()}")
    benchdoc.write_section(
        BEGIN,
        END,
        f"{BEGIN}\n\n{table}\n{END}",
        "End to end: real kube-apiservers (`bench/e2e.py`)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
