"""Argument wiring and exit codes, nothing else.

Exit codes are decided here and only here. Heavy imports (gRPC, cryptography,
jsonschema) happen inside the commands that need them, so ``--help`` and
``validate`` stay cheap on every Puppet run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

from sakeystate import __version__
from sakeystate.errors import SakeystateError, StateError

if TYPE_CHECKING:
    from sakeystate.etcd import EtcdStore
    from sakeystate.fleet import FleetStatus, Lag
    from sakeystate.plan import Plan
    from sakeystate.restart import Outcome, Restarter, Stop
    from sakeystate.state import DesiredState

DEFAULT_STATE = "/etc/sakeystate/state.yaml"
EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2
# check's contract for Puppet onlyif: 0 = run the exec (drift, or the check failed), 1 = in sync.
CHECK_DRIFT, CHECK_IN_SYNC = 0, 1


def _now() -> datetime:
    from datetime import UTC

    return datetime.now(UTC)


def _at(text: str | None) -> datetime:
    from sakeystate.keys import parse_time

    if text is None:
        from datetime import UTC

        return datetime.now(UTC)
    try:
        return parse_time(text)
    except ValueError:
        raise SakeystateError(
            f"--at {text!r} is not RFC 3339 (e.g. 2026-11-22T10:00:00Z)"
        ) from None


def _load(args: argparse.Namespace) -> DesiredState:
    from sakeystate.state import load_state

    return load_state(args.state, getattr(args, "host", None))


def _observe_plan(args: argparse.Namespace, desired: DesiredState) -> Plan:
    from sakeystate.apply import local_facts, observe
    from sakeystate.plan import plan

    snapshot_path = getattr(args, "observed", None)
    observed, found, status = observe(desired, snapshot_path)
    local = None
    if snapshot_path:
        from sakeystate.snapshot import load_local

        local = load_local(snapshot_path)
    if local is None:
        local = local_facts(desired)
    return plan(desired, observed, found, _at(args.at), args.allow_removals, local, status=status)


_PRIORITY = {"error": "<3>", "warning": "<4>", "notice": "<5>"}


def say(kind: str, text: str) -> None:
    """One line on stderr: ``sakeystate: <kind>: <text>``, escaped for a terminal.

    Under systemd (JOURNAL_STREAM set) the line starts with its syslog priority, so
    journald shows warnings and errors at their level.
    """
    import os

    from sakeystate.escape import for_terminal

    prefix = _PRIORITY.get(kind, "<6>") if os.environ.get("JOURNAL_STREAM") else ""
    print(f"{prefix}sakeystate: {kind}: {for_terminal(text)}", file=sys.stderr)


def _json(**fields: Any) -> None:
    import json

    print(json.dumps({"version": 1, **fields}, indent=2))


def _report(plan: Plan, args: argparse.Namespace, verb: str, **fields: Any) -> None:
    """The report to stdout; its warnings, meant for people, to stderr (a markdown
    plan is itself a document for people and keeps them in its body)."""
    from sakeystate.report import render

    quiet = getattr(args, "quiet", False)
    sys.stdout.write(render(plan, args.format, verb, quiet, **fields))
    if args.format != "markdown" and not quiet:
        for warning in plan.warnings:
            say("warning", f"{warning}")


def cmd_validate(args: argparse.Namespace) -> int:
    from sakeystate.escape import for_terminal
    from sakeystate.state import load_state

    results = []
    for path in args.files:
        try:
            desired = load_state(path, args.host)
        except StateError as exc:
            results.append({"file": path, "valid": False, "errors": exc.problems})
            for problem in exc.problems:
                print(for_terminal(problem), file=sys.stderr)
            continue
        results.append({"file": path, "valid": True, "warnings": list(desired.warnings)})
        for warning in desired.warnings:
            say("warning", f"{path}: {warning}")
        if not args.quiet and args.format == "text":
            print(
                f"{path}: valid ({desired.cluster}: {len(desired.trusted)} trusted, "
                f"{len(desired.revoked)} revoked, {len(desired.trust_anchors)} trust anchor(s))"
            )
    failed = any(not r["valid"] for r in results)
    if args.format == "json":
        _json(valid=not failed, files=results)
    return EXIT_ERROR if failed else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:

    current = _observe_plan(args, _load(args))
    _report(current, args, "Plan")
    if current.refusals:
        for refusal in current.refusals:
            say("error", f"converge would be refused: {refusal}")
        return EXIT_ERROR
    if args.detailed_exitcode and current.changed:
        return EXIT_CHANGES
    return EXIT_OK


def _duration(args: argparse.Namespace, name: str) -> float | None:
    """A duration option in seconds (None when not given), its name in the error."""
    from sakeystate.state import parse_duration

    text = getattr(args, name, None)
    if text is None:
        return None
    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise SakeystateError(f"--{name.replace('_', '-')}: {exc}") from None


def _restarter(desired: DesiredState, store: EtcdStore, stop: Stop) -> Restarter:
    """This host's restart lifecycle; its record is planned afresh from etcd and disk."""
    from sakeystate.apply import observe_and_plan
    from sakeystate.restart import Restarter

    return Restarter(desired, store, _now, lambda: observe_and_plan(desired, store, _now()), stop)


