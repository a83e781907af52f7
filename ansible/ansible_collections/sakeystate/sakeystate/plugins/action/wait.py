# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Action of ``sakeystate.sakeystate.wait``: ``host`` defaults to the inventory FQDN."""

from __future__ import annotations

from ansible_collections.sakeystate.sakeystate.plugins.plugin_utils.inventory_host import (
    HostDefaultAction,
)


class ActionModule(HostDefaultAction):
    """See plugin_utils/inventory_host.py."""
