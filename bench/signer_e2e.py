"""`make bench` (and `make bench-e2e`): the new-key window in restart-free mode, measured
on three real kube-apiservers running with `--service-account-signing-endpoint`, each
served by `sakeystate signer` (the end-to-end harness, e2e/harness.py, signer mode).

Reimages, one control plane at a time in turn (default 20, `SAKEYSTATE_BENCH_SIGNER_
REIMAGES`): the host's apiserver and signer go down, it gets a new key and certificate
(trusted by the anchor), `sakeystate publish` puts it in etcd; then its signer and its
apiserver boot. Measured per reimage:

- new-key window: from `publish`'s exit (the key is in etcd) until every peer's
  TokenReview accepts a token signed with the new key (a probe token, signed by the
  harness with the new private key, reviewed on every peer every 100 ms from before
  the publish: an unknown kid to those apiservers until their signer serves it);
- served: from `publish`'s exit until each peer's signer logged a served set with it;
- boot: the reimaged host's signer start to its apiserver's /readyz;
- the reimaged apiserver's first TokenRequest token, presented once to every peer:
  counted when rejected (must be 0).

Asserted: no apiserver restarted other than the reimaged host's own boot (0 reloads).
Percentiles are nearest-rank over the reimages of one run (p99 of 20 is the maximum).
The table goes to stdout and into docs/BENCHMARKS.md between the
`bench-signer-e2e:begin`/`bench-signer-e2e:end` markers.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "e2e"), str(REPO / "tests")]

import benchdoc  # noqa: E402 - bench/ is sys.path[0] when run as a script
import binaries  # noqa: E402 - e2e/ is on sys.path now
from harness import AcceptanceWatch, Cluster, ControlPlane  # noqa: E402

DOC = benchdoc.DOC
BEGIN, END = "<!-- bench-signer-e2e:begin -->", "<!-- bench-signer-e2e:end -->"
REIMAGES = max(1, int(os.environ.get("SAKEYSTATE_BENCH_SIGNER_REIMAGES", "20")))
REFRESH_HINT = os.environ.get("SAKEYSTATE_BENCH_SIGNER_REFRESH_HINT", "60s")


def served_kids(plane: ControlPlane, since: int) -> set[str]:
    lines = [
        line
        for line in plane.signer_output()[since:].splitlines()
        if line.startswith("sakeystate signer: serving ")
    ]
    return set(lines[-1].rsplit(": ", 1)[-1].split(",")) if lines else set()


def reimage(cluster: Cluster, target: ControlPlane) -> dict[str, object]:
    peers = [p for p in cluster.planes if p is not target]
    target.stop()
    assert target.stop_signer() == 0
    target.wipe()
    target.install_key(cluster.issue_sa(target.name))
    assert target.key is not None
    kid = target.key.kid
    probe = cluster.probe(kid)
    offsets = {p.short: len(p.signer_output()) for p in peers}
    served: dict[str, float] = {}
    with AcceptanceWatch(probe, peers) as accepted:
        target.ok("publish")
        probe.issued = published = time.time()  # the window runs from here
        deadline = time.monotonic() + 120
        while len(served) < len(peers) or len(accepted.accepted) < len(peers):
            for peer in peers:
                if peer.short not in served and kid in served_kids(peer, offsets[peer.short]):
                    served[peer.short] = time.time()
            assert time.monotonic() < deadline, f"{kid} not accepted: {accepted.accepted}"
            time.sleep(0.05)
    window = accepted.window
    assert window is not None
    booted = target.start_signer()
    target.start()
    ready = time.time()
    first = target.token("plain")
    assert first.kid == kid
    rejected = sum(1 for peer in peers if not peer.api.review(first.value).authenticated)
    return {
        "window": window,
        "served": max(served.values()) - published,
        "boot": ready - booted,
        "first_rejected": rejected,
        "probe_rejections": sum(accepted.rejections.values()),
    }


def nearest_rank(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def row(name: str, values: list[float]) -> str:
    return (
        f"| {name} | {len(values)} | {nearest_rank(values, 50):.2f} "
        f"| {nearest_rank(values, 99):.2f} | {min(values):.2f} | {max(values):.2f} |"
    )


def main() -> int:
    started = time.time()
    load_start = benchdoc.load_average()
    version = binaries.kube_versions()[0]
    kube = binaries.binary("kube-apiserver", version)
    etcd = os.environ.get("SAKEYSTATE_E2E_ETCD", "3.5")
    if etcd != "3.5":
        os.environ["SAKEYSTATE_ETCD"] = str(binaries.binary("etcd", etcd))
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="sakeystate-bench-signer-") as tmp:
        cluster = Cluster(Path(tmp), kube, mode="signer", refresh_hint=REFRESH_HINT)
        try:
            cluster.start()
            mark = time.time()
            for number in range(REIMAGES):
                target = cluster.planes[number % len(cluster.planes)]
                result = reimage(cluster, target)
                results.append(result)
                print(
                    f"reimage {number + 1}/{REIMAGES} {target.short}: window "
                    f"{result['window']:.2f}s",
                    file=sys.stderr,
                    flush=True,
                )
            restarts = cluster.restarts(mark)
        finally:
            cluster.close()
    reloads = [r for r in restarts if not r.by_harness]
    boots = [r for r in restarts if r.by_harness]
    assert not reloads, f"apiservers restarted in signer mode: {reloads}"
    assert len(boots) == REIMAGES, boots  # each reimaged host's own boot, nothing else
    first_rejected = sum(int(str(r["first_rejected"])) for r in results)

    def column(name: str) -> list[float]:
        return [float(str(r[name])) for r in results]

    lines = [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC ({time.time() - started:.0f} s), "
        f"{REIMAGES} reimages, kube-apiserver {version}, etcd {etcd}, refresh_hint "
        f"{REFRESH_HINT}, nproc {os.cpu_count()}, load average (start; end) "
        f"{load_start}; {benchdoc.load_average()}, python {platform.python_version()}.",
        "",
        "| seconds | reimages | p50 | p99 | min | max |",
        "|---|---|---|---|---|---|",
        row("new-key window: publish until every peer accepts the new key", column("window")),
        row("publish until every peer's signer serves it", column("served")),
        row("reimaged host's boot: signer start to apiserver /readyz", column("boot")),
        "",
        f"apiserver restarts other than the reimaged host's own boot: {len(reloads)}; "
        f"the reimaged apiserver's first token rejected on first presentation to a peer: "
        f"{first_rejected} of {2 * REIMAGES}.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    benchdoc.write_section(
        BEGIN,
        END,
        f"{BEGIN}\n\n{table}\n{END}",
        "End to end in restart-free mode (`bench/signer_e2e.py`)",
    )
    assert first_rejected == 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
