"""The restart lifecycle: the one place that decides and performs kube-apiserver restarts.

Every documented restart path comes through here: ``converge``, ``watch``, and
``sakeystate reload`` for callers (an Ansible handler, a Puppet refresh);
``reload-done`` (a caller restarted the apiserver another way) settles here too.

A restart is *owed* from just before a converge writes a bundle whose key set
changed (the marker beside the bundle is written first) until it is done: this
host's ``bundle.reload`` exited 0 and ``reload_check`` succeeded, or a caller
confirmed with ``reload-done``. Only then may the status record claim the new
set: until then it keeps saying what the apiserver last loaded.

``Restarter.run``, in order:

1. wait for the cluster-wide lock (``etcd.reload_lock``) *without* the local
   lock, so that the bundle keeps following etcd meanwhile (``watch``);
2. take the local lock and look at the marker again: another run on this host
   (``watch`` and a configuration-management handler, say) may have restarted
   the apiserver meanwhile; a restart already done is never repeated;
3. run ``bundle.reload`` in its own session and process group. ``reload_timeout``
   counts from here, once the lock is held. The command is never killed while it
   may still be restarting the apiserver: past ``reload_timeout`` the restart has
   failed, but the lock is held until its process group is gone, at most
   ``HARD_CAP`` x ``reload_timeout``, when the group is killed (SIGTERM, then
   SIGKILL) and waited for;
4. poll ``reload_check`` until it succeeds, by the same deadline;
5. clear the marker, then write the status record (what the apiserver loaded:
   the bundle on disk and this host's own key); clearing first means a crash in
   between costs a late record, never a second restart;
6. release the lock.

A failed restart or check releases the lock (its process group gone), is
recorded under ``<status_prefix><host>/restart`` for ``status``, and stays
owed; ``watch`` retries after an exponential backoff (``backoff``), behind the
hosts already waiting. SIGTERM (``Stop``): before the command starts, the
restart is simply not begun; while it runs, it is waited for ``STOP_GRACE`` at
most and never killed; the restart stays owed unless it completed.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from types import FrameType
from typing import Any, Protocol

from sakeystate import bundle
from sakeystate.errors import EtcdError, ReloadFailed, SakeystateError
from sakeystate.escape import for_terminal
from sakeystate.etcd import EtcdStore, ReloadLock
from sakeystate.fleet import RESTART_KEY
from sakeystate.keys import format_time
from sakeystate.model import Delete, EtcdEntry, EtcdOp, Guard, Put
from sakeystate.plan import Plan, status_record
from sakeystate.state import BundleConfig, DesiredState

# A restart command still running at HARD_CAP x reload_timeout is killed.
HARD_CAP = 3
# After SIGTERM, a running restart command is waited for this long, never killed.
STOP_GRACE = 10.0
# Between SIGTERM and SIGKILL when the hard cap kills a process group.
KILL_GRACE = 5.0
CHECK_INTERVAL = 1.0
# A failed restart is retried (by watch) after this, doubling, at most BACKOFF_MAX.
BACKOFF_FIRST, BACKOFF_MAX = 10.0, 600.0
# How much of a failed command's output is kept for its error message.
OUTPUT_TAIL = 4096
# How long output is still read after a command exited (a daemon it started may
# hold the pipe open forever).
DRAIN_GRACE = 0.5
# A guarded write that loses a race is retried this often.
MAX_ATTEMPTS = 5


class Who(StrEnum):
    """Who restarts kube-apiserver once a restart is owed."""

    RUN = "run"  # this run: bundle.reload under the lock (converge, watch, reload)
    CALLER = "caller"  # the caller (converge --no-reload): `reload`, or `reload-done`
    NEVER = "never"  # restart-free (signer mode): the apiserver fetches the set itself


def mode_of(who: Who) -> str:
    """The status record's ``mode``: how this host's apiserver gets its keys."""
    return "signer" if who is Who.NEVER else "file"


def owes(plan: Plan, who: Who) -> bool:
    """Whether applying ``plan`` makes a restart owed (the marker is written first).

    Any change of the bundle's key set does, whoever restarts and whether or not a
    restart is configured: that is what keeps the status record truthful and the
    warning repeating until someone restarts the apiserver.
    """
    return who is not Who.NEVER and plan.bundle_changed


@dataclass(frozen=True)
class Outcome:
    """What became of a restart in this run; the only source of "reloaded" in output."""

    restarted: bool = False  # this run restarted kube-apiserver, and reload_check passed
    owed: bool = False  # a restart is still owed afterwards
    message: str = "in sync, no restart owed"
    failed: str | None = None  # why this run's restart failed (the run fails)
    attempted: bool = False  # the restart command ran (a failure then counts as one)
    error: str | None = None  # a failure after a restart that succeeded (its status record)
    lock_wait: float | None = None  # seconds this run waited for the cluster lock
    holder: str | None = None  # who held the lock when this run began to wait
    warnings: tuple[str, ...] = ()
    elsewhere: bool = False  # another run on this host restarted it meanwhile

    @property
    def phrase(self) -> str | None:
        """The summary's restart part, in the tense of what happened."""
        if self.restarted:
            return "reloaded"
        if self.failed is not None:
            return "reload failed, still owed"
        if self.owed:
            return "reload owed"
        if self.elsewhere:
            return "reloaded by another run"
        return None


