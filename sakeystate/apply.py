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
from sakeystate.anchors import Anchor, load_roots
from sakeystate.errors import EtcdError, Refused, ReloadFailed, SakeystateError
from sakeystate.escape import for_terminal
from sakeystate.etcd import EtcdStore, batches
from sakeystate.keys import KeyInfo
from sakeystate.model import BundleObservation, EtcdObservation, Guard, Put
from sakeystate.plan import LocalFacts, Plan, certify, plan, plan_publish, status_record
from sakeystate.state import AnchorConfig, BundleConfig, DesiredState

# A guarded write that loses a race is re-planned from a fresh read this often.
MAX_ATTEMPTS = 5
RELOAD_CHECK_INTERVAL = 1.0
MAX_CA_FILE_BYTES = 1024 * 1024
# How much of a failed reload's output is kept for its error message.
RELOAD_OUTPUT_TAIL = 4096
# How long output is still read after the reload command exited (a daemon it
# started may hold the pipe open forever).
RELOAD_DRAIN_GRACE = 0.5


def own_key(desired: DesiredState) -> KeyInfo | None:
    """The key of ``own_cert`` (this host's service-account certificate), if set."""
    if not desired.own_cert:
        return None
    return read_cert_file(desired.own_cert, "own_cert")[0]


def local_facts(desired: DesiredState) -> LocalFacts:
    """What this host adds to the plan; a failure converge would hit becomes a refusal."""
    problems: list[str] = []
    own_kid = None
    try:
        own = own_key(desired)
        own_kid = own.kid if own else None
    except SakeystateError as exc:
        problems.append(str(exc))
    problems += bundle.preflight(desired.bundle)
    anchors = []
    for config in desired.trust_anchors:
        try:
            anchors.append(load_anchor(config))
        except SakeystateError as exc:
            problems.append(str(exc))
    return LocalFacts(own_kid=own_kid, problems=tuple(problems), anchors=tuple(anchors))


def load_anchor(config: AnchorConfig) -> Anchor:
    """A trust anchor with its CA file read and checked (the verifier parses it once)."""
    from sakeystate.files import read_capped

    what = f"trust_anchors {config.name}: ca_file"
    pem = read_capped(config.ca_file, MAX_CA_FILE_BYTES, what)
    load_roots(pem, f"{what} {config.ca_file}")
    return Anchor(config.name, pem, config.hosts, config.common_name)


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
    desired: DesiredState,
    store: EtcdStore,
    at: datetime,
    allow_removals: bool = False,
    reload_by_caller: bool = False,
) -> Plan:
    observed = store.read(desired.etcd.prefix)
    found = bundle.observe(desired.bundle)
    return plan(
        desired, observed, found, at, allow_removals, local_facts(desired), reload_by_caller
    )


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
    # Another run on this host may be in its reload (reload_timeout) and its etcd writes.
    with bundle.locked(config, config.reload_timeout + desired.etcd.timeout):
        for _attempt in range(MAX_ATTEMPTS):
            current = observe_and_plan(desired, store, at, allow_removals, not run_reload)
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
        if reload_action is not None and not current.write_bundle:
            pass  # owed from an earlier run: the marker is already there
        elif reload_action is not None:
            bundle.mark_reload_pending(config, reload_action.reason)
        if current.write_bundle:
            bundle.write(config, current.bundle_content)
        elif any(a.op == "permissions" for a in current.actions):
            bundle.fix_permissions(config)
        if current.write_jwks and current.jwks_content is not None and config.jwks_path:
            bundle.write(config, current.jwks_content, config.jwks_path)
        if reload_action is not None and run_reload and config.reload:
            try:
                _reload(config)
            except ReloadFailed as exc:
                exc.plan = current
                raise
            bundle.clear_reload_pending(config)
        if reload_action is None or run_reload:
            # In sync, no reload owed: what this host's apiserver verifies is settled.
            write_status(desired, store, current, at)
    return current


def _reload(config: BundleConfig) -> None:
    """The reload, then ``reload_check`` polled until it succeeds; one shared deadline."""
    assert config.reload is not None
    deadline = time.monotonic() + config.reload_timeout
    run_reload_command(config.reload, config.reload_timeout)
    if not config.reload_check:
        return
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ReloadFailed(
                f"reload_check {' '.join(config.reload_check)!r} did not succeed within "
                f"reload_timeout ({config.reload_timeout:g}s); the reload will be retried"
            )
        try:
            run_reload_command(config.reload_check, left)
            return
        except ReloadFailed:
            time.sleep(min(RELOAD_CHECK_INTERVAL, max(0.0, deadline - time.monotonic())))


