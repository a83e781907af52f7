#!/usr/bin/python
# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402 - Ansible modules put their documentation before the imports
"""Ansible module ``sakeystate.sakeystate.reload_done``: ``sakeystate reload-done`` as a task.

The handler that restarted kube-apiserver calls it last, so the owed restart
recorded by a converge with ``run_reload: false`` is cleared only once the
restart really happened.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: reload_done
short_description: Confirm that kube-apiserver was restarted with the current bundle
version_added: 0.1.0
description:
  - Clears the restart owed since M(sakeystate.sakeystate.converge) with
    O(sakeystate.sakeystate.converge#module:run_reload=false)
    changed the bundle's key set, exactly like C(sakeystate reload-done).
  - Call it from the handler, after the task that restarted kube-apiserver, so a failed
    restart (or an aborted play) leaves the restart owed and the next run reports
    C(reload_needed) again.
  - Check mode changes nothing.
author:
  - sakeystate maintainers (!UNKNOWN)
requirements:
  - Python >= 3.11 on the target
  - the sakeystate Python package, installed for the target's Python interpreter
options:
  state_file:
    description:
      - Path on the target of the desired-state YAML file (for the bundle's path).
      - Exactly one of O(state_file) and O(desired_state) is required.
    type: path
  desired_state:
    description:
      - The desired state as a mapping, as in M(sakeystate.sakeystate.converge).
      - Exactly one of O(state_file) and O(desired_state) is required.
    type: dict
  host:
    description:
      - The fully qualified name of this control plane (C(--host)).
    type: str
seealso:
  - module: sakeystate.sakeystate.converge
attributes:
  check_mode:
    description: Changes nothing and reports changed (a restart that is owed would be confirmed).
    support: full
  diff_mode:
    description: Not applicable.
    support: none
  platform:
    description: Runs on the control plane that was restarted.
    support: full
    platforms: posix
"""

EXAMPLES = r"""
- name: Confirm the restart (last in the handler chain)
  sakeystate.sakeystate.reload_done:
    state_file: /etc/sakeystate/state.yaml
    host: "{{ inventory_hostname }}"
"""

RETURN = r"""
message:
  description: What C(sakeystate reload-done) reported.
  returned: success
  type: str
  sample: owed reload confirmed and cleared
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sakeystate.sakeystate.plugins.module_utils.cli import (
    STATE_CHOICE,
    STATE_OPTIONS,
    require_sakeystate,
    run_cli,
    state_arguments,
)


def main() -> None:
    module = AnsibleModule(argument_spec=STATE_OPTIONS, supports_check_mode=True, **STATE_CHOICE)
    require_sakeystate(module)
    if module.check_mode:
        module.exit_json(changed=True, message="check mode: the owed restart would be confirmed")
    state, inline = state_arguments(module)
    run = run_cli(module, ["reload-done", *state, "--format", "json"], inline)
    if run.rc != 0 or run.report is None:
        module.fail_json(msg=run.message())
    # changed: a restart was owed and is now confirmed (false: nothing was owed).
    module.exit_json(changed=bool(run.report.get("changed")), message=run.report.get("message"))


if __name__ == "__main__":
    main()
