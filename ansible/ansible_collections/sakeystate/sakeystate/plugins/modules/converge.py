#!/usr/bin/python
# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402 - Ansible modules put their documentation before the imports
"""Ansible module ``sakeystate.sakeystate.converge``: ``sakeystate converge`` as a task.

A documentation block and a thin ``main()``; the CLI (run by
``module_utils.cli``) decides everything. Check mode runs ``plan``, a real run
``converge``; both print the same JSON report, which becomes the result and
the diff.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: converge
short_description: Converge the kube-apiserver service-account public-key bundle
version_added: 0.1.0
description:
  - Converges etcd and the on-disk service-account key bundle of a kube-apiserver
    (C(--service-account-key-file)) to a reviewed desired state, exactly like
    C(sakeystate converge), which it runs with the target's Python interpreter.
  - The desired state lists the trusted key fingerprints (kids), the trust anchors and
    the retention policy; etcd holds one entry per published key under C(<prefix><kid>).
  - One desired state serves every control plane of a cluster (C(host) and
    C(bundle.exclude_host) set to V(self)); O(host) names the control plane the task runs for.
  - Check mode runs C(sakeystate plan), writes nothing, and reports C(changed) exactly as
    a real run of this task would, B(given etcd as it is when the task runs). It cannot
    see what other tasks of the same check run only predicted (a publish predicted by
    M(sakeystate.sakeystate.publish) on this host or on a peer, or a deletion a peer's
    converge would make, is not in etcd), so the peers' check shows V(ok) where the real
    run changes their bundles (and restarts their apiservers). Every check-mode diff says
    so in a C(check mode) line, and when the plan holds a trusted key that is not
    published yet (a reimage in progress), check mode warns on each host that the real
    run will add it there. Publish everywhere first (a real run), then check the
    converge, to review a bootstrap or reimage exactly.
  - Diff mode shows the bundle's kids (with their hosts) before and after, the etcd keys
    deleted or written, and the permission change and reload owed.
author:
  - sakeystate maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sakeystate.sakeystate.common
options:
  state_file:
    description:
      - Path on the target of the desired-state YAML file.
      - Exactly one of O(state_file) and O(desired_state) is required.
      - In check mode a file deployed by an earlier task of the same play still holds its
        old content (that task did not write either); use O(desired_state) rendered from
        the same template to check a change of the state in one task.
    type: path
  desired_state:
    description:
      - The desired state as a mapping, validated by the same JSON Schema as a state file
        (C(apiVersion), C(cluster), C(etcd), C(bundle), C(trusted), ...).
      - Render it from a template with
        C("{{ lookup('ansible.builtin.template', 'state.yaml.j2') | from_yaml }}"), so check
        mode sees the state the play is about to deploy.
      - Exactly one of O(state_file) and O(desired_state) is required.
    type: dict
  allow_removals:
    description:
      - Allow a plan that removes more than C(retention.max_removals) keys, or a fleet host's
        newest key, from the bundle. Review the plan (check mode and diff) first.
    type: bool
    default: false
  run_reload:
    description:
      - Run C(bundle.reload) when the bundle's key set changed, or when an earlier reload
        is still owed.
      - Set to V(false) to leave the restart of kube-apiserver to a handler running
        M(sakeystate.sakeystate.reload), which restarts under the cluster-wide lock and
        writes the status record. The owed restart is recorded on the target and every run
        returns RV(reload_needed=true) (and C(changed)) until it happened, so an aborted
        play or a failed handler never loses a restart, and a done one is never repeated
        (also not by C(sakeystate watch), which shares the record).
    type: bool
    default: true
notes:
  - Takes no secret parameter. The etcd password is read on the target from
    C(etcd.auth.password_file), so it never passes through module arguments, results or
    logs; private keys never leave the target either.
  - A converge holds an exclusive lock beside the bundle, so it never interleaves with a
    Puppet run or a manual C(sakeystate converge) on the same host.
seealso:
  - module: sakeystate.sakeystate.reload
  - module: sakeystate.sakeystate.publish
  - module: sakeystate.sakeystate.plan_info
attributes:
  check_mode:
    description:
      - Plans only, writes nothing, and reports changed exactly as a real run would from
        etcd as it is now; what other tasks only predicted is not seen (see above).
    support: full
  diff_mode:
    description:
      - Shows the bundle's kids and hosts before and after, etcd writes, and the permission
        and reload lines.
    support: full
  platform:
    description: Runs on the control plane whose bundle it converges.
    support: full
    platforms: posix
"""

