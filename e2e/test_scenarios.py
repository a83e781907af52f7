"""The scenarios of the end-to-end suite, on one cluster of three real kube-apiservers.

They run in this order on one cluster (each leaves it converged for the next, and each
restarts only the apiservers its procedure restarts): a same-key renewal, a reimage by
the documented procedure, a revocation, a reimage driven by ``watch``, the rotation of
every key after a compromise, a host that was down during a reimage, a decommission.
After each, the status record of every running apiserver must claim exactly the kids
its TokenReview authenticates (scenario 8).

Every count comes from kube-apiserver's TokenReview answers and the supervisors'
restart events; each test asserts the contract's zeros and its restart counts, and
records its numbers on the board (terminal summary, ``$SAKEYSTATE_E2E_RESULTS``).
"""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta

from harness import AcceptanceWatch, Cluster, ControlPlane, Token
from scenario import Board, Continuous, Scenario, truthful_status

WAIT = "5m"


def mounted_own_cert(cluster: Cluster) -> str:
    """own_cert as every host sees it (the state file's path)."""
    return str(cluster.mount / "pki" / "sa.pem")


def tokens_of(tokens: list[Token], kids: set[str]) -> list[Token]:
    return [t for t in tokens if t.kid in kids]


def check_truthful(cluster: Cluster, board: Board, after: str) -> None:
    """Scenario 8 after ``after``: every record says what its apiserver verifies."""
    differences = truthful_status(cluster)
    board.add(
        {
            "scenario": f"after scenario {after}",
            "kind": "truthful",
            "mismatched_hosts": len(differences),
            "differences": differences,
        }
    )
    assert not differences, f"status records differ from TokenReview after {after}: {differences}"


def converge_all(planes: list[ControlPlane], *args: str) -> None:
    for plane in planes:
        plane.ok("converge", *args)


def test_3_same_key_renewal_restarts_nothing(cluster: Cluster, board: Board) -> None:
    s = Scenario(cluster, "3 same-key renewal")
    tokens = [t for p in cluster.planes for t in p.tokens()]
    s.expect_valid(tokens, step="before")
    renewed = cluster["ctrl1001"]
    assert renewed.key is not None
    old_serial = renewed.key.cert.serial_number
    leaf = cluster.renew_sa(renewed.key)
    assert leaf.kid == renewed.key.kid and leaf.cert.serial_number != old_serial
    renewed.install_key(leaf)
    published = renewed.ok("publish")
    bundles = {p.short: p.bundle.read_bytes() for p in cluster.planes}
    converge_all(cluster.planes)
    assert {p.short: p.bundle.read_bytes() for p in cluster.planes} == bundles
    s.expect_valid(tokens, step="after the renewal")
    s.numbers["publish"] = published.out.strip()
    s.finish(board, expected_restarts={"ctrl1001": 0, "ctrl1002": 0, "ctrl1003": 0})
    check_truthful(cluster, board, "3")


