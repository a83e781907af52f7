"""`make bench-etcd`: the etcd client, before and after, and against OpenStack's etcd3gw.

One run, one 3-member etcd 3.5 on loopback, 50 keys:

1. no-op `sakeystate check` with 1 and with 3 endpoints, this tree against another
   (``--before REF``, default ``main``, exported with `git archive`), in rotating
   order round by round: wall time (median) and the gRPC requests etcd handled per run
   (from every member's /metrics): the cluster-ID check rides on response headers, so
   the "after" column must not grow with the number of endpoints;
2. one process that imports a client and reads the 50-key prefix: sakeystate's
   EtcdStore against etcd3gw (over etcd's gRPC gateway), when a Python with etcd3gw is
   given in ``SAKEYSTATE_ETCD3GW_PYTHON`` (``python -m venv X && X/bin/pip install
   etcd3gw``);
3. a watch across a member restart: the watch's member killed, a key published 1 s
   later, the member restarted 5 s after that: when each client delivers the event.

Prints a Markdown table; writes nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import dataset  # bench/dataset.py
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from etcd_cluster import Cluster, etcd_for  # noqa: E402

RUNS = max(5, int(os.environ.get("SAKEYSTATE_BENCH_RUNS", "7")))
PREFIX = "/bench/kube-apiserver-sa-certs/"


def requests(cluster: Cluster) -> Counter[str]:
    counts: Counter[str] = Counter()
    for member in cluster.members:
        with urllib.request.urlopen(member.direct_url + "/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("grpc_server_handled_total{"):
                    method = re.search(r'grpc_method="([^"]+)"', line)
                    if method:
                        counts[method.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def export(ref: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "sakeystate", "schema"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def check(tree: Path, state: Path) -> float:
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); from sakeystate.cli import main; "
        "sys.exit(main())"
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, "check", "-q", "--state", str(state)],
        capture_output=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 1:  # 1: in sync
        raise RuntimeError(f"check from {tree} exited {proc.returncode}: {proc.stderr[-800:]!r}")
    return seconds


def bench_check(cluster: Cluster, root: Path, before: str) -> list[str]:
    trees = {"after": REPO, f"before ({before})": export(before, root / "before")}
    rows = []
    for count in (1, 3):
        entries = dataset.entries(50)
        data = {
            "apiVersion": "sakeystate/v1",
            "cluster": "bench",
            "etcd": {"endpoints": cluster.endpoints()[:count], "prefix": PREFIX, "timeout": "5s"},
            "bundle": {"path": str(root / f"sa-{count}.pem")},
            "trusted": [{"fingerprint": e.kid} for e in entries],
        }
        state = root / f"state-{count}.yaml"
        state.write_text(yaml.safe_dump(data))
        subprocess.run(
            [sys.executable, "-m", "sakeystate", "converge", "-q", "--state", str(state)],
            check=True,
            cwd=REPO,
        )
        times: dict[str, list[float]] = {name: [] for name in trees}
        calls: dict[str, Counter[str]] = {}
        names = list(trees)
        for round_ in range(RUNS):
            for name in names[round_ % 2 :] + names[: round_ % 2]:
                seen = requests(cluster)
                times[name].append(check(trees[name], state))
                after = requests(cluster)
                calls[name] = Counter({k: after[k] - seen[k] for k in after if after[k] > seen[k]})
        ratio = statistics.median(
            a / b for a, b in zip(times["after"], times[names[1]], strict=True)
        )
        for name in names:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(calls[name].items()))
            note = (
                f"; after/before {ratio:.2f} (median of per-round ratios)"
                if name == "after"
                else ""
            )
            rows.append(
                f"| no-op check, 50 keys, {count} endpoint(s) | {name} | "
                f"{statistics.median(times[name]) * 1000:.0f} ms | requests: {shown}{note} |"
            )
    return rows


READ_OURS = """
import sys, time
t = time.perf_counter()
from sakeystate.etcd import EtcdStore
from sakeystate.state import EtcdConfig
with EtcdStore(EtcdConfig(endpoints=(sys.argv[1],), prefix=sys.argv[2])) as s:
    n = len(s.read(sys.argv[2]).entries)
