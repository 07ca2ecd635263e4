"""Reading weights: file formats, the pickle policy, and converting into sdmagic's parameter trees.

PyTorch-layout safetensors (what model repos publish today) are the native input: the header is
read and every key, shape and dtype planned against the architecture before any tensor is read,
then tensors are read memory-mapped, one at a time, straight into the target dtype. diffusers'
Flax msgpack files are read too. Pickles (.ckpt, .bin, .pt) can run code when loaded: refused
unless the user trusts the file, and then read only by torch's weights_only loader.
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .convert import SafetensorsFile, check_flax_tree, plan_pytorch_to_flax, run_plan
from .errors import ModelLoadError, example
from .text import printable

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
PT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model", "stable_diffusion": "model"}


# diffusers' and transformers' Flax weight file names, per component library.
FLAX_WEIGHTS = {"diffusers": "diffusion_flax_model.msgpack", "transformers": "flax_model.msgpack"}


def weights_format(part_dir: Path, library: str) -> str | None:
    """'safetensors', 'flax' or 'pickle': what a component folder holds (in that order of preference),
    None if nothing (or no folder)."""
    if not part_dir.is_dir():
        return None
    if pytorch_file(part_dir, library, ".safetensors"):
        return "safetensors"
    if flax_file(part_dir, library).is_file():
        return "flax"
    if any(p.suffix in PICKLE_SUFFIXES for p in part_dir.iterdir()):
        return "pickle"
    return None


def flax_file(part_dir: Path, library: str) -> Path:
    return part_dir / FLAX_WEIGHTS.get(library if library in FLAX_WEIGHTS else "transformers")


def pytorch_file(part_dir: Path, library: str, suffix: str) -> Path | None:
    stems = [PT_STEMS.get(library, "model"), "diffusion_pytorch_model", "model", "pytorch_model"]
    for stem in dict.fromkeys(stems):
        if (part_dir / f"{stem}{suffix}").is_file():
            return part_dir / f"{stem}{suffix}"
    return None


def refuse_pickle(path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{printable(path.name)} is a pickle file ({printable(path.suffix)}): loading a pickle can run any code inside"
        " it, so sdmagic does not. Use the model's .safetensors version (most models publish one) or convert"
        f" this file to safetensors; if you trust it, {example('trust_pickle', True)} loads it through torch.load(weights_only=True),"
        " which refuses code"
    )


def torch_load(path: Path) -> dict[str, np.ndarray]:
    """A pickle's tensors through torch's weights_only loader (only with --trust-pickle)."""
    name = printable(path.name)
    try:
        import torch
    except ImportError:
        raise ModelLoadError(
            f"{example('trust_pickle', True)} reads {name} only through torch.load(weights_only=True), and torch is not"
            " installed: pip install torch (the CPU build is enough), or convert the file to safetensors"
        ) from None
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols say nothing a user can act on
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        # torch's message is a page long; the line that names what it refused is the useful one.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line or "Unsupported operand" in line),
                      lines[0] if lines else type(err).__name__)
        raise ModelLoadError(f"torch's weights_only loader refused {name}: {printable(reason)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{name} holds no state dict of tensors")
    return {
        k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        for k, v in state.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor)
    }


def caster(dtype: Any):
    """A host-side cast of floating arrays to `dtype` (integer arrays pass through)."""
    target = np.dtype(dtype)

    def cast(x):
        x = np.asarray(x)
        # copy=False: an array already in `dtype` is kept, not duplicated while its tree is rebuilt.
        return x.astype(target, copy=False) if np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16 else x

    return cast


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Cast floating leaves of one component to `dtype` on the host."""
    return jax.tree_util.tree_map(caster(dtype), tree)