EXAMPLES = r"""
- name: Converge the service-account key bundle (the module restarts kube-apiserver itself)
  sakeystate.sakeystate.converge:
    state_file: /etc/sakeystate/state.yaml
    host: "{{ inventory_hostname }}"

- name: Converge, leaving the restart to a handler (sakeystate.sakeystate.reload)
  sakeystate.sakeystate.converge:
    state_file: /etc/sakeystate/state.yaml
    run_reload: false
  notify: Restart kube-apiserver under the sakeystate lock

# handlers:
- name: Restart kube-apiserver under the sakeystate lock
  sakeystate.sakeystate.reload:
    state_file: /etc/sakeystate/state.yaml

- name: Check a new desired state before deploying it (one task, right in check mode too)
  sakeystate.sakeystate.converge:
    desired_state: "{{ lookup('ansible.builtin.template', 'state.yaml.j2') | from_yaml }}"
    host: "{{ inventory_hostname }}"
    run_reload: false
  register: sakeystate_result

- name: After reviewing the plan, allow it to remove more keys than max_removals
  sakeystate.sakeystate.converge:
    state_file: /etc/sakeystate/state.yaml
    allow_removals: true
"""

RETURN = r"""
version:
  description: Version of the report format.
  returned: when the plan was computed
  type: int
  sample: 1
cluster:
  description: The cluster named by the desired state.
  returned: when the plan was computed
  type: str
  sample: wikikube-eqiad
host:
  description: The control plane the run was for (the resolved C(host)).
  returned: when the plan was computed
  type: str
  sample: ctrl1002.eqiad.example.org
at:
  description: The moment time-based policy was evaluated at (RFC 3339, UTC).
  returned: when the plan was computed
  type: str
  sample: "2026-11-22T10:00:00Z"
bundle_changed:
  description:
    - Whether this run changed (check mode, would change) the bundle's key set. A
      permission change or an etcd-only cleanup leaves it V(false).
  returned: when the plan was computed
  type: bool
  sample: true
reload_needed:
  description:
    - Whether a kube-apiserver restart is owed and not yet confirmed. This run changed the
      key set, or an earlier restart left to a handler is still owed. With
      O(run_reload=false) it stays V(true) on every run until
      M(sakeystate.sakeystate.reload) restarted kube-apiserver (or
      M(sakeystate.sakeystate.reload_done) confirmed a restart made another way).
  returned: when the plan was computed
  type: bool
  sample: true
actions:
  description:
    - The changes, each with the reason a reviewer reads. Empty when etcd and the bundle
      are in sync.
  returned: when the plan was computed
  type: list
  elements: dict
  contains:
    target:
      description: What the action changes.
      type: str
      returned: always
      sample: bundle
    op:
      description:
        - The operation (V(add), V(remove), V(delete), V(migrate), V(permissions), V(run), ...).
      type: str
      returned: always
      sample: add
    kid:
      description: The key's fingerprint, when the action concerns one key.
      type: str
      returned: when the action concerns one key
      sample: 8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E
    host:
      description: The host that published the key, when known.
      type: str
      returned: when the action concerns one key
      sample: ctrl1001.eqiad.example.org
    key:
      description: The etcd key an etcd action writes or deletes.
      type: str
      returned: for etcd actions
      sample: /kube-apiserver-sa-certs/8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E
    reason:
      description: Why.
      type: str
      returned: always
      sample: trusted, pinned
bundle:
  description: The bundle's path and its kids before and after the run.
  returned: when the plan was computed
  type: dict
  contains:
    path:
      description: Path of the bundle file.
      type: str
      returned: always
      sample: /etc/kubernetes/pki/kube-apiserver-sa-certs.pem
    kids_before:
      description: Kids in the bundle before the run.
      type: list
      elements: str
      returned: always
      sample: [8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E]
    kids_after:
      description: Kids in the bundle after the run.
      type: list
      elements: str
      returned: always
      sample: [8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E]
service_account_keys:
  description:
    - Every key seen in etcd and the bundle, with its status and why (the C(keys) list of
      C(sakeystate plan --format json), renamed so that it does not clash with a
      dictionary's C(keys) method in Jinja).
  returned: when the plan was computed
  type: list
  elements: dict
  contains:
    kid:
      description: The key's fingerprint.
      type: str
      returned: always
    host:
      description: The host that published it, when known.
      type: str
      returned: when known
    host_source:
      description:
        - Where its host comes from, V(recorded in this host's bundle), V(pinned),
          V(named by the certificate), V(etcd path), or an unauthenticated etcd claim.
      type: str
      returned: when known
    status:
      description: V(trusted), V(untrusted), V(revoked), ...
      type: str
      returned: always
    trust:
      description: How it is trusted (V(pinned), or the anchor that certifies it).
      type: str
      returned: when trusted
    not_after:
      description: The certificate's expiry (RFC 3339), when the value is a certificate.
      type: str
      returned: when known
    etcd_key:
      description: The etcd key holding it, when it is in etcd.
      type: str
      returned: when known
    in_bundle:
      description: Whether the bundle holds it now.
      type: bool
      returned: always
    bundle_after:
      description: Whether the bundle holds it after the run.
      type: bool
      returned: always
    reason:
      description: Why it has this status.
      type: str
      returned: always
errors:
  description: Why the plan was refused or the run failed, in the module's terms.
  returned: when the plan was computed
  type: list
  elements: str
  sample:
    - "refusing to converge: 3 kid(s) would be removed (max_removals 2); review the plan
      and re-run with allow_removals: true"
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sakeystate.sakeystate.plugins.module_utils.cli import (
    CHECK_MODE_NOTE,
    STATE_CHOICE,
    STATE_OPTIONS,
    Run,
    plan_result,
    require_sakeystate,
    run_cli,
    state_arguments,
    unseen_publishes,
)


def _lines(items: list[str]) -> str:
    return "".join(f"{item}\n" for item in items)


def _reload_line(action: dict, run_reload: bool) -> str:
    if run_reload:
        return f"reload run: {action.get('reason')}"
    return (
        f"reload left to the handler (sakeystate.sakeystate.reload), owed from now on: "
        f"{action.get('reason')}"
    )


def diff_of(report: dict, run_reload: bool, check_mode: bool) -> list[dict[str, str]]:
    """Ansible diffs of a report: the bundle's kids with their hosts, etcd writes, the rest."""
    hosts = {k.get("kid"): k.get("host") or "host unknown" for k in report.get("keys", [])}
    bundle = report.get("bundle", {})
    path = bundle.get("path", "bundle")
    diffs = [
        {
            "before_header": f"{path} (kids)",
            "after_header": f"{path} (kids)",
            "before": _lines(
                [f"{kid}  # {hosts.get(kid)}" for kid in bundle.get("kids_before", [])]
            ),
            "after": _lines([f"{kid}  # {hosts.get(kid)}" for kid in bundle.get("kids_after", [])]),
        }
    ]
    etcd = [a for a in report.get("actions", []) if a.get("target") == "etcd"]
    deleted = [
        f"{a.get('key') or a.get('kid')}  # {a.get('host') or hosts.get(a.get('kid'))}: "
        f"{a.get('reason')}"
        for a in etcd
        if a.get("op") == "delete"
    ]
    written = [
        f"{a.get('key') or a.get('kid')}  # {a.get('op')}: {a.get('reason')}"
        for a in etcd
        if a.get("op") != "delete"
    ]
    if deleted or written:
        diffs.append(
            {
                "before_header": "etcd (keys deleted)",
                "after_header": "etcd (keys written)",
                "before": _lines(deleted),
                "after": _lines(written),
            }
        )
    other = [
        _reload_line(a, run_reload)
        if a.get("target") == "reload"
        else f"{a.get('target')} {a.get('op')}: {a.get('reason')}"
        for a in report.get("actions", [])
        if a.get("target") != "etcd"
        and not (a.get("target") == "bundle" and a.get("op") in ("add", "remove"))
    ]
    if report.get("reload_needed") and not any(
        a.get("target") == "reload" for a in report.get("actions", [])
    ):
        other.append(f"reload owed: kube-apiserver on {report.get('host')} was not restarted yet")
    if check_mode:
        other.append(CHECK_MODE_NOTE)
    if other:
        diffs.append(
            {
                "before_header": f"{report.get('host', 'this host')} (reload and permissions)",
                "after_header": f"{report.get('host', 'this host')} (reload and permissions)",
                "before": "",
                "after": _lines(other),
            }
        )
    return diffs