IN_SYNC = Outcome()
OWED = Outcome(owed=True, message="reload owed")

NO_RESTART = (
    "the bundle's key set changed but no bundle.reload is configured and no caller "
    "restarts kube-apiserver: it still verifies only the keys it loaded last, and the "
    "status record keeps saying so; restart it, then run `sakeystate reload-done` "
    "(or configure bundle.reload)"
)
BY_CALLER = (
    "reload owed: the caller restarts kube-apiserver (`sakeystate reload`, or "
    "`sakeystate reload-done` after restarting it another way)"
)


def left_owed(who: Who, config: BundleConfig) -> Outcome:
    """An owed restart this run does not perform: the caller's, or nobody's yet."""
    if who is Who.CALLER:
        return Outcome(owed=True, message=BY_CALLER)
    assert not config.reload
    return Outcome(owed=True, message="reload owed: " + NO_RESTART, warnings=(NO_RESTART,))


# --- stopping (SIGTERM, SIGINT) ---------------------------------------------------------


class StopRequested(BaseException):
    """SIGTERM/SIGINT reached a point where the run stops; the restart stays owed.

    A BaseException so that no ``except Exception`` swallows it. ``alive`` is set when
    a restart command's process group still runs: the lock must then not be released
    by hand (its lease expires instead).
    """

    alive = False


class Stop:
    """A stop request, set from a signal handler; the lifecycle polls it at each step.

    Inside ``interruptible()`` (a blocking wait that cannot poll, such as the lock
    wait of a one-shot command) the handler raises StopRequested at once instead.
    """

    def __init__(self) -> None:
        self.requested = False
        self._raise = False

    def request(self) -> None:
        self.requested = True
        if self._raise:
            self._raise = False
            raise StopRequested()

    def check(self) -> None:
        if self.requested:
            raise StopRequested()

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self._raise = True
        try:
            yield
        finally:
            self._raise = False


