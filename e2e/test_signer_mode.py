"""Restart-free mode (issue 21, R22) against three real kube-apiservers.

One cluster, booted in file mode, then in this order (each leaves it for the next):

- S4a the migration file mode -> signer mode, one host at a time, tokens flowing:
  one restart per host, no valid token rejected;
- S1 a reimage with trust anchors in signer mode: no apiserver restarts; the
  reimaged apiserver's first token verifies on every peer on its first
  presentation; old and new tokens verify throughout;
- S2 a revocation in signer mode: the revoked key's tokens are rejected by every
  apiserver within the refresh hint plus the revocation's landing (measured), and
  ``wait --absent`` returns;
- S3 the signer killed and restarted on one host: that host's apiserver keeps
  verifying (its cached set), its TokenRequest fails while the signer is down and
  succeeds again after (measured);
- S4b the migration back, signer mode -> file mode: one restart per host, no
  valid token rejected.

Timings are measured and printed (and recorded on the board); no test asserts a
wall-clock time except generous bounds that only catch "never".
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

import binaries
import kube
from harness import (
    ISSUER,
    NAMESPACE,
    SERVICE_ACCOUNT,
    Cluster,
    ControlPlane,
    ReviewWatch,
    Token,
)
from scenario import Board, Continuous, Scenario, truthful_status

WAIT = "5m"
REFRESH_HINT = 15  # signer.refresh_hint, seconds: bounds how long a revoked key verifies
OUTAGE = 10.0  # how long the killed signer stays down


_VERSIONS: dict[int, str] = {}


@pytest.fixture(scope="module", params=binaries.kube_versions())
def live(
    request: pytest.FixtureRequest,
    namespaces: None,
    etcd_binary: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Three control planes on one etcd member, booted in file mode (S4a migrates them),
    on each configured release (``E2E_KUBE=v1.37.2,v1.34.4``: the oldest signer-mode
    release too, where ExternalJWTSigner is beta and on by default)."""
    version = str(request.param)
    kube_apiserver = binaries.binary("kube-apiserver", version)
    root = tmp_path_factory.mktemp(f"signer-{version}")
    cluster = Cluster(root, kube_apiserver, refresh_hint=f"{REFRESH_HINT}s")
    _VERSIONS[id(cluster)] = version
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
        _VERSIONS.pop(id(cluster), None)


def title(cluster: Cluster, name: str) -> str:
    """A scenario's name on the board, with the release when several run."""
    if len(binaries.kube_versions()) == 1:
        return name
    return f"{name} ({_VERSIONS.get(id(cluster), '?')})"


# --- helpers ------------------------------------------------------------------------------


def mounted_own_cert(cluster: Cluster) -> str:
    return str(cluster.mount / "pki" / "sa.pem")


def fresh_tokens(cluster: Cluster, planes: list[ControlPlane] | None = None) -> list[Token]:
    return [t for p in (planes or cluster.planes) for t in p.tokens()]


def check_truthful(cluster: Cluster, board: Board, after: str) -> None:
    """Scenario 8: every status record claims exactly what its apiserver verifies."""
    after = title(cluster, after)
    differences = truthful_status(cluster)
    board.add(
        {
            "scenario": f"after {after}",
            "kind": "truthful",
            "mismatched_hosts": len(differences),
            "differences": differences,
        }
    )
    assert not differences, f"status records differ from TokenReview after {after}: {differences}"


def try_token_request(plane: ControlPlane, timeout: float) -> tuple[str | None, str]:
    """One TokenRequest on ``plane`` that gives up after ``timeout``: the token (or None)
    and what happened (``issued``, ``HTTP <status>``, or ``no answer``: kube-apiserver
    waits for its signer)."""
    api = plane.new_api()
    try:
        status, answer = api.request(
            "POST",
            f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{SERVICE_ACCOUNT}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"audiences": [ISSUER], "expirationSeconds": 3600},
            },
            timeout=timeout,
        )
    except kube.Unavailable as exc:
        return None, "HTTP 5xx" if "HTTP 5" in str(exc) else "no answer"
    finally:
        api.close()
    if status != 201 or not isinstance(answer, dict):
        return None, f"HTTP {status}"
    return str(answer["status"]["token"]), "issued"


def serves(plane: ControlPlane, kid: str, since: int = 0) -> bool | None:
    """Whether the last set ``plane``'s signer logged serving (after byte ``since`` of
    its output) holds ``kid``; None when it logged none."""
    lines = [
        line
        for line in plane.signer_output()[since:].splitlines()
        if line.startswith("sakeystate signer: serving ")
    ]
    if not lines:
        return None
    return kid in lines[-1].rsplit(": ", 1)[-1].split(",")