def shape_structs(shapes: dict, dtype: Any = np.float32, sharding: Any = None) -> dict:
    """A tree of shape tuples (as the nets' shape functions give) as ShapeDtypeStructs."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(tuple(s), dtype, sharding=sharding), shapes,
                                  is_leaf=lambda x: isinstance(x, tuple))


def msgpack_reader(path: Path, shapes: Any, what: str, dtype: Any) -> Callable[[], Any]:
    """A Flax msgpack's parameters, read later. msgpack has no header to check first, so the file's
    size is: at most the architecture's float32 bytes (plus framing), so a junk file costs nothing."""
    most = sum(math.prod(leaf.shape) * 4 for leaf in jax.tree_util.tree_leaves(shapes))
    size = path.stat().st_size
    if size > most * 1.05 + 2**20:
        raise ModelLoadError(
            f"{what} is {size / 2**20:.1f} MiB but this architecture's weights take at most {most / 2**20:.1f} MiB:"
            " not this model's weights"
        )

    def read():
        import mmap

        try:
            # Mapped, not read into a bytes object: the file's pages stay reclaimable page cache
            # instead of a second, anonymous copy of the component beside its arrays.
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                params = msgpack_restore(data)
        except Exception as err:  # noqa: BLE001 - msgpack raises a variety of types on a broken file
            # msgpack's errors for a junk byte can have no text: the type still says what broke.
            problem = printable(err) or type(err).__name__
            raise ModelLoadError(f"could not read {what} as Flax msgpack: {problem}") from None
        check_flax_tree(params, shapes, what)
        return cast_floats(params, dtype)

    return read


def safetensors_reader(stack: ExitStack, path: Path, module_shapes: Any, part: str, library: str, what: str,
                        dtype: Any) -> Callable[[], Any]:
    source = stack.enter_context(SafetensorsFile(path))
    plan = plan_pytorch_to_flax(
        dict(source.refs), module_shapes, diffusers_names=library == "diffusers", what=what,
        ignore=lambda key: key.endswith("position_ids"),
    )
    return lambda: run_plan(plan, source.read, caster(dtype))


def pickle_reader(path: Path, module_shapes: Any, library: str, what: str, dtype: Any) -> Callable[[], Any]:
    def read():
        state = torch_load(path)
        plan = plan_pytorch_to_flax(state, module_shapes, diffusers_names=library == "diffusers", what=what,
                                    ignore=lambda key: key.endswith("position_ids"))
        state.clear()
        return run_plan(plan, None, caster(dtype))

    return read


# ----------------------------------------------------------------------------------------------
# Flax's msgpack format, read without Flax: a msgpack map of maps whose leaves are ext type 1
# (an array: msgpack (shape, dtype name, bytes)); arrays over 1 GiB are split into chunks.
# ----------------------------------------------------------------------------------------------

_MSGPACK_ARRAY, _MSGPACK_SCALAR = 1, 3
# Only numeric dtypes: a file naming "object" (or anything else) is refused, never interpreted.
_MSGPACK_DTYPES = {"float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
                   "uint32", "bool"}


def _msgpack_array(data: bytes) -> np.ndarray:
    import msgpack

    shape, name, buffer = msgpack.unpackb(data, raw=True)
    name = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
    if name not in _MSGPACK_DTYPES:
        raise ValueError(f"an array of dtype {printable(name, 20)!r}")
    dtype = np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(name)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _msgpack_ext(code: int, data: bytes) -> Any:
    if code == _MSGPACK_ARRAY:
        return _msgpack_array(data)
    if code == _MSGPACK_SCALAR:
        return _msgpack_array(data)[()]
    raise ValueError(f"unknown msgpack extension {code}")


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        if tree.get("__msgpack_chunked_array__") is True:
            shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {key: _unchunk(value) for key, value in tree.items()}
    return tree


def msgpack_restore(data: Any) -> Any:
    """A Flax msgpack file's tree (as `flax.serialization.msgpack_restore` reads it), numeric arrays only."""
    import msgpack

    return _unchunk(msgpack.unpackb(data, ext_hook=_msgpack_ext, raw=False, strict_map_key=False))


def msgpack_serialize(tree: dict) -> bytes:
    """Flax's msgpack encoding of a tree of numpy arrays (arrays under 1 GiB each, as in tests)."""
    import msgpack

    def pack(x):
        if isinstance(x, np.ndarray):
            payload = msgpack.packb((x.shape, x.dtype.name, x.tobytes()), use_bin_type=True)
            return msgpack.ExtType(_MSGPACK_ARRAY, payload)
        return x

    return msgpack.packb(tree, default=pack, strict_types=False)
