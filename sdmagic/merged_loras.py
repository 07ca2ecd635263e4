"""The LoRAs merged into a session's weights, and how to change their weights cheaply.

`lora.py` reads LoRA files and computes merged values; this keeps what a session needs on top: which
files are merged with which weight, and the values the touched layers had before any LoRA (host
copies of those layers only). A new weight is then one merge from those values, not a re-read of
the base model, and the devices receive only the touched layers. Immutable: a failed change leaves
the session's set as it was.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import SDMagicError, example, option
from .text import printable

# A1111 takes any weight; past this a LoRA's delta swamps the weights and the images are noise.
MAX_LORA_WEIGHT = 100.0


@dataclass(frozen=True)
class MergedLora:
    path: str
    name: str
    short_hash: str
    weight: float
    matched: Any  # lora.MatchedLora


@dataclass(frozen=True)
class LoraSet:
    loras: tuple[MergedLora, ...] = ()
    base: dict = field(default_factory=dict)  # param path -> the layer's value before any LoRA (host)

    def record(self) -> tuple[tuple[str, float, str], ...]:
        """(name, weight, short hash) per merged LoRA, as images and PNG parameters record them."""
        return tuple((m.name, m.weight, m.short_hash) for m in self.loras)

    def describe(self) -> str:
        if not self.loras:
            return "no LoRA"
        return ", ".join(f"{printable(m.name, 60)} x{m.weight:g}" for m in self.loras)

    def with_lora(self, path: str | os.PathLike, weight: Any, params: Any, model: Any, *,
                  trust_pickle: bool = False) -> "LoraSet":
        """This set with the LoRA at `path` merged at `weight` (replacing its earlier weight; weight
        0 takes it out). `params`: the current weights (host or device arrays), whose untouched
        layers are still their base values."""
        from . import lora

        weight = lora_weight(weight)
        key = _file_key(path)
        kept = tuple(m for m in self.loras if _file_key(m.path) != key)
        if weight == 0:
            return LoraSet(kept, self.base)
        loaded = lora.read_lora(path, trust_pickle=trust_pickle)
        matched = lora.match_lora(loaded, params, model)
        base = dict(self.base)
        for leaf_path in lora.touched_paths([matched]):
            if leaf_path not in base:
                # Not touched by any merged LoRA yet, so the current value is the base value.
                base[leaf_path] = np.asarray(lora.get_leaf(params, leaf_path))
        entry = MergedLora(os.fspath(path), loaded.name, loaded.short_hash, weight, matched)
        return LoraSet(kept + (entry,), base)

    def merged_leaves(self) -> dict:
        """New values of every layer any LoRA ever touched: base + the merged LoRAs' deltas (a layer
        no LoRA touches any more gets its base value back)."""
        from . import lora

        leaves = dict(self.base)
        if self.loras:
            leaves.update(lora.merge(self.base, [(m.matched, m.weight) for m in self.loras]))
        return leaves


    @staticmethod
    def with_leaves(params: Any, leaves: dict) -> Any:
        """`params` with the layers at `leaves`' paths replaced (a new tree; `params` is unchanged)."""
        from . import lora

        return lora.with_leaves(params, leaves)


def lora_weight(value: Any) -> float:
    hint = f"e.g. {example('lora', 'style.safetensors:0.8')}" if option("lora") != "lora" else "e.g. 0.8"
    try:
        if isinstance(value, bool):
            raise TypeError
        weight = float(value)
    except (TypeError, ValueError):
        raise SDMagicError(f"a LoRA weight must be a number, got {printable(repr(value), 40)}: {hint}") from None
    if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
        raise SDMagicError(f"a LoRA weight must be from {-MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}, got {weight:g}: {hint}")
    return weight


def parse_lora(spec: Any) -> tuple[str, float]:
    """`"style.safetensors:0.8"`, `("style.safetensors", 0.8)` or a path (weight 1) -> (path, weight).
    A colon is read as the weight's only when what follows is a number (`C:\\loras\\x` stays a path)."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise SDMagicError(f"a LoRA is (path, weight), got {printable(repr(spec), 60)}")
        path, weight = spec
        return os.fspath(path), lora_weight(weight)
    if isinstance(spec, os.PathLike):
        return os.fspath(spec), 1.0
    if not isinstance(spec, str) or not spec.strip():
        raise SDMagicError(f"a LoRA is a file path, optionally with :WEIGHT, got {printable(repr(spec), 60)}")
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            float(tail)
        except ValueError:
            return spec, 1.0
        return head, lora_weight(tail)
    return spec, 1.0


def lora_set(specs: Iterable[Any], params: Any, model: Any, *, trust_pickle: bool = False,
             start: LoraSet | None = None) -> LoraSet:
    """The set of LoRAs `specs` (see parse_lora) merged in order, for weights `params`. `start`: an
    empty set holding base values kept earlier (the layers in it need not be base in `params`)."""
    merged = start or LoraSet()
    for spec in specs:
        path, weight = parse_lora(spec)
        merged = merged.with_lora(path, weight, params, model, trust_pickle=trust_pickle)
    return merged


def _file_key(path: str | os.PathLike) -> str:
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        return os.fspath(path)
