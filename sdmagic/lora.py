"""LoRA files: read them safely, find the layers they change, and merge them into the weights.

Two formats are in the wild, and both are read:
- kohya/A1111 (sd-scripts, most files on model sites): `lora_unet_<module>.lora_down.weight`,
  `.lora_up.weight` and `.alpha`, where <module> is the PyTorch module's name with '_' for '.';
  text encoder `lora_te_...` (SDXL: `lora_te1_...`, `lora_te2_...`). SD 1.x/2.x files name the
  UNet as diffusers does (`down_blocks_1_attentions_0_...`), SDXL files as the original (SGM) UNet
  does (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`); conv LoRA (LoCon) has a 3x3 down and a
  1x1 up.
- diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<...>`, with rank
  and alpha in the safetensors metadata as diffusers' `save_lora_weights` writes them
  (`lora_adapter_metadata`); also diffusers' older names (`...processor.to_q_lora.down.weight`,
  `.lora.down.weight`, `.lora_linear_layer.down.weight`).

A module's change to its layer is `up @ down * scale` with scale = alpha / rank (rank = down's first
dimension; no alpha: scale 1), as A1111, kohya and PEFT define it (PEFT's rsLoRA: alpha / sqrt(rank)).
Layers are found by name from the model's own parameter tree: every dense or conv kernel of the UNet
and the text encoders gets its diffusers, kohya and (for the UNet) SGM names, so a file either names
a real layer of this model or is reported; nothing is guessed from string surgery on the file's keys.
Where diffusers 0.39 and A1111 differ, A1111 is followed: a kohya layer without an alpha has scale 1
(diffusers gives it the file's most common alpha), and every kohya layer's own alpha counts (diffusers
loses the attention layers' alphas that differ from the most common one).

Host-side numpy only: nothing is traced or compiled, and neither torch nor diffusers is imported
(a pickled LoRA, allowed only with trust_pickle, goes through weights.torch_load).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from .convert import FLOAT_DTYPES, SafetensorsFile
from .errors import ModelLoadError, SDMagicError
from .text import printable
from .weights import PICKLE_SUFFIXES, refuse_pickle, torch_load

__all__ = [
    "LoraWarning", "LoraModule", "LoraFile", "MatchedModule", "MatchedLora", "read_lora", "match_lora",
    "merge", "touched_paths", "get_leaf", "with_leaves", "take_leaves", "lora_hashes",
]

ParamPath = tuple  # a parameter's path: keys into the params tree, e.g. ("unet", "conv_in", "kernel")

# The parameter trees LoRAs can change, and the kohya prefixes that name them. SD 1.x/2.x files say
# `lora_te_`, SDXL files `lora_te1_` for the same (first) text encoder; diffusers reads both so.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
_KOHYA = tuple(p for prefixes in _KOHYA_PREFIXES.values() for p in prefixes)

# How many unmatched names a warning spells out before "and N more".
SHOWN_NAMES = 5

# The cross-attention context width (and CLIP width) of each family: how a message tells an SDXL
# LoRA from an SD 1.x one.
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


class LoraWarning(UserWarning):
    """Some of a LoRA file's keys match no layer of the model and were left out."""


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One layer's low-rank change as stored: `down` (rank, in[, kh, kw]) and `up` (out, rank[, 1, 1])."""

    name: str  # the file's name for the layer: kohya `lora_unet_...` or diffusers `unet.<module>`
    down: np.ndarray
    up: np.ndarray
    alpha: float | None = None
    rslora: bool = False  # PEFT's rank-stabilised scale alpha / sqrt(rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank (no alpha: 1, i.e. alpha = rank), as A1111, kohya and PEFT scale a LoRA."""
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def torch_shape(self) -> tuple[int, int, int, int]:
        """The (out, in, kh, kw) of the PyTorch weight this changes (kh = kw = 1 for a linear layer)."""
        kernel = tuple(self.down.shape[2:]) or (1, 1)
        return (int(self.up.shape[0]), int(self.down.shape[1]), int(kernel[0]), int(kernel[1]))


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A LoRA file's factors, checked and read. `name` is the file's stem, as A1111 names a LoRA;
    `short_hash` A1111's `Lora hashes` value for it."""

    path: Path
    name: str
    short_hash: str
    format: str  # "kohya", "diffusers" or "kohya+diffusers"
    modules: dict[str, LoraModule]
    # Layers (or keys) of the file that sdmagic leaves out, with why where it is known.
    ignored: tuple[str, ...] = ()
    alias: str | None = None  # kohya's `ss_output_name`, the name A1111 shows by default


