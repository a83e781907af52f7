#!/usr/bin/python
# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402 - Ansible modules put their documentation before the imports
"""Ansible module ``sakeystate.sakeystate.reload``: ``sakeystate reload`` as a handler.

The CLI runs the owed restart under the cluster-wide lock, polls
``reload_check``, writes the status record and clears the owed marker; this
module passes its JSON (``changed``, ``owed``, ``message``) on.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: reload
short_description: Restart kube-apiserver under the cluster-wide lock when a restart is owed
version_added: 0.3.0
description:
  - Runs C(sakeystate reload) on the target. When a restart is owed (the bundle's key
    set changed with O(sakeystate.sakeystate.converge#module:run_reload=false), or an
    earlier restart failed), it takes the cluster-wide reload lock, runs the state's
    C(bundle.reload), polls C(bundle.reload_check) until it succeeds, writes the host's
    status record and clears the owed restart. Nothing owed, nothing runs.
  - This is the handler of the documented pattern. Because every restart path of
    sakeystate (this module, M(sakeystate.sakeystate.converge) with its default
    O(sakeystate.sakeystate.converge#module:run_reload=true), C(sakeystate watch), the
    Puppet module) takes the same lock and clears the same owed marker, two apiservers
    never restart at once (even with C(serial) > 1 or C(strategy=free)), and a restart
    already done by C(sakeystate watch) is not repeated (C(changed=false)).
  - It needs no C(when); notify it from the converge task.
  - Check mode restarts nothing and reports C(changed) exactly when the real run of the
    play would restart (a restart owed now, or a key-set change the play's converge
    would leave owed), predicted with C(sakeystate plan).
author:
  - sakeystate maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sakeystate.sakeystate.common
  - sakeystate.sakeystate.state
notes:
  - Fails (and the restart stays owed, so the next run retries it once) when the lock is
    not obtained within C(bundle.reload_timeout), when C(reload_check) never succeeds,
    or when a restart is owed but the state configures no C(bundle.reload).
seealso:
  - module: sakeystate.sakeystate.converge
  - module: sakeystate.sakeystate.reload_done
  - module: sakeystate.sakeystate.wait
attributes:
  check_mode:
    description: Restarts nothing; C(changed) is the real run's, predicted with C(sakeystate plan).
    support: full
  diff_mode:
    description: Not applicable.
    support: none
  platform:
    description: Runs on the control plane whose kube-apiserver it restarts.
    support: full
    platforms: posix
"""

EXAMPLES = r"""
- name: Converge etcd and the service-account key bundle
  sakeystate.sakeystate.converge:
    state_file: /etc/sakeystate/state.yaml
    run_reload: false
  notify: Restart kube-apiserver under the sakeystate lock

# handlers:
- name: Restart kube-apiserver under the sakeystate lock
  sakeystate.sakeystate.reload:
    state_file: /etc/sakeystate/state.yaml
"""

RETURN = r"""
owed:
  description:
    - Whether a restart is still owed after this run (V(false) after a successful
      restart; in check mode, whether one would be owed before the restart).
  returned: always
  type: bool
  sample: false
message:
  description: What C(sakeystate reload) did (in check mode, would do).
  returned: always
  type: str
  sample: reloaded kube-apiserver under the lock; reload_check passed
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
        message = "a restart is owed and would run under the lock" if owed else "nothing owed"
        module.exit_json(changed=owed, owed=owed, message=f"check mode: {message}")
    run = run_cli(module, command, ["reload", *state, "--format", "json"], inline)
    report = run.report or {}
    for warning in run.warnings:
        module.warn(warning)
    if run.rc != 0 or run.report is None:
        # The restart may have run before its check failed: changed says so.
        module.fail_json(
            msg=run.message(),
            changed=bool(report.get("changed")),
            owed=bool(report.get("owed", True)),
        )
    module.exit_json(
        changed=bool(report.get("changed")),
        owed=bool(report.get("owed")),
        message=report.get("message", ""),
    )


if __name__ == "__main__":
    main()
