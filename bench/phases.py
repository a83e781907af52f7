"""Where a no-op converge of many keys spends its time, phase by phase.

    .venv/bin/python bench/phases.py [KEYS]     (default 10000)

Starts its own etcd, loads KEYS cached certificates (bench/dataset.py), converges
once, then runs a child process per round that times each phase of a no-op
converge in-process: imports, the state file (YAML, then schema and semantic
checks), the etcd read, the bundle observation and the planner (which parses
every etcd value; that parse is also timed alone). Median of 5 rounds.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROUNDS = 5


def child(state_path: str) -> None:
    t0 = time.perf_counter()
    import yaml

    from sakeystate import bundle
    from sakeystate.etcd import EtcdStore
    from sakeystate.keys import parse_value
    from sakeystate.plan import plan
    from sakeystate.state import load_state, state_from_data

    t1 = time.perf_counter()
    desired = load_state(state_path)
    t2 = time.perf_counter()
    with open(state_path, encoding="utf-8") as handle:
        data = yaml.load(handle, Loader=yaml.CSafeLoader)
    t3 = time.perf_counter()
    state_from_data(data, state_path)
    t4 = time.perf_counter()
    with EtcdStore(desired.etcd) as store:
        observed = store.read(desired.etcd.prefix)
        requests = store.requests
    t5 = time.perf_counter()
    seen = bundle.observe(desired.bundle)
    t6 = time.perf_counter()
    result = plan(desired, observed, seen, datetime.now(UTC))
    t7 = time.perf_counter()
    for entry in observed.entries:
        parse_value(entry.value)
    t8 = time.perf_counter()
    assert not result.changed, result.actions[:3]
    print(
        json.dumps(
            {
                "imports": t1 - t0,
                "state file (load_state)": t2 - t1,
                "... of which schema and semantic checks (state_from_data)": t4 - t3,
                "etcd read": t5 - t4,
                "bundle observe": t6 - t5,
                "plan": t7 - t6,
                "... of which parsing every etcd value (parse_value)": t8 - t7,
                # Without the second, separately timed state validation (t2..t4).
                "total": (t2 - t0) + (t7 - t4),
                "range requests": requests,
            }
        )
    )


def main(keys: int) -> None:
    # bench/ is sys.path[0]: this file runs as a script.
    import dataset

    import bench

    root = Path(tempfile.mkdtemp(prefix="sakeystate-phases-"))
    (root / "etcd").mkdir()
    try:
        etcd = bench.Etcd(str(root / "etcd"))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        entries = dataset.entries(keys)
        cluster = bench.Cluster(etcd, "phases", root, [(e.kid, None) for e in entries])
        etcd.load(cluster.prefix, entries)
        cluster.write_state()
        cluster.sakeystate("converge", "-q")
        rounds = []
        for _ in range(ROUNDS):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(cluster.state)],
                capture_output=True,
                check=True,
                env=bench.child_env(),
            ).stdout
            rounds.append(json.loads(out))
    finally:
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"| phase of a no-op converge, {keys:,} keys | median of {ROUNDS} |")
    print("|---|---:|")
    for name in rounds[0]:
        value = statistics.median(r[name] for r in rounds)
        shown = f"{value:.0f}" if name == "range requests" else f"{value * 1000:.0f} ms"
        print(f"| {name} | {shown} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)
