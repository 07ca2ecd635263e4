"""Every run of a session, numbered from 1, with a cap on how many images stay in memory."""

from __future__ import annotations

import warnings
from pathlib import Path

from .errors import SDMagicError
from .output import GenerationResult, shorten

# A 512x512 RGB image is 0.75 MiB in memory; 256 of them are about 200 MiB.
DEFAULT_MAX_IMAGES = 256


class HistoryTrimmedWarning(UserWarning):
    """The oldest runs' images were dropped from memory (their files on disk are kept)."""


class History:
    """The session's results in order; `history[n]` is run n (1-based, as `%sd_show n`).

    It outlives a new %sd_setup (the new session takes it over); each result names its model
    and scheduler."""

    def __init__(self, max_images: int = DEFAULT_MAX_IMAGES):
        self.runs: list[GenerationResult] = []
        self.max_images = max_images

    def add(self, result: GenerationResult) -> None:
        result.number = len(self.runs) + 1
        self.runs.append(result)
        self.trim()

    def trim(self) -> list[int]:
        """Drop the oldest runs' images until at most `max_images` are held; never the newest run's."""
        held = sum(len(r.images) for r in self.runs)
        dropped = []
        for result in self.runs[:-1]:
            if held <= self.max_images:
                break
            if result.images:
                held -= len(result.images)
                result.images = []
                dropped.append(result.number)
        if dropped:
            runs = ", ".join(str(n) for n in dropped)
            warnings.warn(
                f"history keeps at most {self.max_images} images in memory: dropped the images of run"
                f"{'s' if len(dropped) > 1 else ''} {runs} (files on disk are kept; raise the cap with"
                " %config SDMagics.history_images = N)",
                HistoryTrimmedWarning,
                stacklevel=3,
            )
        return dropped

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, number: int) -> GenerationResult:
        if not self.runs:
            raise SDMagicError("no runs yet: run a %%sd cell first")
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= len(self.runs):
            raise SDMagicError(f"there is no run {number!r}: runs are numbered 1 to {len(self.runs)} (see %sd_history)")
        return self.runs[number - 1]

    def table(self) -> "HistoryTable":
        return HistoryTable(list(self.runs))


class HistoryTable:
    """`%sd_history`: one line per run."""

    def __init__(self, runs: list[GenerationResult]):
        self.runs = runs

    def rows(self) -> list[tuple[str, ...]]:
        rows = [("#", "images", "prompts", "seeds", "size", "steps", "model", "compile s", "run s", "saved")]
        for r in self.runs:
            prompts = list(dict.fromkeys(r.prompts))
            text = shorten(prompts[0], 32) + (f" (+{len(prompts) - 1} more)" if len(prompts) > 1 else "")
            seeds = str(r.seeds[0]) if len(r.seeds) == 1 else f"{min(r.seeds)}..{max(r.seeds)}"
            sizes = "/".join(sorted({f"{i.width}x{i.height}" for i in r.info}))
            steps = "/".join(str(s) for s in sorted({i.steps for i in r.info}))
            if r.saved:
                saved = ", ".join(sorted({str(Path(p).parent) for p in r.saved}))
            else:
                saved = "-"
            images = str(len(r.info)) + ("" if r.images_in_memory else " (dropped)")
            model = f"{shorten(r.model, 32)} ({r.scheduler})"
            rows.append((str(r.number), images, text, seeds, sizes, steps, model, f"{r.compile_seconds:.2f}",
                         f"{r.run_seconds:.2f}", saved))
        return rows

    def __repr__(self) -> str:
        if not self.runs:
            return "no runs yet"
        rows = self.rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