def test_1_reimage_by_the_documented_procedure(cluster: Cluster, board: Board) -> None:
    """docs/reimage.md, with trust anchors: publish, converge, peers converge, wait --cert,
    pool. Old tokens verify everywhere throughout; the new key's tokens verify on every
    apiserver the moment wait returns."""
    s = Scenario(cluster, "1 reimage (docs/reimage.md, converge)")
    target = cluster["ctrl1002"]
    peers = [p for p in cluster.planes if p is not target]
    before = [t for p in cluster.planes for t in p.tokens()]
    s.expect_valid(before, step="before")
    old_kid = target.key.kid if target.key else ""
    with Continuous(s, before, peers):
        # 1. Reinstall, depooled: a new key and its certificate (the seed PKI's shape).
        target.stop()
        target.wipe()
        target.install_key(cluster.issue_sa(target.name))
        s.expect_valid(before, peers, "reinstalled")
        # 2. publish (--check says it would).
        target.ok("publish", "--check", codes=(2,))
        target.ok("publish")
        # 3. converge on the reimaged host: its bundle, then its apiserver (the reload).
        target.ok("converge")
        assert target.key is not None
        assert old_kid in target.bundle_kids() and target.key.kid not in target.bundle_kids()
        first = target.token("plain")  # the reimaged apiserver's first token
        assert first.kid == target.key.kid
        s.expect_valid([*before, first], [target], "reimaged host converged")
        with AcceptanceWatch(first, peers) as accepted:
            # 4. the peers converge (triggered by hand, as the procedure allows).
            for peer in peers:
                peer.ok("converge")
                s.expect_valid(before, cluster.planes, f"{peer.short} converged")
            # 5. wait until every fleet host's apiserver verifies the new key.
            target.ok("wait", "--cert", mounted_own_cert(cluster), "--timeout", WAIT)
            waited = time.time()
            # 6. pool: from now on every apiserver must accept the new key's tokens.
            s.expect_valid([first], cluster.planes, "pooled (wait returned)")
            assert accepted.wait(60), accepted.accepted
        s.window = accepted.window
        s.numbers["wait_returned_after_last_accept_s"] = round(
            waited - max(accepted.accepted.values()), 2
        )
        after = [t for p in cluster.planes for t in p.tokens()]
        everything = [*before, first, *after]
        s.expect_valid(everything, cluster.planes, "after pooling")
    # A further converge round changes nothing and restarts nothing.
    mark = time.time()
    converge_all(cluster.planes)
    assert not cluster.restarts(mark)
    s.expect_valid(everything, cluster.planes, "after a no-op converge round")
    s.finish(board, expected_restarts={"ctrl1001": 1, "ctrl1002": 1, "ctrl1003": 1})
    check_truthful(cluster, board, "1")


def test_4_revocation_then_wait_absent(cluster: Cluster, board: Board) -> None:
    """docs/SECURITY.md "Emergency: revoke a key now", for ctrl1002's pre-reimage key."""
    s = Scenario(cluster, "4 revocation, wait --absent")
    target = cluster["ctrl1002"]
    revoked = target.keys[-2].kid  # the key it signed with before scenario 1's reimage
    revoked_tokens = tokens_of(cluster.tokens, {revoked})
    assert revoked_tokens, "scenario 1 issued tokens with the old key"
    fresh = [t for p in cluster.planes for t in p.tokens()]
    s.expect_valid(revoked_tokens + fresh, step="before")
    cluster.edit_state(
        lambda state: state.setdefault("revoked", []).append(
            {"fingerprint": revoked, "reason": "e2e: private key exposed"}
        )
    )
    plan = target.ok("plan", "--format", "json")
    assert revoked in plan.out
    with Continuous(s, fresh, cluster.planes):
        converge_all(cluster.planes)
        target.ok("wait", "--kid", revoked, "--absent", "--timeout", WAIT)
        s.expect_rejected(revoked_tokens, cluster.planes, "wait --absent returned")
        s.expect_valid(fresh, cluster.planes, "after the revocation")
    # Deleted from etcd, whatever the layout (<prefix><kid> or <prefix><host>/<kid>).
    assert not [k for k in cluster.etcd_keys(cluster.key_prefix) if k.endswith(revoked)]
    s.numbers["revoked_tokens"] = len(revoked_tokens)
    s.finish(board, expected_restarts={"ctrl1001": 1, "ctrl1002": 1, "ctrl1003": 1})
    check_truthful(cluster, board, "4")


def wait_until(condition: object, timeout: float, what: str, interval: float = 0.1) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(interval)


