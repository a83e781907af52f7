#!/usr/bin/python
# ruff: noqa: E402 - Ansible modules put their documentation before the imports
"""Ansible module ``sakeystate``: a thin shell over the sakeystate package.

Like community.crypto's modules: a documentation block, a ``main()`` that
builds ``AnsibleModule``, and a backend (the sakeystate package) that does the
work. Every decision is the package's: this file maps parameters to
``state_from_data``/``load_state``, ``observe_and_plan`` (check mode) or
``converge`` (a real run), and the resulting Plan to the contract's report,
the diff and ``fail_json``.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sakeystate
short_description: Converge kube-apiserver service-account public-key bundles
description:
  - Converges etcd and the on-disk service-account key bundle of a kube-apiserver
    (C(--service-account-key-file)) to a reviewed desired-state file, exactly like
    C(sakeystate converge).
  - The desired state lists the trusted key fingerprints (kids) and the retention
    policy; etcd holds one entry per published key under C(<prefix><kid>).
  - Check mode plans only, writes nothing, and reports C(changed) exactly as a real
    run would.
  - Diff mode shows the bundle's kids before and after, and the etcd keys deleted
    or written.
  - The result carries the fields of C(sakeystate plan --format json).
author:
  - sakeystate maintainers
requirements:
  - sakeystate (the Python package, installed for the target's Python interpreter)
options:
  state_file:
    description:
      - Path on the target of the desired-state YAML file.
      - Exactly one of O(state_file) and O(state) is required.
    type: path
  state:
    description:
      - The desired state as an inline mapping, validated by the same JSON Schema
        as a state file (C(apiVersion), C(cluster), C(etcd), C(bundle), C(trusted), ...).
      - Exactly one of O(state_file) and O(state) is required.
    type: dict
  allow_removals:
    description:
      - Allow a plan that removes more than C(retention.max_removals) keys from the bundle.
    type: bool
    default: false
  run_reload:
    description:
      - Run C(bundle.reload) when the bundle's key set changed, or when an earlier
        reload failed.
      - Set to V(false) to leave the restart of kube-apiserver to a playbook handler
        notified by this task.
    type: bool
    default: true
  at:
    description:
      - Evaluate time-based policy (certificate expiry, superseded keys) as of this
        RFC 3339 moment instead of now, for instance V(2026-11-22T10:00:00Z).
    type: str
notes:
  - Takes no secret parameter. The etcd password is read on the target from
    C(etcd.auth.password_file), so it never passes through module arguments,
    results or logs; private keys never leave the target either.
  - A converge holds an exclusive lock beside the bundle, so it never interleaves
    with a Puppet run or a manual C(sakeystate converge) on the same host.
attributes:
  check_mode:
    description: Plans only, writes nothing, and reports changed exactly as a real run would.
    support: full
  diff_mode:
    description: Shows the bundle's kids before and after, and the etcd keys deleted or written.
    support: full
"""

EXAMPLES = r"""
- name: Converge the service-account key bundle
  sakeystate:
    state_file: /etc/sakeystate/state.yaml

- name: Converge, leaving the kube-apiserver restart to a handler
  sakeystate:
    state_file: /etc/sakeystate/state.yaml
    run_reload: false
  notify: Restart kube-apiserver

- name: Converge from an inline state
  sakeystate:
    state:
      apiVersion: sakeystate/v1
      cluster: wikikube-eqiad
      etcd:
        endpoints: [https://etcd1001.eqiad.example.org:2379]
        tls: {ca_file: /etc/ssl/certs/etcd-ca.pem}
      bundle:
        path: /etc/kubernetes/pki/kube-apiserver-sa-certs.pem
      trusted:
        - fingerprint: 8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E
          host: ctrl1001.eqiad.example.org

- name: After reviewing the plan, allow it to remove more keys than max_removals
  sakeystate:
    state_file: /etc/sakeystate/state.yaml
    allow_removals: true
"""

