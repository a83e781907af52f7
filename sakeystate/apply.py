"""Executes plans: observe, plan, apply; and publish.

Order of a converge, chosen so that a crash at any point is repaired by the
next run: lock; read etcd and the bundle; plan; refuse if unsafe; etcd writes
(guarded, re-planned from a fresh read when something moved); mark a reload as
owed; write the bundle atomically; reload; clear the mark.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime

from sakeystate import bundle
from sakeystate.errors import EtcdError, Refused, ReloadFailed
from sakeystate.escape import for_terminal
from sakeystate.etcd import EtcdStore, batches
from sakeystate.keys import KeyInfo
from sakeystate.model import BundleObservation, EtcdObservation, Guard, Put
from sakeystate.plan import Plan, plan, plan_publish
from sakeystate.state import DesiredState

# A guarded write that loses a race is re-planned from a fresh read this often.
MAX_ATTEMPTS = 5
# How much of a failed reload's output is kept for its error message.
RELOAD_OUTPUT_TAIL = 4096
# How long output is still read after the reload command exited (a daemon it
# started may hold the pipe open forever).
RELOAD_DRAIN_GRACE = 0.5


def observe(
    desired: DesiredState, snapshot_path: str | None = None
) -> tuple[EtcdObservation, BundleObservation]:
    """etcd (or a snapshot of it) and the bundle, as a plan sees them.

    A snapshot that carries the bundle of ``bundle.path`` stands in for the local
    file too, so a review machine plans exactly what the host would.
    """
    if snapshot_path:
        from sakeystate import snapshot

        observed, found = snapshot.load_with_bundle(snapshot_path, desired.etcd.prefix)
        if found is not None and found.path == desired.bundle.path:
            return observed, found
        return observed, bundle.observe(desired.bundle)
    with EtcdStore(desired.etcd) as store:
        return store.read(desired.etcd.prefix), bundle.observe(desired.bundle)


def observe_and_plan(
    desired: DesiredState, store: EtcdStore, at: datetime, allow_removals: bool = False
) -> Plan:
    observed = store.read(desired.etcd.prefix)
    return plan(desired, observed, bundle.observe(desired.bundle), at, allow_removals)


def apply_etcd(store: EtcdStore, current: Plan) -> bool:
    """Apply the plan's etcd writes; False when a guard failed (re-plan and retry)."""
    items = [(a.guards, a.writes) for a in current.etcd_actions]
    return all(store.transaction(guards, writes) for guards, writes in batches(items))


def converge(
    desired: DesiredState,
    store: EtcdStore,
    at: datetime,
    allow_removals: bool = False,
    run_reload: bool = True,
) -> Plan:
    """Bring etcd and the bundle to the desired state; returns the plan that was applied."""
    config = desired.bundle
    with bundle.locked(config, desired.etcd.timeout):
        for _attempt in range(MAX_ATTEMPTS):
            current = observe_and_plan(desired, store, at, allow_removals)
            if current.refusals:
                raise Refused(current)
            if apply_etcd(store, current):
                break
        else:
            raise EtcdError(
                f"etcd keys under {desired.etcd.prefix} kept changing during {MAX_ATTEMPTS} "
                "attempts; nothing more was written, run again"
            )
        reload_action = current.reload
        if current.write_bundle:
            if reload_action is not None and run_reload:
                bundle.mark_reload_pending(config, reload_action.reason)
            bundle.write(config, current.bundle_content)
        elif any(a.op == "permissions" for a in current.actions):
            bundle.fix_permissions(config)
        if current.write_jwks and current.jwks_content is not None and config.jwks_path:
            bundle.write(config, current.jwks_content, config.jwks_path)
        if config.reload and reload_action is not None and run_reload:
            try:
                run_reload_command(config.reload, config.reload_timeout)
            except ReloadFailed as exc:
                exc.plan = current
                raise
        if run_reload or not config.reload:
            bundle.clear_reload_pending(config)
    return current


def run_reload_command(argv: tuple[str, ...], timeout: float) -> None:
    """Run the reload argv with a time limit; any failure raises ReloadFailed.

    Returns or raises within ``timeout`` plus about a second, whatever the
    command does: its output is read as it comes, keeping only the last
    ``RELOAD_OUTPUT_TAIL`` bytes (a reload that prints gigabytes costs no
    memory), and a child that daemonises while holding stdout open is not
    waited for: once the command itself has exited, its output is drained for
    ``RELOAD_DRAIN_GRACE`` at most, then the pipe is closed. On timeout the
    command's process group is killed.
    """
    shown = for_terminal(" ".join(argv))
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise ReloadFailed(f"reload command {shown!r} could not start: {exc.strerror}") from None
    assert proc.stdout is not None
    try:
        tail, exited = _output_tail(proc, proc.stdout.fileno(), time.monotonic() + timeout)
    finally:
        proc.stdout.close()
    if not exited:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
        raise ReloadFailed(
            f"reload command {shown!r} timed out after {timeout:g}s; it will be retried"
        )
    if proc.returncode != 0:
        detail = _last_lines(tail)
        raise ReloadFailed(
            f"reload command {shown!r} exited {proc.returncode}{detail}; it will be retried"
        )


def _output_tail(proc: subprocess.Popen[bytes], fd: int, deadline: float) -> tuple[bytes, bool]:
    """The last bytes ``proc`` wrote, and whether it exited before ``deadline``."""
    tail = b""
    eof = False
    exited_at: float | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and (eof or now >= exited_at + RELOAD_DRAIN_GRACE):
                return tail, True
            if exited_at is None and now >= deadline:
                return tail, False
            until = deadline if exited_at is None else exited_at + RELOAD_DRAIN_GRACE
            if eof:
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, until - now))
                continue
            # A short wait, so an exit is noticed while a daemon keeps the pipe open.
            if selector.select(timeout=min(0.05, max(0.0, until - now))):
                chunk = os.read(fd, 65536)
                eof = not chunk
                tail = (tail + chunk)[-RELOAD_OUTPUT_TAIL:]


def _last_lines(tail: bytes) -> str:
    """The end of the reload's output for the error message: three lines, escaped."""
    # Split at LF only: a CR or other control character inside a line is shown escaped.
    lines = [line for line in tail.decode("utf-8", "replace").split("\n") if line.strip()]
    if len(tail) == RELOAD_OUTPUT_TAIL and len(lines) > 1:
        lines = lines[1:]  # cut mid-line by the cap
    shown = [for_terminal(line.strip()) for line in lines[-3:]]
    return f": {' / '.join(shown)}" if shown else ""


@dataclass(frozen=True)
class PublishResult:
    changed: bool
    key: str
    message: str


def publish(store: EtcdStore, prefix: str, key: KeyInfo, host: str, at: datetime) -> PublishResult:
    """Put this host's certificate under its kid; never overwrite a different key."""
    target = prefix + key.kid
    for _attempt in range(MAX_ATTEMPTS):
        existing = store.get(target)
        decision = plan_publish(target, existing, key, host, at)
        if decision.value is None:
            return PublishResult(False, target, decision.message)
        guard = Guard(target, existing.mod_revision if existing else 0)
        if store.transaction([guard], [Put(target, decision.value)]):
            return PublishResult(True, target, decision.message)
    raise EtcdError(f"{target} kept changing during {MAX_ATTEMPTS} attempts; run again")
