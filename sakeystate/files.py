"""Reading the files a user names (state, certificate, snapshot, old bundle): size-capped.

A file larger than its cap is refused before it is parsed, with one message
shape: which option or role the file plays, its path, and the limit.
"""

from __future__ import annotations

from sakeystate.errors import SakeystateError


def read_capped(path: str, limit: int, what: str) -> bytes:
    """The bytes of ``path``; ``what`` names it in errors (e.g. "--cert", "snapshot")."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise SakeystateError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise SakeystateError(f"{what} {path} is larger than {limit} bytes; refusing to parse it")
    return data