def reload_done(desired: DesiredState) -> bool:
    """The caller restarted kube-apiserver: clear the owed reload. True if one was owed."""
    with bundle.locked(desired.bundle, desired.bundle.reload_timeout + desired.etcd.timeout):
        owed = bundle.observe(desired.bundle).reload_pending
        bundle.clear_reload_pending(desired.bundle)
    return owed


def write_status(desired: DesiredState, store: EtcdStore, current: Plan, at: datetime) -> None:
    """This host's status record, written (guarded) only when what it says changed."""
    if desired.host is None:
        return
    key = desired.etcd.status_prefix + desired.host
    for _attempt in range(MAX_ATTEMPTS):
        existing = store.get(key)
        value = status_record(desired, current, existing, at)
        if value is None:
            return
        guard = Guard(key, existing.mod_revision if existing else 0)
        if store.transaction([guard], [Put(key, value)]):
            return
    raise EtcdError(f"{key} kept changing during {MAX_ATTEMPTS} attempts; run again")


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
    changed: bool  # written (or, with dry_run, would be)
    key: str
    message: str


def read_cert_file(path: str, what: str) -> tuple[KeyInfo, tuple[bytes, ...]]:
    """A certificate (possibly followed by its intermediates) or public key file."""
    from sakeystate.files import read_capped
    from sakeystate.keys import MAX_VALUE_BYTES, parse_key_file

    pem = read_capped(path, MAX_VALUE_BYTES, what)
    try:
        return parse_key_file(pem)
    except SakeystateError as exc:
        raise SakeystateError(f"{what} {path}: {exc}") from None


def publish_host(desired: DesiredState, key: KeyInfo) -> str:
    """The host a key is published for: ``--host``, else the state's ``host`` (R7).

    It must be fully qualified, and one of the names the certificate gives, when it
    gives any: a certificate issued to another host is never published as this one.
    """
    from sakeystate.keys import names_of

    host = desired.host
    if host is None:
        raise SakeystateError(
            "cannot tell which host publishes: this machine's name is not fully qualified; "
            "pass --host FQDN or set host in the state file"
        )
    names = names_of(key)
    if names and host not in names:
        raise SakeystateError(
            f"refusing to publish for {host}: the certificate names {', '.join(names)}, "
            "not this host"
        )
    return host


def publish(
    store: EtcdStore,
    desired: DesiredState,
    key: KeyInfo,
    intermediates: tuple[bytes, ...],
    at: datetime,
    dry_run: bool = False,
) -> PublishResult:
    """Put this host's certificate under its kid; never overwrite a different key."""
    host = publish_host(desired, key)
    if key.kid in desired.revoked:
        raise SakeystateError(
            f"refusing to publish {key.kid}: it is revoked ({desired.revoked[key.kid]})"
        )
    anchors = local_facts(desired).anchors
    if desired.trust_anchors and key.kid not in desired.trusted:
        verdict = certify(anchors, key, intermediates, host, at)
        if not verdict.trusted:
            raise SakeystateError(
                f"refusing to publish {key.kid} for {host}: no trust anchor certifies it "
                f"({verdict.reason}); its peers would not trust it"
            )
    target = desired.etcd.prefix + key.kid
    attempted: bytes | None = None
    for _attempt in range(MAX_ATTEMPTS):
        existing = store.get(target)
        decision = plan_publish(target, existing, key, host, at, intermediates)
        if decision.value is None:
            # A write whose answer was lost may have applied: then it is ours.
            ours = attempted is not None and existing is not None and existing.value == attempted
            return PublishResult(ours, target, decision.message)
        if dry_run:
            return PublishResult(True, target, "would be " + decision.message)
        guard = Guard(target, existing.mod_revision if existing else 0)
        attempted = decision.value
        if store.transaction([guard], [Put(target, decision.value)]):
            return PublishResult(True, target, decision.message)
    raise EtcdError(f"{target} kept changing during {MAX_ATTEMPTS} attempts; run again")
