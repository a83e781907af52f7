"""``sakeystate watch``: the service that converges on events, not on a timer.

Every pass is ``apply.converge``: the same observe, plan and guarded apply, the
same refusals, reload lock and status record as a one-shot converge. This
module only decides *when* to pass:

- at start;
- on a change under the key prefix (an etcd watch from the revision the last
  pass read; after a compaction, or when the watch breaks, the next pass reads
  everything again and a new watch starts from there);
- on a change of the state file (stat checked at least once a second; an
  invalid file is reported and the last good state kept) or SIGHUP;
- at the plan's next time-based event (a superseded key's removal, a
  certificate's start or end);
- every ``resync`` as a safety net.

Events are coalesced for ``debounce``. A failed pass is retried with
exponential backoff capped at 30 s, never fatal; converge writes nothing
before it has read etcd, so the bundle is never touched while etcd cannot be
read. python3-etcd3's watch stream can go quiet without an error (a member cut
off from quorum keeps the stream open), so every wait is bounded and the
watch's member is asked now and then whether it still has a leader.

SIGTERM/SIGINT let the current step finish; a reload in progress (waiting for
the reload lock included) is aborted instead, so that it stays owed and the
lock is released, and the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any

from sakeystate.apply import converge
from sakeystate.errors import EtcdError, Refused, ReloadFailed, SakeystateError, StateError
from sakeystate.etcd import EtcdStore, PrefixWatch, WatchCompacted
from sakeystate.keys import format_time
from sakeystate.metrics import Metrics
from sakeystate.plan import Plan
from sakeystate.state import DesiredState, load_state

# The state file is stat'ed at least this often.
STATE_POLL = 1.0
# The watch's member is asked this often whether it still has a leader.
LIVENESS = 10.0
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
# A time-based event is planned a little after its moment, when it is in the past.
EVENT_MARGIN = 0.05


class Stopping(BaseException):
    """SIGTERM/SIGINT during a reload: unwinds it (the lock is released, the reload
    stays owed). A BaseException so that no ``except Exception`` swallows it."""


@dataclass(frozen=True)
class Options:
    state: str
    host: str | None
    debounce: float = 1.0
    resync: float = 600.0
    format: str = "text"
    quiet: bool = False  # no line for a pass that changed nothing


def _signature(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    # ctime too: a copy that keeps the mtime (cp -p, rsync -a) and the size still moves it.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Watcher:
    """One ``watch`` process: its state, its etcd session and watch, and the schedule."""

    def __init__(
        self,
        options: Options,
        desired: DesiredState,
        metrics: Metrics | None,
        now: Callable[[], datetime],
    ) -> None:
        self.options = options
        self.desired = desired
        self.metrics = metrics
        self.now = now
        self.store = EtcdStore(desired.etcd)
        self.watch: PrefixWatch | None = None
        self.signature = _signature(options.state)
        self.passes = 0
        self.due: float | None = None  # when the next pass runs (monotonic)
        self.triggers: set[str] = set()
        self.backoff = BACKOFF_FIRST
        self.event_at: float | None = None
        self.resync_at = time.monotonic() + options.resync
        self.liveness_at = time.monotonic() + LIVENESS
        self.stopping = False
        self.hup = False
        self.in_reload = False
        self.interrupted = False
        self.warnings: tuple[str, ...] = ()

    # --- signals -------------------------------------------------------------------------

    def _on_stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        if self.in_reload and not self.interrupted:
            self.interrupted = True
            raise Stopping()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.hup = True

    def _reloading(self, active: bool) -> None:
        self.in_reload = active

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        handlers = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_stop),
            signal.SIGINT: signal.signal(signal.SIGINT, self._on_stop),
            signal.SIGHUP: signal.signal(signal.SIGHUP, self._on_hup),
        }
        try:
            self._schedule("start", 0.0)
            while not self.stopping:
                try:
                    self._step()
                except Exception as exc:
                    self._survive(exc)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            self._drop_watch()
            self.store.close()
        self._log({"event": "stopped"}, "stopped")
        return 0

    def _survive(self, exc: Exception) -> None:
        """An unexpected error (a bug, or a library's exception nobody mapped): reported,
        the watch dropped, and the next pass retried with backoff, as for etcd errors."""
        self._drop_watch()
        text = f"internal error ({type(exc).__name__}: {exc}); retrying in {self.backoff:g}s"
        self._log({"event": "error", "error": text}, text)
        self._schedule("retry", self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def _step(self) -> None:
        now = time.monotonic()
        if self.due is not None and now >= self.due:
            self._pass()
            return
        wake = min(
            now + STATE_POLL,
            self.due if self.due is not None else now + STATE_POLL,
            self.event_at if self.event_at is not None else now + STATE_POLL,
        )
        self._wait(max(0.0, wake - now))
        if self.stopping:
            return
        self._check_state()
        now = time.monotonic()
        if self.event_at is not None and now >= self.event_at:
            self.event_at = None
            self._schedule("time-based event", 0.0)
        if now >= self.resync_at:
            self.resync_at = now + self.options.resync  # a failing pass keeps its backoff
            self._schedule("resync", 0.0)
        if self.watch is not None and now >= self.liveness_at:
            self.liveness_at = now + LIVENESS
            if not self.watch.alive():
                self._drop_watch()
                self._schedule("etcd watch not live", 0.0)

    def _schedule(self, trigger: str, delay: float) -> None:
        """A pass within ``delay``; an earlier one already due is kept (coalescing)."""
        self.triggers.add(trigger)
        due = time.monotonic() + delay
        if self.due is None or due < self.due:
            self.due = due

    def _wait(self, timeout: float) -> None:
        if self.watch is None:
            time.sleep(timeout)
            return
        try:
            if self.watch.wait(timeout) is not None:
                self._schedule("etcd change", self.options.debounce)
        except WatchCompacted as exc:
            self._drop_watch()
            self._log({"event": "watch", "error": str(exc)}, f"{exc}: reading everything again")
            self._schedule("compacted", 0.0)
        except EtcdError as exc:
            self._drop_watch()
            self._log({"event": "watch", "error": str(exc)}, f"{exc}: reading everything again")
            # A second later, not at once: a watch that keeps breaking while reads
            # succeed costs at most one pass a second.
            self._schedule("etcd watch broke", BACKOFF_FIRST)

    def _drop_watch(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    # --- the state file ------------------------------------------------------------------

    def _check_state(self) -> None:
        signature = _signature(self.options.state)
        if signature == self.signature and not self.hup:
            return
        hup, self.hup = self.hup, False
        self.signature = signature
        try:
            desired = load_state(self.options.state, self.options.host)
        except SakeystateError as exc:
            problems = exc.problems if isinstance(exc, StateError) else [str(exc)]
            self._log(
                {"event": "state", "valid": False, "errors": problems},
                "state file invalid, keeping the last good state: " + "; ".join(problems),
            )
            return
        if desired == self.desired and not hup:
            return
        if desired.etcd != self.desired.etcd:
            self._drop_watch()
            self.store.close()
            self.store = EtcdStore(desired.etcd)
        self.desired = desired
        self._schedule("SIGHUP" if hup else "state file changed", self.options.debounce)

    # --- one pass ------------------------------------------------------------------------

    def _pass(self) -> None:
        self.passes += 1
        triggers, self.triggers, self.due = sorted(self.triggers), set(), None
        at = self.now()
        plan: Plan | None = None
        error: str | None = None
        reloaded = False
        try:
            plan = converge(self.desired, self.store, at, reloading=self._reloading)
            reloaded = plan.reload is not None and bool(self.desired.bundle.reload)
            result = "changed" if plan.changed else "unchanged"
        except Stopping:
            self._log(
                {"pass": self.passes, "result": "stopped"},
                f"pass {self.passes}: stopped during the reload; the reload stays owed",
            )
            return
        except (Refused, ReloadFailed) as exc:
            plan, error = exc.plan, str(exc)
            result = "refused" if isinstance(exc, Refused) else "error"
        except SakeystateError as exc:
            error, result = str(exc), "error"
            if isinstance(exc, EtcdError):
                self._drop_watch()
        retry_in = None
        if error is None:
            self.backoff = BACKOFF_FIRST
            self._after_success(plan, at)
        else:
            retry_in = self.backoff
            self._schedule("retry", retry_in)
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self._report(triggers, result, plan, error, reloaded, retry_in)
        if self.metrics is not None:
            try:
                self.metrics.record(result, at, plan, reloaded)
            except SakeystateError as exc:
                self._log({"event": "metrics", "error": str(exc)}, str(exc))

    def _after_success(self, plan: Plan | None, at: datetime) -> None:
        now = time.monotonic()
        self.resync_at = now + self.options.resync
        self.event_at = None
        if plan is not None and plan.next_event is not None:
            self.event_at = now + max(0.0, (plan.next_event - at).total_seconds()) + EVENT_MARGIN
        if self.watch is None:
            prefix = self.desired.etcd.prefix
            try:
                self.watch = PrefixWatch(self.store, [prefix], self.store.revisions[prefix] + 1)
                self.liveness_at = now + LIVENESS
            except EtcdError as exc:
                self._log({"event": "watch", "error": str(exc)}, str(exc))
                self._schedule("retry", self.backoff)

    # --- output ----------------------------------------------------------------------------

    def _report(
        self,
        triggers: list[str],
        result: str,
        plan: Plan | None,
        error: str | None,
        reloaded: bool,
        retry_in: float | None,
    ) -> None:
        fields: dict[str, Any] = {"pass": self.passes, "triggers": triggers, "result": result}
        text = f"pass {self.passes} ({', '.join(triggers)}): {result}"
        if plan is not None:
            fields["actions"] = [a.as_dict() for a in plan.actions]
            if plan.changed:
                from sakeystate.report import summary

                text += f": {summary(plan).rstrip('.')}"
        if plan is not None and error is None:
            # What the bundle holds now; a refused or failed pass says why instead.
            fields["kids"] = list(plan.kids_after)
            fields["reloaded"] = reloaded
            text += f"{'; reloaded' if reloaded else ''}; kids={','.join(plan.kids_after)}"
            if plan.next_event is not None:
                fields["next_event"] = format_time(plan.next_event)
        if error is not None:
            fields["error"], fields["retry_in"] = error, retry_in
            text += f": {error}; retrying in {retry_in:g}s"
        warnings = plan.warnings if plan is not None else ()
        if warnings != self.warnings:
            fields["warnings"] = list(warnings)
            self.warnings = warnings
            for warning in warnings:
                text += f"\nsakeystate: warning: {warning}"
        elif self.options.quiet and result == "unchanged":
            return
        self._log(fields, text)

    def _log(self, fields: dict[str, Any], text: str) -> None:
        if self.options.format == "json":
            line = json.dumps({"version": 1, "at": format_time(self.now()), **fields})
        else:
            line = f"sakeystate watch: {text}"
        print(line, file=sys.stderr, flush=True)