def _stopped() -> Outcome:
    from sakeystate.restart import Outcome

    why = "stopped by a signal before the restart completed; the reload stays owed"
    return Outcome(owed=True, message=why, failed=why)


def _say_outcome(outcome: Outcome) -> None:
    for warning in outcome.warnings:
        say("warning", warning)
    for failure in (outcome.failed, outcome.error):
        if failure:
            say("error", failure)


def cmd_converge(args: argparse.Namespace) -> int:
    from sakeystate import restart
    from sakeystate.apply import converge
    from sakeystate.etcd import EtcdStore
    from sakeystate.plan import Refused

    desired = _load(args)
    who = restart.Who.CALLER if args.no_reload else restart.Who.RUN
    lock_timeout = _duration(args, "lock_timeout")
    stop = restart.Stop()
    with EtcdStore(desired.etcd) as store, restart.on_signals(stop):
        try:
            applied = converge(desired, store, _now(), args.allow_removals, who)
        except Refused as exc:
            # Nothing was written: show what would have been, and why it was refused
            # (a restart owed from before is still owed).
            owed = restart.pending(desired.bundle)
            _report(exc.plan, args, "Refused", changed=False, errors=[str(exc)], owed=owed)
            _record_metrics(args, "refused", exc.plan)
            raise
        except SakeystateError:
            _record_metrics(args, "error")
            raise
        try:
            outcome = restart.settle(
                _restarter(desired, store, stop), applied.owed, who, lock_timeout
            )
        except restart.StopRequested:
            outcome = _stopped()
        except SakeystateError as exc:  # the local lock, the marker: still owed
            outcome = restart.Outcome(owed=True, message=str(exc), failed=str(exc))
    if applied.record_error:
        outcome = replace(outcome, error=applied.record_error)
    failures = [f for f in (outcome.failed, outcome.error) if f]
    _report(applied.plan, args, "Converged", errors=failures or None, restart=outcome)
    _say_outcome(outcome)
    result = "error" if failures else "changed" if applied.plan.changed else "unchanged"
    _record_metrics(args, result, applied.plan, outcome)
    if failures:
        return EXIT_ERROR
    if args.detailed_exitcode and applied.plan.changed:
        return EXIT_CHANGES
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """Run the owed restart for a caller (an Ansible handler, a Puppet refresh), through
    the same lifecycle as converge and watch: lock, command, check, record, marker."""
    from sakeystate import restart
    from sakeystate.bundle import PENDING_SUFFIX
    from sakeystate.etcd import EtcdStore

    desired = _load(args)
    lock_timeout = _duration(args, "lock_timeout")
    stop = restart.Stop()
    if not restart.pending(desired.bundle):
        outcome = restart.Outcome(message="no reload is owed; nothing was run")
    elif not desired.bundle.reload:
        why = (
            f"a reload is owed ({desired.bundle.path}{PENDING_SUFFIX}) but no bundle.reload "
            "is configured: restart kube-apiserver yourself, then run `sakeystate reload-done`"
        )
        outcome = restart.Outcome(owed=True, message=why, failed=why)
    else:
        with EtcdStore(desired.etcd) as store, restart.on_signals(stop):
            try:
                outcome = _restarter(desired, store, stop).run(lock_timeout)
            except restart.StopRequested:
                outcome = _stopped()
            except SakeystateError as exc:  # the local lock, the marker: still owed
                outcome = restart.Outcome(owed=True, message=str(exc), failed=str(exc))
    failed = bool(outcome.failed or outcome.error)
    message = outcome.message
    if outcome.restarted:
        waited = f" (after {outcome.lock_wait:.1f}s waiting for the reload lock)"
        message = f"reloaded: {message}" + (waited if outcome.lock_wait else "")
    if args.format == "json":
        _json(changed=outcome.restarted, owed=outcome.owed, message=message)
    elif not failed and not (args.quiet and not outcome.restarted):
        print(message)
    _say_outcome(outcome)
    return EXIT_ERROR if failed else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Any failure at all, even an unexpected exception or a missing dependency, is
    "run the converge" (exit 0): Puppet's onlyif reads exit 1 as "in sync", so a crash
    read as in sync would silently stop convergence, revocations included."""
    try:
        current = _observe_plan(args, _load(args))
        for warning in current.warnings:
            say("warning", f"{warning}")
    except Exception as exc:
        if isinstance(exc, SakeystateError):
            _print_error(exc)
        else:
            say("error", f"unexpected {type(exc).__name__}: {exc}")
        say(
            "error",
            "check failed; exiting 0 so that the guarded converge runs and reports the failure",
        )
        if args.format == "json":
            _json(in_sync=False, changed=None, errors=[str(exc)])
        _record_metrics(args, "error")
        return CHECK_DRIFT
    for refusal in current.refusals:
        say("error", f"converge would be refused: {refusal}")
    drift = bool(current.refusals) or current.changed
    outcome = "refused" if current.refusals else "changed" if drift else "unchanged"
    _record_metrics(args, outcome, current)
    if args.format == "json":
        from sakeystate.report import as_dict

        _json(**{**as_dict(current), "in_sync": not drift})
    elif current.refusals and not args.quiet:
        # Never "No changes" above an error saying that converge would be refused.
        print(
            f"Refused: converge would write nothing ({len(current.refusals)} "
            "refusal(s), on stderr)."
        )
    elif drift and not args.quiet:
        from sakeystate.report import summary

        print(summary(current))
    return CHECK_DRIFT if drift else CHECK_IN_SYNC


def _record_metrics(
    args: argparse.Namespace,
    result: str,
    plan: Plan | None = None,
    restart: Outcome | None = None,
) -> None:
    """``--metrics-textfile``: this run's outcome added to the file's counters. Failing
    to write it is a warning: it never turns a converge or a check into a failure."""
    if not getattr(args, "metrics_textfile", None):
        return
    from sakeystate.metrics import Metrics

    try:
        Metrics(args.metrics_textfile).record(result, _now(), plan, restart)
    except Exception as exc:
        print(f"sakeystate: warning: metrics not written: {exc}", file=sys.stderr)


def cmd_watch(args: argparse.Namespace) -> int:
    """The service: converge at start, then on every event (see sakeystate.watch)."""
    import re

    from sakeystate.metrics import Metrics
    from sakeystate.state import parse_duration
    from sakeystate.watch import Options, Watcher

    durations = {}
    for name in ("debounce", "resync"):
        text = getattr(args, name)
        fraction = re.fullmatch(r"(\d{1,6}\.\d{1,3})s", text)  # 0.5s: below a second
        try:
            durations[name] = (
                float(fraction.group(1)) if fraction else parse_duration(text).total_seconds()
            )
        except ValueError as exc:
            raise SakeystateError(f"--{name}: {exc}") from None
    if durations["resync"] < 1:
        raise SakeystateError("--resync must be at least 1s")
    desired = _load(args)
    if desired.host is None:
        # Never a service that runs without knowing which host it is (it could write no
        # status record, and systemd would call it active).
        raise SakeystateError(
            "cannot tell which control plane this is: the machine's name is not fully "
            "qualified; pass --host FQDN (the shipped unit takes it from SAKEYSTATE_HOST "
            "in /etc/default/sakeystate) or set host in the state file"
        )
    metrics = None
    if args.metrics_textfile or args.metrics_listen:
        metrics = Metrics(args.metrics_textfile, args.metrics_listen)
    options = Options(
        args.state, args.host, durations["debounce"], durations["resync"], args.format, args.quiet
    )
    return Watcher(options, desired, metrics, _now).run()


def cmd_signer(args: argparse.Namespace) -> int:
    """Restart-free mode: converge like watch and serve kube-apiserver's ExternalJWTSigner
    API on signer.socket (see sakeystate.signer)."""
    from sakeystate import signer
    from sakeystate.metrics import Metrics
    from sakeystate.watch import Options

    desired = _load(args)
    metrics = None
    if args.metrics_textfile or args.metrics_listen:
        metrics = Metrics(args.metrics_textfile, args.metrics_listen)
    options = Options(args.state, args.host, format=args.format, quiet=args.quiet)
    return signer.run(options, desired, metrics, _now)


def cmd_publish(args: argparse.Namespace) -> int:
    from sakeystate.apply import publish, read_cert_file
    from sakeystate.etcd import EtcdStore

    desired = _load(args)
    path = args.cert or desired.own_cert
    if not path:
        raise SakeystateError("publish needs --cert FILE, or own_cert in the state file")
    cert = read_cert_file(path, "--cert" if args.cert else "own_cert")
    key, intermediates = cert
    with EtcdStore(desired.etcd) as store:
        result = publish(store, desired, key, intermediates, _now(), dry_run=args.check)
    if args.format == "json":
        _json(changed=result.changed, key=result.key, kid=key.kid, message=result.message)
    elif not args.quiet or result.changed:
        print(result.message)
    if args.check:
        return EXIT_CHANGES if result.changed else EXIT_OK
    return EXIT_CHANGES if args.detailed_exitcode and result.changed else EXIT_OK


def cmd_reload_done(args: argparse.Namespace) -> int:
    """The caller restarted kube-apiserver another way: clear the owed reload and write
    the status record (with --wait-ready: once reload_check says it is up)."""
    from sakeystate import restart
    from sakeystate.apply import observe_and_plan
    from sakeystate.etcd import EtcdStore

    desired = _load(args)
    stop = restart.Stop()
    with EtcdStore(desired.etcd) as store, restart.on_signals(stop):
        try:
            if args.wait_ready:
                restart.wait_ready(desired.bundle, stop)
            owed = restart.confirm(
                desired, store, _now, lambda: observe_and_plan(desired, store, _now())
            )
        except restart.StopRequested:
            raise SakeystateError("stopped by a signal; nothing was confirmed") from None
    message = "owed reload confirmed and cleared" if owed else "no reload was owed"
    if args.format == "json":
        _json(changed=owed, message=message)
    elif not args.quiet:
        print(message)
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    """Operator-run: delete the etcd entries no host needs any more (R13). Hosts delete
    only their own revoked entries; what retention retired, on any host, only this."""
    from dataclasses import replace

    from sakeystate.apply import local_facts, prune
    from sakeystate.etcd import EtcdStore
    from sakeystate.plan import Refused
    from sakeystate.state import load_state

    desired = load_state(args.state, None)
    if args.etcd_user:
        desired = replace(
            desired,
            etcd=replace(
                desired.etcd, username=args.etcd_user, password_file=args.etcd_password_file
            ),
        )
    only = args.host.lower().rstrip(".") if args.host else None
    with EtcdStore(desired.etcd) as store:
        try:
            pruned = prune(
                desired, store, _now(), local_facts(desired), only, args.allow_removals, args.check
            )
        except Refused as exc:
            _prune_report(exc.plan, args, "Refused", [str(exc)])
            raise
    _prune_report(pruned, args, "Would prune" if args.check else "Pruned", [])
    if args.check or args.detailed_exitcode:
        return EXIT_CHANGES if pruned.changed else EXIT_OK
    return EXIT_OK


def _prune_report(plan: Plan, args: argparse.Namespace, verb: str, errors: list[str]) -> None:
    from sakeystate.escape import for_terminal
    from sakeystate.report import as_dict

    if args.format == "json":
        _json(**{k: v for k, v in as_dict(plan, errors=errors).items() if k != "version"})
        return
    for action in plan.actions:
        host = action.host or "unknown host"
        print(for_terminal(f"etcd   delete {action.key or ''} ({host}): {action.reason}"))
    if not (args.quiet and not plan.changed):
        print(f"{verb}: {len(plan.actions)} etcd entr{'y' if len(plan.actions) == 1 else 'ies'}.")


def cmd_snapshot(args: argparse.Namespace) -> int:
    from sakeystate import bundle, snapshot
    from sakeystate.apply import local_facts
    from sakeystate.etcd import EtcdStore

    desired = _load(args)
    with EtcdStore(desired.etcd) as store:
        observed = store.read(desired.etcd.prefix)
    found = bundle.observe(desired.bundle)
    local = local_facts(desired)
    sys.stdout.write(snapshot.to_json(observed, desired.cluster, _at(args.at), found, local))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from sakeystate.report import render_inspect

    current = _observe_plan(args, _load(args))
    sys.stdout.write(render_inspect(current, args.format))
    return EXIT_OK


def cmd_adopt(args: argparse.Namespace) -> int:
    from sakeystate import adopt

    result = adopt.run(
        adopt.Options(
            **{name: getattr(args, name) for name in adopt.Options.FROM_ARGS},
            at=_at(args.at),
            endpoints=tuple(args.endpoint),
            read_etcd=not args.no_etcd,
        )
    )
    for warning in result.warnings:
        say("warning", f"{warning}")
    if args.format == "json":
        pinned = [k.kid for k in result.keys if k.trusted]
        _json(state=result.text, trusted=pinned, warnings=list(result.warnings))
    elif args.output == "-":
        sys.stdout.write(result.text)
    else:
        trusted = sum(1 for k in result.keys if k.trusted)
        bundled = (
            "" if args.no_etcd else f", {len(result.bundled_after)} of them bundled by converge"
        )
        print(f"wrote {args.output}: {trusted} trusted key(s){bundled}; review it, then run plan")
    return EXIT_OK


def cmd_verify_token(args: argparse.Namespace) -> int:
    import os

    from sakeystate import tokens
    from sakeystate.files import read_capped

    source = args.token
    if source != "-" and os.path.isfile(source):
        source = read_capped(source, tokens.MAX_TOKEN_BYTES, "token file").decode(
            "utf-8", "replace"
        )
    elif source != "-":
        say(
            "warning",
            "a token given on the command line lands in ps and shell history; "
            "pass a file, or - to read stdin",
        )
    result = tokens.verify_token(source, _load(args), _at(args.at), args.observed)
    sys.stdout.write(tokens.render(result, args.format))
    return EXIT_OK if result.ok else EXIT_ERROR


def _fleet(args: argparse.Namespace, desired: DesiredState) -> FleetStatus:
    from sakeystate import bundle, fleet
    from sakeystate.apply import local_facts
    from sakeystate.etcd import EtcdStore
    from sakeystate.plan import plan

    down_after = _duration(args, "down_after")
    with EtcdStore(desired.etcd) as store:
        observed = store.read(desired.etcd.prefix)
        statuses = store.read(desired.etcd.status_prefix)
    # The effective set of the cluster: this host's plan with nothing excluded.
    everyone = replace(desired, bundle=replace(desired.bundle, exclude_host=None))
    found = bundle.observe(desired.bundle)
    current = plan(everyone, observed, found, _at(args.at), True, local_facts(desired))
    seen = fleet.read_seen(statuses, desired.etcd.status_prefix)
    return fleet.fleet_status(
        current, desired.fleet, seen, set(desired.revoked), down_after or fleet.DOWN_AFTER
    )


def cmd_status(args: argparse.Namespace) -> int:
    from sakeystate.fleet import render_status

    status = _fleet(args, _load(args))
    if args.format == "json":
        _json(**{k: v for k, v in status.as_dict().items() if k != "version"})
    elif not (args.quiet and status.in_order):
        sys.stdout.write(render_status(status))
    return EXIT_OK if status.in_order else EXIT_CHANGES


def cmd_wait(args: argparse.Namespace) -> int:
    """Block on an etcd watch of the status records until the kid reached every fleet
    host (or, with --absent, left every one); a timeout names the hosts that lag, and
    whether each is lagging, unknown (no record) or down."""
    import time

    from sakeystate.apply import read_cert_file
    from sakeystate.etcd import EtcdStore, PrefixWatch
    from sakeystate.fleet import DOWN_AFTER, read_seen, waiting_on
    from sakeystate.keys import normalize_fingerprint

    desired = _load(args)
    if args.cert:
        kid = read_cert_file(args.cert, "--cert")[0].kid
    else:
        try:
            kid = normalize_fingerprint(args.kid)
        except ValueError as exc:
            raise SakeystateError(f"--kid: {exc}") from None
    timeout = _duration(args, "timeout") or 0.0
    down_after = _duration(args, "down_after") or DOWN_AFTER
    hosts = desired.fleet
    if not hosts:
        raise SakeystateError("the fleet is empty: set fleet, trust_anchors or trusted hosts")
    skip = frozenset(h.lower().rstrip(".") for h in args.skip)
    strangers = sorted(skip - set(hosts))
    if strangers:
        raise SakeystateError(
            f"--skip {', '.join(strangers)}: not in the fleet ({', '.join(hosts)})"
        )
    goal = "no fleet host verifies" if args.absent else "every fleet host verifies"
    for host in sorted(skip):
        say(
            "notice",
            f"--skip {host}: not waited for, as asked; it may not be true there that {goal} {kid}",
        )
    prefix = desired.etcd.status_prefix
    deadline = time.monotonic() + timeout
    with EtcdStore(desired.etcd) as store:
        while True:
            statuses = store.read(prefix)
            lags = waiting_on(
                read_seen(statuses, prefix), hosts, kid, args.absent, _now(), down_after, skip
            )
            if all(lag.state == "skipped" for lag in lags):
                skipped = [lag.host for lag in lags]
                if args.format == "json":
                    _json(reached=True, kid=kid, lagging=[], skipped=skipped)
                elif not args.quiet:
                    passed = f"; skipped: {', '.join(skipped)}" if skipped else ""
                    print(f"{goal} {kid} ({len(hosts) - len(skipped)} host(s){passed})")
                return EXIT_OK
            if time.monotonic() >= deadline:
                return _wait_timed_out(
                    args, kid, goal, [lag for lag in lags if lag.state != "skipped"]
                )
            with PrefixWatch(store, [prefix], statuses.revision + 1) as watch:
                watch.wait(deadline - time.monotonic())


def _wait_timed_out(args: argparse.Namespace, kid: str, goal: str, lags: list[Lag]) -> int:
    if args.format == "json":
        _json(
            reached=False,
            kid=kid,
            lagging=[{"host": lag.host, "state": lag.state, "record": lag.detail} for lag in lags],
        )
    groups = []
    for state in ("lagging", "unknown", "down"):
        where = [f"{lag.host} ({lag.detail})" for lag in lags if lag.state == state]
        if where:
            groups.append(f"{state}: {'; '.join(where)}")
    down = [lag.host for lag in lags if lag.state == "down"]
    hint = f"; a host known to be down can be passed with --skip {down[0]}" if down else ""
    say("error", f"timed out waiting until {goal} {kid}; {' / '.join(groups)}{hint}")
    return EXIT_ERROR


def _print_error(exc: SakeystateError) -> None:
    if isinstance(exc, StateError):
        for problem in exc.problems:
            say("error", f"{problem}")
    else:
        say("error", f"{exc}")


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 on every command (argparse's own default is 2, which
    ``plan --detailed-exitcode`` and ``publish --check`` use for "changes")."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"sakeystate: error: {message}\n")


class _RefuseAt(argparse.Action):
    """``--at`` on a command that writes: refused (R2). ``converge --at <future>`` once
    deleted live keys from etcd for the whole cluster."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kw: Any) -> None:
        parser.error(
            "--at is only for read-only commands (plan, check, inspect, status, "
            "verify-token, snapshot, adopt): a command that writes or waits always acts "
            "as of now"
        )


