"""`make bench` (second part): how fast `sakeystate watch` propagates a key-set change.

One local etcd, three `watch` processes (three hosts, three bundles, one shared
reload lock), a `bundle.reload` that sleeps 1-2 s and a `reload_check`. For each
of EVENTS events, alternately the publish of a new key certified by the cluster's
trust anchor (an etcd write) and a revocation (a state-file edit on every host):

- latency from the write to each bundle holding the new key set (p50, p99);
- time until all three reloads that followed finished;
- overlapping reloads (from the start/end times the reload command logs) and
  reloads per host per change.

Then the idle cost of one watcher over IDLE_SECONDS with nothing changing: etcd
requests by method (etcd's own /metrics), CPU seconds and RSS of the process.
Results go to stdout and into docs/BENCHMARKS.md between the
`propagation:begin`/`propagation:end` markers. This is a measurement, not a test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchdoc  # bench/ is sys.path[0] when run as a script
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from sakeystate.keys import format_time  # noqa: E402

from etcd_server import EtcdServer  # noqa: E402
from pki import Pki  # noqa: E402  (tests/pki.py: the cfssl-shaped PKI generator)
from watch_support import overlapping, probe, reloads  # noqa: E402

DOC = benchdoc.DOC
BEGIN, END = "<!-- propagation:begin -->", "<!-- propagation:end -->"
EVENTS = max(20, int(os.environ.get("SAKEYSTATE_BENCH_EVENTS", "21")))
IDLE_SECONDS = int(os.environ.get("SAKEYSTATE_BENCH_IDLE", "60"))
DEBOUNCE = 1.0
HOSTS = tuple(f"ctrl100{i}.eqiad.example.org" for i in (1, 2, 3))
PAUSES = (1.0, 1.5, 2.0)  # each host's reload sleeps this long
PREFIX = "/kube-apiserver-sa-certs/"
SAKEYSTATE = str(Path(sys.executable).parent / "sakeystate")
TICK = 0.005


@dataclass
class Event:
    kind: str  # "publish" | "revoke"
    latencies: list[float]  # per host: write -> bundle holds the new set
    reloads_done: float  # write -> the last of the three reloads finished


class Bench:
    def __init__(self, work: Path, etcd: EtcdServer) -> None:
        self.work, self.etcd = work, etcd
        self.pki = Pki()
        (work / "ca.pem").write_bytes(self.pki.ca_file())
        self.log = work / "reloads.log"
        self.revoked: list[dict[str, str]] = []
        self.expected: set[str] = set()
        self.leaves: list[Any] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def bundle(self, host: str) -> Path:
        return self.work / f"{host}.pem"

    def write_states(self) -> None:
        """One state per host (only bundle.path differs), replaced atomically."""
        for host, pause in zip(HOSTS, PAUSES, strict=True):
            data = {
                "apiVersion": "sakeystate/v1",
                "cluster": "bench",
                "host": "self",
                "fleet": list(HOSTS),
                "etcd": {"endpoints": [self.etcd.url], "prefix": PREFIX, "timeout": "5s"},
                "bundle": {
                    "path": str(self.bundle(host)),
                    "reload": probe(self.log, host, pause),
                    "reload_check": ["test", "-s", str(self.bundle(host))],
                    "reload_timeout": "2m",
                },
                "trust_anchors": [
                    {
                        "name": "bench-pki",
                        "ca_file": str(self.work / "ca.pem"),
                        "hosts": list(HOSTS),
                        "common_name": "sa",
                    }
                ],
                "trusted": [],
                "revoked": self.revoked,
                "retention": {"min_keys": 1, "max_removals": 2},
            }
            path = self.work / f"{host}.yaml"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(data, sort_keys=False))
            os.replace(tmp, path)

    def publish(self, index: int) -> None:
        host = HOSTS[index % len(HOSTS)]
        now = datetime.now(UTC)
        leaf = self.pki.sa(
            curve="p256", not_before=now - timedelta(days=1), not_after=now + timedelta(days=365)
        )
        self.leaves.append(leaf)
        value = f"Host: {host}\nPublished: {format_time(now)}\n".encode() + leaf.chained
        self.expected.add(leaf.kid)
        put = [self.etcd_ctl(), "--endpoints", self.etcd.url, "put", PREFIX + leaf.kid]
        subprocess.run(put, input=value, capture_output=True, check=True, env=_ctl_env())

    def revoke(self) -> None:
        leaf = self.leaves.pop(0)
        self.revoked.append({"fingerprint": leaf.kid, "reason": "bench"})
        self.expected.discard(leaf.kid)
        self.write_states()

    @staticmethod
    def etcd_ctl() -> str:
        from etcd_server import etcdctl_binary

        return etcdctl_binary()

    def start(self) -> None:
        for host in HOSTS:
            err = open(self.work / f"watch-{host}.log", "ab")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen(
                    [
                        SAKEYSTATE,
                        "watch",
                        "--state",
                        str(self.work / f"{host}.yaml"),
                        "--host",
                        host,
                        "--debounce",
                        f"{DEBOUNCE:g}s",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            )
            err.close()

    def in_sync(self, host: str) -> bool:
        path = self.bundle(host)
        if not path.exists():
            return False
        kids = {ln.split()[1] for ln in path.read_text().splitlines() if ln.startswith("# ")}
        return kids == self.expected

    def ends(self) -> Counter[str]:
        return Counter(r.name for r in reloads(self.log) if r.end is not None)

    def measure(self, kind: str, action: Any, reloads_before: Counter[str]) -> Event:
        started = time.monotonic()
        action()
        latencies: dict[str, float] = {}
        deadline = started + 120
        while len(latencies) < len(HOSTS) and time.monotonic() < deadline:
            for host in HOSTS:
                if host not in latencies and self.in_sync(host):
                    latencies[host] = time.monotonic() - started
            time.sleep(TICK)
        while time.monotonic() < deadline:
            ends = self.ends()
            if all(ends[h] > reloads_before[h] for h in HOSTS):
                break
            time.sleep(TICK * 4)
        done = time.monotonic() - started
        return Event(kind, [latencies.get(h, float("inf")) for h in HOSTS], done)

    def stop(self, keep: int = 0) -> None:
        for proc in self.procs[keep:]:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        self.procs = self.procs[:keep]


def _ctl_env() -> dict[str, str]:
    return {**os.environ, "ETCDCTL_API": "3"}


def grpc_handled(url: str) -> Counter[str]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total{"):
            method = re.search(r'grpc_method="([^"]+)"', line)
            if method:
                counts[method.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of the process, in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
    return int(found["VmRSS"]) / 1024, int(found["VmHWM"]) / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(work: Path, etcd: EtcdServer) -> str:
    bench = Bench(work, etcd)
    bench.publish(0)
    bench.publish(1)
    bench.publish(2)
    bench.write_states()
    bench.start()
    deadline = time.monotonic() + 120
    while not all(bench.in_sync(h) for h in HOSTS) or sum(bench.ends().values()) < 3:
        if time.monotonic() > deadline:
            raise SystemExit("the watchers did not converge at start")
        time.sleep(0.05)
    events: list[Event] = []
    for index in range(EVENTS):
        before = bench.ends()
        if index % 3 == 2:
            events.append(bench.measure("revoke", bench.revoke, before))
        else:
            number = len(bench.leaves)
            events.append(bench.measure("publish", lambda n=number: bench.publish(n), before))
    time.sleep(3)  # any late, duplicate reload would land in the log now
    runs = reloads(bench.log)
    per_host = Counter(r.name for r in runs)
    overlaps = overlapping(runs)
    bench.stop(keep=1)

    pid = bench.procs[0].pid
    requests_before, cpu_before = grpc_handled(etcd.url), cpu_seconds(pid)
    time.sleep(IDLE_SECONDS)
    idle_requests = grpc_handled(etcd.url) - requests_before
    idle_cpu = cpu_seconds(pid) - cpu_before
    rss, hwm = rss_mb(pid)
    bench.stop()

    latencies = [x for e in events if e.kind == "publish" for x in e.latencies]
    edits = [x for e in events if e.kind == "revoke" for x in e.latencies]
    done = [e.reloads_done for e in events]
    kinds = Counter(e.kind for e in events)
    p99 = percentile(latencies, 0.99)
    writes = sum(n for m, n in idle_requests.items() if m in ("Put", "Txn", "DeleteRange"))
    ranges = idle_requests.get("Range", 0)
    target = DEBOUNCE + 1
    lines = [
        BEGIN,
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average "
        + benchdoc.load_average()
        + f"; {len(events)} events ({kinds['publish']} publishes of an anchor-certified key, "
        f"{kinds['revoke']} revocations), three watchers, `--debounce {DEBOUNCE:g}s`, "
        f"reloads sleeping {'/'.join(f'{p:g}' for p in PAUSES)} s plus a `reload_check`.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| etcd write (publish) -> bundle holds the new set, p50 | "
        f"{percentile(latencies, 0.5):.2f} s | |",
        f"| etcd write (publish) -> bundle holds the new set, p99 | {p99:.2f} s | <= {target:g} s "
        f"({'met' if p99 <= target else 'NOT met'}) |",
        f"| state-file edit (revocation) -> bundles, p50 / p99 | "
        f"{percentile(edits, 0.5):.2f} s / {percentile(edits, 0.99):.2f} s | (stat once a "
        "second, then the debounce) |",
        f"| write -> all three reloads finished, p50 / max | "
        f"{statistics.median(done):.2f} s / {max(done):.2f} s | |",
        f"| overlapping reloads | {len(overlaps)} | 0 ({'met' if not overlaps else 'NOT met'}) |",
        f"| reloads per host (start + {len(events)} changes) | "
        + ", ".join(f"{per_host[h]}" for h in HOSTS)
        + f" | {len(events) + 1} each |",
        f"| idle {IDLE_SECONDS} s, etcd requests by method | "
        + (", ".join(f"{m} {n}" for m, n in sorted(idle_requests.items())) or "none")
        + f" | no writes ({'met' if writes == 0 else 'NOT met'}), no Range "
        f"({'met' if ranges == 0 else 'NOT met'}) |",
        f"| idle CPU | {idle_cpu:.2f} s = {100 * idle_cpu / IDLE_SECONDS:.2f} % of a core | "
        f"< 1 % ({'met' if idle_cpu / IDLE_SECONDS < 0.01 else 'NOT met'}) |",
        f"| watcher RSS now / peak | {rss:.0f} MB / {hwm:.0f} MB | <= 80 MB "
        f"({'met' if hwm <= 80 else 'NOT met'}) |",
        "",
        END,
    ]
    return "\n".join(lines)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sakeystate-propagation-"))
    etcd = EtcdServer(str(work)).start()
    try:
        section = run(work, etcd)
    finally:
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(section)
    benchdoc.write_section(BEGIN, END, section, "Propagation (`watch`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
