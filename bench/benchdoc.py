"""docs/BENCHMARKS.md: each bench script rewrites its own section, between its markers."""

from __future__ import annotations

import os
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, as the tables print them."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def write_section(begin: str, end: str, section: str, heading: str = "") -> None:
    """Replace what lies from ``begin`` to ``end`` with ``section`` (which holds both
    markers); a file without them gets the section at its end, under ``## heading``."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nReproduce: `make bench`.\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        title = f"## {heading}\n\n" if heading else ""
        text = text.rstrip("\n") + "\n\n" + title + section + "\n"
    DOC.write_text(text)
