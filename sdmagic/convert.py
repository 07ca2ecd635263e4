"""PyTorch-layout weights -> Flax parameters, with numpy only: no torch, no pickle.

Two layouts are read:
- diffusers' PyTorch layout (`unet/diffusion_pytorch_model.safetensors`, `text_encoder/model.safetensors`,
  ...): key names as the PyTorch modules name them;
- the original Stable Diffusion single-file layout (`model.diffusion_model.*`, `first_stage_model.*`,
  `cond_stage_model.*`), as AUTOMATIC1111 and most fine-tunes ship it: first renamed to diffusers'
  PyTorch names (`ldm_to_diffusers`), then converted like the above; and SDXL's (Stability's
  generative-models layout: the same UNet and VAE names, the text encoders under
  `conditioner.embedders.0.transformer.*` (transformers' CLIP names) and
  `conditioner.embedders.1.model.*` (OpenCLIP's), `sgm_to_diffusers`).

The conversion is driven by the target: the parameter tree sdmagic's networks declare for the
configs (the shape functions in `sdmagic/nets/`), so a missing, extra or misshapen weight is an
error that names it. A .safetensors file is checked from its header alone (`SafetensorsFile`: keys,
shapes, dtypes) before any tensor is read, then read one tensor at a time: a file that does not fit
costs no memory, and one that fits never holds two copies. `flax_to_pytorch` and
`diffusers_to_ldm` / `diffusers_to_sgm` are the inverses (the tests write tiny models in each layout
with them).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from .errors import ModelLoadError, option
from .text import printable

# diffusers' PyTorch attention names -> its Flax names (the Flax VAE kept the old ones).
_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
_DIGITS = re.compile(r"(\w+)\.(\d+)(?=\.|$)")


# ---------------------------------------------------------------------------------------------- files

# safetensors dtype names -> numpy. Weights must be floats; the integer ones appear in real files
# only as buffers that are never read (position_ids, EMA step counters).
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# A real SD checkpoint's header is a few hundred kB (about a thousand keys); the format allows 100 MB.
MAX_HEADER_BYTES = 16 * 2**20


@dataclass(frozen=True)
class TensorRef:
    """A tensor still in its file: its key, shape and dtype name. `part`/`parts`: this is the
    part-th of `parts` equal row blocks of the stored tensor (OpenCLIP's fused q/k/v);
    `transposed`: this is the stored 2-D tensor transposed (`shape` is the transposed one)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    part: int = 0
    parts: int = 1
    transposed: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)


