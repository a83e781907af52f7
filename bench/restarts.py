"""`make bench` (third part): rolling restarts of a 5-host fleet with one sick apiserver.

Five `watch` processes (five hosts, one local etcd, one reload lock), each with a
`bundle.reload` detached with `setsid --wait` (as a systemd job is) that sleeps
RESTART seconds, and a `reload_check` that succeeds, except on one host, whose
check fails forever (an apiserver that never gets ready). For each of ROUNDS
publishes of a new pinned key:

- time from the publish to the last healthy host's completed restart (the
  restart's end, from the log the restart command writes), p50 and max, against
  2 x reload_timeout;
- how long each host waited for the lock before its restart (from the watchers'
  JSON lines), p50 and max per host;
- overlapping restarts, restarts cut short, and the sick host's attempts.

Results go to stdout and into docs/BENCHMARKS.md between the
`restarts:begin`/`restarts:end` markers. This is a measurement, not a test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import benchdoc  # bench/ is sys.path[0] when run as a script
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from sakeystate.keys import kid_of  # noqa: E402

from etcd_server import EtcdServer, etcdctl_binary  # noqa: E402
from support import entry_value  # noqa: E402
from watch_support import detached, overlapping, reloads  # noqa: E402

DOC = benchdoc.DOC
BEGIN, END = "<!-- restarts:begin -->", "<!-- restarts:end -->"
ROUNDS = max(3, int(os.environ.get("SAKEYSTATE_BENCH_RESTART_ROUNDS", "6")))
HOSTS = tuple(f"ctrl100{i}.eqiad.example.org" for i in range(1, 6))
SICK = HOSTS[2]
RELOAD_TIMEOUT = 10.0
RESTART = 0.5
DEBOUNCE = 0.2
PREFIX = "/kube-apiserver-sa-certs/"
SAKEYSTATE = str(Path(sys.executable).parent / "sakeystate")
FAIL = [sys.executable, "-c", "raise SystemExit(1)"]


def new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


class Bench:
    def __init__(self, work: Path, etcd: EtcdServer) -> None:
        self.work, self.etcd = work, etcd
        self.log = work / "restarts.log"
        self.keys = [new_key() for _ in HOSTS]
        self.pending = [new_key() for _ in range(ROUNDS)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def state(self, host: str) -> Path:
        return self.work / f"{host}.yaml"

    def bundle(self, host: str) -> Path:
        return self.work / f"{host}.pem"

    def write_states(self) -> None:
        owners = [*HOSTS, *(HOSTS[i % len(HOSTS)] for i in range(ROUNDS))]
        trusted = [
            {"fingerprint": kid_of(k.public_key()), "host": h}
            for k, h in zip([*self.keys, *self.pending], owners, strict=True)
        ]
        for host in HOSTS:
            data = {
                "apiVersion": "sakeystate/v1",
                "cluster": "bench",
                "host": "self",
                "fleet": list(HOSTS),
                "etcd": {"endpoints": [self.etcd.url], "prefix": PREFIX, "timeout": "5s"},
                "bundle": {
                    "path": str(self.bundle(host)),
                    "reload": detached(self.log, host, RESTART),
                    "reload_check": FAIL if host == SICK else ["true"],
                    "reload_timeout": f"{RELOAD_TIMEOUT:g}s",
                },
                "trusted": trusted,
                "retention": {"min_keys": 1, "max_removals": 2},
            }
            self.state(host).write_text(yaml.safe_dump(data, sort_keys=False))

    def put(self, key: Any, host: str) -> None:
        value = entry_value(key, host, datetime.now(UTC).replace(microsecond=0))
        put = [
            etcdctl_binary(),
            "--endpoints",
            self.etcd.url,
            "put",
            PREFIX + kid_of(key.public_key()),
        ]
        subprocess.run(put, input=value, capture_output=True, check=True, env=_ctl_env())

    def sakeystate(self, host: str, *args: str) -> None:
        argv = [SAKEYSTATE, *args, "--state", str(self.state(host)), "--host", host]
        subprocess.run(argv, capture_output=True, check=True)

    def start(self) -> None:
        for host in HOSTS:
            err = open(self.work / f"watch-{host}.log", "ab")  # noqa: SIM115
            argv = [SAKEYSTATE, "watch", "--state", str(self.state(host)), "--host", host]
            argv += ["--debounce", f"{DEBOUNCE:g}s", "--format", "json"]
            self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err))
            err.close()

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(timeout=60)

    def lock_waits(self) -> dict[str, list[float]]:
        waits: dict[str, list[float]] = defaultdict(list)
        for host in HOSTS:
            for line in (self.work / f"watch-{host}.log").read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == "restart" and event.get("lock_wait") is not None:
                    waits[host].append(float(event["lock_wait"]))
        return waits


def _ctl_env() -> dict[str, str]:
    return {**os.environ, "ETCDCTL_API": "3"}


def run(work: Path, etcd: EtcdServer) -> str:
    bench = Bench(work, etcd)
    bench.write_states()
    for key, host in zip(bench.keys, HOSTS, strict=True):
        bench.put(key, host)
    # A fleet that has run for a while: converged, its restarts confirmed.
    for host in HOSTS:
        bench.sakeystate(host, "converge", "--no-reload")
        bench.sakeystate(host, "reload-done")
    bench.start()
    time.sleep(3)
    healthy = [h for h in HOSTS if h != SICK]
    done: list[float] = []
    for index, key in enumerate(bench.pending):
        published = time.time()
        bench.put(key, HOSTS[index % len(HOSTS)])
        deadline = time.monotonic() + 10 * RELOAD_TIMEOUT
        while time.monotonic() < deadline:
            ends = {
                h: [
                    r.end
                    for r in reloads(bench.log)
                    if r.name == h and r.start > published and r.end
                ]
                for h in healthy
            }
            if all(ends.values()):
                done.append(max(min(e) for e in ends.values()) - published)
                break
            time.sleep(0.05)
        else:
            done.append(float("inf"))
        time.sleep(1)
    time.sleep(RELOAD_TIMEOUT + 2)  # a sick host's attempt in progress ends
    bench.stop()
    runs = reloads(bench.log)
    waits = bench.lock_waits()
    sick_attempts = sum(1 for r in runs if r.name == SICK)
    cut = sum(1 for r in runs if r.end is None)
    overlaps = overlapping(runs)
    bound = 2 * RELOAD_TIMEOUT
    worst = max(done)
    rows = [
        BEGIN,
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, load average "
        + benchdoc.load_average()
        + f"; {ROUNDS} publishes of a pinned key to five `watch` hosts on one etcd, "
        f"`--debounce {DEBOUNCE:g}s`, restarts detached with `setsid --wait` sleeping "
        f"{RESTART:g} s, `reload_timeout: {RELOAD_TIMEOUT:g}s`; {SICK}'s `reload_check` "
        "fails forever.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| publish -> last healthy host's restart done, p50 | {statistics.median(done):.2f} s | |",
        f"| publish -> last healthy host's restart done, max | {worst:.2f} s | <= 2 x "
        f"reload_timeout = {bound:g} s ({'met' if worst <= bound else 'NOT met'}) |",
        f"| overlapping restarts | {len(overlaps)} | 0 ({'met' if not overlaps else 'NOT met'}) |",
        f"| restarts cut short | {cut} | 0 ({'met' if not cut else 'NOT met'}) |",
        f"| {SICK}'s restart attempts (backoff 10 s, doubling) | {sick_attempts} | |",
        "",
        "| host | lock wait before its restart, p50 / max | restarts |",
        "|---|---|---:|",
    ]
    for host in HOSTS:
        values = waits.get(host, [])
        shown = f"{statistics.median(values):.2f} s / {max(values):.2f} s" if values else "-"
        label = f"{host} (check fails)" if host == SICK else host
        rows.append(f"| {label} | {shown} | {sum(1 for r in runs if r.name == host)} |")
    rows += ["", END]
    return "\n".join(rows)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sakeystate-restarts-"))
    etcd = EtcdServer(str(work)).start()
    try:
        section = run(work, etcd)
    finally:
        etcd.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(section)
    benchdoc.write_section(BEGIN, END, section, "Rolling restarts with one sick apiserver")
    return 0


if __name__ == "__main__":
    sys.exit(main())