def migrate_to_signer(cluster: Cluster, s: Scenario | None, continuous: Continuous | None) -> None:
    """docs/signer.md "File mode -> signer mode", one host at a time."""
    if "signer" not in cluster.state:
        cluster.edit_state(lambda state: state.__setitem__("signer", cluster.signer_section()))
        assert cluster.validate().code == 0
    for plane in cluster.planes:
        if plane.mode == "signer":
            continue
        kid = plane.key.kid if plane.key else ""
        # 2. the signer replaces watch on the host: it converges, serves, restarts nothing
        mark = time.time()
        plane.start_signer()
        assert not cluster.restarts(mark), f"{plane.short}: starting the signer restarted"
        # 3. the apiserver's flags to signer mode, and its one restart
        plane.set_mode("signer")
        plane.restart()
        # 4. a TokenRequest there succeeds, with the same key, and verifies on the peers
        fresh = plane.token("plain")
        assert fresh.kid == kid, (fresh.kid, kid)
        if s is not None:
            s.expect_valid([fresh], cluster.planes, f"{plane.short} in signer mode")
        if continuous is not None:
            continuous.add([fresh, plane.legacy_token()])


def ensure_signer_mode(cluster: Cluster) -> None:
    """A test run on its own (-k) gets the cluster S4a leaves."""
    if any(p.mode != "signer" for p in cluster.planes):
        migrate_to_signer(cluster, None, None)


class RejectionWatch(ReviewWatch):
    """Review ``token`` on every plane until each rejects it; and note when each plane's
    signer first logged a served set without its kid (the revocation landing there)."""

    def __init__(self, token: Token, planes: list[ControlPlane], interval: float = 0.2):
        super().__init__(token, planes, interval, authenticated=False)
        self.landed: dict[str, float] = {}
        self.offsets = {p.short: len(p.signer_output()) for p in planes}

    @property
    def rejected(self) -> dict[str, float]:
        return self.answered

    def observe(self, plane: ControlPlane) -> None:
        short = plane.short
        if short not in self.landed and serves(plane, self.token.kid, self.offsets[short]) is False:
            self.landed[short] = time.time()


def reloads(s: Scenario) -> list[Any]:
    """Restarts sakeystate itself ran (reloads), as opposed to the harness's boots."""
    return [r for r in s.restarts() if not r.by_harness]


# --- the tests ----------------------------------------------------------------------------


def test_s4a_migration_file_mode_to_signer_mode(live: Cluster, board: Board) -> None:
    cluster = live
    s = Scenario(cluster, title(cluster, "S4a migration file -> signer mode"))
    before = fresh_tokens(cluster)
    s.expect_valid(before, step="before (file mode)")
    with Continuous(s, before, cluster.planes) as continuous:
        migrate_to_signer(cluster, s, continuous)
        after = fresh_tokens(cluster)
        continuous.add(after)
        s.expect_valid([*before, *after], cluster.planes, "every host in signer mode")
    for plane in cluster.planes:
        record = plane.status_record() or {}
        assert record.get("mode") == "signer", (plane.short, record)
    s.numbers["continuous_rounds"] = continuous.rounds
    s.finish(board, expected_restarts={"ctrl1001": 1, "ctrl1002": 1, "ctrl1003": 1})
    check_truthful(cluster, board, "S4a")


