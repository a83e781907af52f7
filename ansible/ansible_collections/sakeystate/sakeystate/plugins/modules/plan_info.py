#!/usr/bin/python
# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402 - Ansible modules put their documentation before the imports
"""Ansible module ``sakeystate.sakeystate.plan_info``: ``sakeystate plan`` as facts for assertions.

Read-only in every mode: the plan's JSON report, with ``in_sync`` added and
``keys`` renamed like ``converge`` does.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: plan_info
short_description: The plan sakeystate would apply on this control plane, without applying it
version_added: 0.3.0
description:
  - Runs C(sakeystate plan --format json) on the target and returns the report, for
    C(assert) and C(until) (RV(in_sync), RV(bundle.kids_after), RV(reload_needed), ...).
  - Never changes anything and never reports C(changed); a refused plan, an invalid state
    or an unreachable etcd fails the task with the tool's message.
author:
  - sakeystate maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sakeystate.sakeystate.common
  - sakeystate.sakeystate.state
options:
  at:
    description:
      - Evaluate time-based policy as of this moment (RFC 3339), for example the day a
        change will be deployed. Default now.
    type: str
  allow_removals:
    description:
      - Plan as C(converge) with
        O(sakeystate.sakeystate.converge#module:allow_removals=true) would.
    type: bool
    default: false
seealso:
  - module: sakeystate.sakeystate.converge
  - module: sakeystate.sakeystate.status
attributes:
  check_mode:
    description: Read-only; runs the same in check mode.
    support: full
  diff_mode:
    description: Not applicable.
    support: none
  platform:
    description: Runs on the control plane whose plan it computes.
    support: full
    platforms: posix
"""

EXAMPLES = r"""
- name: Plan
  sakeystate.sakeystate.plan_info:
    state_file: /etc/sakeystate/state.yaml
  register: plan

- name: The new key is in this host's bundle and nothing is owed
  ansible.builtin.assert:
    that:
      - plan.in_sync
      - new_kid in plan.bundle.kids_after
"""

RETURN = r"""
in_sync:
  description: Whether a converge would change nothing (no drift, no restart owed).
  returned: success
  type: bool
  sample: true
version:
  description: Version of the report format.
  returned: success
  type: int
  sample: 1
cluster:
  description: The cluster named by the desired state.
  returned: success
  type: str
  sample: wikikube-eqiad
host:
  description: The control plane the plan is for.
  returned: success
  type: str
  sample: ctrl1002.eqiad.example.org
at:
  description: The moment time-based policy was evaluated at (RFC 3339, UTC).
  returned: success
  type: str
bundle_changed:
  description: Whether the plan changes the bundle's key set.
  returned: success
  type: bool
reload_needed:
  description: Whether a restart is owed, or would be after the plan's bundle write.
  returned: success
  type: bool
actions:
  description:
    - The changes a converge would make, each with its reason (as in
      M(sakeystate.sakeystate.converge)).
  returned: success
  type: list
  elements: dict
bundle:
  description:
    - The bundle's path and its kids now (C(kids_before)) and after the plan
      (C(kids_after)).
  returned: success
  type: dict
  contains:
    path:
      description: Path of the bundle file.
      type: str
      returned: always
    kids_before:
      description: Kids in the bundle now.
      type: list
      elements: str
      returned: always
    kids_after:
      description: Kids in the bundle after the plan.
      type: list
      elements: str
      returned: always
service_account_keys:
  description:
    - Every key seen in etcd and the bundle, with its status and why (as in
      M(sakeystate.sakeystate.converge)).
  returned: success
  type: list
  elements: dict
errors:
  description: Why the plan would be refused, in the module's terms.
  returned: success
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sakeystate.sakeystate.plugins.module_utils.cli import (
    STATE_CHOICE,
    STATE_OPTIONS,
    plan_result,
    require_sakeystate,
    run_cli,
    state_arguments,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **STATE_OPTIONS,
            "at": {"type": "str"},
            "allow_removals": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
        **STATE_CHOICE,
    )
    command = require_sakeystate(module)
    state, inline = state_arguments(module)
    args = ["plan", *state, "--format", "json"]
    if module.params["at"]:
        args += ["--at", module.params["at"]]
    if module.params["allow_removals"]:
        args.append("--allow-removals")
    run = run_cli(module, command, args, inline)
    result = plan_result(module, run, inline)
    if run.rc != 0 or run.report is None:
        result.pop("changed", None)
        module.fail_json(msg=run.message(), **result)
    # The plan's own "changed" (a converge would change something) is in_sync's negation;
    # this task itself never changes anything.
    result["in_sync"] = not result.pop("changed", False)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