@contextmanager
def on_signals(stop: Stop) -> Iterator[None]:
    """SIGTERM and SIGINT request ``stop`` for the duration (one-shot commands)."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.request()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# --- the lock -----------------------------------------------------------------------------


class Lock(Protocol):
    """What the lifecycle needs of ``etcd.ReloadLock`` (fair or not)."""

    def acquire(self, timeout: float) -> None: ...

    def release(self) -> None: ...


def holder_name(desired: DesiredState) -> str:
    return f"{desired.host or socket.gethostname()} pid {os.getpid()}"


def lock_holder(store: EtcdStore, key: str) -> str | None:
    """Who holds the reload lock now: the oldest key at ``key`` or under ``key/`` (a
    waiter queue keeps its waiters there, the holder first), escaped; None if free."""
    try:
        entries = [
            e for e in store.read(key).entries if e.key == key or e.key.startswith(key + "/")
        ]
    except EtcdError:
        return None
    if not entries:
        return None
    oldest = min(entries, key=lambda e: e.create_revision)
    return for_terminal(oldest.value.decode("utf-8", "replace").strip())[:200]


class LockRequest:
    """The cluster lock awaited in a thread of its own (with its own etcd session), so
    that ``watch`` keeps converging the bundle while it waits (only the restart waits).

    ``abandon()`` (SIGTERM): a lock obtained afterwards is released at once; a wait
    still running ends with the process, and its lease expires.
    """

    def __init__(self, desired: DesiredState, timeout: float) -> None:
        assert desired.etcd.reload_lock is not None
        self.store = EtcdStore(desired.etcd)
        self.lock: Lock = ReloadLock(self.store, desired.etcd.reload_lock, holder_name(desired))
        self.started = time.monotonic()
        self.holder = lock_holder(self.store, desired.etcd.reload_lock)
        self.error: SakeystateError | None = None
        self._done = threading.Event()
        self._mutex = threading.Lock()
        self._abandoned = False
        self._thread = threading.Thread(
            target=self._wait, args=(timeout,), name="reload-lock-wait", daemon=True
        )
        self._thread.start()

    def _wait(self, timeout: float) -> None:
        try:
            self.lock.acquire(timeout)
        except SakeystateError as exc:
            self.error = exc
        except Exception as exc:  # a library's exception nobody mapped: the wait failed
            self.error = EtcdError(f"waiting for the reload lock: {type(exc).__name__}: {exc}")
        with self._mutex:
            if self._abandoned and self.error is None:
                self.lock.release()
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def waited(self) -> float:
        return time.monotonic() - self.started

    def abandon(self) -> None:
        with self._mutex:
            self._abandoned = True
            if self._done.is_set() and self.error is None:
                self.lock.release()
        if self._done.is_set():
            self.store.close()


# --- commands --------------------------------------------------------------------------


def _shown(argv: tuple[str, ...]) -> str:
    return for_terminal(" ".join(argv))


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group runs (zombies nobody reaps do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a member running as another user still counts
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _kill_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _start(argv: tuple[str, ...]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise ReloadFailed(
            f"reload command {_shown(argv)!r} could not start: {exc.strerror}"
        ) from None


class _Output:
    """The last OUTPUT_TAIL bytes a command wrote, read as they come (no memory cost
    for a command that prints gigabytes)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.tail = b""
        self.eof = False
        self.drained = False
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def pump(self, timeout: float) -> None:
        """Read for at most ``timeout`` seconds (short: an exit is noticed meanwhile)."""
        if self.eof:
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=max(0.0, timeout))
            return
        if self.selector.select(timeout=max(0.0, timeout)):
            chunk = os.read(self.fd, 65536)
            self.eof = not chunk
            self.tail = (self.tail + chunk)[-OUTPUT_TAIL:]

    def drain(self) -> None:
        """After the exit: what is left, for DRAIN_GRACE at most (a daemon may hold the pipe)."""
        self.drained = True
        until = time.monotonic() + DRAIN_GRACE
        while not self.eof and time.monotonic() < until:
            self.pump(min(0.05, until - time.monotonic()))

    def close(self) -> None:
        self.selector.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def last_lines(self) -> str:
        """The end of the output for an error message: three lines, escaped."""
        # Split at LF only: a CR or other control character inside a line is shown escaped.
        lines = [line for line in self.tail.decode("utf-8", "replace").split("\n") if line.strip()]
        if len(self.tail) == OUTPUT_TAIL and len(lines) > 1:
            lines = lines[1:]  # cut mid-line by the cap
        shown = [for_terminal(line.strip()) for line in lines[-3:]]
        return f": {' / '.join(shown)}" if shown else ""


