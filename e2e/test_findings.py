"""Where three real kube-apiservers disagree with sakeystate's model, on a cluster of
their own. Each test states what the model promises and is marked ``xfail(strict)``
with the finding while the product disagrees, so that it flips (and fails, asking to
be unmarked) once the product is changed to match the apiserver.
"""

from __future__ import annotations

import threading
import time

import pytest

from harness import Cluster, Restart, overlaps
from scenario import Board, Disagreement, Scenario, agree, truthful_status


def test_wait_absent_waits_until_a_revoked_current_key_is_gone_from_every_apiserver(
    cluster: Cluster, board: Board
) -> None:
    """docs/SECURITY.md "Emergency: revoke a key now" for a host's *current* key. Found
    here: that host's apiserver loads the key from its own --service-account-key-file,
    which no converge changes, yet its status record left the kid out, so `wait
    --absent` returned while it still accepted the revoked key's tokens. Now the record
    always lists the host's own key: `wait --absent` keeps waiting, naming that host,
    until it is re-keyed (step 4), and then no apiserver accepts a revoked token."""
    s = Scenario(cluster, "finding: revoke a current key, wait --absent, re-key")
    leaked = cluster["ctrl1001"]
    peers = [p for p in cluster.planes if p is not leaked]
    assert leaked.key is not None
    kid = leaked.key.kid
    tokens = leaked.tokens()
    cluster.edit_state(
        lambda state: state.setdefault("revoked", []).append(
            {"fingerprint": kid, "reason": "e2e: current key exposed"}
        )
    )
    for plane in cluster.planes:
        plane.ok("converge", "--allow-removals")
    s.expect_rejected(tokens, peers, "revocation converged on the peers")
    early = leaked.ok("wait", "--kid", kid, "--absent", "--timeout", "5s", codes=(1,))
    assert leaked.name in early.err and all(p.name not in early.err for p in peers)
    agree(not truthful_status(cluster), "status records differ from TokenReview (revoked)")
    # Re-key the leaked host (the reimage procedure): its own apiserver drops the key.
    leaked.stop()
    leaked.wipe()
    leaked.install_key(cluster.issue_sa(leaked.name))
    leaked.ok("publish")
    leaked.ok("converge")
    for peer in peers:
        peer.ok("converge")
    leaked.ok("wait", "--kid", kid, "--absent", "--timeout", "2m")
    s.expect_rejected(tokens, cluster.planes, "wait --absent returned")
    differences = truthful_status(cluster)
    summary = s.summary()
    summary["truthful_differences"] = differences
    board.add(summary)
    accepted_on = sorted({r.plane for r in s.accepted_revoked})
    agree(not accepted_on, f"after wait --absent, {accepted_on} still accept {kid}")
    agree(not differences, f"status records differ from TokenReview: {differences}")


def _unready_overlaps(restarts: list[Restart]) -> list[tuple[Restart, Restart]]:
    """Pairs of restarts during which two apiservers were not ready at once: from the
    stop to the moment /readyz passed (the supervisor's 50 ms poll)."""
    ended = [
        Restart(r.host, r.began, r.spawned, r.ready, r.readyz, r.readyz, r.by_harness)
        for r in restarts
    ]
    return overlaps(ended)


@pytest.mark.xfail(
    strict=True,
    raises=Disagreement,
    reason="finding: kube-apiserver sends READY=1 (sd_notify) before /readyz passes "
    "(about a second later here); a bundle.reload that is `systemctl restart` of a "
    "Type=notify unit returns then, and without reload_check the reload lock is "
    "released while that apiserver is not ready: the next one stops, and two "
    "apiservers are unready at once. sakeystate cannot know when a restart command's "
    "apiserver is ready without reload_check: `validate` (and every command) now warns "
    "of a bundle.reload without one",
)
def test_without_reload_check_no_two_apiservers_are_unready_at_once(
    cluster: Cluster, board: Board
) -> None:
    """The contract: two apiservers never restart at once (the lock). Here the three
    converge at the same moment (as three Puppet runs or three watchers would) after a
    change that reaches every bundle, with ``bundle.reload`` and no ``reload_check``."""
    s = Scenario(cluster, "finding: no reload_check, concurrent converges")
    cluster.edit_state(lambda state: state["bundle"].pop("reload_check"))
    invalid = cluster.validate()
    try:
        if invalid.code != 0:
            return  # refusing such a state is a fix too
        ctrl1001 = cluster["ctrl1001"]
        leaf = cluster.issue_sa(ctrl1001.name)
        ctrl1001.write_next_key(leaf)
        ctrl1001.ok("publish", "--cert", str(cluster.mount / "pki" / "sa-next.pem"))
        threads = [
            threading.Thread(target=plane.ok, args=("converge",)) for plane in cluster.planes
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        for plane in cluster.planes:
            plane.api.wait_ready(120)
        time.sleep(1)
        restarts = s.restarts()
        summary = s.summary()
        summary["unready_overlaps"] = len(_unready_overlaps(restarts))
        summary["warnings"] = invalid.err.strip()
        board.add(summary)
        assert len(restarts) == 3, restarts
        agree(not _unready_overlaps(restarts), f"unready at once: {_unready_overlaps(restarts)}")
    finally:
        cluster.edit_state(
            lambda state: state["bundle"].__setitem__(
                "reload_check", cluster.default_state()["bundle"]["reload_check"]
            )
        )
