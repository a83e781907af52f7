"""Plan -> text / json / markdown. The same Plan value feeds every renderer."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from sakeystate.escape import for_markdown, for_markdown_code, for_terminal
from sakeystate.keys import format_time
from sakeystate.plan import Plan

if TYPE_CHECKING:
    from sakeystate.restart import Outcome

REPORT_VERSION = 1


def as_dict(
    plan: Plan,
    changed: bool | None = None,
    errors: list[str] | None = None,
    restart: Outcome | None = None,
    owed: bool | None = None,
) -> dict[str, Any]:
    """The contract's JSON report. ``changed`` defaults to "the plan has actions";
    ``reload_needed`` is whether a restart is owed after the run (``owed``, or what
    became of ``restart``), and in a plan whether one would be."""
    if owed is None:
        owed = plan.reload is not None if restart is None else restart.owed
    return {
        "version": REPORT_VERSION,
        "changed": plan.changed if changed is None else changed,
        "cluster": plan.cluster,
        "host": plan.host,
        "at": format_time(plan.at),
        "bundle_changed": plan.bundle_changed,
        "reload_needed": owed,
        "actions": [a.as_dict() for a in plan.actions],
        "bundle": {
            "path": plan.bundle_path,
            "kids_before": list(plan.kids_before),
            "kids_after": list(plan.kids_after),
        },
        "keys": [k.as_dict() for k in plan.keys],
        "warnings": list(plan.warnings),
        "errors": list(errors or plan.refusals),
    }


def render_json(
    plan: Plan,
    changed: bool | None = None,
    errors: list[str] | None = None,
    restart: Outcome | None = None,
    owed: bool | None = None,
) -> str:
    report = as_dict(plan, changed, errors, restart, owed)
    return json.dumps(report, indent=2, sort_keys=False) + "\n"


def summary(plan: Plan, restart: Outcome | None = None) -> str:
    """One line in the tense of what happened: "would add" in a plan, "added" after a
    converge (``restart`` given: what became of the restart, from the one place that
    knows; "reloaded" only when this run restarted the apiserver)."""
    done = restart is not None
    counts = Counter((a.target, a.op) for a in plan.actions)
    verb = (lambda past, _future: past) if done else (lambda _past, future: f"would {future}")
    parts = []
    if counts[("bundle", "add")]:
        parts.append(f"{verb('added', 'add')} {counts[('bundle', 'add')]} bundle key(s)")
    if counts[("bundle", "remove")]:
        parts.append(f"{verb('removed', 'remove')} {counts[('bundle', 'remove')]}")
    if counts[("bundle", "write")]:
        parts.append(f"{verb('rewrote', 'rewrite')} the bundle")
    if counts[("bundle", "permissions")]:
        parts.append(f"{verb('fixed', 'fix')} bundle permissions")
    etcd = sum(n for (target, _op), n in counts.items() if target == "etcd")
    if etcd:
        ops = Counter(a.op for a in plan.etcd_actions)
        parts.append("etcd: " + ", ".join(f"{n} {op}" for op, n in sorted(ops.items())))
    if restart is None and plan.reload:
        parts.append("would reload")
    elif restart is not None and restart.phrase:
        parts.append(restart.phrase)
    if not parts:
        return (
            f"No changes: {len(plan.kids_after)} key(s) in the bundle, etcd and bundle "
            "match the desired state."
        )
    return f"{'; '.join(parts)} ({len(plan.kids_before)} -> {len(plan.kids_after)} bundle keys)."


def render_text(
    plan: Plan, verb: str = "Plan", quiet: bool = False, restart: Outcome | None = None
) -> str:
    """One line per action, then the summary; every value from etcd or a file escaped."""
    if quiet and not plan.changed:
        return ""
    lines = []
    for action in plan.actions:
        subject = for_terminal(action.kid or "")
        where = for_terminal(action.host or action.key or "")
        reason = for_terminal(action.reason)
        lines.append(
            f"{action.target:<6} {action.op:<11} {subject:<43} {where:<28} {reason}".rstrip()
        )
    lines.append(
        f"{verb} for {for_terminal(plan.cluster)} at {format_time(plan.at)}: "
        f"{summary(plan, restart)}"
    )
    return "\n".join(lines) + "\n"


def render_markdown(plan: Plan) -> str:
    """The plan as a review comment: every interpolated value goes through ``for_markdown``.

    Only this function writes markdown structure (headings, table pipes, line
    breaks); a value can therefore neither add a line nor hide one.
    """
    cluster = for_markdown_code(plan.cluster)
    out = [f"### sakeystate plan for {cluster} at {format_time(plan.at)}", ""]
    out.append(f"**{summary(plan)}**")
    out.append("")
    for refusal in plan.refusals:
        out.append(f"> :no_entry: **Refused:** {for_markdown(refusal)}")
        out.append("")
    if plan.actions:
        out += ["| target | op | kid | host / key | reason |", "|---|---|---|---|---|"]
        for a in plan.actions:
            kid = for_markdown_code(a.kid) if a.kid else ""
            where = for_markdown(a.host or a.key or "")
            out.append(f"| {a.target} | {a.op} | {kid} | {where} | {for_markdown(a.reason)} |")
        out.append("")
    if plan.warnings:
        out.append("**Warnings**")
        out.append("")
        out += [f"- {for_markdown(w)}" for w in plan.warnings]
        out.append("")
    out.append(
        f"Bundle {for_markdown_code(plan.bundle_path)}: "
        f"{len(plan.kids_before)} -> {len(plan.kids_after)} keys."
    )
    return "\n".join(out) + "\n"


def render(
    plan: Plan,
    fmt: str,
    verb: str = "Plan",
    quiet: bool = False,
    changed: bool | None = None,
    errors: list[str] | None = None,
    restart: Outcome | None = None,
    owed: bool | None = None,
) -> str:
    if fmt == "json":
        return render_json(plan, changed, errors, restart, owed)
    if fmt == "markdown":
        return render_markdown(plan)
    return render_text(plan, verb, quiet, restart)


def render_inspect(plan: Plan, fmt: str = "text") -> str:
    if fmt == "json":
        return (
            json.dumps(
                {
                    "version": REPORT_VERSION,
                    "cluster": plan.cluster,
                    "host": plan.host,
                    "at": format_time(plan.at),
                    "keys": [k.as_dict() for k in plan.keys],
                },
                indent=2,
            )
            + "\n"
        )
    header = ("KID", "HOST", "NOT-AFTER", "STATUS", "IN-BUNDLE", "AFTER", "WHY")
    rows = [header] + [
        (
            for_terminal(k.kid or "-"),
            for_terminal(k.host or "-"),
            format_time(k.not_after) if k.not_after else "-",
            k.status,
            "yes" if k.in_bundle else "no",
            "yes" if k.bundle_after else "no",
            for_terminal(k.reason),
        )
        for k in plan.keys
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True))
        + "  "
        + r[-1]
        + "\n"
        for r in rows
    )
