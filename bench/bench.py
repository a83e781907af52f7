"""`make bench`: sakeystate against the shell pipeline it replaces and the etcd floor.

One run, one local etcd, everything side by side:

1. no-op `sakeystate check` with 3, 50 and 500 keys, against the per-key pipeline
   (`etcdctl get KEY --print-value-only | openssl x509 -noout -checkend 0`) and the
   floor (one `etcdctl get --prefix`); the three are run in rotating order in every
   round and the ratios are taken round by round, then the median;
2. `converge` with 1,000 and 10,000 keys: first run (no bundle yet) and no-op run,
   wall time and peak RSS of the process (wait4), and the 10k/1k growth, again
   round by round;
3. etcd requests per run, from etcd's own /metrics (grpc_server_handled_total);
4. reloads (apiserver restarts) per event: no-op, republish, same-key renewal,
   reimage, expiry;
5. `python -X importtime` per command: which heavy imports each one pays.

The result table goes to stdout and into docs/BENCHMARKS.md between the
`bench:begin`/`bench:end` markers; the prose around them is kept.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchdoc  # bench/benchdoc.py: bench/ is sys.path[0] when run as a script
import dataset
import yaml

from sakeystate.keys import kid_of

# The throwaway etcd is a test helper (tests/etcd_server.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from etcd_server import EtcdServer, etcd_binary, etcdctl_binary

REPO = Path(__file__).resolve().parent.parent
DOC = benchdoc.DOC
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
RUNS = max(5, int(os.environ.get("SAKEYSTATE_BENCH_RUNS", "5")))
CHECK_SIZES = (3, 50, 500)
CONVERGE_SIZES = (1000, 10000)
SAKEYSTATE = str(Path(sys.executable).parent / "sakeystate")
ETCDCTL = etcdctl_binary()
OPENSSL = shutil.which("openssl") or "openssl"
HEAVY = ("grpc", "etcd3", "cryptography", "jsonschema", "yaml")


def child_env() -> dict[str, str]:
    """The environment of every measured process.

    PYTHONDONTWRITEBYTECODE is dropped so that sakeystate's own modules are
    compiled once (by the warm-up run) and not on every measured run, as on an
    installed host.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["ETCDCTL_API"] = "3"
    return env


@dataclass
class Run:
    seconds: float
    max_rss_mb: float
    code: int
    out: bytes
    err: bytes


