"""Cell text -> prompts: one per non-empty line; lines starting with `#` are comments.

A line may carry its own options after ` -- `, like AUTOMATIC1111's prompts-from-file:

    a red fox in snow -- --seed 7 --n 2 --guidance 5
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# " -- " (or a trailing " --") separates a prompt from its options; a "--" inside a word does not.
_OPTIONS = re.compile(r"^(?P<prompt>.*?)\s+--(?:\s+(?P<options>.*))?$")


@dataclass(frozen=True)
class Prompt:
    """A prompt with options of its own; None means "the cell's (or the call's) value"."""

    text: str
    seed: int | None = None
    n: int | None = None
    guidance: float | None = None
    negative: str | None = None
    steps: int | None = None
    height: int | None = None
    width: int | None = None


def split_line(line: str) -> tuple[str, str]:
    """'a fox -- --seed 7' -> ('a fox', '--seed 7'); a line without ' -- ' -> (line, '')."""
    match = _OPTIONS.match(line.strip())
    if not match:
        return line.strip(), ""
    return match.group("prompt").strip(), (match.group("options") or "").strip()


def parse_prompt_lines(cell: str) -> list[tuple[int, str, str]]:
    """(line number from 1, prompt, option text) for each prompt line of a cell."""
    lines = []
    for number, line in enumerate(cell.splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            prompt, options = split_line(text)
            lines.append((number, prompt, options))
    return lines
