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

A pass only writes (etcd, the bundle, the owed marker); the restart it makes
owed is ``restart.Restarter``'s, run from this loop: the cluster lock is
awaited in a thread (``LockRequest``) while passes go on, so a publish that
arrives meanwhile reaches the bundle at once and is part of the one restart
that follows. A failed restart is retried after ``restart.backoff``, behind
the hosts already waiting. With ``restart_free`` (signer mode) nothing is ever
restarted and the status record says ``"mode": "signer"``; ``on_pass`` is told
every plan applied, before its status record is written.

While it runs, the watcher holds ``<status_prefix><host>/watch``, a key
attached to an etcd lease (``Liveness``): ``status`` and ``wait`` tell a host
that is down from one that lags by it.

SIGTERM/SIGINT let the current step finish; a restart not begun is not begun,
one whose command runs is waited for briefly and never killed (``restart``),
the reload stays owed unless it completed, and the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any

from sakeystate import restart
from sakeystate.apply import converge, observe_and_plan
from sakeystate.errors import EtcdError, SakeystateError, StateError
from sakeystate.etcd import EtcdStore, PrefixWatch, ReloadLock, WatchCompacted
from sakeystate.fleet import WATCH_KEY
from sakeystate.keys import format_time
from sakeystate.metrics import Metrics
from sakeystate.plan import Plan, Refused
from sakeystate.restart import LockRequest, Outcome, Restarter, Stop, StopRequested, Who
from sakeystate.state import DesiredState, load_state

# The state file is stat'ed at least this often.
STATE_POLL = 1.0
# The watch's member is asked this often whether it still has a leader.
LIVENESS = 10.0
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
# A time-based event is planned a little after its moment, when it is in the past.
EVENT_MARGIN = 0.05
# While the reload lock is awaited: how often the loop looks whether it came, and how
# often the metrics say for how long and who holds it.
LOCK_TICK, LOCK_REPORT = 0.05, 5.0
# The watcher waits for the reload lock as long as it takes (waiters are served in
# arrival order; a restart waits, the bundle does not).
LOCK_WAIT = 365 * 86400.0
# A liveness key that could not be taken is tried again this often.
LIVENESS_RETRY = 5.0
# Passes after which the liveness key is looked for in etcd (it may have expired).
_VERIFY_LIVENESS = {"start", "resync", "retry", "compacted", "etcd watch broke"}


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


class Liveness:
    """``<status_prefix><host>/watch`` while this watcher lives.

    A key attached to an etcd lease that a thread keeps alive (one keepalive per
    third of its TTL, no other etcd write while idle): it vanishes within the TTL
    of a watcher's death, and ``status``/``wait`` read its absence as "no live
    watch". Held with ``etcd.ReloadLock``, which is exactly such a key (created
    only while absent, so a second watcher for one host is noticed); a fair
    lock's waiter keys would live under ``.../watch/``, which the readers accept.
    """

    def __init__(self) -> None:
        self.lock: ReloadLock | None = None
        self.key: str | None = None
        self.retry_at = 0.0

    def ensure(
        self, desired: DesiredState, store: EtcdStore, at: datetime, verify: bool
    ) -> str | None:
        """Hold the key (take it again if it expired); an error to log, or None."""
        if desired.host is None:
            return None
        key = f"{desired.etcd.status_prefix}{desired.host}/{WATCH_KEY}"
        if self.lock is not None and key == self.key and verify:
            entries = store.read(key).entries
            if not any(e.key == key or e.key.startswith(key + "/") for e in entries):
                self.release()  # the lease expired (etcd was out of reach for its TTL)
        if self.lock is not None and key == self.key:
            return None
        self.release()
        if time.monotonic() < self.retry_at:
            return None
        holder = f"watch {restart.holder_name(desired)} since {format_time(at)}"
        lock = ReloadLock(store, key, holder)
        try:
            lock.acquire(1.0)
        except EtcdError as exc:
            self.retry_at = time.monotonic() + LIVENESS_RETRY
            return f"liveness key {key} not written (retrying): {exc}"
        self.lock, self.key = lock, key
        return None

    def due(self, now: float) -> bool:
        """Whether to try again to take the key, not held since a failed try."""
        return self.lock is None and self.retry_at > 0 and now >= self.retry_at

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
        self.lock = self.key = None


