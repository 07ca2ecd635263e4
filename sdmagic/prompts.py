"""Cell text -> prompts: one per non-empty line; lines starting with `#` are comments."""

from __future__ import annotations


def parse_prompts(cell: str) -> list[str]:
    prompts = []
    for line in cell.splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            prompts.append(text)
    return prompts