def test_s1_reimage_in_signer_mode_restarts_no_apiserver(live: Cluster, board: Board) -> None:
    """The reimage of docs/reimage.md in signer mode, with trust anchors: no peer restarts
    (nothing runs bundle.reload; the reimaged host's own apiserver is started once, by
    its boot); its first token verifies on every peer on first presentation."""
    cluster = live
    ensure_signer_mode(cluster)
    s = Scenario(cluster, title(cluster, "S1 reimage, signer mode"))
    target = cluster["ctrl1002"]
    peers = [p for p in cluster.planes if p is not target]
    before = fresh_tokens(cluster)
    s.expect_valid(before, step="before")
    # Every apiserver, the reimaged one too: while it is down it gives no answer (not a
    # rejection), from its boot on it must verify every token.
    with Continuous(s, before, cluster.planes) as continuous:
        # 1. Depooled and reinstalled: its apiserver and its signer go down with it.
        target.stop()
        assert target.stop_signer() == 0
        target.wipe()
        target.install_key(cluster.issue_sa(target.name))
        assert target.key is not None
        new_kid = target.key.kid
        s.expect_valid(before, peers, "reinstalled")
        # 2. publish: the peers' signers see it in etcd and serve it, no restart anywhere.
        offsets = {p.short: len(p.signer_output()) for p in peers}
        target.ok("publish")
        published = time.time()
        served: dict[str, float] = {}
        deadline = time.monotonic() + 120
        while len(served) < len(peers):
            for peer in peers:
                if peer.short not in served and serves(peer, new_kid, offsets[peer.short]):
                    served[peer.short] = time.time()
            assert time.monotonic() < deadline, f"peers never served {new_kid}: {served}"
            time.sleep(0.1)
        # 3. It boots: the signer (Before=kube-apiserver.service), then the apiserver.
        target.start_signer()
        target.start()
        first = target.token("plain")
        assert first.kid == new_kid
        # 4. Its first token, presented once to each peer (whose apiserver never saw the
        # kid): it must verify there at once.
        s.expect_valid([first], peers, "the new key's first token, first presentation")
        first_verified = time.time()
        s.expect_valid([*before, first], [target], "the reimaged host verifies everything")
        # 5. wait --cert returns: every fleet host serves the new key.
        target.ok("wait", "--cert", mounted_own_cert(cluster), "--timeout", WAIT)
        after = fresh_tokens(cluster)
        continuous.add([first, *after])
        s.expect_valid([*before, first, *after], cluster.planes, "after pooling")
    assert not reloads(s), f"sakeystate restarted an apiserver in signer mode: {reloads(s)}"
    s.window = first_verified - first.issued
    s.numbers["publish_to_served_s"] = {k: round(v - published, 2) for k, v in served.items()}
    s.numbers["first_presentation_rejected"] = sum(
        1 for r in s.rejections if r.step.startswith("the new key")
    )
    print(f"S1: publish -> served by every peer's signer {max(served.values()) - published:.2f}s")
    # The reimaged host's apiserver was started once (its boot, by the harness); no
    # other apiserver restarted.
    s.finish(board, expected_restarts={"ctrl1001": 0, "ctrl1002": 1, "ctrl1003": 0})
    check_truthful(cluster, board, "S1")


def test_s2_revocation_in_signer_mode(live: Cluster, board: Board) -> None:
    """The reimaged host's pre-reimage key revoked in the state file: every apiserver
    rejects its tokens within about the refresh hint of the revocation landing on its
    host (asserted only against a generous bound); ``wait --absent`` returns."""
    cluster = live
    ensure_signer_mode(cluster)
    s = Scenario(cluster, title(cluster, "S2 revocation, signer mode"))
    target = cluster["ctrl1002"]
    assert len(target.keys) >= 2, "S1 reimaged ctrl1002"
    revoked = target.keys[-2].kid
    revoked_tokens = [t for t in cluster.tokens if t.kid == revoked]
    assert revoked_tokens
    fresh = fresh_tokens(cluster)
    s.expect_valid(revoked_tokens + fresh, step="before")
    probe = next(t for t in revoked_tokens if t.kind == "plain")
    bound = 2 * REFRESH_HINT + 90  # generous: catches "never", not "slow"
    with Continuous(s, fresh, cluster.planes), RejectionWatch(probe, cluster.planes) as watch:
        edited = time.time()
        cluster.edit_state(
            lambda state: state.setdefault("revoked", []).append(
                {"fingerprint": revoked, "reason": "e2e: private key exposed"}
            )
        )
        assert watch.wait(bound), f"still accepted after {bound}s: rejected on {watch.rejected}"
        target.ok("wait", "--kid", revoked, "--absent", "--timeout", WAIT)
        waited = time.time()
        s.expect_rejected(revoked_tokens, cluster.planes, "wait --absent returned")
        s.expect_valid(fresh, cluster.planes, "after the revocation")
    latency = {k: round(v - edited, 2) for k, v in watch.rejected.items()}
    after_landing = {
        k: round(v - watch.landed[k], 2) for k, v in watch.rejected.items() if k in watch.landed
    }
    s.numbers["rejected_after_edit_s"] = latency
    s.numbers["landed_after_edit_s"] = {k: round(v - edited, 2) for k, v in watch.landed.items()}
    s.numbers["rejected_after_landing_s"] = after_landing
    s.numbers["wait_absent_after_edit_s"] = round(waited - edited, 2)
    s.numbers["refresh_hint_s"] = REFRESH_HINT
    print(
        f"S2: revoked key rejected everywhere {max(latency.values()):.2f}s after the edit "
        f"(per host {latency}; after landing {after_landing}; refresh_hint {REFRESH_HINT}s)"
    )
    assert not [k for k in cluster.etcd_keys(cluster.key_prefix) if k.endswith(revoked)]
    s.finish(board, expected_restarts={"ctrl1001": 0, "ctrl1002": 0, "ctrl1003": 0})
    check_truthful(cluster, board, "S2")


