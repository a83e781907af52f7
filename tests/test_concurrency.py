"""Three control planes converging at once against one etcd, while a host publishes.

Each control plane is its own process with its own bundle path (and its own
``exclude_host``), looping converges; a fourth process plays the hosts and the
old tooling: it renews certificates through ``sakeystate publish``, re-creates
a legacy FQDN-keyed copy, puts back a revoked key and adds untrusted keys
awaiting review (a control plane being added). So the converges keep racing
each other to delete and to migrate, and racing the publisher's writes.

While they run, the test reads the prefix (one consistent range each time) and
every bundle, over and over: no trusted key may ever be missing from etcd, and
no bundle may ever hold anything but its policy's keys. Every run must end in
success or a clean refusal, and the final bundles must be what policy says.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta

import pytest

from sakeystate.keys import parse_pem_bundle

from conftest import Env
from support import T0, entry_value, kid, kids_held, make_cert, private_key, state_data, write_state

pytestmark = pytest.mark.slow

ROUNDS = 60
AT = "2026-11-22T10:00:00Z"
HOSTS = ["ctrl1.example.org", "ctrl2.example.org", "ctrl3.example.org"]

WORKER = r"""
import contextlib, io, json, sys
from sakeystate.cli import main
plan = json.load(open(sys.argv[1]))
client = None
if plan["role"] == "publisher":
    import etcd3
    client = etcd3.client(host="127.0.0.1", port=plan["port"], timeout=10)
with open(plan["log"], "w") as log:
    for number, step in enumerate(plan["steps"]):
        for kind, args in step:
            if kind == "put":
                client.put(args[0], args[1].encode())
                continue
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(args)
                except BaseException as exc:  # anything escaping main is a finding
                    import traceback
                    code, err = 99, io.StringIO(traceback.format_exc())
            log.write(json.dumps({"round": number, "command": args[0], "code": code,
                                  "out": out.getvalue(), "err": err.getvalue()}) + "\n")
            log.flush()