def result_of(module: AnsibleModule, run: Run, inline: str | None) -> dict:
    """The report as the task result; an owed restart counts as a change."""
    report = plan_result(module, run, inline)
    report["changed"] = bool(report.get("changed") or report.get("reload_needed"))
    return report


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **STATE_OPTIONS,
            "allow_removals": {"type": "bool", "default": False},
            "run_reload": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
        **STATE_CHOICE,
    )
    command = require_sakeystate(module)
    state, inline = state_arguments(module)
    args = ["plan" if module.check_mode else "converge", *state, "--format", "json"]
    if module.params["allow_removals"]:
        args.append("--allow-removals")
    if not module.params["run_reload"] and not module.check_mode:
        args.append("--no-reload")
    run = run_cli(module, command, args, inline)
    result = result_of(module, run, inline)
    if run.rc != 0 or run.report is None:
        # A refused plan wrote nothing (changed false); a failed reload came after the writes.
        module.fail_json(msg=run.message(), **result)
    unseen = unseen_publishes(run.report, run.warnings) if module.check_mode else []
    for warning in unseen:
        module.warn(warning)
    if module._diff:
        result["diff"] = diff_of(run.report, module.params["run_reload"], module.check_mode)
        if unseen:
            result["diff"][-1]["after"] += _lines(unseen)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
