# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Options every module of the collection takes: the executable and the host."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  executable:
    description:
      - Path of the C(sakeystate) command on the target.
      - Defaults to C(sakeystate) on the C(PATH), then C(/usr/local/bin/sakeystate) and
        C(/opt/sakeystate/bin/sakeystate) (the documented install, a venv in
        C(/opt/sakeystate) with its console script linked into C(/usr/local/bin)).
      - It must be sakeystate 0.3.0 or newer; an older one fails the task with
        C(requires sakeystate >= 0.3.0, found ...) before any other command runs.
    type: path
  host:
    description:
      - The fully qualified name of the control plane this task runs for (C(--host));
        the desired state's C(host) and C(bundle.exclude_host) set to V(self) resolve to it.
      - Defaults to C(inventory_hostname) when that is a fully qualified domain name (the
        collection's action plugin passes it); otherwise to the state's C(host), else the
        target's FQDN. An inventory of short names or IP addresses should set it.
    type: str
requirements:
  - Python >= 3.11 on the target (for the module itself)
  - sakeystate >= 0.3.0 on the target (see O(executable)); the package need not be
    importable by the Python that runs the module
"""
