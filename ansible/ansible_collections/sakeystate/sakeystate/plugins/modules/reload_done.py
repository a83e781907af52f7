#!/usr/bin/python
# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402 - Ansible modules put their documentation before the imports
"""Ansible module ``sakeystate.sakeystate.reload_done``: ``sakeystate reload-done`` as a task.

For a caller that restarted kube-apiserver some other way than
``sakeystate.sakeystate.reload``: it clears the owed restart and writes the
status record. Check mode predicts exactly with ``plan`` (``restart_owed``).
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
    changed the bundle's key set, and writes the host's status record, exactly like
    C(sakeystate reload-done).
  - Prefer M(sakeystate.sakeystate.reload) in the handler; it restarts under the
    cluster-wide lock, so two apiservers never restart at once. Use this module only
    after a restart made another way, last in the handler chain, so a failed restart (or
    an aborted play) leaves the restart owed.
  - Check mode changes nothing and reports C(changed) exactly when the real run of the
    play would confirm a restart (a restart owed now, or a key-set change that the
    play's converge would leave owed).
author:
  - sakeystate maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sakeystate.sakeystate.common
  - sakeystate.sakeystate.state
seealso:
  - module: sakeystate.sakeystate.reload
  - module: sakeystate.sakeystate.converge
attributes:
  check_mode:
    description: Changes nothing; C(changed) is the real run's, predicted with C(sakeystate plan).
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
- name: Confirm a restart made another way (last in the handler chain)
  sakeystate.sakeystate.reload_done:
    state_file: /etc/sakeystate/state.yaml
"""

RETURN = r"""
message:
  description: What C(sakeystate reload-done) reported (in check mode, what it would).
  returned: success
  type: str
  sample: owed reload confirmed and cleared
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sakeystate.sakeystate.plugins.module_utils.cli import (
    STATE_CHOICE,
    STATE_OPTIONS,
    require_sakeystate,
    restart_owed,
    run_cli,
    state_arguments,
)


def main() -> None:
    module = AnsibleModule(argument_spec=STATE_OPTIONS, supports_check_mode=True, **STATE_CHOICE)
    command = require_sakeystate(module)
    state, inline = state_arguments(module)
    if module.check_mode:
        owed = restart_owed(module, command, state, inline)
        message = "the owed restart would be confirmed" if owed else "no reload would be owed"
        module.exit_json(changed=owed, message=f"check mode: {message}")
    run = run_cli(module, command, ["reload-done", *state, "--format", "json"], inline)
    if run.rc != 0 or run.report is None:
        module.fail_json(msg=run.message())
    # changed: a restart was owed and is now confirmed (false: nothing was owed).
    module.exit_json(changed=bool(run.report.get("changed")), message=run.report.get("message"))


if __name__ == "__main__":
    main()