def read_lora(path: str | Path, *, trust_pickle: bool = False) -> LoraFile:
    """Read a LoRA file (.safetensors; a pickle only with `trust_pickle`, through torch's weights_only
    loader), or a folder holding diffusers' `pytorch_lora_weights.safetensors`.

    The safetensors header is checked before any tensor is read: its length, every factor's dtype
    (floats only) and size (within the file). Every problem raises a one-line ModelLoadError."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / "pytorch_lora_weights.safetensors"
        if not inside.is_file():
            raise ModelLoadError(
                f"LoRA folder {printable(path.name)!r} has no pytorch_lora_weights.safetensors: give the LoRA"
                " file itself"
            )
        name, path = path.name, inside
    else:
        name = path.stem
    if not path.is_file():
        raise ModelLoadError(f"LoRA file {printable(str(path), 120)!r} not found")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise refuse_pickle(path)
        tensors: dict[str, Any] = torch_load(path)
        metadata: dict[str, str] = {}
        short_hash = _sha256(path, 0)[:12]
        floats = {k for k, v in tensors.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}
        read = lambda key: np.asarray(tensors[key])  # noqa: E731
        shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
        return _parse(path, name, short_hash, shapes, floats, read, metadata)
    with SafetensorsFile(path) as source:
        size = path.stat().st_size
        header_end, metadata = _safetensors_metadata(path, size)
        for ref in source.refs.values():
            item = np.dtype(_ITEM_SIZE.get(ref.dtype, "f8")).itemsize
            if math.prod(ref.shape) * item > size:
                raise ModelLoadError(
                    f"{printable(path.name)} is damaged: tensor {printable(ref.key)!r} claims {ref.shape}, more than"
                    f" the file's {size} bytes"
                )
        short_hash = _a1111_short_hash(path, header_end, metadata)
        floats = {k for k, ref in source.refs.items() if ref.dtype in FLOAT_DTYPES}
        shapes = {k: ref.shape for k, ref in source.refs.items()}
        return _parse(path, name, short_hash, shapes, floats, lambda key: source.read(source.refs[key]), metadata)


_ITEM_SIZE = {"F64": "f8", "F32": "f4", "F16": "f2", "BF16": "f2", "I64": "i8", "I32": "i4", "I16": "i2",
              "I8": "i1", "U8": "u1", "BOOL": "u1"}


def _safetensors_metadata(path: Path, size: int) -> tuple[int, dict[str, str]]:
    """(where the tensor bytes start, the header's `__metadata__` strings). SafetensorsFile has
    already bounded the header's length by the file's size and 16 MiB."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise ModelLoadError(f"{printable(path.name)} is not a safetensors file (its header is not JSON)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        metadata = {}
    return 8 + length, {k: v for k, v in metadata.items() if isinstance(k, str) and isinstance(v, str)}


def _sha256(path: Path, start: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _a1111_short_hash(path: Path, header_end: int, metadata: dict[str, str]) -> str:
    """A1111's `Lora hashes` value (extensions-builtin/Lora/network.py, NetworkOnDisk): the first 12
    hex digits of kohya's `sshs_model_hash` from the metadata if the file has one, else of the
    "addnet" hash modules/hashes.py computes for a .safetensors: sha256 of the bytes after the
    header (the tensors only, so editing the metadata keeps the hash)."""
    claimed = metadata.get("sshs_model_hash", "")
    if re.fullmatch(r"[0-9a-fA-F]{64}", claimed):
        return claimed[:12]
    return _sha256(path, header_end)[:12]


# A kohya key: `lora_unet_<module>.<part>`; the module name has no dots.
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# diffusers' names for the factors, newest first: PEFT, then its own older LoRA layers.
_DIFFUSERS_PARTS = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
# The oldest diffusers format: attention processors with their own LoRA layers.
_OLD_PROCESSOR = re.compile(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_PROJECTION = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
# The text encoders' attention projections under the UNet's names (diffusers' old text LoRAs).
_TEXT_ATTENTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj", "to_out.0": "out_proj"}
# Top-level UNet modules: an unprefixed diffusers key starting so is the UNet's (old attn-procs files).
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.", "add_embedding.")
# Parts of LoRA variants sdmagic does not merge: their layers are reported, never half-applied.
_UNSUPPORTED = (
    ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), ("hada_", "LoHa"), ("lokr_", "LoKr"),
    ("lora_mid", "LoCon with a middle factor"), ("oft_", "OFT"), (".diff", "full-weight difference"),
    (".lora_B.bias", "LoRA bias"),
)


def _module_of_unsupported(key: str, marker: str) -> str:
    """The module an unsupported part belongs to: its other factors must not be merged alone."""
    if key.startswith(_KOHYA):
        return key.partition(".")[0]
    return _diffusers_module(key[: key.index(marker)].rstrip("."))


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, part) for a factor or alpha key; None for anything else."""
    if key.startswith(_KOHYA):
        module, _, part = key.partition(".")
        return (module, _KOHYA_PARTS[part]) if part in _KOHYA_PARTS else None
    old = _OLD_PROCESSOR.search(key)
    if old:
        return key[: old.start()] + "." + _OLD_PROJECTION[old.group(1)], old.group(2)
    for suffix, part in _DIFFUSERS_PARTS:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part
    return None


def _diffusers_module(name: str) -> str:
    """A diffusers module name with its component prefix, the text encoders' names for attention."""
    name = name.replace(".processor.", ".")
    if not name.startswith(tuple(c + "." for c in COMPONENTS)):
        if name.startswith(_UNET_ROOTS):
            name = "unet." + name
    if name.startswith("text_encoder"):
        head, _, last = name.rpartition(".")
        if name.endswith(".to_out.0"):
            head, last = name[: -len(".to_out.0")], "to_out.0"
        if last in _TEXT_ATTENTION:
            name = f"{head}.{_TEXT_ATTENTION[last]}"
    return name


def _adapter_config(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` (the PEFT LoraConfig per component) as {component: config}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except (ValueError, RecursionError):  # a hostile file can nest deeper than the parser goes
        return {}
    if not isinstance(packed, dict):
        return {}
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, dot, field_name = key.partition(".") if isinstance(key, str) else ("", "", "")
        if dot and component in COMPONENTS:
            configs.setdefault(component, {})[field_name] = value
    return configs


def _pattern_lookup(patterns: Any) -> Callable[[str], Any]:
    """PEFT's rank/alpha pattern lookup (`re.match(rf"(.*\\.)?({key})$", module)`, the first key that
    matches), read literally: a key names the module or a dotted suffix of it (`^key`: the whole
    name). diffusers writes module names here; a key using other regex syntax is not evaluated (a
    hostile file's regex could take forever) and so does not apply. Dict lookups per suffix, so a
    file with a huge pattern table costs no more than its size."""
    exact: dict[str, tuple[int, Any]] = {}
    suffix: dict[str, tuple[int, Any]] = {}
    if isinstance(patterns, dict):
        for i, (key, value) in enumerate(patterns.items()):
            if not isinstance(key, str) or re.search(r"[\[\]()*+?{}|\\$]", key.lstrip("^")):
                continue
            table, name = (exact, key[1:]) if key.startswith("^") else (suffix, key)
            table.setdefault(name, (i, value))

    def lookup(module: str) -> Any:
        parts = module.split(".")
        found = [suffix[s] for s in (".".join(parts[k:]) for k in range(len(parts))) if s in suffix]
        if module in exact:
            found.append(exact[module])
        return min(found, key=lambda entry: entry[0])[1] if found else None

    return lookup


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _parse(path: Path, name: str, short_hash: str, shapes: dict[str, tuple], floats: set[str], read,
           metadata: dict[str, str]) -> LoraFile:
    label = printable(path.name)
    groups: dict[str, dict[str, str]] = {}
    # What is left out, by layer where the key names one: name -> why ("" if the key means nothing here).
    ignored: dict[str, str] = {}
    partial: set[str] = set()  # layers with a part sdmagic cannot merge: left out whole
    kinds = set()
    for key in shapes:
        split = _split_key(key)
        if split is None:
            unsupported = next(((marker, what) for marker, what in _UNSUPPORTED if marker in key), None)
            if unsupported:
                module = _module_of_unsupported(key, unsupported[0])
                partial.add(module)
                ignored[module] = f"{unsupported[1]}, not supported"
            else:
                ignored[key] = ""
            continue
        module, part = split
        kind = "kohya" if key.startswith(_KOHYA) else "diffusers"
        kinds.add(kind)
        if kind == "diffusers":
            module = _diffusers_module(module)
        if part in groups.setdefault(module, {}):
            raise ModelLoadError(
                f"{label}: layer {printable(module)!r} has its {part} factor twice: the file is damaged"
            )
        groups[module][part] = key
    if not groups:
        kinds_seen = sorted({why.split(",")[0] for why in ignored.values() if why})
        if kinds_seen:
            raise ModelLoadError(
                f"{label} is a {' and '.join(kinds_seen)} file: sdmagic merges plain LoRA (and LoCon) only"
            )
        raise ModelLoadError(
            f"{label} holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B keys): is it a LoRA file?"
        )
    if any("DoRA" in why for why in ignored.values()):
        raise ModelLoadError(f"{label} is a DoRA (it has magnitude vectors): sdmagic merges plain LoRA only")
    configs = _adapter_config(metadata)
    if any(bool(c.get("use_dora")) for c in configs.values()):
        raise ModelLoadError(f"{label} is a DoRA (use_dora in its metadata): sdmagic merges plain LoRA only")
    alpha_patterns = {component: _pattern_lookup(config.get("alpha_pattern")) for component, config in configs.items()}

    modules: dict[str, LoraModule] = {}
    for module, parts in groups.items():
        if module in partial:
            continue
        if "down" not in parts or "up" not in parts:
            # An alpha alone, or half a pair: nothing to merge.
            ignored[module] = "no " + ("down" if "down" not in parts else "up") + " factor"
            continue
        down_key, up_key = parts["down"], parts["up"]
        down_shape, up_shape = tuple(shapes[down_key]), tuple(shapes[up_key])
        for key in (down_key, up_key):
            if key not in floats:
                raise ModelLoadError(f"{label}: {printable(key)!r} is not stored as floats: the file is damaged")
        if not _factors_fit(down_shape, up_shape):
            raise ModelLoadError(
                f"{label}: layer {printable(module)!r} has down {down_shape} and up {up_shape}, which do not"
                " multiply: the file is damaged"
            )
        alpha = None
        if "alpha" in parts:
            alpha_key = parts["alpha"]
            if math.prod(shapes[alpha_key]) != 1:
                raise ModelLoadError(
                    f"{label}: alpha {printable(alpha_key)!r} has shape {tuple(shapes[alpha_key])}, not one number"
                )
            value = np.asarray(read(alpha_key)).reshape(())
            if not (np.issubdtype(value.dtype, np.number) or value.dtype == ml_dtypes.bfloat16):
                raise ModelLoadError(f"{label}: alpha {printable(alpha_key)!r} is not a number")
            alpha = _number(float(value.astype(np.float64)))
            if alpha is None:
                raise ModelLoadError(f"{label}: alpha {printable(alpha_key)!r} is not a finite number")
        rslora = False
        component = module.split(".", 1)[0]
        if alpha is None and component in configs and not module.startswith(_KOHYA):
            config = configs[component]
            relative = module[len(component) + 1:]
            found = alpha_patterns[component](relative)
            alpha = _number(found if found is not None else config.get("lora_alpha"))
            rslora = bool(config.get("use_rslora"))
        modules[module] = LoraModule(module, np.asarray(read(down_key)), np.asarray(read(up_key)), alpha, rslora)
    if not modules:
        raise ModelLoadError(f"{label} holds no complete LoRA layer (each needs a down and an up factor)")
    alias = metadata.get("ss_output_name")
    return LoraFile(
        path=path, name=name, short_hash=short_hash, format="+".join(sorted(kinds, reverse=True)), modules=modules,
        ignored=tuple(f"{layer} ({why})" if why else layer for layer, why in ignored.items()),
        alias=printable(alias) if alias else None,
    )


def _factors_fit(down: tuple, up: tuple) -> bool:
    """down (r, in) or (r, in, kh, kw); up (out, r) or (out, r, 1, 1); r > 0."""
    if len(down) not in (2, 4) or len(up) not in (2, 4) or 0 in down or 0 in up:
        return False
    return up[1] == down[0] and (len(up) == 2 or up[2:] == (1, 1))


# ---------------------------------------------------------------------------------------------- matching


@dataclass(frozen=True, eq=False)
class MatchedModule:
    """A LoRA module bound to the parameter it changes: `path` into the params tree, `shape` its shape."""

    path: ParamPath
    module: LoraModule
    shape: tuple[int, ...]

    def delta(self, weight: float = 1.0) -> np.ndarray:
        """weight * scale * up @ down, float32, in sdmagic's layout: dense kernel [in, out], conv HWIO."""
        # The scale goes into the small factor (no pass over the layer-sized product), and
        # (up @ down).T is computed as down.T @ up.T, so the result comes out in the kernel's
        # [in, out] order: adding a transposed view into a kernel is several times slower.
        up = np.asarray(self.module.up, dtype=np.float32).reshape(self.module.up.shape[0], -1)
        up = up * np.float32(self.module.scale * weight)
        down = np.asarray(self.module.down, dtype=np.float32).reshape(self.module.rank, -1)
        product = down.T @ up.T
        out, fan_in, kh, kw = self.module.torch_shape
        if len(self.shape) == 2:
            return product
        return product.reshape(fan_in, kh, kw, out).transpose(1, 2, 0, 3)


@dataclass(frozen=True, eq=False)
class MatchedLora:
    """A LoRA file matched against one model: the modules with their parameters, and what matched nothing."""

    name: str
    short_hash: str
    source: Path
    modules: tuple[MatchedModule, ...]
    unmatched: tuple[str, ...] = ()
    by_path: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        grouped: dict[ParamPath, list[MatchedModule]] = {}
        for m in self.modules:
            grouped.setdefault(m.path, []).append(m)
        object.__setattr__(self, "by_path", {p: tuple(ms) for p, ms in grouped.items()})

    @property
    def paths(self) -> frozenset:
        return frozenset(self.by_path)

    def delta(self, path: ParamPath, weight: float = 1.0) -> np.ndarray:
        """The summed change this LoRA makes to the parameter at `path` (float32, sdmagic's layout)."""
        parts = [m.delta(weight) for m in self.by_path[path]]
        return parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])


def _flat(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(tree, Mapping):
        out: dict[tuple, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, prefix + (key,)))
        return out
    return {prefix: tree}


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in (leaf if isinstance(leaf, tuple) else leaf.shape))


def _torch_name(parts: Iterable[str], diffusers_names: bool) -> str:
    """The PyTorch module name of a params subtree path, as convert.flax_to_pytorch writes it."""
    parts = [str(p) for p in parts]
    if diffusers_names:
        parts = [p if re.fullmatch(r"linear_\d+", p) else re.sub(r"^(.*[a-z])_(\d+)$", r"\1.\2", p) for p in parts]
    return ".".join(parts)


def _count(block: Any, kind: str) -> int:
    return sum(1 for key in block if re.fullmatch(rf"{kind}_\d+", str(key))) if isinstance(block, Mapping) else 0


def _indices(tree: Mapping, kind: str) -> list[int]:
    return sorted(int(str(k).rsplit("_", 1)[1]) for k in tree if re.fullmatch(rf"{kind}_\d+", str(k)))


# The original (SGM/LDM) UNet's names inside a ResNet block, and its top-level layers.
_SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}


def _sgm_prefixes(unet: Mapping) -> dict[str, str]:
    """diffusers block prefix -> the original UNet's (`down_blocks.1.attentions.0` -> `input_blocks.4.1`),
    from the blocks this UNet's tree actually has: the numbering diffusers'
    `_maybe_map_sgm_blocks_to_diffusers` inverts, for any number of levels and layers."""
    pairs = {}
    n = 1
    for i in _indices(unet, "down_blocks"):
        block = unet[f"down_blocks_{i}"]
        attentions = _count(block, "attentions")
        for j in range(_count(block, "resnets")):
            pairs[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if j < attentions:
                pairs[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
            n += 1
        if "downsamplers_0" in block:
            pairs[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    pairs.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                  "mid_block.resnets.1": "middle_block.2"})
    n = 0
    for i in _indices(unet, "up_blocks"):
        block = unet[f"up_blocks_{i}"]
        attentions, resnets = _count(block, "attentions"), _count(block, "resnets")
        for j in range(resnets):
            pairs[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            if j < attentions:
                pairs[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
            if j == resnets - 1 and "upsamplers_0" in block:
                pairs[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if attentions else 1}.conv"
            n += 1
    return pairs


def _sgm_name(name: str, prefixes: dict[str, str]) -> str | None:
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if ".resnets." in f".{head}." and rest:
                rest = [_SGM_RESNET.get(rest[0], rest[0])] + rest[1:]
            return ".".join([prefixes[head]] + rest)
    return None


def _layer_index(params_shapes: Mapping) -> dict[str, tuple[ParamPath, tuple[int, ...]]]:
    """Every name a LoRA file may give a kernel of this model -> (its path, its shape)."""
    index: dict[str, tuple[ParamPath, tuple[int, ...]]] = {}
    for component in COMPONENTS:
        tree = params_shapes.get(component) if isinstance(params_shapes, Mapping) else None
        if not isinstance(tree, Mapping):
            continue
        diffusers_names = component == "unet"
        sgm = _sgm_prefixes(tree) if diffusers_names else {}
        for path, leaf in _flat(tree).items():
            if not path or path[-1] != "kernel":
                continue
            name = _torch_name(path[:-1], diffusers_names)
            entry = ((component,) + tuple(path), _shape(leaf))
            names = [f"{component}.{name}"] + [p + name.replace(".", "_") for p in _KOHYA_PREFIXES[component]]
            if sgm:
                original = _sgm_name(name, sgm)
                if original:
                    names.append("lora_unet_" + original.replace(".", "_"))
            for n in names:
                index.setdefault(n, entry)
    return index


def _torch_kernel_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """A kernel's PyTorch (out, in, kh, kw): dense [in, out] or conv HWIO."""
    if len(shape) == 2:
        return (shape[1], shape[0], 1, 1)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return None


def _family_of_model(flat: dict[tuple, Any]) -> str | None:
    if any(path[:1] == ("text_encoder_2",) for path in flat):
        return "SDXL"
    for path, leaf in flat.items():
        if path[:1] == ("unet",) and path[-3:] == ("attn2", "to_k", "kernel"):
            return _FAMILIES.get(_shape(leaf)[0])
    return None


def _family_of_lora(lora: LoraFile) -> str | None:
    names = list(lora.modules)
    if any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names):
        return "SDXL"
    for name, module in lora.modules.items():
        if name.endswith(("attn2_to_k", "attn2.to_k")):
            return _FAMILIES.get(module.torch_shape[1])
    if any(re.search(r"(input_blocks_(9|1[01])|output_blocks_(9|1[01]))_", n) for n in names):
        return "SD 1.x or 2.x"
    return None


def _made_for(lora: LoraFile, flat: dict[tuple, Any]) -> str:
    made, this = _family_of_lora(lora), _family_of_model(flat)
    if made and this and this not in made:
        return f"it looks made for {made}, and this model is {this}"
    if made and not this:
        return f"it looks made for {made}: is this model {made}?"
    return "is it made for another model (SD 1.x, SD 2.x or SDXL)?"


def _shape_text(shape: tuple[int, int, int, int] | None) -> str:
    """(out, in) for a linear layer or 1x1 conv, (out, in, kh, kw) for a wider conv: PyTorch's order."""
    if shape is None:
        return "non-matrix"
    return str(shape[:2] if shape[2:] == (1, 1) else shape)


def _shown(names: list[str]) -> str:
    shown = ", ".join(printable(n, 120) for n in names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def match_lora(lora: LoraFile, params_shapes: Mapping, model: Any = None) -> MatchedLora:
    """Bind each module of `lora` to the parameter it changes in a model whose params tree (arrays,
    ShapeDtypeStructs or shape tuples) is `params_shapes` ({"unet", "text_encoder"[, "text_encoder_2"], ...}).

    Shapes are checked first: a module whose layer exists with another shape raises SDMagicError
    (the file is for another model); modules that name no layer of this model are left out with
    ONE LoraWarning listing them; a file of which nothing matches raises SDMagicError. `model` is
    not needed: the layers and the original UNet's block numbering come from the tree itself."""
    del model  # the tree says everything; kept in the signature for callers that have it at hand
    label = printable(lora.name, 60)
    index = _layer_index(params_shapes)
    flat = {path: leaf for c in COMPONENTS if isinstance(params_shapes.get(c), Mapping)
            for path, leaf in _flat(params_shapes[c], (c,)).items()}
    matched: list[MatchedModule] = []
    unmatched: list[str] = []
    for name, module in lora.modules.items():
        found = index.get(name)
        if found is None:
            unmatched.append(name)
            continue
        path, shape = found
        if _torch_kernel_shape(shape) != module.torch_shape:
            raise SDMagicError(
                f"LoRA {label!r} does not fit this model: its layer {printable(name, 80)!r} changes a"
                f" {_shape_text(module.torch_shape)} weight, this model's is {_shape_text(_torch_kernel_shape(shape))}:"
                f" {_made_for(lora, flat)}"
            )
        matched.append(MatchedModule(path, module, shape))
    if not matched:
        raise SDMagicError(f"LoRA {label!r} matches none of this model's layers: {_made_for(lora, flat)}")
    left_out = unmatched + list(lora.ignored)
    if left_out:
        warnings.warn(
            f"LoRA {label!r}: {len(left_out)} of its entries are left out (no such layer in this model, or not"
            f" supported): {_shown(left_out)}",
            LoraWarning,
            stacklevel=2,
        )
    return MatchedLora(lora.name, lora.short_hash, lora.path, tuple(matched), tuple(left_out))


# ---------------------------------------------------------------------------------------------- merging


def touched_paths(loras: Iterable[Any]) -> set:
    """The parameter paths any of `loras` changes (MatchedLora objects or (MatchedLora, weight) pairs)."""
    paths: set = set()
    for item in loras:
        matched = item[0] if isinstance(item, tuple) else item
        paths |= matched.paths
    return paths


def merge(base_leaves: Mapping[ParamPath, Any],
          loras: Iterable[tuple[MatchedLora, float]]) -> dict[ParamPath, np.ndarray]:
    """New values for every parameter the LoRAs touch: base (as float32) + sum of weight * delta,
    cast back to the base's dtype (bfloat16 stays bfloat16). `base_leaves` holds each touched
    parameter's value before any LoRA, so merging again with other weights needs no re-read."""
    loras = list(loras)
    touched = touched_paths(loras)
    missing = [p for p in touched if p not in base_leaves]
    if missing:
        raise KeyError(f"merge needs the base value of {'/'.join(map(str, missing[0]))} (and {len(missing) - 1} more)")
    out = {}
    for path in sorted(touched, key=lambda p: tuple(map(str, p))):
        base = np.asarray(base_leaves[path])
        total = base.astype(np.float32, copy=True)
        for matched, weight in loras:
            if weight == 0:
                continue
            for module in matched.by_path.get(path, ()):
                total += module.delta(weight)
        out[path] = total if base.dtype == np.float32 else total.astype(base.dtype)
    return out


def get_leaf(params: Mapping, path: ParamPath) -> Any:
    """The value at `path` in a nested dict of parameters."""
    node = params
    for key in path:
        node = node[key]
    return node


def take_leaves(params: Mapping, paths: Iterable[ParamPath]) -> dict[ParamPath, Any]:
    """{path: value} for `paths` (e.g. a LoRA's touched parameters, their base values kept for re-merging)."""
    return {path: get_leaf(params, path) for path in paths}


def with_leaves(params: Mapping, new_leaves: Mapping[ParamPath, Any]) -> dict:
    """A new nested dict: `params` with the values at `new_leaves`' paths replaced. Only the dicts on
    those paths are copied; `params` itself is not changed."""
    root = dict(params)
    copied = {id(root)}  # each dict on the paths is copied once, however many leaves it holds
    for path, value in new_leaves.items():
        node = root
        for key in path[:-1]:
            if id(node[key]) not in copied:
                node[key] = dict(node[key])
                copied.add(id(node[key]))
            node = node[key]
        if path[-1] not in node:
            raise KeyError(f"no parameter {'/'.join(map(str, path))}")
        node[path[-1]] = value
    return root


def lora_hashes(loras: Iterable[Any]) -> str:
    """A1111's `Lora hashes` setting for LoRAs with `.name` and `.short_hash`: "name: hash, ..."
    (':' and ',' removed from names, as extra_networks_lora.py does)."""
    return ", ".join(
        f"{item.name.replace(':', '').replace(',', '')}: {item.short_hash}" for item in loras if item.short_hash
    )
