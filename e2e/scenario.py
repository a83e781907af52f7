"""What a scenario counts, from TokenReview answers and the supervisors' events.

- ``valid_rejected``: a token that should verify on an apiserver, and that apiserver's
  TokenReview said not authenticated (must be 0). Answers of an apiserver inside its
  own restart (between its stop and the reload_check pass that ended the restart) are
  kept apart as ``rejected_while_restarting``: nothing routes to an apiserver then.
- ``revoked_accepted``: a token of a revoked (or retired) key that an apiserver still
  authenticated after the removal converged (must be 0).
- ``restarts``: (re)starts per apiserver, and ``overlaps``: pairs of reloads of two
  apiservers that were down at the same time (must be none).
- ``window``: the new-key window, from the reimaged apiserver's first token to the
  moment every peer accepted it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kube
from harness import Cluster, ControlPlane, Restart, Token, overlaps


class Disagreement(Exception):
    """The real apiserver disagrees with sakeystate's model: what a finding's test raises
    (and its ``xfail(strict=True, raises=Disagreement)`` expects), so that any other
    failure of the same test still fails it."""


def agree(condition: object, message: str) -> None:
    if not condition:
        raise Disagreement(message)


@dataclass
class Rejection:
    token: str
    plane: str
    step: str
    at: float
    error: str | None


@dataclass
class Scenario:
    cluster: Cluster
    name: str
    started: float = field(default_factory=time.time)
    reviews: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    accepted_revoked: list[Rejection] = field(default_factory=list)
    window: float | None = None
    numbers: dict[str, Any] = field(default_factory=dict)

    # --- checks -------------------------------------------------------------------------------

    def expect_valid(
        self, tokens: Iterable[Token], planes: Iterable[ControlPlane] | None = None, step: str = ""
    ) -> None:
        """Every token must verify on every one of ``planes`` (default: all running)."""
        tokens = list(tokens)
        for plane in self._planes(planes):
            plane.api.wait_ready(120)  # an apiserver that should be up and is not: an error
            for token in tokens:
                self.reviews += 1
                review = plane.api.review(token.value)
                if not review.authenticated:
                    self.rejections.append(
                        Rejection(str(token), plane.short, step, time.time(), review.error)
                    )

    def expect_rejected(
        self, tokens: Iterable[Token], planes: Iterable[ControlPlane] | None = None, step: str = ""
    ) -> None:
        """No token may verify on any of ``planes``: their key was removed, and converged."""
        tokens = list(tokens)
        for plane in self._planes(planes):
            plane.api.wait_ready(120)
            for token in tokens:
                self.reviews += 1
                if plane.api.review(token.value).authenticated:
                    self.accepted_revoked.append(
                        Rejection(str(token), plane.short, step, time.time(), None)
                    )

    def _planes(self, planes: Iterable[ControlPlane] | None) -> list[ControlPlane]:
        return list(planes) if planes is not None else self.cluster.planes_up()

    # --- results ---------------------------------------------------------------------------------

    def restarts(self) -> list[Restart]:
        return self.cluster.restarts(self.started)

    def restart_counts(self) -> dict[str, int]:
        counts = {p.short: 0 for p in self.cluster.planes}
        for restart in self.restarts():
            counts[restart.host] += 1
        return counts

    def while_restarting(self) -> list[Rejection]:
        restarts = self.restarts()
        return [r for r in self.rejections if _inside(r, restarts)]

    def valid_rejected(self) -> list[Rejection]:
        restarts = self.restarts()
        return [r for r in self.rejections if not _inside(r, restarts)]

    def summary(self) -> dict[str, Any]:
        restarts = self.restarts()
        durations = [r.checked - r.began for r in restarts if r.checked and not r.by_harness]
        return {
            "scenario": self.name,
            "seconds": round(time.time() - self.started, 1),
            "reviews": self.reviews,
            "valid_rejected": len(self.valid_rejected()),
            "rejected_while_restarting": len(self.while_restarting()),
            "revoked_accepted": len(self.accepted_revoked),
            "restarts": self.restart_counts(),
            "overlaps": len(overlaps(restarts)),
            "restart_seconds": [round(d, 2) for d in durations],
            "window": None if self.window is None else round(self.window, 2),
            **self.numbers,
        }

    def finish(self, board: Board, expected_restarts: dict[str, int] | None = None) -> None:
        """Record the numbers, then assert the contract's zeros (and the restart counts)."""
        summary = self.summary()
        board.add(summary)
        problems = []
        if self.valid_rejected():
            problems.append(f"valid tokens rejected: {self.valid_rejected()}")
        if self.accepted_revoked:
            problems.append(f"revoked tokens accepted: {self.accepted_revoked}")
        pairs = overlaps(self.restarts())
        if pairs:
            problems.append(f"overlapping restarts: {pairs}")
        if expected_restarts is not None and summary["restarts"] != expected_restarts:
            problems.append(f"restarts {summary['restarts']}, expected {expected_restarts}")
        assert not problems, f"{self.name}: " + "; ".join(problems) + f"\n{json.dumps(summary)}"