print(n, time.perf_counter() - t)
"""
READ_GW = """
import sys, time
t = time.perf_counter()
from etcd3gw.client import Etcd3Client
host, port = sys.argv[1].rsplit("/", 1)[1].split(":")
n = len(Etcd3Client(host=host, port=int(port)).get_prefix(sys.argv[2]))
print(n, time.perf_counter() - t)
"""


def bench_read(cluster: Cluster, gw: str | None) -> list[str]:
    url = cluster.members[0].direct_url
    rows = []
    clients = {"sakeystate EtcdStore (gRPC)": (sys.executable, READ_OURS)}
    if gw:
        clients["etcd3gw 2.x (gRPC gateway, HTTP/JSON)"] = (gw, READ_GW)
    for name, (python, code) in clients.items():
        walls, inner = [], []
        for _ in range(RUNS):
            started = time.perf_counter()
            out = subprocess.run(
                [python, "-c", code, url, PREFIX], capture_output=True, text=True, check=True
            ).stdout.split()
            walls.append(time.perf_counter() - started)
            inner.append(float(out[1]))
            assert out[0] == "50", out
        rows.append(
            f"| read 50 keys in a new process | {name} | "
            f"{statistics.median(walls) * 1000:.0f} ms | import + read "
            f"{statistics.median(inner) * 1000:.0f} ms |"
        )
    return rows


WATCH_OURS = """
import sys, time
from sakeystate.etcd import EtcdStore, PrefixWatch
from sakeystate.state import EtcdConfig
with EtcdStore(EtcdConfig(endpoints=tuple(sys.argv[1].split(",")), prefix=sys.argv[2])) as s:
    rev = s.read(sys.argv[2]).revision
    w = PrefixWatch(s, [sys.argv[2]], rev + 1)
    print("ready", flush=True)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if w.wait(end - time.monotonic()):
            print("event", time.time(), flush=True)
            break
    else:
        print("none", flush=True)
"""
WATCH_GW = """
import sys, time
from etcd3gw.client import Etcd3Client
host, port = sys.argv[1].split(",")[0].rsplit("/", 1)[1].split(":")
events, cancel = Etcd3Client(host=host, port=int(port)).watch_prefix(sys.argv[2])
print("ready", flush=True)
try:
    for _ in events:
        print("event", time.time(), flush=True)
        break
except Exception as exc:
    print("error", type(exc).__name__, flush=True)
"""


def bench_watch(cluster: Cluster, gw: str | None) -> list[str]:
    rows = []
    clients = {"sakeystate PrefixWatch": (sys.executable, WATCH_OURS)}
    if gw:
        clients["etcd3gw watch_prefix"] = (gw, WATCH_GW)
    for index, (name, (python, code)) in enumerate(clients.items()):
        endpoints = ",".join(m.direct_url for m in cluster.members)
        proc = subprocess.Popen(
            [python, "-c", code, endpoints, PREFIX], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        cluster.members[0].kill()
        time.sleep(1)
        survivors = [m.direct_url for m in cluster.members[1:]]
        cluster._etcdctl("put", f"{PREFIX}watched-{index}", "x", endpoints=survivors)
        published = time.time()
        time.sleep(5)
        cluster.members[0].start()
        try:
            line = proc.communicate(timeout=40)[0].strip().split()
        except subprocess.TimeoutExpired:
            proc.kill()
            line = ["none"]
        cluster.wait_ready()
        if line and line[0] == "event":
            result = (
                f"delivered ({max(0.0, float(line[1]) - published):.1f} s after etcdctl returned)"
            )
        else:
            result = f"not delivered ({' '.join(line) or 'no output'})"
        rows.append(
            f"| watch; its member killed, publish 1 s later, member back 5 s later | {name} | "
            f"{result} | endpoints: {'all 3' if 'sakeystate' in name else 'one (no failover)'} |"
        )
    return rows


def main() -> int:
    before = sys.argv[sys.argv.index("--before") + 1] if "--before" in sys.argv else "main"
    gw = os.environ.get("SAKEYSTATE_ETCD3GW_PYTHON")
    binary = etcd_for("3.5")
    assert binary is not None
    root = Path(tempfile.mkdtemp(prefix="sakeystate-bench-etcd-"))
    (root / "before").mkdir()
    cluster = Cluster(root / "etcd", binary)
    try:
        cluster.start()
        for entry in dataset.entries(50):
            cluster.put(PREFIX + entry.kid, entry.value)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        rows = bench_check(cluster, root, before) + bench_read(cluster, gw)
        rows += bench_watch(cluster, gw)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"etcd client benchmark: {RUNS} runs each, etcd 3.5, 3 members; load {load}\n")
    print("| what | client | median | notes |\n|---|---|---|---|")
    print("\n".join(rows))
    if not gw:
        print("\n(etcd3gw not measured: set SAKEYSTATE_ETCD3GW_PYTHON)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