"""


def test_three_control_planes_and_a_publisher_never_lose_a_trusted_key(env: Env) -> None:
    current = [private_key("ec521", 90 + i) for i in range(3)]
    old_ctrl1 = private_key("rsa2048", 93)  # ctrl1's key before its reimage
    revoked = private_key("ec256", 94)
    # Published before the race: ctrl1's old key (superseded, within grace), then the
    # current keys of all three hosts.
    env.publish(old_ctrl1, HOSTS[0], published=T0 - timedelta(days=60))
    for key, host in zip(current, HOSTS, strict=True):
        env.publish(key, host, published=T0 - timedelta(days=1))
    trusted = [(kid(old_ctrl1), HOSTS[0])] + [
        (kid(k), h) for k, h in zip(current, HOSTS, strict=True)
    ]
    all_trusted = {k for k, _ in trusted}
    revoked_list = [{"fingerprint": kid(revoked), "reason": "exposed"}]

    bundles, states = [], []
    for index, host in enumerate(HOSTS):
        bundle = env.tmp / f"cp{index}" / "sa-certs.pem"
        bundle.parent.mkdir()
        data = state_data(
            env.etcd.url,
            env.prefix,
            bundle,
            trusted,
            host=host,
            bundle={"exclude_host": "self"},
            revoked=revoked_list,
            retention={"max_removals": 4},
        )
        states.append(write_state(env.tmp / f"cp{index}.yaml", data))
        bundles.append(bundle)
    # Policy: everything trusted, minus each control plane's own current key.
    expected = [all_trusted - {kid(current[i])} for i in range(3)]

    publisher_steps = []
    for number in range(ROUNDS):
        i = number % 3
        cert = env.tmp / f"renewal-{number}.pem"
        cert.write_bytes(
            make_cert(current[i], HOSTS[i], not_after=T0 + timedelta(days=365, hours=number))
        )
        step: list[tuple[str, list[str]]] = [
            (
                "cli",
                ["publish", "--state", str(states[i]), "--cert", str(cert), "--host", HOSTS[i]],
            ),
            (
                "put",
                [
                    env.prefix + HOSTS[1],
                    make_cert(current[1], HOSTS[1]).decode(),
                ],
            ),
            # An old key of ctrl3's (revoked since): older than its current key, so
            # ctrl3 still signs with the current one and leaves that out (R16).
            (
                "put",
                [
                    env.prefix + kid(revoked),
                    entry_value(revoked, HOSTS[2], published=T0 - timedelta(days=30)).decode(),
                ],
            ),
        ]
        if number % 10 == 0:
            newcomer = private_key("ec256", 100 + number)
            step.append(
                (
                    "put",
                    [
                        env.prefix + kid(newcomer),
                        entry_value(newcomer, "ctrl9.example.org", published=T0).decode(),
                    ],
                )
            )
        publisher_steps.append(step)

    plans = [
        {
            "role": "control-plane",
            "log": str(env.tmp / f"cp{index}.log"),
            "steps": [
                [
                    (
                        "cli",
                        ["converge", "--state", str(states[index]), "--format", "json"],
                    )
                ]
                for _ in range(ROUNDS)
            ],
        }
        for index in range(3)
    ] + [
        {
            "role": "publisher",
            "port": env.etcd.server.client_port,
            "log": str(env.tmp / "publisher.log"),
            "steps": publisher_steps,
        }
    ]
    workers = []
    for index, worker_plan in enumerate(plans):
        path = env.tmp / f"worker-{index}.json"
        path.write_text(json.dumps(worker_plan))
        workers.append(subprocess.Popen([sys.executable, "-c", WORKER, str(path)]))

    # Watch while they race.
    observations = missing_seen = bad_bundles = 0
    legacy_key = env.prefix + HOSTS[1]
    deadline = time.monotonic() + 180
    while any(w.poll() is None for w in workers):
        assert time.monotonic() < deadline, "workers did not finish"
        dump = env.dump()
        present = kids_held(dump) & all_trusted
        observations += 1
        if present != all_trusted:
            missing_seen += 1
        for bundle, kids in zip(bundles, expected, strict=True):
            try:
                content = bundle.read_bytes()
            except FileNotFoundError:
                continue
            keys, problems = parse_pem_bundle(content)
            if problems or {k.kid for k in keys} != kids:
                bad_bundles += 1
        time.sleep(0.005)
    assert [w.returncode for w in workers] == [0, 0, 0, 0]

    runs = outcomes = refusals = 0
    etcd_writes: Counter[str] = Counter()
    unclean = []
    for index in range(4):
        name = f"cp{index}.log" if index < 3 else "publisher.log"
        for line in (env.tmp / name).read_text().splitlines():
            record = json.loads(line)
            runs += 1
            if record["code"] == 0:
                outcomes += 1
                if record["command"] == "converge":
                    for action in json.loads(record["out"])["actions"]:
                        if action["target"] == "etcd":
                            etcd_writes[action["op"] + " " + action["key"]] += 1
            elif (
                record["code"] == 1
                and record["err"].startswith("sakeystate: error: ")
                and "kept changing" in record["err"]
                and "Traceback" not in record["err"]
            ):
                refusals += 1
            else:
                unclean.append(record)
    converge_rounds = sum(
        1 for i in range(3) for _ in (env.tmp / f"cp{i}.log").read_text().splitlines()
    )

    # After the race, one more converge each: the bundles are exactly the policy's.
    for index in range(3):
        result = env.cli("converge", "--state", str(states[index]), "--at", AT)
        assert result.code == 0, result
    final = [{k.kid for k in parse_pem_bundle(b.read_bytes())[0]} for b in bundles]
    dump = env.dump()
    lost = missing_seen + bad_bundles + len(unclean) + (final != expected)
    print(
        f"\nconcurrency: {ROUNDS} rounds x 3 control planes + 1 publisher = {runs} runs "
        f"({converge_rounds} converges); {outcomes} succeeded, {refusals} cleanly refused "
        f"(etcd kept changing); {observations} etcd snapshots watched; "
        f"{missing_seen} with a trusted key missing, {bad_bundles} off-policy bundle reads, "
        f"{len(unclean)} unclean endings; {lost} ended with anything lost"
    )
    assert not unclean, unclean[:3]
    assert missing_seen == 0
    assert bad_bundles == 0
    assert final == expected
    assert kids_held(dump) >= all_trusted
    assert kid(revoked) not in kids_held(dump)
    assert legacy_key not in dump
    # The publisher's renewals kept each key's original Published time.
    for key, host in zip(current, HOSTS, strict=True):
        assert b"Published: 2026-11-21T10:00:00Z" in dump[env.key(host, kid(key))]
    # Each re-created entry was removed by its owner's guarded write (R13: ctrl2 moves its
    # legacy copy, ctrl3 deletes its revoked key), racing the publisher's re-creations:
    # a losing write re-read and re-planned instead of acting on a stale read.
    deletes = etcd_writes[f"delete {env.prefix + kid(revoked)}"]
    migrations = etcd_writes[f"migrate {legacy_key}"]
    print(
        f"concurrency: {deletes} revoked-key deletes and {migrations} legacy migrations applied "
        f"for {ROUNDS} re-creations of each"
    )
    assert 0 < deletes <= ROUNDS
    assert 0 < migrations <= ROUNDS