def split_rows(value: Any, parts: int) -> list:
    """`value` (an array or a TensorRef) cut into `parts` equal blocks of rows."""
    rows = value.shape[0] if value.shape else 0
    if rows % parts:
        raise ModelLoadError(f"a fused weight has {rows} rows, which does not split into {parts} equal parts")
    if isinstance(value, TensorRef):
        if value.parts != 1 or value.transposed:
            raise ModelLoadError(f"weight {printable(value.key)!r} cannot be split twice")
        shape = (rows // parts,) + tuple(value.shape[1:])
        return [replace(value, shape=shape, part=i, parts=parts) for i in range(parts)]
    return np.split(value, parts, axis=0)


def transposed(value: Any) -> Any:
    """A 2-D `value` (an array or a TensorRef) transposed (OpenCLIP's text_projection is stored
    [in, out], PyTorch's Linear weight is [out, in])."""
    if len(value.shape) != 2:
        raise ModelLoadError(f"a projection weight has shape {tuple(value.shape)}, not two axes")
    if isinstance(value, TensorRef):
        if value.parts != 1 or value.transposed:
            raise ModelLoadError(f"weight {printable(value.key)!r} cannot be transposed here")
        return replace(value, shape=tuple(reversed(value.shape)), transposed=True)
    return np.asarray(value).T


class SafetensorsFile:
    """A .safetensors file opened for reading one tensor at a time; `refs` describes every tensor
    from the header alone. Use as a context manager."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self.name = printable(self.path.name)
        self._check_header_size()
        try:
            self._file = safe_open(str(self.path), framework="numpy")
            refs = {}
            for key in self._file.keys():
                view = self._file.get_slice(key)
                refs[key] = TensorRef(key, tuple(int(n) for n in view.get_shape()), str(view.get_dtype()))
        except Exception as err:  # noqa: BLE001 - safetensors' SafetensorError has no stable import path
            raise ModelLoadError(f"could not read {self.name} as safetensors: {printable(err)}") from None
        for ref in refs.values():
            if ref.dtype not in SAFETENSORS_DTYPES:
                raise ModelLoadError(
                    f"{self.name}: tensor {printable(ref.key)!r} has dtype {printable(ref.dtype)}, which sdmagic"
                    " does not read (weights must be float32, float16 or bfloat16)"
                )
        self.refs: dict[str, TensorRef] = refs

    def _check_header_size(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
        except OSError as err:
            raise ModelLoadError(f"could not read {self.name}: {printable(err)}") from None
        if len(head) < 8:
            raise ModelLoadError(f"{self.name} is not a safetensors file (it is {size} bytes long)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise ModelLoadError(
                f"{self.name} is not a usable safetensors file: its header claims {length} bytes"
                f" (the file has {size}; real checkpoints need well under {MAX_HEADER_BYTES // 2**20} MiB)"
            )

    def read(self, ref: TensorRef) -> np.ndarray:
        try:
            if ref.transposed:
                return self._file.get_tensor(ref.key).T
            if ref.parts == 1:
                return self._file.get_tensor(ref.key)
            rows = ref.shape[0]
            return self._file.get_slice(ref.key)[ref.part * rows : (ref.part + 1) * rows]
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(f"could not read tensor {printable(ref.key)!r} from {self.name}: {printable(err)}") from None

    def close(self) -> None:
        self._file = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- PyTorch <-> Flax


def _flat(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, prefix + (key,)))
        return out
    return {prefix: tree}


def _nest(flat: dict[tuple, Any]) -> dict:
    root: dict = {}
    for path, value in flat.items():
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return root


def _path(pt_key: str, diffusers_names: bool) -> tuple[str, ...]:
    # diffusers' Flax modules name list items `down_blocks_0`; transformers' keep `layers/0`.
    if diffusers_names:
        pt_key = _DIGITS.sub(r"\1_\2", _DIGITS.sub(r"\1_\2", pt_key))
    return tuple(pt_key.split("."))


# How a PyTorch tensor becomes its Flax leaf: the resulting shape (None where the layout cannot
# apply), and the array operation. Shapes first, so a plan is checked before anything is read.
_LAYOUTS: dict[str, tuple[Callable[[tuple], tuple | None], Callable[[np.ndarray], np.ndarray]]] = {
    "same": (lambda s: s, lambda x: x),
    # attention projections: (out, in) or the original VAE's 1x1 convs (out, in, 1, 1) -> (in, out)
    "attention": (
        lambda s: (s[1], s[0]) if len(s) >= 2 and math.prod(s[2:]) == 1 else None,
        lambda x: x.reshape(x.shape[:2]).T,
    ),
    "conv": (lambda s: (s[2], s[3], s[1], s[0]), lambda x: x.transpose(2, 3, 1, 0)),  # (out, in, h, w) -> (h, w, in, out)
    "linear": (
        lambda s: (math.prod(s[1:]), s[0]) if len(s) >= 1 else None,
        lambda x: x.reshape(x.shape[0], -1).T,
    ),
}


def _to_flax(path: tuple, shape: tuple, target: dict[tuple, Any]) -> tuple[tuple, str] | None:
    """Where a PyTorch tensor of `shape` goes in the Flax tree, and in which layout; None if nowhere."""
    if path in target:
        return path, "same"
    *parent, leaf = path
    parent = tuple(parent)
    if leaf in ("weight", "gamma"):
        if parent + ("scale",) in target:
            return parent + ("scale",), "same"
        if parent + ("embedding",) in target:
            return parent + ("embedding",), "same"
    if parent and parent[-1] in _ATTENTION:
        renamed = parent[:-1] + (_ATTENTION[parent[-1]],)
        if leaf == "weight" and renamed + ("kernel",) in target:
            return renamed + ("kernel",), "attention"
        if leaf == "bias" and renamed + ("bias",) in target:
            return renamed + ("bias",), "same"
    if leaf == "weight" and parent + ("kernel",) in target:
        return parent + ("kernel",), "conv" if len(shape) == 4 else "linear"
    if leaf == "beta" and parent + ("bias",) in target:
        return parent + ("bias",), "same"
    return None


def _is_float(value: Any) -> bool:
    if isinstance(value, TensorRef):
        return value.dtype in FLOAT_DTYPES
    dtype = np.asarray(value).dtype if not hasattr(value, "dtype") else value.dtype
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


@dataclass
class ConversionPlan:
    """Which stored tensor fills which Flax leaf, and how: checked against the target, nothing read."""

    what: str
    steps: list[tuple[Any, tuple, str]]  # (array or TensorRef, Flax path, layout name)


def plan_pytorch_to_flax(
    state: dict[str, Any],
    target_shapes: Any,
    *,
    diffusers_names: bool,
    what: str,
    ignore: Callable[[str], bool] = lambda key: False,
) -> ConversionPlan:
    """Match a PyTorch state dict (arrays, or TensorRefs from a file's header) against a Flax
    model's parameter shapes (a pytree of ShapeDtypeStruct). Raises ModelLoadError naming the first
    missing, extra, misshapen or non-float weight; reads nothing."""
    target = _flat(target_shapes)
    steps: list[tuple[Any, tuple, str]] = []
    filled: dict[tuple, str] = {}
    unexpected = []
    for key, value in state.items():
        shape = tuple(int(n) for n in value.shape)
        placed = _to_flax(_path(key, diffusers_names), shape, target)
        if placed is None:
            if not ignore(key):
                unexpected.append(key)
            continue
        path, layout = placed
        want = tuple(target[path].shape)
        got = _LAYOUTS[layout][0](shape)
        if got != want:
            raise ModelLoadError(
                f"{what}: weight {printable(key)!r} has shape {shape}, but this architecture needs"
                f" {want}: the config does not match the weights (try {option('config')})"
            )
        if not _is_float(value):
            dtype = value.dtype if isinstance(value, TensorRef) else str(np.asarray(value).dtype)
            raise ModelLoadError(f"{what}: weight {printable(key)!r} is stored as {printable(dtype)}, not as floats")
        if path in filled:
            raise ModelLoadError(
                f"{what}: weights {printable(filled[path])!r} and {printable(key)!r} both fill"
                f" {'.'.join(map(str, path))!r}: the file is not this architecture"
            )
        filled[path] = key
        steps.append((value, path, layout))
    missing = [".".join(map(str, p)) for p in target if p not in filled]
    if missing:
        raise ModelLoadError(
            f"{what}: {len(missing)} weights missing, e.g. {missing[0]!r}: the file is not this architecture"
            f" or is incomplete (try {option('config')})"
        )
    if unexpected:
        raise ModelLoadError(
            f"{what}: {len(unexpected)} weights this architecture does not have, e.g. {printable(unexpected[0])!r}"
            f" (try {option('config')})"
        )
    return ConversionPlan(what, steps)


def run_plan(
    plan: ConversionPlan,
    read: Callable[[TensorRef], np.ndarray] | None = None,
    cast: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """The Flax tree of a checked plan: each tensor read (if a TensorRef), cast, laid out and kept,
    one at a time, so the peak is the result plus one tensor."""
    flat: dict[tuple, np.ndarray] = {}
    steps, plan.steps = plan.steps[::-1], []  # dropped as converted: no second copy of the whole model
    while steps:
        value, path, layout = steps.pop()
        if isinstance(value, TensorRef):
            if read is None:
                raise ValueError("a plan over a file's tensors needs `read`")
            value = read(value)
        if cast is not None:
            value = cast(value)
        flat[path] = np.ascontiguousarray(_LAYOUTS[layout][1](np.asarray(value)))
        del value
    return _nest(flat)


def pytorch_to_flax(
    state: dict[str, Any],
    target_shapes: Any,
    *,
    diffusers_names: bool,
    what: str,
    ignore: Callable[[str], bool] = lambda key: False,
    read: Callable[[TensorRef], np.ndarray] | None = None,
    cast: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """A Flax parameter tree for a model whose parameter shapes are `target_shapes`, from its
    PyTorch state dict (arrays, or TensorRefs read through `read`). Everything is checked before
    anything is read; raises ModelLoadError naming what is wrong."""
    plan = plan_pytorch_to_flax(state, target_shapes, diffusers_names=diffusers_names, what=what, ignore=ignore)
    state.clear()  # the plan holds what is needed; the caller's dict no longer keeps a copy alive
    return run_plan(plan, read, cast)


def check_flax_tree(params: Any, target_shapes: Any, what: str) -> None:
    """A Flax parameter tree (e.g. from a msgpack file) must have exactly the target's leaves,
    shapes and floating dtypes. Raises ModelLoadError naming the first difference."""
    if not isinstance(params, dict):
        raise ModelLoadError(f"{what} does not hold a parameter tree")
    got, want = _flat(params), _flat(target_shapes)
    missing = [".".join(map(str, p)) for p in want if p not in got]
    if missing:
        raise ModelLoadError(
            f"{what}: {len(missing)} weights missing, e.g. {printable(missing[0])!r}: the file is not this"
            " architecture or is incomplete"
        )
    extra = [".".join(map(str, p)) for p in got if p not in want]
    if extra:
        raise ModelLoadError(f"{what}: {len(extra)} weights this architecture does not have, e.g. {printable(extra[0])!r}")
    for path, value in got.items():
        name = ".".join(map(str, path))
        if not isinstance(value, np.ndarray) or not _is_float(value):
            kind = str(value.dtype) if isinstance(value, np.ndarray) else type(value).__name__
            raise ModelLoadError(f"{what}: weight {printable(name)!r} is {printable(kind)}, not an array of floats")
        if tuple(value.shape) != tuple(want[path].shape):
            raise ModelLoadError(
                f"{what}: weight {printable(name)!r} has shape {tuple(value.shape)}, but this architecture needs"
                f" {tuple(want[path].shape)}: the config does not match the weights"
            )


def flax_to_pytorch(params: Any, *, diffusers_names: bool) -> dict[str, np.ndarray]:
    """The inverse of `pytorch_to_flax`: PyTorch key names and layouts from a Flax tree."""
    reverse_attention = {v: k for k, v in _ATTENTION.items()}
    out = {}
    for path, value in _flat(params).items():
        value = np.asarray(value)
        *parent, leaf = [str(p) for p in path]
        if parent and parent[-1] in reverse_attention and leaf in ("kernel", "bias"):
            parent[-1] = reverse_attention[parent[-1]]
        if leaf == "kernel":
            leaf, value = "weight", (value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        parts = parent + [leaf]
        if diffusers_names:
            # `down_blocks_0` -> `down_blocks.0`, but `linear_1` (a real name) stays.
            parts = [re.sub(r"^(.*[a-z])_(\d+)$", r"\1.\2", p) if not re.fullmatch(r"linear_\d+", p) else p for p in parts]
        out[".".join(parts)] = np.ascontiguousarray(value)
    return out


# ---------------------------------------------------------------------------------------------- single files


# SDXL's text encoders in Stability's layout: CLIP ViT-L (transformers' names) and OpenCLIP bigG.
SGM_TEXT = "conditioner.embedders.0.transformer."
SGM_TEXT_2 = "conditioner.embedders.1.model."


def detect_family(keys) -> str:
    """'sdxl' (two text encoders under conditioner.embedders), 'sd2' (OpenCLIP text encoder) or
    'sd1' (CLIP), from an original-layout checkpoint's keys (a file's header is enough: a dict of
    key -> TensorRef iterates over its keys)."""
    keys = list(keys)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError(
            "this .safetensors file is not a Stable Diffusion checkpoint in the original layout (no"
            " 'model.diffusion_model.' keys): for a diffusers folder give the folder, not a file"
        )
    if any(k.startswith("conditioner.embedders.") for k in keys):
        if any(k.startswith(SGM_TEXT) for k in keys) and any(k.startswith(SGM_TEXT_2) for k in keys):
            return "sdxl"
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise ModelLoadError(
                "this checkpoint is an SDXL refiner (one OpenCLIP text encoder): sdmagic draws with SDXL base"
                " checkpoints, not the refiner"
            )
        raise ModelLoadError(
            "this SDXL-layout checkpoint lacks a text encoder (conditioner.embedders.0.transformer.* and"
            " conditioner.embedders.1.model.* are both needed): it cannot make images alone"
        )
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ModelLoadError("this checkpoint has no text encoder weights (cond_stage_model.*): it cannot make images alone")


def _unet_pairs(config: dict) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) for every UNet block, from the diffusers UNet config."""
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    down_attention = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        # SDXL's added (text-time) embedding: generative-models' label_emb.0 is a Sequential.
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ]
    for i in range(levels):
        for j in range(layers):
            block = (layers + 1) * i + j + 1
            pairs.append((f"input_blocks.{block}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attention[i]:
                pairs.append((f"input_blocks.{block}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        for j in range(layers + 1):
            block = (layers + 1) * i + j
            pairs.append((f"output_blocks.{block}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attention[i]:
                pairs.append((f"output_blocks.{block}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            index = 2 if up_attention[i] else 1
            pairs.append((f"output_blocks.{(layers + 1) * i + layers}.{index}.", f"up_blocks.{i}.upsamplers.0."))
    return pairs


_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
           ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
_VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]


def _vae_pairs(config: dict) -> list[tuple[str, str]]:
    levels = len(config["block_out_channels"])
    layers = config.get("layers_per_block", 1)
    pairs = [("mid.attn_1.", "mid_block.attentions.0."), ("mid.block_1.", "mid_block.resnets.0."),
             ("mid.block_2.", "mid_block.resnets.1."), ("norm_out.", "conv_norm_out.")]
    for i in range(levels):
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(layers + 1):
            pairs.append((f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{levels - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]], forward: bool, anywhere: bool = False) -> str:
    """Replace the longest matching block prefix (original -> diffusers if `forward`); with
    `anywhere`, also after a dot (the VAE's `encoder.` / `decoder.` come first)."""
    best = None
    for original, diffusers in pairs:
        source, target = (original, diffusers) if forward else (diffusers, original)
        if key.startswith(source):
            at = 0
        elif anywhere and f".{source}" in key:
            at = key.index(f".{source}") + 1
        else:
            continue
        if best is None or len(source) > len(best[1]):
            best = (at, source, target)
    if best is None:
        return key
    at, source, target = best
    return key[:at] + target + key[at + len(source):]


def _rename_parts(key: str, pairs: list[tuple[str, str]], forward: bool, after: str) -> str:
    """Rename a module inside a block: `after` is a regex for the block's prefix (e.g. resnets.N.)."""
    for original, diffusers in pairs:
        source, target = (original, diffusers) if forward else (diffusers, original)
        key, n = re.subn(f"({after}){re.escape(source)}", lambda m: m.group(1) + target, key, count=1)
        if n:
            return key
    return key


def ldm_to_diffusers(checkpoint: dict[str, Any], unet_config: dict, vae_config: dict, family: str,
                     text_layers: int | None = None) -> tuple[dict, dict, dict]:
    """Split an original-layout checkpoint into diffusers' PyTorch-layout (unet, vae, text encoder) dicts.

    `text_layers`: for SD 2.x, how many OpenCLIP blocks the text encoder uses (diffusers' config
    keeps 23 of 24: SD 2 reads the penultimate layer); later blocks are dropped.
    Values are moved, not read: arrays, or TensorRefs from a file's header (OpenCLIP's fused q/k/v
    become three TensorRefs of row blocks), so a whole checkpoint is renamed and checked first.
    """
    unet, vae, text = {}, {}, {}
    unet_pairs, vae_pairs = _unet_pairs(unet_config), _vae_pairs(vae_config)
    for key in list(checkpoint):
        tensor = checkpoint.pop(key)
        if key.startswith("model.diffusion_model."):
            name = _rename(key[len("model.diffusion_model."):], unet_pairs, True)
            unet[_rename_parts(name, _RESNET, True, r"resnets\.\d+\.")] = tensor
        elif key.startswith("first_stage_model."):
            name = _rename(key[len("first_stage_model."):], vae_pairs, True, anywhere=True)
            name = _rename_parts(name, _VAE_ATTENTION, True, r"mid_block\.attentions\.0\.")
            vae[name.replace("nin_shortcut.", "conv_shortcut.")] = tensor
        elif family == "sd1" and key.startswith("cond_stage_model.transformer."):
            name = key[len("cond_stage_model.transformer."):]
            text[name if name.startswith("text_model.") else "text_model." + name] = tensor
        elif family == "sd2" and key.startswith("cond_stage_model.model."):
            _open_clip_to_clip(key[len("cond_stage_model.model."):], tensor, text, text_layers)
        # anything else (EMA copies, the learned-logvar, optimizer state) is not part of the model
    text.pop("text_model.embeddings.position_ids", None)  # a buffer some transformers versions saved
    return unet, vae, text


_OPEN_CLIP = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
              ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]


_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d{1,4})\.(.+)")


def _open_clip_to_clip(key: str, tensor: Any, text: dict, layers: int | None, projection: bool = False,
                       prefix: str = "cond_stage_model.model.") -> None:
    """One OpenCLIP text tower key into transformers' CLIP names; with `projection` (SDXL's second
    encoder, a CLIPTextModelWithProjection) its text_projection too, as the Linear weight."""
    block = _RESBLOCK.fullmatch(key)
    if projection and key == "text_projection":
        # OpenCLIP multiplies x @ text_projection ([in, out]); the Linear weight is [out, in].
        text["text_projection.weight"] = transposed(tensor)
        return
    if key == "token_embedding.weight":
        text["text_model.embeddings.token_embedding.weight"] = tensor
    elif key == "positional_embedding":
        text["text_model.embeddings.position_embedding.weight"] = tensor
    elif key.startswith("ln_final."):
        text["text_model.final_layer_norm." + key[len("ln_final."):]] = tensor
    elif block:
        index, rest = block.groups()
        if layers is not None and int(index) >= layers:
            return
        prefix = f"text_model.encoder.layers.{int(index)}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest[len("attn.in_proj_"):]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), split_rows(tensor, 3)):
                text[f"{prefix}self_attn.{name}.{kind}"] = part
            return
        for original, clip in _OPEN_CLIP:
            if rest.startswith(original):
                text[prefix + clip + rest[len(original):]] = tensor
                return
        text[prefix + rest] = tensor
    elif key not in ("text_projection", "logit_scale"):
        text[prefix + key] = tensor  # not a CLIP weight: reported as unexpected
    # text_projection and logit_scale belong to OpenCLIP's contrastive head, which SD does not use


def diffusers_to_ldm(unet: dict, vae: dict, text: dict, unet_config: dict, vae_config: dict, family: str) -> dict:
    """The inverse of `ldm_to_diffusers` (diffusers PyTorch layout -> one original-layout checkpoint)."""
    out = {}
    unet_pairs, vae_pairs = _unet_pairs(unet_config), _vae_pairs(vae_config)
    for key, tensor in unet.items():
        name = _rename_parts(key, _RESNET, False, r"resnets\.\d+\.")
        out["model.diffusion_model." + _rename(name, unet_pairs, False)] = tensor
    for key, tensor in vae.items():
        name = _rename_parts(key, _VAE_ATTENTION, False, r"mid_block\.attentions\.0\.")
        if re.search(r"mid_block\.attentions\.0\.(q|k|v|proj_out)\.weight$", name):
            tensor = tensor.reshape(tensor.shape + (1, 1))  # the original VAE attention is 1x1 convs
        name = _rename(name, vae_pairs, False, anywhere=True).replace("conv_shortcut.", "nin_shortcut.")
        out["first_stage_model." + name] = tensor
    if family == "sd1":
        for key, tensor in text.items():
            out["cond_stage_model.transformer." + key] = tensor
    else:
        out.update(_clip_to_open_clip(text, "cond_stage_model.model."))
    return out


def _clip_to_open_clip(text: dict, prefix: str) -> dict:
    """transformers' CLIP text names -> OpenCLIP's under `prefix` (the inverse of `_open_clip_to_clip`)."""
    out = {}
    pending: dict[str, dict] = {}
    for key, tensor in text.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = np.ascontiguousarray(np.asarray(tensor).T)
            continue
        name = key[len("text_model."):]
        if name == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = tensor
        elif name == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = tensor
        elif name.startswith("final_layer_norm."):
            out[prefix + "ln_final." + name[len("final_layer_norm."):]] = tensor
        else:
            index, rest = name[len("encoder.layers."):].split(".", 1)
            block = f"{prefix}transformer.resblocks.{index}."
            match = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if match:
                pending.setdefault(f"{block}attn.in_proj_{match.group(2)}", {})[match.group(1)] = tensor
                continue
            for original, clip in _OPEN_CLIP:
                if rest.startswith(clip):
                    rest = original + rest[len(clip):]
                    break
            out[block + rest] = tensor
    for key, parts in pending.items():
        out[key] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def sgm_to_diffusers(checkpoint: dict[str, Any], unet_config: dict, vae_config: dict) -> dict[str, dict]:
    """Split an SDXL checkpoint (Stability's generative-models layout) into diffusers' PyTorch-layout
    {"unet", "vae", "text_encoder", "text_encoder_2"} dicts. Values are moved, not read (arrays or
    TensorRefs), as in `ldm_to_diffusers`; keys of no component (the denoiser's sigmas, EMA copies)
    are dropped."""
    first, second = {}, {}
    for key in [k for k in checkpoint if k.startswith(("conditioner.", "cond_stage_model."))]:
        tensor = checkpoint.pop(key)
        if key.startswith(SGM_TEXT):
            name = key[len(SGM_TEXT):]
            first[name if name.startswith("text_model.") else "text_model." + name] = tensor
        elif key.startswith(SGM_TEXT_2):
            _open_clip_to_clip(key[len(SGM_TEXT_2):], tensor, second, None, projection=True, prefix=SGM_TEXT_2)
    first.pop("text_model.embeddings.position_ids", None)
    unet, vae, _ = ldm_to_diffusers(checkpoint, unet_config, vae_config, "sdxl")
    return {"unet": unet, "vae": vae, "text_encoder": first, "text_encoder_2": second}


def diffusers_to_sgm(parts: dict[str, dict], unet_config: dict, vae_config: dict) -> dict:
    """The inverse of `sgm_to_diffusers`: one SDXL checkpoint in Stability's layout from diffusers'
    PyTorch-layout {"unet", "vae", "text_encoder", "text_encoder_2"} dicts."""
    out = diffusers_to_ldm(parts["unet"], parts["vae"], {}, unet_config, vae_config, "sd1")
    out.update({SGM_TEXT + key: tensor for key, tensor in parts["text_encoder"].items()})
    out.update(_clip_to_open_clip(parts["text_encoder_2"], SGM_TEXT_2))
    return out
