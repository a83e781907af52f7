"""Escaping of untrusted text at every output boundary: terminal, markdown, YAML comments.

Key names, values, certificate fields, token claims and file contents are
written by whoever can write to etcd or hand us a file. Every piece of such
text passes through one of these functions where it is printed, so that it
can neither drive a terminal (escape sequences, carriage returns, bidi
overrides), nor reshape a review comment (HTML, links, images, new lines a
bot would act on), nor add live lines to a generated state file.

Structure that sakeystate itself writes (labels, table pipes, newlines between
lines) is never passed through them; only the interpolated values are.
JSON output needs none of this: ``json.dumps`` escapes control characters.
"""

from __future__ import annotations

import re

# C0, DEL and C1 controls (Unicode category Cc); line and paragraph separators
# (PyYAML and some terminals break lines there); the bidi marks, embeddings,
# overrides and isolates that reorder what a reader sees ("Trojan Source");
# lone surrogates, which cannot even be encoded to a UTF-8 terminal.
_UNSAFE_RE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)
# Characters with a meaning in GitHub/GitLab markdown or HTML. Each becomes a
# numeric character reference, which renders as the character itself and
# starts nothing.
_MARKDOWN_SPECIAL = frozenset("\\`*_[]!<>&|~")
# What a code span may show verbatim: no backtick, no pipe, nothing a renderer reads.
_CODE_SAFE_RE = re.compile(r"[A-Za-z0-9_.:/+=-]+")


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def for_terminal(text: str) -> str:
    """``text`` with every control, separator and bidi character shown as ``\\xNN``/``\\uNNNN``.

    The backslash itself is left alone, so escaping twice changes nothing: a
    caller that escapes once more at the print is harmless. The price is that a
    name holding a literal ``\\x1b`` looks like one holding ESC; neither can do
    anything to the terminal.
    """
    return _UNSAFE_RE.sub(_escape_one, text)


def for_markdown(text: str) -> str:
    """``text`` as inert markdown: one line, no HTML, no links, images, emphasis or table cells.

    Control characters (CR and LF included) are first shown as ``\\xNN``, so the
    value stays on the line it was put on: no ``<!--`` can hide the lines after
    it, and no value can start a line of its own (``/approve``). Then every
    character markdown or HTML gives a meaning to becomes ``&#NN;``. Bare URLs
    may still be auto-linked by the renderer; such a link shows its own target.
    """
    safe = for_terminal(text)
    return "".join(f"&#{ord(c)};" if c in _MARKDOWN_SPECIAL else c for c in safe)


def for_markdown_code(text: str) -> str:
    """A kid, path or cluster name in a code span when it is plain, else ``for_markdown``.

    A code span shows its content verbatim (character references included), so
    only text that cannot close the span or split a table cell goes in one.
    """
    if _CODE_SAFE_RE.fullmatch(text):
        return f"`{text}`"
    return for_markdown(text)


def for_yaml_comment(text: str) -> str:
    """``text`` for the rest of a ``# ...`` line in a generated YAML file.

    A YAML comment ends at the first line break, and PyYAML breaks lines at CR,
    LF, NEL (U+0085) and U+2028/U+2029: all of them are escaped here, so
    nothing after the ``#`` can become a live key.
    """
    return for_terminal(text)
