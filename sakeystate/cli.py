"""Argument wiring and exit codes, nothing else.

Exit codes are decided here and only here. Heavy imports (gRPC, cryptography,
jsonschema) happen inside the commands that need them, so ``--help`` and
``validate`` stay cheap on every Puppet run.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sakeystate import __version__
from sakeystate.errors import SakeystateError, StateError

if TYPE_CHECKING:
    from sakeystate.plan import Plan
    from sakeystate.state import DesiredState

DEFAULT_STATE = "/etc/sakeystate/state.yaml"
EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2
# check's contract for Puppet onlyif: 0 = run the exec (drift, or the check failed), 1 = in sync.
CHECK_DRIFT, CHECK_IN_SYNC = 0, 1


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

    return load_state(args.state)


def _observe_plan(args: argparse.Namespace, desired: DesiredState) -> Plan:
    from sakeystate.apply import observe
    from sakeystate.plan import plan

    observed, found = observe(desired, getattr(args, "observed", None))
    return plan(desired, observed, found, _at(args.at), args.allow_removals)


def _report(plan: Plan, args: argparse.Namespace, verb: str, **fields: Any) -> None:
    """The report to stdout; its warnings, meant for people, to stderr (a markdown
    plan is itself a document for people and keeps them in its body)."""
    from sakeystate.report import render

    quiet = getattr(args, "quiet", False)
    sys.stdout.write(render(plan, args.format, verb, quiet, **fields))
    if args.format != "markdown" and not quiet:
        for warning in plan.warnings:
            print(f"sakeystate: warning: {warning}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from sakeystate.state import load_state

    failed = False
    for path in args.files:
        try:
            desired = load_state(path)
        except StateError as exc:
            failed = True
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            continue
        if not args.quiet:
            print(
                f"{path}: valid ({desired.cluster}: {len(desired.trusted)} trusted, "
                f"{len(desired.revoked)} revoked)"
            )
    return EXIT_ERROR if failed else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:

    current = _observe_plan(args, _load(args))
    _report(current, args, "Plan")
    if current.refusals:
        for refusal in current.refusals:
            print(f"sakeystate: converge would be refused: {refusal}", file=sys.stderr)
        return EXIT_ERROR
    if args.detailed_exitcode and current.changed:
        return EXIT_CHANGES
    return EXIT_OK


def cmd_converge(args: argparse.Namespace) -> int:
    from sakeystate.apply import converge
    from sakeystate.errors import Refused, ReloadFailed
    from sakeystate.etcd import EtcdStore

    desired = _load(args)
    with EtcdStore(desired.etcd) as store:
        try:
            applied = converge(desired, store, _at(args.at), args.allow_removals)
        except Refused as exc:
            # Nothing was written: show what would have been, and why it was refused.
            _report(exc.plan, args, "Refused", changed=False, errors=[str(exc)])
            raise
        except ReloadFailed as exc:
            # etcd and the bundle were converged; only the reload is still owed.
            if exc.plan is not None:
                _report(exc.plan, args, "Converged, reload failed", errors=[str(exc)])
            raise
    _report(applied, args, "Converged")
    if args.detailed_exitcode and applied.changed:
        return EXIT_CHANGES
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    try:
        current = _observe_plan(args, _load(args))
    except SakeystateError as exc:
        _print_error(exc)
        print(
            "sakeystate: check failed; exiting 0 so that the guarded converge runs and "
            "reports the failure",
            file=sys.stderr,
        )
        return CHECK_DRIFT
    if current.refusals:
        for refusal in current.refusals:
            print(f"sakeystate: converge would be refused: {refusal}", file=sys.stderr)
        return CHECK_DRIFT
    if current.changed:
        if not args.quiet:
            from sakeystate.report import summary

            print(summary(current))
        return CHECK_DRIFT
    return CHECK_IN_SYNC


def cmd_publish(args: argparse.Namespace) -> int:
    import socket

    from sakeystate.apply import publish
    from sakeystate.etcd import EtcdStore
    from sakeystate.files import read_capped
    from sakeystate.keys import MAX_VALUE_BYTES, parse_key_pem

    desired = _load(args)
    pem = read_capped(args.cert, MAX_VALUE_BYTES, "--cert")
    try:
        key = parse_key_pem(pem)
    except SakeystateError as exc:
        raise SakeystateError(f"--cert {args.cert}: {exc}") from None
    host = args.host or socket.getfqdn()
    with EtcdStore(desired.etcd) as store:
        result = publish(store, desired.etcd.prefix, key, host, _at(args.at))
    if not args.quiet or result.changed:
        print(result.message)
    return EXIT_CHANGES if args.detailed_exitcode and result.changed else EXIT_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    from sakeystate import bundle, snapshot
    from sakeystate.etcd import EtcdStore

    desired = _load(args)
    with EtcdStore(desired.etcd) as store:
        observed = store.read(desired.etcd.prefix)
    found = bundle.observe(desired.bundle)
    sys.stdout.write(snapshot.to_json(observed, desired.cluster, _at(args.at), found))
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
        print(f"sakeystate: warning: {warning}", file=sys.stderr)
    if args.output == "-":
        sys.stdout.write(result.text)
    else:
        trusted = sum(1 for k in result.keys if k.trusted)
        bundled = (
            "" if args.no_etcd else f", {len(result.bundled_after)} of them bundled by converge"
        )
        print(f"wrote {args.output}: {trusted} trusted key(s){bundled}; review it, then run plan")
    return EXIT_OK


def cmd_verify_token(args: argparse.Namespace) -> int:
    from sakeystate import tokens

    result = tokens.verify_token(args.token, _load(args), _at(args.at), args.observed)
    sys.stdout.write(tokens.render(result, args.format))
    return EXIT_OK if result.ok else EXIT_ERROR


def _print_error(exc: SakeystateError) -> None:
    if isinstance(exc, StateError):
        for problem in exc.problems:
            print(f"sakeystate: error: {problem}", file=sys.stderr)
    else:
        print(f"sakeystate: error: {exc}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sakeystate",
        description="Converge kube-apiserver service-account key bundles "
        "from a reviewed state file.",
    )
    parser.add_argument("--version", action="version", version=f"sakeystate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(
        p: argparse.ArgumentParser,
        formats: tuple[str, ...] = ("text", "json"),
        quiet: bool = True,
        observed: str | None = None,
    ) -> None:
        p.add_argument(
            "--state",
            default=DEFAULT_STATE,
            metavar="FILE",
            help=f"desired-state YAML file (default {DEFAULT_STATE})",
        )
        p.add_argument("--at", metavar="RFC3339", help="evaluate time-based policy at this moment")
        p.add_argument("--format", choices=formats, default="text")
        if quiet:
            p.add_argument("-q", "--quiet", action="store_true", help="nothing when unchanged")
        if observed:
            p.add_argument("--observed", metavar="SNAPSHOT", help=observed)

    p = sub.add_parser("validate", help="check state files (schema and semantics, no network)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="show what converge would change (read-only)")
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

    p = sub.add_parser("converge", help="apply the plan to etcd and the bundle")
    common(p)
    p.add_argument(
        "--detailed-exitcode", action="store_true", help="exit 0 unchanged, 2 changed, 1 error"
    )
    p.add_argument(
        "--allow-removals",
        action="store_true",
        help="allow removing more than retention.max_removals keys from the bundle",
    )
    p.set_defaults(func=cmd_converge)

    p = sub.add_parser(
        "check",
        help="for Puppet onlyif: exit 0 if converge would change "
        "something or the check failed, 1 if in sync",
    )
    common(p)
    p.set_defaults(func=cmd_check, allow_removals=False)

    p = sub.add_parser("publish", help="publish this host's certificate under its kid")
    common(p)
    p.add_argument("--cert", required=True, metavar="FILE", help="PEM certificate (or public key)")
    p.add_argument(
        "--host", metavar="FQDN", help="host name for the Host header (default: this host)"
    )
    p.add_argument(
        "--detailed-exitcode", action="store_true", help="exit 2 when something was written"
    )
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("snapshot", help="export the etcd prefix (public material only) as JSON")
    common(p, ("json",))
    p.set_defaults(func=cmd_snapshot, allow_removals=False)

    p = sub.add_parser("inspect", help="table of every key in etcd and the bundle, with its status")
    common(p, observed="inspect a `sakeystate snapshot` file instead of etcd")
    p.set_defaults(func=cmd_inspect, allow_removals=False)

    p = sub.add_parser(
        "adopt",
        help="write a first state file from the keys in etcd and/or an existing bundle",
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
    p.add_argument("--at", metavar="RFC3339", help="evaluate certificate dates at this moment")
    p.set_defaults(func=cmd_adopt)

    p = sub.add_parser(
        "verify-token",
        help="check a service-account token against the bundle now and after the pending plan",
    )
    common(p, quiet=False, observed="plan against a snapshot instead of etcd")
    p.add_argument(
        "token", nargs="?", default="-", metavar="TOKEN", help="the JWT, or - for stdin (default)"
    )
    p.set_defaults(func=cmd_verify_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SakeystateError as exc:
        _print_error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("sakeystate: interrupted", file=sys.stderr)
        return 130
    return code