class Watcher:
    """One ``watch`` process: its state, its etcd session and watch, and the schedule.

    ``on_pass(plan, desired)``: called with every plan a pass applied (after its etcd,
    bundle and JWKS writes, before its status record: an exception fails the pass);
    ``restart_free``: never restart kube-apiserver (signer mode).
    """

    def __init__(
        self,
        options: Options,
        desired: DesiredState,
        metrics: Metrics | None,
        now: Callable[[], datetime],
        on_pass: Callable[[Plan, DesiredState], None] | None = None,
        restart_free: bool = False,
    ) -> None:
        self.options = options
        self.desired = desired
        self.metrics = metrics
        self.now = now
        self.on_pass = on_pass
        self.who = Who.NEVER if restart_free else Who.RUN
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
        self.stop = Stop()
        self.hup = False
        self.warnings: tuple[str, ...] = ()
        self.liveness = Liveness()
        # The restart: owed and due at restart_due (monotonic); the lock awaited by request.
        self.restart_due: float | None = None
        self.request: LockRequest | None = None
        self.failures = 0
        self.lock_report_at = 0.0

    # --- signals -------------------------------------------------------------------------

    def _on_stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        self.stop.request()  # polled by a restart in progress; never raises here

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.hup = True

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
            if self.request is not None:
                self.request.abandon()
            self._drop_watch()
            with suppress(Exception):
                self.liveness.release()
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
        if self._restart_step(now):
            return
        wake = min(
            now + STATE_POLL,
            self.due if self.due is not None else now + STATE_POLL,
            self.event_at if self.event_at is not None else now + STATE_POLL,
            self.restart_due if self.restart_due is not None else now + STATE_POLL,
            now + LOCK_TICK if self.request is not None else now + STATE_POLL,
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
        if self.watch is not None and self.liveness.due(now):
            # Not taken after the last pass (a dead predecessor's key had not expired).
            problem = self.liveness.ensure(self.desired, self.store, self.now(), verify=False)
            if problem is not None:
                self._log({"event": "liveness", "error": problem}, problem)

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
            self.liveness.release()
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
        owed = False
        try:
            applied = converge(self.desired, self.store, at, who=self.who, on_applied=self._applied)
            plan, owed, error = applied.plan, applied.owed, applied.record_error
            result = "error" if error else "changed" if plan.changed else "unchanged"
        except Refused as exc:
            plan, error, result = exc.plan, str(exc), "refused"
        except SakeystateError as exc:
            error, result = str(exc), "error"
            if isinstance(exc, EtcdError):
                self._drop_watch()
        retry_in = None
        if error is None:
            self.backoff = BACKOFF_FIRST
            self._after_success(plan, at, triggers)
        else:
            retry_in = self.backoff
            self._schedule("retry", retry_in)
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        if owed and self.restart_due is None and self.request is None:
            self.restart_due = time.monotonic()
        state = restart.OWED if owed else restart.IN_SYNC
        self._report(triggers, result, plan, error, state, retry_in)
        if self.metrics is not None:
            try:
                self.metrics.record(result, at, plan, state if plan is not None else None)
            except SakeystateError as exc:
                self._log({"event": "metrics", "error": str(exc)}, str(exc))

    def _applied(self, plan: Plan) -> None:
        if self.on_pass is not None:
            self.on_pass(plan, self.desired)

    # --- the restart -----------------------------------------------------------------------

    def _restarter(self) -> Restarter:
        desired, store = self.desired, self.store
        return Restarter(
            desired,
            store,
            self.now,
            lambda: observe_and_plan(desired, store, self.now()),
            self.stop,
        )

    def _restart_step(self, now: float) -> bool:
        """Advance an owed restart; True when it did something (the loop starts over)."""
        if self.stopping:
            return False
        if self.request is not None:
            return self._lock_wait_step(now)
        if self.restart_due is None or now < self.restart_due:
            return False
        self.restart_due = None
        try:
            if not restart.pending(self.desired.bundle):
                return False  # another run on this host restarted the apiserver meanwhile
        except SakeystateError as exc:  # the marker cannot be read: like a failed pass
            self._restarted(Outcome(owed=True, message=str(exc), failed=str(exc)))
            return True
        if not self.desired.bundle.reload:
            # Warned by every pass's line (reload owed) and below; nothing to run.
            self._restarted(restart.left_owed(Who.RUN, self.desired.bundle))
            return True
        if self.desired.etcd.reload_lock is None:
            self._perform(None, 0.0, None)
            return True
        self.request = LockRequest(self.desired, LOCK_WAIT)
        self.lock_report_at = now
        holder = self.request.holder
        text = (
            f"restart owed: waiting for the reload lock{f' (held by {holder})' if holder else ''}"
        )
        self._log({"event": "restart", "waiting": True, "holder": holder}, text)
        return True

    def _lock_wait_step(self, now: float) -> bool:
        request = self.request
        assert request is not None
        if not request.done:
            if self.metrics is not None and now >= self.lock_report_at:
                self.lock_report_at = now + LOCK_REPORT
                key = self.desired.etcd.reload_lock
                holder = restart.lock_holder(self.store, key) if key else None
                with suppress(SakeystateError):
                    self.metrics.waiting(request.waited, holder or request.holder)
            return False
        self.request = None
        if request.error is not None:
            # etcd failed under the wait: no restart was tried, so no restart failure;
            # waited for again with the passes' backoff.
            request.store.close()
            retry_in = self.backoff
            self.restart_due = time.monotonic() + retry_in
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            text = f"restart: waiting for the reload lock failed: {request.error}; "
            self._log(
                {"event": "restart", "error": str(request.error), "retry_in": retry_in},
                text + f"retrying in {retry_in:g}s",
            )
            return True
        try:
            self._perform(request.lock, request.waited, request.holder)
        finally:
            request.store.close()
        return True

    def _perform(self, lock: restart.Lock | None, waited: float, holder: str | None) -> None:
        try:
            outcome = self._restarter().perform(lock, waited, holder)
        except StopRequested:
            self._log(
                {"event": "restart", "result": "stopped"},
                "stopped during the restart; the reload stays owed",
            )
            return
        except SakeystateError as exc:  # the local lock, or the marker: retried like a failure
            outcome = Outcome(owed=True, message=str(exc), failed=str(exc), lock_wait=waited)
        self._restarted(outcome)

    def _restarted(self, outcome: Outcome) -> None:
        fields: dict[str, Any] = {
            "event": "restart",
            "reloaded": outcome.restarted,
            "owed": outcome.owed,
            "lock_wait": None if outcome.lock_wait is None else round(outcome.lock_wait, 3),
            "holder": outcome.holder,
        }
        if outcome.restarted:
            self.failures = 0
            text = f"reloaded: {outcome.message}"
            if outcome.lock_wait is not None:
                text += f" (after waiting {outcome.lock_wait:.1f}s for the reload lock)"
        elif outcome.failed is not None:
            # A restart that ran and failed backs off long (its apiserver is sick); one
            # that never ran (the local lock, the marker) like a failed pass.
            if outcome.attempted:
                self.failures += 1
                retry_in = restart.backoff(self.failures)
            else:
                retry_in = self.backoff
                self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            self.restart_due = time.monotonic() + retry_in
            fields["error"], fields["retry_in"] = outcome.failed, retry_in
            text = f"restart failed ({self.failures} in a row): {outcome.failed}; "
            text += f"retrying in {retry_in:g}s"
        else:
            text = outcome.message
        for extra in (outcome.error, *outcome.warnings):
            if extra:
                fields.setdefault("errors", []).append(extra)
                text += f"\nsakeystate: warning: {extra}"
        if outcome.error:
            self._schedule("retry", self.backoff)  # the next pass writes the record
        self._log(fields, f"restart: {text}")
        if self.metrics is not None:
            try:
                self.metrics.restart(outcome)
            except SakeystateError as exc:
                self._log({"event": "metrics", "error": str(exc)}, str(exc))

    def _after_success(self, plan: Plan | None, at: datetime, triggers: list[str]) -> None:
        verify = bool(_VERIFY_LIVENESS.intersection(triggers))
        problem = self.liveness.ensure(self.desired, self.store, at, verify)
        if problem is not None:
            self._log({"event": "liveness", "error": problem}, problem)
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
        state: Outcome,
        retry_in: float | None,
    ) -> None:
        fields: dict[str, Any] = {"pass": self.passes, "triggers": triggers, "result": result}
        text = f"pass {self.passes} ({', '.join(triggers)}): {result}"
        if plan is not None:
            fields["actions"] = [a.as_dict() for a in plan.actions]
            if plan.changed:
                from sakeystate.report import summary

                # A refused pass wrote nothing: what it would have done, in that tense.
                done = state if result != "refused" else None
                text += f": {summary(plan, done).rstrip('.')}"
        if plan is not None and result != "refused":
            # What the bundle holds now; the restart, if owed, follows on its own line.
            fields["kids"] = list(plan.kids_after)
            fields["reload_owed"] = state.owed
            text += f"; kids={','.join(plan.kids_after)}"
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
