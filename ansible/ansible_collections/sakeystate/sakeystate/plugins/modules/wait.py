#!/usr/bin/python
# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402 - Ansible modules put their documentation before the imports
"""Ansible module ``sakeystate.sakeystate.wait``: ``sakeystate wait`` as a task (the reimage gate).

A real run blocks on the CLI's etcd watch; check mode looks once
(``--timeout 0s``) and never fails for a key that has not arrived yet.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: wait
short_description: Wait until every fleet apiserver verifies a key (or none does)
version_added: 0.3.0
description:
  - Runs C(sakeystate wait) on the target, which blocks (an etcd watch of the status records,
    not a poll loop) until every fleet host's record includes the key, or, with
    O(absent=true), until no fleet host's record does (a revocation reached every
    apiserver).
  - The reimage gate. Publish the new certificate, wait for it, then pool the apiserver.
  - A timeout fails the task, naming the hosts that lag (RV(lagging)).
  - Check mode looks once and does not wait. It never fails because the key has not
    arrived (RV(reached=false)), since in a check run the publish and converges that would
    bring it were only predicted.
author:
  - sakeystate maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sakeystate.sakeystate.common
  - sakeystate.sakeystate.state
options:
  kid:
    description:
      - The key's kid (or C(sha256:<hex>)).
      - Exactly one of O(kid) and O(cert) is required.
    type: str
  cert:
    description:
      - Path on the target of the key's certificate (a chained file is fine).
      - Exactly one of O(kid) and O(cert) is required.
    type: path
  absent:
    description: Wait until no fleet host verifies the key.
    type: bool
    default: false
  timeout:
    description: How long to wait (a sakeystate duration, V(90s), V(10m), V(1h30m)).
    type: str
    default: 10m
seealso:
  - module: sakeystate.sakeystate.status
  - module: sakeystate.sakeystate.publish
attributes:
  check_mode:
    description: Looks once, waits for nothing, never fails on a key not yet arrived.
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
- name: Publish the reimaged host's certificate
  sakeystate.sakeystate.publish:
    state_file: /etc/sakeystate/state.yaml

- name: Wait until every apiserver verifies it, then pool this one
  sakeystate.sakeystate.wait:
    state_file: /etc/sakeystate/state.yaml
    cert: /etc/kubernetes/pki/sa.pem
    timeout: 15m
"""

RETURN = r"""
reached:
  description: Whether every fleet host verifies the key (with O(absent), none does).
  returned: always
  type: bool
  sample: true
kid:
  description: The key's kid.
  returned: success
  type: str
  sample: 8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E
lagging:
  description: The hosts that lag, each with its status record's age.
  returned: always
  type: list
  elements: dict
  contains:
    host:
      description: The fleet host.
      type: str
      returned: always
    record:
      description: Its status record's age, or V(no status record).
      type: str
      returned: always
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sakeystate.sakeystate.plugins.module_utils.cli import (
    STATE_CHOICE,
    STATE_OPTIONS,
    require_sakeystate,
    run_cli,
    state_arguments,
)


def _lagging(report: dict) -> list[dict]:
    found = report.get("lagging") or []
    return [item if isinstance(item, dict) else {"host": item, "record": ""} for item in found]


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            **STATE_OPTIONS,
            "kid": {"type": "str"},
            "cert": {"type": "path"},
            "absent": {"type": "bool", "default": False},
            "timeout": {"type": "str", "default": "10m"},
        },
        supports_check_mode=True,
        mutually_exclusive=[*STATE_CHOICE["mutually_exclusive"], ("kid", "cert")],
        required_one_of=[*STATE_CHOICE["required_one_of"], ("kid", "cert")],
    )
    command = require_sakeystate(module)
    state, inline = state_arguments(module)
    params = module.params
    args = ["wait", *state, "--format", "json"]
    args += ["--kid", params["kid"]] if params["kid"] else ["--cert", params["cert"]]
    if params["absent"]:
        args.append("--absent")
    args += ["--timeout", "0s" if module.check_mode else params["timeout"]]
    run = run_cli(module, command, args, inline)
    report = run.report or {}
    reached = run.rc == 0 and bool(report.get("reached"))
    if reached or (module.check_mode and report.get("reached") is False):
        module.exit_json(
            changed=False, reached=reached, kid=report.get("kid"), lagging=_lagging(report)
        )
    module.fail_json(msg=run.message(), reached=False, lagging=_lagging(report))


if __name__ == "__main__":
    main()