def run(argv: Sequence[str], expect: Iterable[int] = (0,)) -> Run:
    """Run ``argv``; wall time and the peak RSS of the process (and what it waited for)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=child_env())
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = Run(seconds, usage.ru_maxrss / 1024, code, out.read(), err.read())
    if code not in tuple(expect):
        raise RuntimeError(
            f"{' '.join(argv[:4])}... exited {code}, expected {tuple(expect)}: "
            f"{result.err.decode(errors='replace')[-1500:]}"
        )
    return result


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# --- etcd -------------------------------------------------------------------------------


class Etcd:
    """The benchmark's etcd: load keys in batched transactions, read its own metrics."""

    def __init__(self, data_dir: str) -> None:
        import etcd3

        self.server = EtcdServer(data_dir).start()
        self.client = etcd3.client(host="127.0.0.1", port=self.server.client_port, timeout=30)

    @property
    def url(self) -> str:
        return self.server.url

    def load(self, prefix: str, entries: Sequence[dataset.Entry]) -> None:
        # etcd's default --max-txn-ops is 128.
        for start in range(0, len(entries), 128):
            puts = [
                self.client.transactions.put(prefix + e.kid, e.value)
                for e in entries[start : start + 128]
            ]
            self.client.transaction(compare=[], success=puts, failure=[])

    def grpc_handled(self) -> Counter[str]:
        """Completed gRPC calls by method, as etcd counts them."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        counts: Counter[str] = Counter()
        for line in text.splitlines():
            if line.startswith("grpc_server_handled_total{"):
                method = re.search(r'grpc_method="([^"]+)"', line)
                if method:
                    counts[method.group(1)] += int(float(line.rsplit(" ", 1)[1]))
        return counts

    def since(self, before: Counter[str]) -> Counter[str]:
        after = self.grpc_handled()
        return Counter({k: after[k] - before[k] for k in after if after[k] - before[k] > 0})

    def requests_of(self, action: Callable[[], object]) -> Counter[str]:
        before = self.grpc_handled()
        action()
        return self.since(before)

    def stop(self) -> None:
        self.client.close()
        self.server.stop()


@dataclass
class Cluster:
    """One prefix in the etcd, with its own state file and bundle."""

    etcd: Etcd
    name: str
    root: Path
    trusted: list[tuple[str, str | None]] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    reload: list[str] | None = None

    @property
    def prefix(self) -> str:
        return f"/bench/{self.name}/kube-apiserver-sa-certs/"

    @property
    def state(self) -> Path:
        return self.root / self.name / "state.yaml"

    @property
    def bundle(self) -> Path:
        return self.root / self.name / "sa-certs.pem"

    def write_state(self) -> None:
        self.state.parent.mkdir(parents=True, exist_ok=True)
        bundle: dict[str, Any] = {"path": str(self.bundle)}
        if self.reload:
            bundle["reload"] = self.reload
        data = {
            "apiVersion": "sakeystate/v1",
            "cluster": f"bench-{self.name}",
            "etcd": {"endpoints": [self.etcd.url], "prefix": self.prefix, "timeout": "60s"},
            "bundle": bundle,
            # 10,000 entries with hosts would not fit the state file's 1 MiB limit;
            # the host comes from the etcd value's Host header instead.
            "trusted": [
                {"fingerprint": k, "host": h} if h else {"fingerprint": k} for k, h in self.trusted
            ],
            "revoked": [{"fingerprint": k, "reason": "bench"} for k in self.revoked],
            "retention": {
                "superseded_grace": "8760h",
                "min_keys": 1,
                "max_removals": 2,
            },
        }
        self.state.write_text(yaml.safe_dump(data, sort_keys=False))

    def sakeystate(self, command: str, *args: str, expect: Iterable[int] = (0,)) -> Run:
        return run([SAKEYSTATE, command, "--state", str(self.state), *args], expect)

    def drop_bundle(self) -> None:
        for path in (self.bundle, Path(f"{self.bundle}.reload-pending")):
            path.unlink(missing_ok=True)


# --- 1 and 3: no-op check against the pipeline and the floor ----------------------------


@dataclass
class CheckRow:
    keys: int
    check: list[float]
    floor: list[float]
    pipeline: list[float]
    check_requests: Counter[str]
    floor_requests: Counter[str]
    pipeline_requests: Counter[str]

    def ratio(self, top: list[float], bottom: list[float]) -> float:
        return median(a / b for a, b in zip(top, bottom, strict=True))


def pipeline_script(cluster: Cluster, kids: Sequence[str], path: Path) -> Path:
    """The shell the old deployment ran: one etcdctl and one openssl per key."""
    lines = ["set -o pipefail"]
    for kid in kids:
        lines.append(
            f"{ETCDCTL} --endpoints {cluster.etcd.url} get '{cluster.prefix}{kid}' "
            f"--print-value-only | {OPENSSL} x509 -noout -checkend 0 >/dev/null || exit 1"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_check(etcd: Etcd, root: Path, entries: Sequence[dataset.Entry]) -> list[CheckRow]:
    rows = []
    for size in CHECK_SIZES:
        cluster = Cluster(etcd, f"check-{size}", root, [(e.kid, None) for e in entries[:size]])
        etcd.load(cluster.prefix, entries[:size])
        cluster.write_state()
        cluster.sakeystate("converge", "-q")
        script = pipeline_script(cluster, [e.kid for e in entries[:size]], root / f"p{size}.sh")
        commands: dict[str, Callable[[], Run]] = {
            # check: exit 1 means in sync, which is what a no-op run must find.
            "check": lambda c=cluster: c.sakeystate("check", "-q", expect=(1,)),
            "floor": lambda c=cluster: run(
                [ETCDCTL, "--endpoints", c.etcd.url, "get", "--prefix", c.prefix]
            ),
            "pipeline": lambda s=script: run(["bash", str(s)]),
        }
        commands["check"]()  # warm-up: .pyc files, page cache
        commands["floor"]()
        times: dict[str, list[float]] = {name: [] for name in commands}
        requests: dict[str, Counter[str]] = {}
        order = list(commands)
        for round_ in range(RUNS):
            for name in order[round_ % 3 :] + order[: round_ % 3]:
                before = etcd.grpc_handled()
                times[name].append(commands[name]().seconds)
                requests[name] = etcd.since(before)
        rows.append(
            CheckRow(
                size,
                times["check"],
                times["floor"],
                times["pipeline"],
                requests["check"],
                requests["floor"],
                requests["pipeline"],
            )
        )
        print(f"  check {size} keys: done", file=sys.stderr)
    return rows


# --- 2 and 3: converge at 1,000 and 10,000 keys -----------------------------------------


@dataclass
class ConvergeRow:
    keys: int
    first: list[Run] = field(default_factory=list)
    noop: list[Run] = field(default_factory=list)
    first_requests: Counter[str] = field(default_factory=Counter)
    noop_requests: Counter[str] = field(default_factory=Counter)


def bench_converge(
    etcd: Etcd, root: Path, entries: Sequence[dataset.Entry]
) -> dict[int, ConvergeRow]:
    clusters = {}
    for size in CONVERGE_SIZES:
        cluster = Cluster(etcd, f"converge-{size}", root, [(e.kid, None) for e in entries[:size]])
        etcd.load(cluster.prefix, entries[:size])
        cluster.write_state()
        cluster.sakeystate("converge", "-q")  # warm-up
        clusters[size] = cluster
    rows = {size: ConvergeRow(size) for size in CONVERGE_SIZES}
    for _round in range(RUNS):
        for size, cluster in clusters.items():
            cluster.drop_bundle()
            # --detailed-exitcode: 2 = changed (the first run writes the bundle), 0 = no-op.
            rows[size].first.append(
                cluster.sakeystate("converge", "-q", "--detailed-exitcode", expect=(2,))
            )
            rows[size].noop.append(
                cluster.sakeystate("converge", "-q", "--detailed-exitcode", expect=(0,))
            )
    for size, cluster in clusters.items():
        blocks = cluster.bundle.read_bytes().count(b"-----BEGIN PUBLIC KEY-----")
        if blocks != size:
            raise RuntimeError(f"bundle of {cluster.name} holds {blocks} keys, not {size}")
        cluster.drop_bundle()
        row = rows[size]
        row.first_requests = etcd.requests_of(
            lambda c=cluster: c.sakeystate("converge", "-q", "--detailed-exitcode", expect=(2,))
        )
        row.noop_requests = etcd.requests_of(
            lambda c=cluster: c.sakeystate("converge", "-q", "--detailed-exitcode", expect=(0,))
        )
        print(f"  converge {size} keys: done", file=sys.stderr)
    return rows


# --- 4: reloads per event ---------------------------------------------------------------


@dataclass
class EventRow:
    event: str
    expected_reloads: int
    check_code: int
    bundle_written: bool
    reloads: int
    etcd_writes: int


def bench_events(etcd: Etcd, root: Path) -> list[EventRow]:
    """Three control planes; each event is followed by `check` and then `converge`."""
    now = datetime.now(UTC).replace(microsecond=0)
    counter = root / "reloads.log"
    counter.touch()
    cluster = Cluster(etcd, "events", root, reload=["sh", "-c", f"echo reload >> {counter}"])
    hosts = [f"ctrl{i}.bench.example.org" for i in range(3)]
    keys = [dataset.new_key() for _ in hosts]
    # The third host's certificate expires in two days; expiry removes nothing (it is no
    # event), so the last events revoke that host's key instead.
    not_after = [now + timedelta(days=365), now + timedelta(days=365), now + timedelta(days=2)]
    serial = iter(range(1, 1000))
    cert_dir = root / "certs"
    cert_dir.mkdir()

    def publish(index: int, key: Any, lifetime: timedelta | None = None) -> Path:
        number = next(serial)
        until = now + lifetime if lifetime else not_after[index]
        path = cert_dir / f"{hosts[index]}-{number}.pem"
        path.write_bytes(
            dataset.certificate(key, hosts[index], now - timedelta(days=1), until, number)
        )
        republish(path, index)
        return path

    def republish(path: Path, index: int) -> None:
        cluster.sakeystate("publish", "--cert", str(path), "--host", hosts[index])

    def trust(key: Any, index: int) -> None:
        cluster.trusted.append((kid_of(key.public_key()), hosts[index]))
        cluster.write_state()

    rows = []

    def event(name: str, expected_reloads: int, *at: str) -> None:
        reloads_before = len(counter.read_text().splitlines())
        bundle_before = cluster.bundle.read_bytes() if cluster.bundle.exists() else None
        check = cluster.sakeystate("check", "-q", *at, expect=(0, 1))
        requests = etcd.requests_of(lambda: cluster.sakeystate("converge", "-q", *at))
        reloads = len(counter.read_text().splitlines()) - reloads_before
        written = cluster.bundle.read_bytes() != bundle_before
        rows.append(EventRow(name, expected_reloads, check.code, written, reloads, requests["Txn"]))

    for index, key in enumerate(keys):
        trust(key, index)
    first = [publish(index, key) for index, key in enumerate(keys)]
    event("initial converge (3 control planes)", 1)
    event("no-op", 0)
    republish(first[0], 0)
    event("republish the same certificate", 0)
    publish(0, keys[0], timedelta(days=730))
    event("renewal with the same key", 0)
    reimaged = dataset.new_key()
    publish(1, reimaged)
    event("reimage: new key published, awaiting review", 0)
    trust(reimaged, 1)
    event("reimage: new key added to trusted", 1)
    cluster.revoked.append(kid_of(keys[2].public_key()))
    cluster.trusted = [t for t in cluster.trusted if t[0] not in cluster.revoked]
    cluster.write_state()
    event("revocation of a host's key", 1)
    event("no-op after the revocation", 0)
    print("  events: done", file=sys.stderr)
    return rows


# --- 5: imports per command -------------------------------------------------------------


@dataclass
class ImportRow:
    command: str
    seconds: float
    total_ms: float
    heavy_ms: dict[str, float]


def import_times(err: bytes) -> tuple[float, dict[str, float]]:
    """Total import time and each heavy package's share, in ms.

    A package's share is the cumulative time of its outermost modules (those not
    imported by another module of the same package), so it includes what only
    that package pulled in (protobuf for etcd3, referencing for jsonschema).
    """
    nodes = []
    for line in err.decode(errors="replace").splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)", line)
        if match:
            nodes.append((len(match.group(3)), match.group(4), int(match.group(2)) / 1000))
    total = 0.0
    heavy: dict[str, float] = {}
    # importtime prints a module after what it imported; reversed, parents come first.
    ancestors: list[tuple[int, str]] = []
    for depth, name, cumulative in reversed(nodes):
        while ancestors and ancestors[-1][0] >= depth:
            ancestors.pop()
        family = name.split(".")[0]
        if depth == 0:
            total += cumulative
        if family in HEAVY and all(a.split(".")[0] != family for _d, a in ancestors):
            heavy[family] = heavy.get(family, 0) + cumulative
        ancestors.append((depth, name))
    return total, heavy


def bench_imports(cluster: Cluster) -> list[ImportRow]:
    python = [sys.executable, "-X", "importtime", "-m", "sakeystate"]
    state = ["--state", str(cluster.state)]
    commands = [
        ("--version", [*python, "--version"], (0,)),
        ("validate", [*python, "validate", "-q", str(cluster.state)], (0,)),
        ("check (no-op)", [*python, "check", "-q", *state], (1,)),
        ("converge (no-op)", [*python, "converge", "-q", *state], (0,)),
    ]
    rows = []
    for name, argv, expect in commands:
        runs = [run(argv, expect) for _ in range(RUNS)]
        total, heavy = import_times(runs[-1].err)
        rows.append(ImportRow(name, median(r.seconds for r in runs), total, heavy))
    return rows


# --- the report -------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="utf-8") as handle:
        kib = int(next(line for line in handle if line.startswith("MemTotal")).split()[1])
    etcd_version = subprocess.run(
        [etcd_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "CPU": cpu,
        "memory": f"{kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "etcd": etcd_version,
        "openssl": subprocess.run(
            [OPENSSL, "version"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def requests_text(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {method}" for method, n in sorted(counts.items())) or "none"


@dataclass
class Results:
    started: str
    seconds: float
    load: tuple[str, str]
    host: dict[str, str]
    interpreter: float
    checks: list[CheckRow]
    converges: dict[int, ConvergeRow]
    events: list[EventRow]
    imports: list[ImportRow]


def growth(rows: dict[int, ConvergeRow], which: str) -> float:
    small, large = (getattr(rows[n], which) for n in CONVERGE_SIZES)
    return median(b.seconds / a.seconds for a, b in zip(small, large, strict=True))


def targets(r: Results) -> list[tuple[str, str, bool]]:
    from sakeystate.etcd import PAGE_SIZE

    check50 = next(c for c in r.checks if c.keys == 50)
    big = r.converges[max(CONVERGE_SIZES)]
    peak = max(x.max_rss_mb for x in big.first + big.noop)
    first, noop = median(x.seconds for x in big.first), median(x.seconds for x in big.noop)
    pages = -(-max(CONVERGE_SIZES) // PAGE_SIZE)
    events = r.events[1:]  # the initial converge is the set-up, not an event
    return [
        (
            "no-op check at 50 keys <= 3x `etcdctl get --prefix`",
            f"{check50.ratio(check50.check, check50.floor):.2f}x",
            check50.ratio(check50.check, check50.floor) <= 3,
        ),
        (
            "no-op check at 50 keys >= 10x faster than the per-key pipeline",
            f"{check50.ratio(check50.pipeline, check50.check):.2f}x",
            check50.ratio(check50.pipeline, check50.check) >= 10,
        ),
        ("converge, 10,000 keys, first run <= 5 s", ms(first), first <= 5),
        ("converge, 10,000 keys, peak RSS <= 250 MB", f"{peak:.0f} MB", peak <= 250),
        ("no-op converge, 10,000 keys <= 2 s", ms(noop), noop <= 2),
        (
            "time(10k)/time(1k) <= 12 (first run; no-op)",
            f"{growth(r.converges, 'first'):.2f}; {growth(r.converges, 'noop'):.2f}",
            max(growth(r.converges, "first"), growth(r.converges, "noop")) <= 12,
        ),
        (
            f"no-op check: one Range request; 10,000 keys: one per page ({PAGE_SIZE} keys)",
            "; ".join(requests_text(c.check_requests) for c in r.checks)
            + f"; 10k: {requests_text(big.noop_requests)}",
            all(c.check_requests == Counter(Range=1) for c in r.checks)
            and big.noop_requests == Counter(Range=pages),
        ),
        (
            "restarts: 0 for no-op, republish, same-key renewal; 1 per trusted-set change",
            ", ".join(f"{e.reloads} (expected {e.expected_reloads})" for e in events),
            all(e.reloads == e.expected_reloads for e in events),
        ),
    ]


def render(r: Results) -> str:
    out = [BEGIN, "", f"Run {r.started} ({r.seconds:.0f} s), median of {RUNS} runs each.", ""]
    out += ["| machine | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in r.host.items()]
    out += [f"| load average (start, end) | {r.load[0]}; {r.load[1]} |", ""]
    out += [
        "### 1. No-op `check` against the per-key pipeline and the etcd floor",
        "",
        "| keys | `sakeystate check` | floor: `etcdctl get --prefix` | per-key pipeline "
        "| check / floor | pipeline / check | etcd requests: check; floor; pipeline |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in r.checks:
        out.append(
            f"| {c.keys} | {ms(median(c.check))} | {ms(median(c.floor))} "
            f"| {ms(median(c.pipeline))} | {c.ratio(c.check, c.floor):.1f}x "
            f"| {c.ratio(c.pipeline, c.check):.1f}x | {requests_text(c.check_requests)}; "
            f"{requests_text(c.floor_requests)}; {requests_text(c.pipeline_requests)} |"
        )
    out += [
        "",
        f"The Python interpreter alone (`python -c pass`) starts in {ms(r.interpreter)}.",
        "",
        "### 2. `converge` at 1,000 and 10,000 keys",
        "",
        "| keys | first run | peak RSS | no-op run | peak RSS | etcd requests: first run; no-op |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for size, row in r.converges.items():
        out.append(
            f"| {size:,} | {ms(median(x.seconds for x in row.first))} "
            f"| {max(x.max_rss_mb for x in row.first):.0f} MB "
            f"| {ms(median(x.seconds for x in row.noop))} "
            f"| {max(x.max_rss_mb for x in row.noop):.0f} MB "
            f"| {requests_text(row.first_requests)}; {requests_text(row.noop_requests)} |"
        )
    out += [
        f"| 10k / 1k | {growth(r.converges, 'first'):.1f}x | | "
        f"{growth(r.converges, 'noop'):.1f}x | | |",
        "",
        "Peak RSS is the largest of the runs (wait4 `ru_maxrss` of the process).",
        "",
        "### 3. Reloads (apiserver restarts) per event",
        "",
        "| event | `check` exit (0 drift, 1 in sync) | bundle written | reloads "
        "| expected | etcd Txn by converge |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for e in r.events:
        out.append(
            f"| {e.event} | {e.check_code} | {'yes' if e.bundle_written else 'no'} "
            f"| {e.reloads} | {e.expected_reloads} | {e.etcd_writes} |"
        )
    out += [
        "",
        "### 4. Imports per command (`python -X importtime -m sakeystate ...`, 50 keys)",
        "",
        "| command | wall | all imports | " + " | ".join(HEAVY) + " |",
        "|---|---:|---:|" + "---:|" * len(HEAVY),
    ]
    for i in r.imports:
        heavy = " | ".join(f"{i.heavy_ms[h]:.0f} ms" if h in i.heavy_ms else "-" for h in HEAVY)
        out.append(f"| {i.command} | {ms(i.seconds)} | {i.total_ms:.0f} ms | {heavy} |")
    out += [
        "",
        "Each package column is the cumulative import time of that package's outermost "
        "modules; etcd3 includes grpc and protobuf.",
        "",
        "### Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    out += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets(r)]
    out += ["", END]
    return "\n".join(out)


def main() -> int:
    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = benchdoc.load_average()
    print(f"sakeystate benchmark, {RUNS} runs each; generating/loading keys", file=sys.stderr)
    entries = dataset.entries(max(CONVERGE_SIZES))
    root = Path(tempfile.mkdtemp(prefix="sakeystate-bench-"))
    try:
        (root / "etcd").mkdir()
        etcd = Etcd(str(root / "etcd"))
        try:
            interpreter = median(run([sys.executable, "-c", "pass"]).seconds for _ in range(RUNS))
            checks = bench_check(etcd, root, entries)
            converges = bench_converge(etcd, root, entries)
            events = bench_events(etcd, root)
            imports = bench_imports(Cluster(etcd, "check-50", root))
        finally:
            etcd.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = Results(
        stamp,
        time.perf_counter() - started,
        (load_start, benchdoc.load_average()),
        machine(),
        interpreter,
        checks,
        converges,
        events,
        imports,
    )
    section = render(results)
    print(section)
    benchdoc.write_section(BEGIN, END, section)
    print(f"written to {DOC.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
