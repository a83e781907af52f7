#!/usr/bin/python
# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402 - Ansible modules put their documentation before the imports
"""Ansible module ``sakeystate.sakeystate.status``: ``sakeystate status`` as a read-only task.

Exit 0 (in order) and 2 (something lags) are both results, so the task can
sit in ``until`` or feed ``assert``; exit 1 (an error) fails it.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: status
short_description: The fleet view of service-account keys, for until and assert
version_added: 0.3.0
description:
  - Runs C(sakeystate status --format json) on the target, which tells which fleet host's
    kube-apiserver verifies which key of the effective set (from the hosts' status
    records), keys awaiting review, revoked or removed keys still verified somewhere.
  - Read-only; never changed. RV(in_order=false) is a result, not a failure, so
    an C(until) on RV(in_order) retries until the fleet caught up; an error (etcd
    unreachable, an invalid state) fails the task.
author:
  - sakeystate maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sakeystate.sakeystate.common
  - sakeystate.sakeystate.state
seealso:
  - module: sakeystate.sakeystate.wait
  - module: sakeystate.sakeystate.plan_info
attributes:
  check_mode:
    description: Read-only; runs the same in check mode.
    support: full
  diff_mode:
    description: Not applicable.
    support: none
  platform:
    description: Runs on any host that can read the state file and etcd.
    support: full
    platforms: posix
"""

EXAMPLES = r"""
- name: Wait until every apiserver verifies every effective key
  sakeystate.sakeystate.status:
    state_file: /etc/sakeystate/state.yaml
  register: fleet
  until: fleet.in_order
  retries: 30
  delay: 10
  run_once: true

- name: No key awaits review
  ansible.builtin.assert:
    that: fleet.awaiting_review | length == 0
    fail_msg: "{{ fleet.items }}"
"""

RETURN = r"""
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
at:
  description: When the fleet was read (RFC 3339, UTC).
  returned: success
  type: str
  sample: "2026-11-22T10:00:00Z"
in_order:
  description: Whether nothing lags or needs a person (C(sakeystate status) exit 0).
  returned: success
  type: bool
  sample: true
ignored_records:
  description:
    - Hosts whose status records are under the status prefix although they are not in the
      fleet (decommissioned, renamed); ignored by C(in_order). C(sakeystate prune) removes them.
  returned: success
  type: list
  elements: str
  sample: [ctrl1000.eqiad.example.org]
hosts:
  description: One entry per fleet host.
  returned: success
  type: list
  elements: dict
  contains:
    host:
      description: The fleet host.
      type: str
      returned: always
      sample: ctrl1001.eqiad.example.org
    record_since:
      description: When its status record last changed (RFC 3339), or null without a record.
      type: str
      returned: always
      sample: "2026-11-22T10:00:00Z"
    problem:
      description: Why its record is unusable (V(no record), not JSON, ...), or null.
      type: str
      returned: always
    verifies:
      description: For each effective kid, whether this host's apiserver verifies it.
      type: dict
      returned: always
      sample: {"8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E": true}
effective_kids:
  description: The effective set every fleet apiserver should verify.
  returned: success
  type: list
  elements: str
awaiting_review:
  description: Kids published in etcd that nothing trusts yet (a freshly reimaged host's).
  returned: success
  type: list
  elements: str
lingering:
  description: Revoked or removed kids that some host still verifies, with those hosts.
  returned: success
  type: dict
items:
  description: One line per thing that lags or needs a person; empty when in order.
  returned: success
  type: list
  elements: str
  sample: ["ctrl1002.eqiad.example.org does not verify 8Xq0y... yet (record since ...)"]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sakeystate.sakeystate.plugins.module_utils.cli import (
    STATE_CHOICE,
    STATE_OPTIONS,
    require_sakeystate,
    run_cli,
    state_arguments,
)

IN_ORDER = 0
LAGS = 2


def main() -> None:
    module = AnsibleModule(argument_spec=STATE_OPTIONS, supports_check_mode=True, **STATE_CHOICE)
    command = require_sakeystate(module)
    state, inline = state_arguments(module)
    run = run_cli(module, command, ["status", *state, "--format", "json"], inline)
    for warning in run.warnings:
        module.warn(warning)
    if run.rc not in (IN_ORDER, LAGS) or run.report is None:
        module.fail_json(msg=run.message())
    module.exit_json(changed=False, **run.report)


if __name__ == "__main__":
    main()
