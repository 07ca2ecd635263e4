"""Cell text -> prompts: one per non-empty line; lines starting with `#` are comments.

A line may carry its own options after ` -- `, like AUTOMATIC1111's prompts-from-file:

    a red fox in snow -- --seed 7 --n 2 --guidance 5
    the same fox at dusk -- --init fox.png --strength 0.6

A1111's emphasis and long prompts are prompt_weights.py's concern.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any

from .errors import SDMagicError

# " -- " (or a trailing " --", or a "-- " that starts the line) separates a prompt from its
# options; a "--" inside a word does not.
_OPTIONS = re.compile(r"^(?P<prompt>.*?)(?:^|\s+)--(?:\s+(?P<options>.*))?$")


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
    init: Any = None  # an init image: a path or a PIL image (image-to-image, inpainting)
    mask: Any = None  # a mask image, white = repaint (inpainting; needs `init`)
    strength: float | None = None
    mask_blur: int | None = None


def split_line(line: str) -> tuple[str, str | None]:
    """'a fox -- --seed 7' -> ('a fox', '--seed 7'); a line without ' -- ' -> (line, None)."""
    match = _OPTIONS.match(line.strip())
    if not match:
        return line.strip(), None
    return match.group("prompt").strip(), (match.group("options") or "").strip()


def parse_prompt_lines(cell: str) -> list[tuple[int, str, str | None]]:
    """(line number from 1, prompt, option text or None without ' -- ') for each prompt line."""
    lines = []
    for number, line in enumerate(cell.splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            prompt, options = split_line(text)
            lines.append((number, prompt, options))
    return lines


def split_words(text: str) -> list[str]:
    """Split option text into words like a shell, except that a quote inside a word is a letter.

    `--negative 'a, b'` keeps 'a, b' together, as a shell does, and `a cat's portrait` stays three
    words (a shell would wait for the closing quote). A quote opens a quoted part only at the start
    of a word; inside one, a backslash escapes the quote character. Raises ValueError for a quoted
    part that is never closed.
    """
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        if text[i] in "'\"":
            quote, i, word = text[i], i + 1, []
            while i < n and text[i] != quote:
                if text[i] == "\\" and i + 1 < n and text[i + 1] in (quote, "\\"):
                    i += 1
                word.append(text[i])
                i += 1
            if i >= n:
                raise ValueError(f"no closing quotation ({quote}) for the text starting {''.join(word)[:20]!r}")
            i += 1
            words.append("".join(word))
            continue
        start = i
        while i < n and not text[i].isspace():
            i += 1
        words.append(text[start:i])
    return words


# The options a line may carry after ' -- ', as `--flag` (the Prompt field is the flag's name).
LINE_OPTIONS = ("--seed", "--n", "--guidance", "--negative", "--steps", "--height", "--width", "--init", "--mask",
                "--strength", "--mask-blur")


class _LineOptionParser(argparse.ArgumentParser):
    def error(self, message):
        raise SDMagicError(message)


def _line_option_parser() -> argparse.ArgumentParser:
    parser = _LineOptionParser(prog="", add_help=False, allow_abbrev=False)
    for option in LINE_OPTIONS:
        parser.add_argument(option, default=None, dest=option[2:].replace("-", "_"))
    return parser


def prompts_of_text(text: str, where: str = "the text") -> list[Prompt]:
    """The prompts of a %%sd cell or a prompt file, each with the options written after its ' -- '.
    Mistakes raise SDMagicError naming the line ("line 3 of the cell: ...")."""
    parser = _line_option_parser()
    prompts = []
    for number, prompt, options in parse_prompt_lines(text):
        if options is None:
            prompts.append(Prompt(prompt))
            continue
        if not prompt:
            raise SDMagicError(f"line {number} of {where} has options but no prompt before ' -- '")
        try:
            parsed = vars(parser.parse_args(split_words(options)))
        except (ValueError, SDMagicError) as err:
            raise SDMagicError(
                f"line {number} of {where}: {err} (options after ' -- ' may be {', '.join(LINE_OPTIONS)})"
            ) from None
        prompts.append(Prompt(prompt, **parsed))
    return prompts
