#!/usr/bin/python
# Copyright: sakeystate contributors
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
# ruff: noqa: E402 - Ansible modules put their documentation before the imports
"""Ansible module ``sakeystate.sakeystate.publish``: ``sakeystate publish`` as a task.

``publish --check`` (0 already published, 2 would publish, 1 error) decides
``changed`` in both modes; a real run then publishes. The CLI does the work.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: publish
short_description: Publish this control plane's service-account certificate in etcd
version_added: 0.1.0
description:
  - Publishes the host's own service-account certificate (or public key) in etcd under its
    kid, exactly like C(sakeystate publish). It never overwrites a different key, refuses a
    revoked kid, and refuses a host the certificate does not name.
  - Idempotent; check mode runs C(sakeystate publish --check) and writes nothing.
  - Publishing does not create trust; the desired state (a pin or a trust anchor) does.
author:
  - sakeystate maintainers (!UNKNOWN)
extends_documentation_fragment:
  - sakeystate.sakeystate.common
  - sakeystate.sakeystate.state
options:
  cert:
    description:
      - Path on the target of the PEM certificate (a chained file is fine) or public key.
      - Defaults to the desired state's C(own_cert).
    type: path
seealso:
  - module: sakeystate.sakeystate.converge
attributes:
  check_mode:
    description: Runs C(sakeystate publish --check); writes nothing.
    support: full
  diff_mode:
    description: Shows what would be published, for which host.
    support: full
  platform:
    description: Runs on the control plane whose certificate it publishes.
    support: full
    platforms: posix
"""

EXAMPLES = r"""
- name: Publish this control plane's service-account certificate
  sakeystate.sakeystate.publish:
    state_file: /etc/sakeystate/state.yaml

- name: Publish a certificate other than the state's own_cert
  sakeystate.sakeystate.publish:
    state_file: /etc/sakeystate/state.yaml
    cert: /etc/kubernetes/pki/sa-new.pem
"""

RETURN = r"""
message:
  description: What C(sakeystate publish) did or would do.
  returned: success
  type: str
  sample: published 8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E for ctrl1001.eqiad.example.org
kid:
  description: The certificate's key fingerprint (kid).
  returned: success
  type: str
  sample: 8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E
key:
  description: The etcd key the certificate is (or would be) published under.
  returned: success
  type: str
  sample: /kube-apiserver-sa-certs/8Xq0yTQ3c3bPqH0nJj6f2m1fV3tq1Lz0m9p2vXh7a4E
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.sakeystate.sakeystate.plugins.module_utils.cli import (
    STATE_CHOICE,
    STATE_OPTIONS,
    require_sakeystate,
    run_cli,
    state_arguments,
)

ALREADY = 0
WOULD_PUBLISH = 2


def main() -> None:
    module = AnsibleModule(
        argument_spec={**STATE_OPTIONS, "cert": {"type": "path"}},
        supports_check_mode=True,
        **STATE_CHOICE,
    )
    command = require_sakeystate(module)
    state, inline = state_arguments(module)
    args = ["publish", *state, "--format", "json"]
    if module.params["cert"]:
        args += ["--cert", module.params["cert"]]
    checked = run_cli(module, command, [*args, "--check"], inline)
    for warning in checked.warnings:
        module.warn(warning)
    if checked.rc not in (ALREADY, WOULD_PUBLISH) or checked.report is None:
        module.fail_json(msg=checked.message())
    report = checked.report
    changed = checked.rc == WOULD_PUBLISH
    if changed and not module.check_mode:
        done = run_cli(module, command, args, inline)
        if done.rc != 0 or done.report is None:
            module.fail_json(msg=done.message())
        report = done.report
    result: dict = {
        "changed": changed,
        "message": report.get("message"),
        "kid": report.get("kid"),
        "key": report.get("key"),
    }
    if module._diff:
        entry = f"{report.get('key')}  # {module.params['host'] or 'this host'}\n"
        result["diff"] = {
            "before_header": "etcd",
            "after_header": "etcd",
            "before": "" if changed else entry,
            "after": entry,
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