def test_2_reimage_driven_by_watch(cluster: Cluster, board: Board) -> None:
    """``sakeystate watch`` on every control plane; ctrl1003 is reimaged into the SAN
    shape (its certificate names it; the service-account intermediate's anchor). Nobody
    converges by hand: publish, then ``wait --cert``, then pool. A fault on the way: the
    etcd member listed first (where every watcher's session started) is killed with
    SIGKILL just before the reimage, and comes back after it."""
    s = Scenario(cluster, "2 reimage (watch on all three, SAN shape, etcd member killed)")
    target = cluster["ctrl1003"]
    peers = [p for p in cluster.planes if p is not target]
    for plane in cluster.planes:
        plane.start_watch()
    # The watchers' first passes find everything in sync: no restart.
    assert not cluster.restarts(s.started)
    before = [t for p in cluster.planes for t in p.tokens()]
    s.expect_valid(before, step="before")
    with Continuous(s, before, peers):
        cluster.etcd_members[0].stop(signal.SIGKILL)
        cluster.reconnect()
        # The host goes down and is reinstalled; its watch service is down with it.
        assert target.stop_watch() == 0
        target.stop()
        target.wipe()
        target.install_key(cluster.issue_sa(target.name, shape="san"))
        target.ok("publish")
        target.start_watch(wait=False)  # boots: its first pass starts its apiserver (the reload)
        wait_until(target.running, 120, f"{target.short}'s apiserver started by its watcher")
        target.api.wait_ready(120)
        first = target.token("plain")
        assert first.kid == target.key.kid  # type: ignore[union-attr]
        with AcceptanceWatch(first, peers) as accepted:
            target.ok("wait", "--cert", mounted_own_cert(cluster), "--timeout", WAIT)
            waited = time.time()
            s.expect_valid([first], cluster.planes, "pooled (wait returned)")
            assert accepted.wait(60), accepted.accepted
        s.window = accepted.window
        s.numbers["wait_returned_after_last_accept_s"] = round(
            waited - max(accepted.accepted.values()), 2
        )
        after = [t for p in cluster.planes for t in p.tokens()]
        s.expect_valid([*before, first, *after], cluster.planes, "after pooling")
    codes = {p.short: p.stop_watch() for p in cluster.planes}
    assert codes == {p.short: 0 for p in cluster.planes}, codes
    cluster.etcd_members[0].start()  # rejoins with its data
    s.numbers["watch_passes"] = {
        p.short: (p.dir / "watch.log").read_text().count("sakeystate watch: pass ")
        for p in cluster.planes
    }
    s.finish(board, expected_restarts={"ctrl1001": 1, "ctrl1002": 1, "ctrl1003": 1})
    check_truthful(cluster, board, "2")


def shape_of(cluster: Cluster, plane: ControlPlane) -> str:
    assert plane.key is not None
    return "san" if plane.key.issuer is cluster.san_ca else "cn-sa"