def _inside(rejection: Rejection, restarts: list[Restart]) -> bool:
    return any(
        r.host == rejection.plane and r.began <= rejection.at <= (r.checked or float("inf"))
        for r in restarts
    )


class Continuous:
    """In the background, review tokens that must verify on running apiservers, over and
    over, for the whole of a procedure: "at every step", between the steps too.

    Each round reviews a slice of ``PER_ROUND`` tokens on every apiserver, the next
    round the next slice, so that every token is reviewed every few rounds without
    the reviews themselves loading the two cores the apiservers restart on.
    """

    PER_ROUND = 8
    PAUSE = 0.3

    def __init__(self, scenario: Scenario, tokens: list[Token], planes: list[ControlPlane]):
        self.scenario = scenario
        self.tokens = list(tokens)
        self.planes = planes
        self.rounds = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, tokens: Iterable[Token]) -> None:
        with self._lock:
            self.tokens.extend(tokens)

    def __enter__(self) -> Continuous:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _slice(self) -> list[Token]:
        with self._lock:
            tokens = list(self.tokens)
        if len(tokens) <= self.PER_ROUND:
            return tokens
        start = (self.rounds * self.PER_ROUND) % len(tokens)
        return (tokens + tokens)[start : start + self.PER_ROUND]

    def _run(self) -> None:
        apis = {p.short: p.new_api() for p in self.planes}
        try:
            while not self._stop.is_set():
                tokens = self._slice()
                for short, api in apis.items():
                    for token in tokens:
                        try:
                            review = api.review(token.value)
                        except (kube.Unavailable, kube.ApiError):
                            break  # down or restarting: no answer, not a rejection
                        self.scenario.reviews += 1
                        if not review.authenticated:
                            self.scenario.rejections.append(
                                Rejection(
                                    str(token), short, "continuous", time.time(), review.error
                                )
                            )
                self.rounds += 1
                self._stop.wait(self.PAUSE)
        finally:
            for api in apis.values():
                api.close()


def truthful_status(cluster: Cluster) -> dict[str, dict[str, list[str]]]:
    """Scenario 8: for each running apiserver, the kids its status record claims against
    the kids whose probe token (one per private key the harness holds) it authenticates.
    Returns the differences (empty when every record tells the truth)."""
    probes = [cluster.probe(kid) for kid in sorted(cluster.held)]
    differences: dict[str, dict[str, list[str]]] = {}
    for plane in cluster.planes_up():
        record = plane.status_record() or {}
        claimed = set(record.get("kids", []))
        verified = {p.kid for p in probes if plane.api.review(p.value).authenticated}
        if claimed != verified:
            differences[plane.short] = {
                "claimed_not_verified": sorted(claimed - verified),
                "verified_not_claimed": sorted(verified - claimed),
            }
    return differences


class Board:
    """Every scenario's numbers, for the terminal summary, bench and BENCHMARKS.md."""

    def __init__(self, path: Path | None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.path = path

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.rows, indent=1) + "\n")

    def table(self) -> str:
        """The scenarios' numbers, then scenario 8's checks, then the bundle findings."""
        sections = []
        scenarios = [r for r in self.rows if "restarts" in r]
        if scenarios:
            lines = [
                "| scenario | valid rejected | revoked accepted | restarts (1001, 1002, 1003) "
                "| overlaps | restart s (p50, max) | new-key window s | TokenReviews | s |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for row in scenarios:
                lines.append(
                    f"| {row['scenario']} | {row['valid_rejected']} | {row['revoked_accepted']} "
                    f"| {', '.join(str(n) for n in row['restarts'].values())} "
                    f"| {row['overlaps']} | {_p50_max(row['restart_seconds'])} "
                    f"| {'-' if row['window'] is None else row['window']} "
                    f"| {row['reviews']} | {row['seconds']} |"
                )
            sections.append("\n".join(lines))
        truthful = [r for r in self.rows if r.get("kind") == "truthful"]
        if truthful:
            lines = ["| scenario 8: status records vs TokenReview | hosts whose record differs |"]
            lines.append("|---|---|")
            lines += [f"| {r['scenario']} | {r['mismatched_hosts']} |" for r in truthful]
            sections.append("\n".join(lines))
        bundles = [r for r in self.rows if r.get("kind") == "bundle"]
        if bundles:
            lines = ["| key file given to kube-apiserver | starts | verifies | model agrees |"]
            lines.append("|---|---|---|---|")
            lines += [
                f"| {r['scenario']} | {'yes' if r['started'] else 'no: ' + r['error']} "
                f"| {', '.join(r['verified']) or '-'} | {'yes' if r['model_agrees'] else 'NO'} |"
                for r in bundles
            ]
            sections.append("\n".join(lines))
        return "\n\n".join(sections)


def _p50_max(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 2]:.1f}, {ordered[-1]:.1f}"


def results_path() -> Path | None:
    explicit = os.environ.get("SAKEYSTATE_E2E_RESULTS")
    return Path(explicit) if explicit else None
