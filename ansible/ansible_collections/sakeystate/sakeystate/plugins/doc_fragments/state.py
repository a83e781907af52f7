# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The desired state, as a file or inline: every module but converge (which says more)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  state_file:
    description:
      - Path on the target of the desired-state YAML file.
      - Exactly one of O(state_file) and O(desired_state) is required.
    type: path
  desired_state:
    description:
      - The desired state as a mapping, as in M(sakeystate.sakeystate.converge).
      - Exactly one of O(state_file) and O(desired_state) is required.
    type: dict
"""