def test_5_rotation_of_every_key_after_a_compromise(cluster: Cluster, board: Board) -> None:
    """docs/SECURITY.md "Emergency: rotate every key", step by step: the new keys are
    trusted everywhere first, then each apiserver signs with its new key, then every
    old key is revoked. No valid token is rejected on the way; afterwards no token of
    an old key verifies anywhere. Counts the human steps and the restarts."""
    s = Scenario(cluster, "5 rotate every key (docs/SECURITY.md)")
    planes = cluster.planes
    steps: list[str] = []
    before = [t for p in planes for t in p.tokens()]
    s.expect_valid(before, step="before")
    nexts = {}
    with Continuous(s, before, planes) as continuous:
        # 1-2. A new key and certificate beside the current ones on every host; publish it.
        for plane in planes:
            leaf = cluster.issue_sa(plane.name, shape_of(cluster, plane))
            nexts[plane.short] = leaf
            plane.write_next_key(leaf)
            steps.append(f"{plane.short}: issue sa-next.pem")
        for plane in planes:
            plane.ok("publish", "--cert", str(cluster.mount / "pki" / "sa-next.pem"))
            steps.append(f"{plane.short}: sakeystate publish --cert sa-next.pem")
        # 3. Every host converges: every bundle gains the three new keys (one restart each).
        for plane in planes:
            plane.ok("converge")
            steps.append(f"{plane.short}: sakeystate converge")
        # 4. Until every apiserver verifies every new key.
        for plane in planes:
            plane.ok(
                "wait", "--cert", str(cluster.mount / "pki" / "sa-next.pem"), "--timeout", WAIT
            )
            steps.append(f"{plane.short}: sakeystate wait --cert sa-next.pem")
        # 5. One host at a time: the new key becomes its signing key; converge restarts it.
        for plane in planes:
            plane.install_key(nexts[plane.short])
            steps.append(f"{plane.short}: move sa-next.pem, sa-next-key.pem into place")
            plane.ok("converge")
            steps.append(f"{plane.short}: sakeystate converge")
            fresh = plane.token("plain")
            assert fresh.kid == nexts[plane.short].kid
            # No window: every peer verified this key since step 4.
            s.expect_valid([fresh], planes, f"{plane.short} signs with its new key")
            continuous.add([fresh])
    new_kids = {leaf.kid for leaf in nexts.values()}
    status = cluster["ctrl1001"].ok("status", "--format", "json", codes=(0, 2))
    import json

    effective = set(json.loads(status.out)["effective_kids"])
    old_kids = effective - new_kids
    assert {p.keys[-2].kid for p in planes} <= old_kids
    after_tokens = [t for p in planes for t in p.tokens()]
    with Continuous(s, after_tokens, planes):
        # 6. Revoke every old key (one reviewed edit), converge everywhere.
        cluster.edit_state(
            lambda state: state.setdefault("revoked", []).extend(
                {"fingerprint": kid, "reason": "e2e: every key exposed"} for kid in sorted(old_kids)
            )
        )
        steps.append("edit the state file: revoke every old kid (status --format json)")
        refused = cluster["ctrl1001"].sakeystate("converge")
        s.numbers["converge_without_allow_removals"] = refused.code
        for plane in planes:
            plane.ok("converge", "--allow-removals")
            steps.append(f"{plane.short}: sakeystate converge --allow-removals")
        # 7. Until no apiserver verifies any old key.
        for kid in sorted(old_kids):
            cluster["ctrl1001"].ok("wait", "--kid", kid, "--absent", "--timeout", WAIT)
            steps.append(f"sakeystate wait --kid {kid[:8]}... --absent")
    revoked_tokens = tokens_of(cluster.tokens, old_kids)
    s.expect_rejected(revoked_tokens, planes, "every old key revoked")
    s.expect_valid(after_tokens, planes, "after the rotation")
    s.numbers["human_steps"] = len(steps)
    s.numbers["revoked_kids"] = len(old_kids)
    s.numbers["revoked_tokens"] = len(revoked_tokens)
    s.numbers["steps"] = steps
    s.finish(board, expected_restarts={"ctrl1001": 3, "ctrl1002": 3, "ctrl1003": 3})
    check_truthful(cluster, board, "5")