def test_s3_signer_killed_and_restarted_on_one_host(live: Cluster, board: Board) -> None:
    """SIGKILL of ctrl1001's signer (a crash: the stale socket stays), down for OUTAGE
    seconds: its apiserver keeps verifying every valid token (the cached set), its
    TokenRequest fails; after the signer restarted, TokenRequest succeeds again."""
    cluster = live
    ensure_signer_mode(cluster)
    s = Scenario(cluster, title(cluster, "S3 signer killed on one host"))
    host = cluster["ctrl1001"]
    revoked = {r["fingerprint"] for r in cluster.state.get("revoked", [])}
    valid = [t for t in cluster.tokens if t.kid not in revoked and t.kind != "probe"]
    valid = [*valid[-24:], *fresh_tokens(cluster)]
    s.expect_valid(valid, step="before")
    failed: list[str] = []
    with Continuous(s, valid, cluster.planes):
        killed = time.time()
        assert host.stop_signer(signal.SIGKILL) == -signal.SIGKILL
        assert host.signer_socket.exists()  # a crash leaves the socket behind
        while time.time() - killed < OUTAGE:
            value, how = try_token_request(host, timeout=3)
            assert value is None, "TokenRequest issued a token without a signer"
            failed.append(how)
            s.expect_valid(valid, [host], "signer down")
        restarted = host.start_signer(wait=False)
        host.wait_signer_pass(1)
        serving = time.time()
        deadline = time.monotonic() + 180
        attempts = 0
        while True:
            attempts += 1
            value, _how = try_token_request(host, timeout=3)
            if value is not None:
                recovered = time.time()
                break
            assert time.monotonic() < deadline, "TokenRequest never recovered"
            time.sleep(0.2)
        s.expect_valid(valid, [host], "signer back")
        after = fresh_tokens(cluster)
        s.expect_valid([*valid, *after], cluster.planes, "after the outage")
    s.numbers["token_requests_failed_while_down"] = failed
    assert failed, "no TokenRequest tried while the signer was down"
    s.numbers["outage_s"] = round(restarted - killed, 2)
    s.numbers["token_request_recovered_after_restart_s"] = round(recovered - restarted, 2)
    s.numbers["token_request_recovered_after_serving_s"] = round(recovered - serving, 2)
    s.numbers["attempts_after_restart"] = attempts
    print(
        f"S3: signer down {restarted - killed:.1f}s, TokenRequests failed: {failed}; "
        f"TokenRequest succeeded {recovered - restarted:.2f}s after the restart "
        f"({recovered - serving:.2f}s after its first pass)"
    )
    s.finish(board, expected_restarts={"ctrl1001": 0, "ctrl1002": 0, "ctrl1003": 0})
    check_truthful(cluster, board, "S3")


def test_s4b_migration_signer_mode_to_file_mode(live: Cluster, board: Board) -> None:
    """docs/signer.md "Signer mode -> file mode", one host at a time, tokens flowing."""
    cluster = live
    ensure_signer_mode(cluster)
    s = Scenario(cluster, title(cluster, "S4b migration signer -> file mode"))
    revoked = {r["fingerprint"] for r in cluster.state.get("revoked", [])}
    before = [*fresh_tokens(cluster), *[t for t in cluster.tokens if t.kid not in revoked][-24:]]
    s.expect_valid(before, step="before (signer mode)")
    with Continuous(s, before, cluster.planes) as continuous:
        for plane in cluster.planes:
            kid = plane.key.kid if plane.key else ""
            # 1. the signer stops (the bundle on disk is what it served)
            assert plane.stop_signer() == 0
            # 2. the apiserver's flags back to file mode, and its one restart
            plane.set_mode("file")
            plane.restart()
            fresh = plane.token("plain")
            assert fresh.kid == kid
            s.expect_valid([fresh], cluster.planes, f"{plane.short} back in file mode")
            continuous.add([fresh, plane.legacy_token()])
            # 3. converge (what watch's first pass does): in sync, nothing to restart
            mark = time.time()
            plane.ok("converge")
            assert not cluster.restarts(mark), f"{plane.short}: converge restarted it again"
        after = fresh_tokens(cluster)
        s.expect_valid([*before, *after], cluster.planes, "every host in file mode")
    for plane in cluster.planes:
        record = plane.status_record() or {}
        assert record.get("mode", "file") != "signer", (plane.short, record)
    s.finish(board, expected_restarts={"ctrl1001": 1, "ctrl1002": 1, "ctrl1003": 1})
    check_truthful(cluster, board, "S4b")
