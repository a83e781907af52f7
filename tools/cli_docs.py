"""Generate the man page and the bash/zsh completions from ``sakeystate.cli:build_parser``.

The files are made by maintained tools (argparse-manpage, shtab) from the parser
itself, so they cannot drift from the CLI: ``make docs-gen`` rewrites them after a
CLI change, and ``--check`` (run by tests/test_packaging.py in ``make test``) fails
while any of them is stale. The man page's date is the release date of
``__version__`` in CHANGELOG.md, so regenerating is reproducible.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from sakeystate import __version__

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PARSER = "sakeystate.cli.build_parser"
MAN = "docs/man/sakeystate.1"
BASH = "docs/completion/sakeystate.bash"
ZSH = "docs/completion/_sakeystate"


def release_epoch() -> str:
    """SOURCE_DATE_EPOCH for the man page: the CHANGELOG date of this version."""
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    found = re.search(
        rf"^## \[{re.escape(__version__)}\] - (\d{{4}}-\d{{2}}-\d{{2}})$", changelog, re.M
    )
    if found is None:
        raise SystemExit(f"CHANGELOG.md has no '## [{__version__}] - YYYY-MM-DD' heading")
    day = datetime.strptime(found.group(1), "%Y-%m-%d").replace(tzinfo=UTC)
    return str(int(day.timestamp()))


def _run(argv: list[str]) -> str:
    # A fixed width too: argparse wraps usage lines to the terminal's.
    env = {**os.environ, "SOURCE_DATE_EPOCH": release_epoch(), "COLUMNS": "80"}
    return subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout


def generate() -> dict[str, str]:
    """Every generated file's path (relative to the repository) and content."""
    module, function = PARSER.rsplit(".", 1)
    man = _run(
        [
            str(BIN / "argparse-manpage"),
            *("--module", module, "--function", function),
            *("--project-name", "sakeystate", "--prog", "sakeystate"),
            *("--version", __version__, "--manual-title", "sakeystate manual"),
            *("--description", "keep every kube-apiserver trusting the right service-account keys"),
        ]
    )
    return {
        MAN: man,
        BASH: _run([str(BIN / "shtab"), "--shell=bash", PARSER]),
        ZSH: _run([str(BIN / "shtab"), "--shell=zsh", PARSER]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is stale")
    args = parser.parse_args()
    stale = []
    for name, content in generate().items():
        path = REPO / name
        if path.exists() and path.read_text(encoding="utf-8") == content:
            continue
        if args.check:
            stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            print(f"wrote {name}")
    if stale:
        print(f"stale: {', '.join(stale)}; run `make docs-gen`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