def run_check(argv: tuple[str, ...], timeout: float) -> None:
    """Run a probe (``reload_check``) with a time limit; any failure raises ReloadFailed.

    Returns or raises within ``timeout`` plus about a second, whatever the command
    does: a child that daemonises while holding stdout open is not waited for, and
    on timeout the probe's process group is killed (a probe changes nothing).
    """
    proc = _start(argv)
    output = _Output(proc)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            output.pump(min(0.05, deadline - time.monotonic()))
        if proc.poll() is not None:
            output.drain()
    except BaseException:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        output.close()
    if proc.poll() is None:
        _kill_group(proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        raise ReloadFailed(
            f"reload command {_shown(argv)!r} timed out after {timeout:g}s; it will be retried"
        )
    if proc.returncode != 0:
        raise ReloadFailed(
            f"reload command {_shown(argv)!r} exited {proc.returncode}"
            f"{output.last_lines()}; it will be retried"
        )


def run_restart(
    argv: tuple[str, ...], timeout: float, stop: Stop, cap: float | None = None
) -> float:
    """Run ``bundle.reload`` and wait until its whole process group is gone; the seconds
    it took. ReloadFailed when it failed or outlasted ``timeout``.

    Never killed before ``cap`` (default HARD_CAP x ``timeout``): a restart killed
    halfway (or a ``systemctl restart`` whose job goes on without it) must not be
    taken for a finished one, and the lock must not be released under it. At the cap
    the group is killed and waited for. On a stop request the group is waited for
    STOP_GRACE at most, then StopRequested is raised (``alive`` if it still runs).
    """
    cap = HARD_CAP * timeout if cap is None else cap
    started = time.monotonic()
    proc = _start(argv)
    output = _Output(proc)
    stopped_at: float | None = None
    killed_at: float | None = None
    try:
        while not _finished(proc, output):
            now = time.monotonic()
            if stop.requested and stopped_at is None:
                stopped_at = now
            if stopped_at is not None and now - stopped_at >= STOP_GRACE:
                interrupted = StopRequested()
                interrupted.alive = True
                raise interrupted
            if killed_at is None and now - started >= cap:
                killed_at = now
                _kill_after_grace(proc)
            elif killed_at is not None and now - killed_at >= 2 * KILL_GRACE:
                break  # SIGKILLed and still listed: nothing more can be done about it
            if proc.poll() is None:
                output.pump(0.05)
            else:
                time.sleep(0.05)
    finally:
        output.close()
    took = time.monotonic() - started
    if stopped_at is not None:
        raise StopRequested()  # it ended within the grace, but the check was not done
    shown = _shown(argv)
    if killed_at is not None:
        raise ReloadFailed(
            f"reload command {shown!r} was still running after {cap:g}s ({HARD_CAP} x "
            f"reload_timeout), so its process group was killed; it will be retried"
        )
    if took > timeout:
        raise ReloadFailed(
            f"reload command {shown!r} took {took:.1f}s, more than reload_timeout "
            f"({timeout:g}s); the lock was held until it ended; it will be retried"
        )
    if proc.returncode != 0:
        raise ReloadFailed(
            f"reload command {shown!r} exited {proc.returncode}{output.last_lines()}; "
            "it will be retried"
        )
    return took


def _finished(proc: subprocess.Popen[bytes], output: _Output) -> bool:
    """The command exited and its whole process group is gone (its output drained first)."""
    if proc.poll() is None:
        return False
    if not output.drained:
        output.drain()
    return not _group_alive(proc.pid)


def _kill_after_grace(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group, SIGKILL KILL_GRACE later if anything of it is left."""
    _kill_group(proc.pid, signal.SIGTERM)
    until = time.monotonic() + KILL_GRACE
    while _group_alive(proc.pid) and time.monotonic() < until:
        proc.poll()
        time.sleep(0.05)
    _kill_group(proc.pid, signal.SIGKILL)


def poll_check(config: BundleConfig, deadline: float, stop: Stop) -> None:
    """``reload_check`` polled until it succeeds, by ``deadline``."""
    if not config.reload_check:
        return
    while True:
        stop.check()
        left = deadline - time.monotonic()
        if left <= 0:
            raise ReloadFailed(
                f"reload_check {' '.join(config.reload_check)!r} did not succeed within "
                f"reload_timeout ({config.reload_timeout:g}s); the reload will be retried"
            )
        try:
            run_check(config.reload_check, left)
            return
        except ReloadFailed:
            pause = min(CHECK_INTERVAL, max(0.0, deadline - time.monotonic()))
            until = time.monotonic() + pause
            while time.monotonic() < until and not stop.requested:
                time.sleep(0.05)


def wait_ready(config: BundleConfig, stop: Stop) -> None:
    """``reload-done --wait-ready``: ``reload_check`` until it succeeds, within
    ``reload_timeout`` (the apiserver that a caller started loads the bundle)."""
    if not config.reload_check:
        raise SakeystateError("--wait-ready needs bundle.reload_check in the state file")
    poll_check(config, time.monotonic() + config.reload_timeout, stop)


def backoff(failures: int) -> float:
    """Seconds before the next try after ``failures`` consecutive failed restarts."""
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1)))


# --- status records ----------------------------------------------------------------------


def etcd_user(desired: DesiredState) -> str:
    config = desired.etcd
    if config.username:
        return config.username
    if config.cert_file:
        return f"the TLS client certificate {config.cert_file}"
    return "none (no etcd auth)"


def _json(entry: EtcdEntry | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    try:
        data = json.loads(entry.value)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def record_value(
    desired: DesiredState, loaded: Plan, existing: EtcdEntry | None, at: datetime, mode: str
) -> bytes | None:
    """The status record claiming what ``loaded`` says the apiserver verifies; None when
    the record already says so (a no-op run writes nothing)."""
    value = status_record(desired, loaded, existing, at)
    old = _json(existing)
    if value is None:
        if old is not None and old.get("mode") == mode:
            return None
        value = status_record(desired, loaded, None, at)
        assert value is not None
    data = json.loads(value)
    data["mode"] = mode
    return (json.dumps(data, sort_keys=True) + "\n").encode()


def from_disk(fresh: Plan, content: bytes | None) -> Plan:
    """What an apiserver that (re)started now loads, from a plan observed now: the kids
    of the bundle as found (``kids_before``) and this host's own excluded key."""
    excluded = set(fresh.verified_kids) - set(fresh.kids_after)
    verified = tuple(sorted(set(fresh.kids_before) | excluded))
    return replace(fresh, verified_kids=verified, bundle_content=content or b"")


def write_record(
    desired: DesiredState, store: EtcdStore, loaded: Plan, at: datetime, mode: str = "file"
) -> bool:
    """This host's status record (guarded), and a cleared restart-failure key; True if
    something was written. A failure fails the run, naming the key and the etcd user."""
    if desired.host is None:
        return False
    key = desired.etcd.status_prefix + desired.host
    failure_key = f"{key}/{RESTART_KEY}"
    try:
        for _attempt in range(MAX_ATTEMPTS):
            own = {e.key: e for e in store.read(key).entries if e.key in (key, failure_key)}
            existing, failure = own.get(key), own.get(failure_key)
            value = record_value(desired, loaded, existing, at, mode)
            guards: list[Guard] = []
            writes: list[EtcdOp] = []
            if value is not None:
                guards.append(Guard(key, existing.mod_revision if existing else 0))
                writes.append(Put(key, value))
            if failure is not None:
                guards.append(Guard(failure_key, failure.mod_revision))
                writes.append(Delete(failure_key))
            if not writes:
                return False
            if store.transaction(guards, writes):
                return True
    except EtcdError as exc:
        raise EtcdError(
            f"the status record {key} was not written (etcd user {etcd_user(desired)}): "
            f"{exc}; its apiserver's keys stay unconfirmed until it is (grant the host "
            f"readwrite on {key} and the prefix {key}/)"
        ) from None
    raise EtcdError(f"{key} kept changing during {MAX_ATTEMPTS} attempts; run again")


def note_failure(desired: DesiredState, store: EtcdStore, error: str, at: datetime) -> str | None:
    """Record a failed restart under ``<status_prefix><host>/restart`` for ``status``;
    a warning when that write fails (the run fails for the restart anyway)."""
    if desired.host is None:
        return None
    key = f"{desired.etcd.status_prefix}{desired.host}/{RESTART_KEY}"
    try:
        existing = store.get(key)
        old = _json(existing) or {}
        count, since = old.get("failures"), old.get("since")
        record = {
            "version": 1,
            "failures": (count if isinstance(count, int) else 0) + 1,
            "since": since if isinstance(since, str) else format_time(at),
            "last": format_time(at),
            "error": error[:1000],
        }
        value = (json.dumps(record, sort_keys=True) + "\n").encode()
        guard = Guard(key, existing.mod_revision if existing else 0)
        store.transaction([guard], [Put(key, value)])
    except EtcdError as exc:
        return f"the failed restart was not recorded at {key}: {exc}"
    return None


# --- the lifecycle -------------------------------------------------------------------------


@dataclass
class Restarter:
    """One host's restart lifecycle (see the module docstring).

    ``replan`` plans this host afresh (etcd and the bundle on disk): the status
    record after a restart claims what the apiserver loaded, the bundle as found
    under the local lock, whatever run wrote it.
    """

    desired: DesiredState
    store: EtcdStore
    now: Callable[[], datetime]
    replan: Callable[[], Plan]
    stop: Stop

    @property
    def config(self) -> BundleConfig:
        return self.desired.bundle

    def lock_timeout(self) -> float:
        """How long a one-shot command waits for the cluster lock by default: every fleet
        host ahead of it holding it for one ``reload_timeout``."""
        return self.config.reload_timeout * max(1, len(self.desired.fleet))

    def run(self, lock_timeout: float | None = None) -> Outcome:
        """Wait for the lock (interruptibly), then ``perform`` (a one-shot command)."""
        key = self.desired.etcd.reload_lock
        if key is None:
            return self.perform(None, 0.0, None)
        holder = lock_holder(self.store, key)
        lock = ReloadLock(self.store, key, holder_name(self.desired))
        started = time.monotonic()
        try:
            with self.stop.interruptible():
                lock.acquire(self.lock_timeout() if lock_timeout is None else lock_timeout)
        except EtcdError as exc:
            why = f"{exc}; the reload will be retried"
            return Outcome(owed=True, message=why, failed=why, lock_wait=time.monotonic() - started)
        return self.perform(lock, time.monotonic() - started, holder)

    def perform(self, lock: Lock | None, waited: float, holder: str | None) -> Outcome:
        """Holding the cluster lock (or none configured): the restart, the check, the
        marker, the record. The lock is released here, never while the command's
        process group lives (on SIGTERM with the group alive, its lease expires)."""
        release = True
        try:
            return self._restart(waited, holder)
        except StopRequested as exc:
            release = not exc.alive
            raise
        finally:
            if lock is not None and release:
                lock.release()

    def _restart(self, waited: float, holder: str | None) -> Outcome:
        config = self.config
        cap = HARD_CAP * config.reload_timeout
        assert config.reload is not None
        with bundle.locked(config, cap + self.desired.etcd.timeout):
            if not bundle.observe(config).reload_pending:
                return Outcome(
                    message="another run already restarted kube-apiserver; not repeated",
                    lock_wait=waited,
                    holder=holder,
                    elsewhere=True,
                )
            self.stop.check()
            deadline = time.monotonic() + config.reload_timeout
            try:
                run_restart(config.reload, config.reload_timeout, self.stop, cap)
                poll_check(config, deadline, self.stop)
            except ReloadFailed as exc:
                return self.failed(str(exc), waited, holder)
            bundle.clear_reload_pending(config)
            error = None
            try:
                fresh = self.replan()
                loaded = from_disk(fresh, bundle.observe(config).content)
                write_record(self.desired, self.store, loaded, self.now())
            except SakeystateError as exc:
                error = str(exc)
        return Outcome(
            restarted=True,
            message="kube-apiserver restarted and reload_check passed",
            error=error,
            lock_wait=waited,
            holder=holder,
        )

    def failed(self, error: str, waited: float, holder: str | None = None) -> Outcome:
        """A restart that failed (its command, or reload_check): recorded for `status`
        under ``<status_prefix><host>/restart``, counted, still owed."""
        warning = note_failure(self.desired, self.store, error, self.now())
        return Outcome(
            owed=True,
            message=error,
            failed=error,
            attempted=True,
            lock_wait=waited,
            holder=holder,
            warnings=(warning,) if warning else (),
        )


def settle(
    restarter: Restarter, owed: bool, who: Who, lock_timeout: float | None = None
) -> Outcome:
    """After a converge's writes: the restart this run performs, or why it stays owed."""
    if not owed:
        return IN_SYNC
    if who is not Who.RUN or not restarter.config.reload:
        return left_owed(who, restarter.config)
    return restarter.run(lock_timeout)


def confirm(
    desired: DesiredState,
    store: EtcdStore,
    now: Callable[[], datetime],
    replan: Callable[[], Plan],
) -> bool:
    """``reload-done``: the caller restarted kube-apiserver. Clears the owed restart and
    writes the status record for the bundle on disk; True if a restart was owed."""
    config = desired.bundle
    with bundle.locked(config, config.reload_timeout + desired.etcd.timeout):
        owed = bundle.observe(config).reload_pending
        bundle.clear_reload_pending(config)
        fresh = replan()
        write_record(desired, store, from_disk(fresh, bundle.observe(config).content), now())
    return owed


def pending(config: BundleConfig) -> bool:
    """Whether a restart is owed on this host (the marker beside the bundle)."""
    return bundle.observe(config).reload_pending