def test_7_a_host_down_during_a_reimage_converges_before_its_apiserver_starts(
    cluster: Cluster, board: Board
) -> None:
    """ctrl1001 is down while ctrl1002 is reimaged; when it comes back it converges
    before its apiserver starts (boot ordering: ``converge --no-reload``, then the
    apiserver, then the restart confirmed and the status record written), so the new
    key's tokens verify on it from its first answer."""
    s = Scenario(cluster, "7 host down during a reimage (boot ordering)")
    down, target, other = cluster["ctrl1001"], cluster["ctrl1002"], cluster["ctrl1003"]
    before = [t for p in cluster.planes for t in p.tokens()]
    s.expect_valid(before, step="before")
    down.stop()  # powered off
    target.stop()
    target.wipe()
    target.install_key(cluster.issue_sa(target.name))
    target.ok("publish")
    target.ok("converge")
    first = target.token("plain")
    other.ok("converge")
    s.expect_valid([*before, first], [target, other], "reimaged while ctrl1001 is down")
    lagging = target.sakeystate("wait", "--cert", mounted_own_cert(cluster), "--timeout", "3s")
    assert lagging.code == 1 and down.name in lagging.err, lagging
    # ctrl1001 boots: sakeystate before kube-apiserver.
    down.ok("converge", "--no-reload")
    assert target.key is not None and target.key.kid in down.bundle_kids()
    down.start()
    s.expect_valid([*before, first], [down], "returned host's first answers")
    down.ok("reload-done")
    down.ok("converge")  # the status record, now that the apiserver runs with the bundle
    record = down.status_record() or {}
    assert target.key.kid in record.get("kids", []), record
    target.ok("wait", "--cert", mounted_own_cert(cluster), "--timeout", WAIT)
    after = [t for p in cluster.planes for t in p.tokens()]
    s.expect_valid([*before, first, *after], cluster.planes, "after the return")
    s.numbers["wait_while_down_exit"] = lagging.code
    s.finish(board, expected_restarts={"ctrl1001": 1, "ctrl1002": 1, "ctrl1003": 1})
    check_truthful(cluster, board, "7")


DECOMMISSION_LIFETIME = 30


def test_6_decommission_tokens_verify_until_at_plus_lifetime_then_not(
    cluster: Cluster, board: Board
) -> None:
    """ctrl1003 is decommissioned with a max_token_lifetime of 30s; ``watch`` runs on the two
    others. Its tokens (TokenRequest, valid for an hour, and a legacy token, which never
    expires) verify there until at + 30s; the watchers' time-based pass then removes
    its keys, and they verify nowhere."""
    s = Scenario(cluster, f"6 decommission (max_token_lifetime {DECOMMISSION_LIFETIME}s, watch)")
    gone = cluster["ctrl1003"]
    rest = [p for p in cluster.planes if p is not gone]
    gone_tokens = gone.tokens()
    others = [t for p in rest for t in p.tokens()]
    s.expect_valid(gone_tokens + others, step="before")
    gone.stop()
    at = datetime.now(UTC).replace(microsecond=0)
    until = at + timedelta(seconds=DECOMMISSION_LIFETIME)

    def decommission(state: dict[str, object]) -> None:
        state["decommissioned"] = [{"host": gone.name, "at": at.strftime("%Y-%m-%dT%H:%M:%SZ")}]
        retention = state["retention"]
        assert isinstance(retention, dict)
        retention["max_token_lifetime"] = f"{DECOMMISSION_LIFETIME}s"

    cluster.edit_state(decommission)
    for plane in rest:
        plane.start_watch()
    with Continuous(s, gone_tokens + others, rest):
        time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds() - 3))
    assert not cluster.restarts(s.started), "nothing may change before at + max_token_lifetime"
    with Continuous(s, others, rest):
        deadline = time.monotonic() + 120
        while any(cluster.verifies(p, t) for p in rest for t in gone_tokens):
            assert time.monotonic() < deadline, "ctrl1003's keys still verify 2 minutes late"
            time.sleep(0.5)
        s.numbers["removed_after_s"] = round(time.time() - until.timestamp(), 2)
        # The watchers' passes end with the status record (after reload_check): stopping
        # a watcher before would abort its reload, which then stays owed.
        gone_kids = {leaf.kid for leaf in gone.keys}
        wait_until(
            lambda: all(
                not gone_kids & set((p.status_record() or {}).get("kids", [])) for p in rest
            ),
            120,
            "the remaining hosts' status records without ctrl1003's keys",
            interval=0.5,
        )
        s.expect_rejected(gone_tokens, rest, "after at + max_token_lifetime")
        s.expect_valid(others, rest, "after the decommission")
    codes = {p.short: p.stop_watch() for p in rest}
    assert codes == {p.short: 0 for p in rest}, codes
    s.finish(board, expected_restarts={"ctrl1001": 1, "ctrl1002": 1, "ctrl1003": 0})
    check_truthful(cluster, board, "6")