_EXITS = {
    "validate": "0 every file is valid, 1 not",
    "plan": "0 (with --detailed-exitcode: 0 no changes, 2 changes); 1 error or refusal",
    "converge": "0 done (with --detailed-exitcode: 0 unchanged, 2 changed); 1 error",
    "check": (
        "INVERTED for Puppet onlyif: 0 converge would change something OR the check "
        "failed for any reason (error on stderr); 1 in sync"
    ),
    "publish": "0 done (with --check: 0 already published, 2 would publish); 1 error",
    "reload-done": "0 cleared (or nothing owed), 1 error",
    "prune": "0 done (with --check or --detailed-exitcode: 0 nothing to prune, 2 entries "
    "deleted or to delete); 1 error or refusal",
    "reload": (
        "0 restarted (or nothing owed), 1 error (lock not obtained, restart or reload_check "
        "failed, owed but no bundle.reload)"
    ),
    "snapshot": "0, 1 error",
    "status": "0 all in order, 2 something lags or needs a person (each item on stdout), 1 error",
    "wait": "0 reached, 1 timed out (naming the hosts that lag) or error",
    "inspect": "0, 1 error",
    "watch": (
        "0 when stopped by SIGTERM or SIGINT; 1 when the state is invalid at start or this "
        "host's FQDN is unknown"
    ),
    "signer": (
        "0 when stopped by SIGTERM or SIGINT; 1 when it cannot start (invalid state, no "
        "signer section, a private key or socket refused)"
    ),
    "adopt": "0, 1 error",
    "verify-token": "0 the token verifies now and after the plan, 1 not or error",
}