RETURN = r"""
version:
  description: Version of the report format.
  returned: success or when the plan was computed
  type: int
  sample: 1
cluster:
  description: The cluster named by the desired state.
  returned: success or when the plan was computed
  type: str
  sample: wikikube-eqiad
at:
  description: The moment time-based policy was evaluated at (RFC 3339, UTC).
  returned: success or when the plan was computed
  type: str
  sample: "2026-11-22T10:00:00Z"
actions:
  description:
    - The changes, each with its target (V(bundle), V(etcd), V(reload)), operation and
      the reason a reviewer reads. Empty when etcd and the bundle are in sync.
  returned: success or when the plan was computed
  type: list
  elements: dict
  sample:
    - {target: bundle, op: add, kid: 8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E,
       host: ctrl1001.eqiad.example.org, reason: "trusted, published in etcd"}
bundle:
  description: The bundle's path and its kids before and after the run.
  returned: success or when the plan was computed
  type: dict
  contains:
    path:
      description: Path of the bundle file.
      type: str
      returned: always
    kids_before:
      description: Kids in the bundle before the run.
      type: list
      elements: str
      returned: always
    kids_after:
      description: Kids in the bundle after the run.
      type: list
      elements: str
      returned: always
keys:
  description: Every key seen in etcd and the bundle, with its status and why.
  returned: success or when the plan was computed
  type: list
  elements: dict
warnings:
  description:
    - Things for a person to look at (untrusted keys awaiting review, trusted keys not
      yet published, keys that retention drops within 30 days). Ansible also shows
      them as warnings.
  returned: when there are any
  type: list
  elements: str
errors:
  description: Why the plan was refused, when it was.
  returned: success or when the plan was computed
  type: list
  elements: str
"""

import traceback
from datetime import UTC, datetime
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from sakeystate.apply import converge, observe_and_plan
    from sakeystate.errors import Refused, ReloadFailed, SakeystateError
    from sakeystate.etcd import EtcdStore
    from sakeystate.keys import parse_time
    from sakeystate.model import Delete, Put
    from sakeystate.report import as_dict
    from sakeystate.state import load_state, state_from_data
except ImportError:
    SAKEYSTATE_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    SAKEYSTATE_IMPORT_ERROR = None

INLINE_SOURCE = "state parameter"


def _lines(items: list[str]) -> str:
    return "".join(f"{item}\n" for item in items)


def diff_of(plan: Any) -> list[dict[str, str]]:
    """Ansible diffs of a Plan: the bundle's kids, and the etcd keys deleted or written."""
    diffs = [
        {
            "before_header": f"{plan.bundle_path} (kids)",
            "after_header": f"{plan.bundle_path} (kids)",
            "before": _lines(list(plan.kids_before)),
            "after": _lines(list(plan.kids_after)),
        }
    ]
    writes = [(w, a.reason) for a in plan.etcd_actions for w in a.writes]
    deleted = [f"{w.key}  # {reason}" for w, reason in writes if isinstance(w, Delete)]
    written = [f"{w.key}  # {reason}" for w, reason in writes if isinstance(w, Put)]
    if deleted or written:
        diffs.append(
            {
                "before_header": "etcd (keys deleted)",
                "after_header": "etcd (keys written)",
                "before": _lines(deleted),
                "after": _lines(written),
            }
        )
    return diffs


def run(module: AnsibleModule) -> None:
    params = module.params
    if params["at"] is None:
        at = datetime.now(UTC)
    else:
        try:
            at = parse_time(params["at"])
        except ValueError:
            module.fail_json(msg=f"at {params['at']!r} is not RFC 3339 (e.g. 2026-11-22T10:00:00Z)")
    plan = None
    try:
        if params["state"] is not None:
            desired = state_from_data(params["state"], INLINE_SOURCE)
        else:
            desired = load_state(params["state_file"])
        with EtcdStore(desired.etcd) as store:
            if module.check_mode:
                plan = observe_and_plan(desired, store, at, params["allow_removals"])
                if plan.refusals:
                    raise Refused(plan)
            else:
                plan = converge(
                    desired,
                    store,
                    at,
                    allow_removals=params["allow_removals"],
                    run_reload=params["run_reload"],
                )
    except (Refused, ReloadFailed) as exc:
        failed: Any = exc.plan
        if failed is None:
            module.fail_json(msg=str(exc))
        # A refused plan wrote nothing; a failed reload comes after the writes.
        wrote = isinstance(exc, ReloadFailed) and failed.changed
        module.fail_json(msg=str(exc), **report(module, failed, changed=wrote, errors=[str(exc)]))
    except SakeystateError as exc:
        module.fail_json(msg=str(exc))
    assert plan is not None
    result = report(module, plan)
    if module._diff:
        result["diff"] = diff_of(plan)
    module.exit_json(**result)


def report(module: AnsibleModule, plan: Any, **overrides: Any) -> dict[str, Any]:
    """The contract's report; its warnings become Ansible warnings (shown, and in the result)."""
    fields = as_dict(plan, **overrides)
    for warning in fields.pop("warnings"):
        module.warn(warning)
    return fields


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state_file": {"type": "path"},
            "state": {"type": "dict"},
            "allow_removals": {"type": "bool", "default": False},
            "run_reload": {"type": "bool", "default": True},
            "at": {"type": "str"},
        },
        mutually_exclusive=[("state_file", "state")],
        required_one_of=[("state_file", "state")],
        supports_check_mode=True,
    )
    if SAKEYSTATE_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("sakeystate"), exception=SAKEYSTATE_IMPORT_ERROR)
    run(module)


if __name__ == "__main__":
    main()
