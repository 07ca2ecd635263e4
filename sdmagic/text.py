"""Text that is safe and short to echo back to a user.

Strings that come from outside (a PNG's parameters, a model folder's configs, a prompt of ten
megabytes) can hold terminal escape sequences, control characters or simply too much. Anything
sdmagic echoes in a message goes through `printable` first.
"""

from __future__ import annotations

import re
import unicodedata

ECHO_CHARS = 80
# ANSI/VT escape sequences (CSI such as colours and cursor moves, OSC such as window titles and
# hyperlinks, and two-character escapes): dropped whole, so no fragment like "[31m" is left.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|\x9b[0-?]*[ -/]*[@-~]")


def printable(text: object, limit: int = ECHO_CHARS) -> str:
    """`text` without control, format or escape characters (each becomes a space, runs collapse),
    cut at a word boundary to at most `limit` characters with an ellipsis when cut."""
    raw = str(text)
    # Cleaning only the head keeps a 10 MB string from costing 10 MB of work.
    head = raw[: limit * 4 + 16]
    more = len(raw) > len(head)
    head = _ESCAPES.sub("", head)
    # Control, format, private-use and separator characters (newlines, bidi overrides, ...) -> spaces.
    cleaned = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in head)
    cleaned = " ".join(cleaned.split())
    return cut_at_word(cleaned, limit, more=more)


def cut_at_word(text: str, limit: int, *, more: bool = False) -> str:
    """`text` if it fits in `limit` characters, else its longest word-bounded head plus '…'."""
    if len(text) <= limit and not more:
        return text
    head = text[: max(1, limit - 1)]
    space = head.rfind(" ")
    if space >= limit // 2:  # a word boundary not too far back; else cut inside a long word
        head = head[:space]
    return head.rstrip(" ,;:") + "…"