def _lock_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lock-timeout",
        metavar="DURATION",
        help="wait this long for the cluster's reload lock (default: reload_timeout x the "
        "fleet's size); reload_timeout counts from when it is held",
    )


def _down_after(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--down-after",
        metavar="DURATION",
        help="a lagging host with no live watch whose record has not changed for this long "
        "is reported as down (default 15m)",
    )


def _metrics_textfile(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-textfile",
        metavar="PATH",
        help="write Prometheus metrics here (node_exporter textfile format, atomically)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sakeystate",
        description="Converge kube-apiserver service-account key bundles "
        "from a reviewed state file.",
    )
    parser.add_argument("--version", action="version", version=f"sakeystate {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=f"{summary}. {description}",
            epilog=f"exit status: {_EXITS[name]}",
        )

    def common(
        p: argparse.ArgumentParser,
        formats: tuple[str, ...] = ("text", "json"),
        read_only: bool = True,
        observed: str | None = None,
    ) -> None:
        p.add_argument(
            "--state",
            default=DEFAULT_STATE,
            metavar="FILE",
            help=f"desired-state YAML file (default {DEFAULT_STATE})",
        )
        p.add_argument(
            "--host",
            metavar="FQDN",
            help="this control plane (the state's host: self); default the machine's FQDN",
        )
        if read_only:
            p.add_argument(
                "--at", metavar="RFC3339", help="evaluate time-based policy at this moment"
            )
        else:
            p.add_argument("--at", action=_RefuseAt, help=argparse.SUPPRESS)
        p.add_argument("--format", choices=formats, default="text")
        p.add_argument(
            "-q", "--quiet", action="store_true", help="print nothing when nothing changed"
        )
        if observed:
            p.add_argument("--observed", metavar="SNAPSHOT", help=observed)

    p = command(
        "validate",
        "check state files (schema and semantics, no network)",
        "Every problem names the file, the line and the field.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--host", metavar="FQDN", help="resolve host: self as this host")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing for valid files")
    p.set_defaults(func=cmd_validate)

    p = command(
        "plan",
        "show what converge would change (read-only)",
        "It predicts every refusal and failure converge would hit before writing.",
    )
    common(
        p,
        ("text", "json", "markdown"),
        observed="plan offline against a `sakeystate snapshot` file instead of etcd",
    )
    p.add_argument(
        "--detailed-exitcode", action="store_true", help="exit 0 no changes, 2 changes, 1 error"
    )
    p.add_argument(
        "--allow-removals",
        action="store_true",
        help="plan as if converge were run with --allow-removals",
    )
    p.set_defaults(func=cmd_plan)

    p = command(
        "converge",
        "apply the plan to etcd and the bundle",
        "Restarts kube-apiserver (bundle.reload) only when the bundle's key set changed.",
    )
    common(p, read_only=False)
    p.add_argument(
        "--detailed-exitcode", action="store_true", help="exit 0 unchanged, 2 changed, 1 error"
    )
    p.add_argument(
        "--allow-removals",
        action="store_true",
        help="allow removing more than retention.max_removals keys, or a host's newest key",
    )
    p.add_argument(
        "--no-reload",
        action="store_true",
        help="leave the restart to the caller: the owed reload is reported (reload_needed) "
        "until `sakeystate reload` (or `reload-done`) performs or confirms it",
    )
    _lock_timeout(p)
    p.set_defaults(func=cmd_converge)
    _metrics_textfile(p)

    p = command(
        "check",
        "for Puppet onlyif: exit 0 if converge would change something or the check failed",
        "Exit codes are inverted (0 = run the converge) so that a failure is never read "
        "as in sync.",
    )
    common(p)
    p.set_defaults(func=cmd_check, allow_removals=False)
    _metrics_textfile(p)

    p = command(
        "watch",
        "the service: converge at start, then on every change in etcd or the state file",
        "Also at the plan's next time-based event and every --resync; bursts are "
        "coalesced for --debounce. One line per pass on stderr.",
    )
    common(p, read_only=False)
    p.add_argument(
        "--debounce",
        default="1s",
        metavar="DURATION",
        help="coalesce events this long (default 1s; 0.5s for less than a second)",
    )
    p.add_argument(
        "--resync",
        default="10m",
        metavar="DURATION",
        help="read everything again at least this often (default 10m)",
    )
    _metrics_textfile(p)
    p.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        help="serve Prometheus metrics over HTTP on HOST:PORT (or :PORT)",
    )
    p.set_defaults(func=cmd_watch)

    p = command(
        "signer",
        "restart-free mode: converge like watch and serve kube-apiserver's ExternalJWTSigner "
        "API on signer.socket",
        "FetchKeys serves the converged effective set plus this host's own key, Sign signs "
        "with signer.private_key_file, Metadata states retention.max_token_lifetime. No "
        "restart is ever run; the bundle, JWKS and status record are still written. "
        "kube-apiserver runs with --service-account-signing-endpoint=<signer.socket>.",
    )
    common(p, read_only=False)
    _metrics_textfile(p)
    p.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        help="serve Prometheus metrics over HTTP on HOST:PORT (or :PORT)",
    )
    p.set_defaults(func=cmd_signer)

    p = command(
        "publish",
        "publish this host's certificate under its kid",
        "Never overwrites a different key; a same-key renewal keeps its Published time.",
    )
    common(p, read_only=False)
    p.add_argument(
        "--cert",
        metavar="FILE",
        help="PEM certificate, optionally followed by its intermediates (default: own_cert)",
    )
    p.add_argument("--check", action="store_true", help="write nothing: exit 2 if it would")
    p.add_argument(
        "--detailed-exitcode", action="store_true", help="exit 2 when something was written"
    )
    p.set_defaults(func=cmd_publish)

    p = command(
        "reload-done",
        "confirm that the caller restarted kube-apiserver",
        "Clears the reload that converge --no-reload left owed and writes the status "
        "record for the bundle on disk. For callers that restart another way; "
        "`sakeystate reload` restarts under the cluster's lock instead.",
    )
    common(p, read_only=False)
    p.add_argument(
        "--wait-ready",
        action="store_true",
        help="first poll bundle.reload_check until it succeeds (within reload_timeout): "
        "for the boot unit, after kube-apiserver started",
    )
    p.set_defaults(func=cmd_reload_done)

    p = command(
        "prune",
        "delete etcd entries no host needs any more (operator-run)",
        "Revoked keys, keys retention retired (superseded past superseded_grace, "
        "decommissioned hosts past max_token_lifetime), flat or legacy copies already moved "
        "to their host's path, status records of hosts outside the fleet. Hosts never "
        "delete each other's entries: this does, planned and refused like converge.",
    )
    p.add_argument(
        "--state",
        default=DEFAULT_STATE,
        metavar="FILE",
        help=f"desired-state YAML file (default {DEFAULT_STATE})",
    )
    p.add_argument("--host", metavar="FQDN", help="prune only this host's entries")
    p.add_argument("--check", action="store_true", help="write nothing: exit 2 if it would")
    p.add_argument(
        "--detailed-exitcode", action="store_true", help="exit 0 nothing pruned, 2 pruned"
    )
    p.add_argument(
        "--allow-removals",
        action="store_true",
        help="allow deleting more than retention.max_removals trusted keys",
    )
    p.add_argument("--etcd-user", metavar="NAME", help="the operator's etcd user (not the host's)")
    p.add_argument("--etcd-password-file", metavar="FILE", help="file holding that user's password")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when nothing changed")
    p.add_argument("--at", action=_RefuseAt, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_prune)

    p = command(
        "reload",
        "run the owed kube-apiserver restart under the cluster's reload lock",
        "For Ansible handlers and Puppet refreshes: the lock, bundle.reload, reload_check, "
        "the status record and the owed marker, as converge and watch do. Nothing owed: "
        "nothing is run.",
    )
    common(p, read_only=False)
    _lock_timeout(p)
    p.set_defaults(func=cmd_reload)

    p = command(
        "status",
        "the fleet view: which apiserver verifies which key",
        "One read of the key prefix and the status prefix; what monitoring runs.",
    )
    common(p)
    _down_after(p)
    p.set_defaults(func=cmd_status)

    p = command(
        "wait",
        "block until every fleet host verifies a key (or, with --absent, none does)",
        "An etcd watch on the status records, not a poll loop. The reimage procedure: "
        "publish, then wait --cert, then pool the apiserver.",
    )
    common(p, read_only=False)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--kid",
        metavar="KID",
        help="the key's kid (or sha256:<hex>); a kid that begins with - works as it is "
        "(--kid -Xy... or --kid=-Xy...)",
    )
    which.add_argument("--cert", metavar="FILE", help="the key's certificate (chained is fine)")
    p.add_argument(
        "--absent",
        action="store_true",
        help="wait until no fleet host verifies it (a host without a record is unknown, "
        "never absent)",
    )
    p.add_argument("--timeout", default="10m", metavar="DURATION", help="default 10m")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="HOST",
        help="do not wait for this fleet host (one known to be down; logged); repeatable",
    )
    _down_after(p)
    p.set_defaults(func=cmd_wait)

    p = command(
        "snapshot",
        "export the etcd prefix (public material only) as JSON",
        "For `plan --observed` on a review machine.",
    )
    common(p, ("json",))
    p.set_defaults(func=cmd_snapshot, allow_removals=False)

    p = command(
        "inspect",
        "table of every key in etcd and the bundle, with its status",
        "IN-BUNDLE is the file on disk now; AFTER is the bundle the plan writes.",
    )
    common(p, observed="inspect a `sakeystate snapshot` file instead of etcd")
    p.set_defaults(func=cmd_inspect, allow_removals=False)

    p = command(
        "adopt",
        "write a first state file from the keys in etcd and/or an existing bundle",
        "Review its output before use.",
    )
    p.add_argument(
        "--state",
        metavar="FILE",
        help="take cluster, etcd, bundle and retention from this state file",
    )
    p.add_argument("--cluster", metavar="NAME", help="cluster name (required without --state)")
    p.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="URL",
        help="etcd endpoint http(s)://host:port (repeatable; required without --state)",
    )
    p.add_argument(
        "--prefix", metavar="PREFIX", help="etcd key prefix (default /kube-apiserver-sa-certs/)"
    )
    p.add_argument("--timeout", metavar="DURATION", help="etcd timeout (default 5s)")
    p.add_argument("--ca-file", metavar="FILE", help="CA bundle for https endpoints")
    p.add_argument("--cert-file", metavar="FILE", help="etcd client certificate")
    p.add_argument("--key-file", metavar="FILE", help="etcd client key")
    p.add_argument("--username", metavar="NAME", help="etcd user")
    p.add_argument("--password-file", metavar="FILE", help="file holding the etcd password")
    p.add_argument(
        "--from-bundle",
        metavar="FILE",
        help="trust exactly the keys of this bundle (the one the old watcher wrote)",
    )
    p.add_argument(
        "--bundle-path",
        metavar="PATH",
        help="bundle.path of the new state (default: --from-bundle, else the legacy path)",
    )
    p.add_argument(
        "--no-etcd", action="store_true", help="do not read etcd (adopt from --from-bundle only)"
    )
    p.add_argument(
        "-o", "--output", default="-", metavar="FILE", help="write the state here (default stdout)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --output file")
    p.add_argument(
        "--anchor-ca",
        metavar="FILE",
        help="add a trust anchor for this cluster CA file over the adopted keys' hosts",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--at", metavar="RFC3339", help="evaluate certificate dates at this moment")
    p.set_defaults(func=cmd_adopt)

    p = command(
        "verify-token",
        "check a service-account token against the bundle now and after the pending plan",
        "The token is read from stdin (or a file) so that it never lands in ps or history.",
    )
    common(p, observed="plan against a snapshot instead of etcd")
    p.add_argument(
        "token",
        nargs="?",
        default="-",
        metavar="FILE",
        help="a file holding the token, or - for stdin (default); a token itself works "
        "but lands in ps and shell history",
    )
    p.set_defaults(func=cmd_verify_token)
    return parser


# Options whose value is a kid: base64url, so about one kid in 64 begins with "-".
_KID_OPTIONS = frozenset({"--kid"})


def _kid_values(argv: list[str]) -> list[str]:
    """``--kid -Xy...`` as ``--kid=-Xy...``, which argparse would read as an option."""
    import re

    out: list[str] = []
    pending = False
    for arg in argv:
        if pending and re.fullmatch(r"-[A-Za-z0-9_-]{42}", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
        pending = arg in _KID_OPTIONS
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_kid_values(sys.argv[1:] if argv is None else argv))
    failed = CHECK_DRIFT if args.command == "check" else EXIT_ERROR
    try:
        code: int = args.func(args)
    except SakeystateError as exc:
        _print_error(exc)
        return failed
    except KeyboardInterrupt:
        say("error", "interrupted")
        return failed if args.command == "check" else 130
    except Exception as exc:
        # Never a traceback (the report would be the only output a person reads), and
        # never an exit status that a caller reads as success or "in sync".
        say("error", f"internal error ({type(exc).__name__}: {exc}); please report it")
        return failed
    return code
