"""Compile seconds kept apart from inference seconds, and %timeit-style reports."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def _seconds(value: float) -> str:
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.1f} ms"


@dataclass(frozen=True)
class RunRecord:
    """One generate call, or a warm-up (a compile with no images), and the model that made it."""

    images: int
    compile_seconds: float
    run_seconds: float
    shape: str
    model: str = ""
    scheduler: str = ""
    kind: str = "run"  # "run" or "warm-up"

    @property
    def total(self) -> float:
        return self.compile_seconds + self.run_seconds


@dataclass
class TimingLog:
    """Every completed generate call (and warm-up) in order; it outlives a new %sd_setup."""

    runs: list[RunRecord] = field(default_factory=list)

    def add(self, record: RunRecord) -> None:
        self.runs.append(record)

    def summary(self) -> "TimingSummary":
        return TimingSummary(list(self.runs))


@dataclass(frozen=True)
class TimingSummary:
    runs: list[RunRecord]

    @property
    def compile_seconds(self) -> float:
        return sum(r.compile_seconds for r in self.runs)

    @property
    def run_seconds(self) -> float:
        return sum(r.run_seconds for r in self.runs)

    @property
    def images(self) -> int:
        return sum(r.images for r in self.runs)

    @property
    def shapes(self) -> int:
        return sum(1 for r in self.runs if r.compile_seconds > 0)

    @property
    def generate_runs(self) -> list[RunRecord]:
        return [r for r in self.runs if r.kind == "run"]

    def __repr__(self) -> str:
        if not self.runs:
            return "no runs yet"
        runs = self.generate_runs
        warmups = len(self.runs) - len(runs)
        per_image = self.run_seconds / max(1, self.images)
        rate = self.images / self.run_seconds if self.run_seconds else 0.0
        warm = f", {warmups} warm-up{'s' if warmups != 1 else ''}" if warmups else ""
        lines = [
            f"{len(runs)} run{'s' if len(runs) != 1 else ''}{warm}, {self.images} images:"
            f" compile {_seconds(self.compile_seconds)}"
            f" ({self.shapes} compiled shape{'s' if self.shapes != 1 else ''}), inference {_seconds(self.run_seconds)}"
            f" = {_seconds(per_image)} per image, {rate:.2f} images/s"
        ]
        models = list(dict.fromkeys(f"{r.model} ({r.scheduler})" for r in self.runs if r.model))
        if len(models) > 1:
            lines.append(f"models: {', '.join(models)} (a new %sd_setup keeps the runs before it)")
        first = runs[0] if runs else None
        if first is not None and first.total > 0 and first.compile_seconds / first.total > 0.5:
            lines.append(
                f"the first run ({_seconds(first.total)}) was mostly compile"
                f" ({first.compile_seconds / first.total:.0%}); later runs of the same shape compile nothing"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class TimingReport:
    """`%sd_time --runs N`: steady-state seconds of the same configuration, like %timeit's result."""

    seconds: list[float]
    images_per_run: int
    compile_seconds: float
    shape: str

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def worst(self) -> float:
        return max(self.seconds)

    @property
    def seconds_per_image(self) -> float:
        return self.median / max(1, self.images_per_run)

    def __repr__(self) -> str:
        n = len(self.seconds)
        text = (
            f"{_seconds(self.median)} per run (median of {n} run{'s' if n != 1 else ''}:"
            f" min {_seconds(self.best)}, max {_seconds(self.worst)}), {self.images_per_run}"
            f" image{'s' if self.images_per_run != 1 else ''} per run"
            f" = {_seconds(self.seconds_per_image)} per image, {1 / self.seconds_per_image:.2f} images/s"
            f" [{self.shape}]"
        )
        if self.compile_seconds:
            text += f"\nthese runs compiled {_seconds(self.compile_seconds)}"
        return text
