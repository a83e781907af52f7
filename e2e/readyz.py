"""``bundle.reload_check`` of the end-to-end cluster: ``readyz.py HOSTDIR``.

One GET of this control plane's ``/readyz`` (what ``curl -fsk
https://localhost:6443/readyz`` does in production, anonymous, the serving
certificate checked against the cluster CA): exit 0 on 200, 1 otherwise. A pass is
recorded as a ``check-ok`` event in the control plane's event log before the
command exits, so it is ordered before sakeystate releases the reload lock: the
harness proves that no two apiservers were down at once from these events.
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.request
from pathlib import Path

from supervisor import note


def main(argv: list[str]) -> int:
    hostdir = Path(argv[1])
    config = json.loads((hostdir / "apiserver.json").read_text())
    context = ssl.create_default_context(cafile=config["ca"])
    context.check_hostname = False
    try:
        with urllib.request.urlopen(config["url"] + "/readyz", context=context, timeout=3) as r:
            ok = r.status == 200
    except (OSError, ValueError):
        ok = False
    if ok:
        note(str(hostdir / "events.jsonl"), "check-ok")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
