"""Running ansible-core commands in tests, isolated from ~/.ansible and /etc/ansible.

ANSIBLE_HOME, the temporary directories and the configuration file live under the
test's tmp directory; the collection is used from the checkout
(ansible/ansible_collections/sakeystate/sakeystate).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import REPO

BIN = Path(sys.executable).parent
COLLECTIONS = REPO / "ansible"
COLLECTION = COLLECTIONS / "ansible_collections" / "sakeystate" / "sakeystate"


def ansible_environ(tmp: Path) -> dict[str, str]:
    """Environment for ansible-* commands that touches nothing outside ``tmp``."""
    home = tmp / "ansible-home"
    home.mkdir(exist_ok=True)
    config = tmp / "ansible.cfg"
    if not config.exists():
        config.write_text("[defaults]\n")
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_CONFIG": str(config),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
    }


def ansible_tool(
    tmp: Path, tool: str, *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ansible-core's ``tool`` (beside this interpreter) with its paths under ``tmp``."""
    return subprocess.run(
        [str(BIN / tool), *args],
        cwd=cwd or tmp,
        env=ansible_environ(tmp),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
