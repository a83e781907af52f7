# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The action that runs every module of the collection: ``host`` defaults to the inventory name.

A module cannot see ``inventory_hostname``; the action on the controller can. When
the task sets no ``host`` and the inventory name is a fully qualified domain name
(letters, digits and hyphens in dot-separated labels, not an IP address), that
name is passed as ``host``; otherwise the option stays unset and the CLI's default
applies (the state's ``host``, else the target's FQDN). An inventory of short names
or addresses (``ctrl1001``, ``10.0.0.5``) therefore never names a host that the
certificates and the fleet do not know.
"""

from __future__ import annotations

import re
from typing import Any

from ansible.plugins.action import ActionBase

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_FQDN = re.compile(rf"^(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?$")


def inventory_fqdn(name: Any) -> str | None:
    """``name`` when it is a fully qualified domain name (the last label is not numeric)."""
    if isinstance(name, str) and len(name) <= 253 and _FQDN.match(name):
        return name.lower()
    return None


class HostDefaultAction(ActionBase):
    """Runs the module of the same name, with ``host`` defaulted as described above."""

    def run(self, tmp: Any = None, task_vars: dict[str, Any] | None = None) -> dict[str, Any]:
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        del tmp  # unused since Ansible 2.5
        args = dict(self._task.args)
        if not args.get("host"):
            fqdn = inventory_fqdn(task_vars.get("inventory_hostname"))
            if fqdn:
                args["host"] = fqdn
        result.update(
            self._execute_module(
                module_name=self._task.resolved_action or self._task.action,
                module_args=args,
                task_vars=task_vars,
            )
        )
        return result
