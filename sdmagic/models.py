"""Loading Stable Diffusion pipelines: the only module that imports diffusers and transformers.

diffusers removed its Flax pipeline in 0.40 and transformers its Flax CLIP in 5.0. Keeping every
import of them here means that owning the model code later is a change to this file alone.

Sources a user can name with `model=`:
- `"tiny"`: a built-in, deterministic, random miniature pipeline written to disk in diffusers' Flax
  layout and then loaded through exactly the same code path as a real model;
- a local folder in diffusers' layout (`model_index.json`, `unet/`, `vae/`, ...), with Flax msgpack
  or PyTorch-layout .safetensors weights;
- a Hugging Face Hub id such as `CompVis/stable-diffusion-v1-4`;
- a single original-layout checkpoint file (.safetensors).

A model folder is data, never code: no entry of `model_index.json` and no config key is handed to
diffusers' or transformers' loaders (which import the classes and libraries that files name).
Every component is built here from its checked config, from a fixed set of classes, and every
config value is checked against sane bounds before anything is built or read, so a broken or
hostile folder fails in one line that names the file and key.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .convert import (
    SafetensorsFile,
    check_flax_tree,
    detect_family,
    ldm_to_diffusers,
    plan_pytorch_to_flax,
    run_plan,
)
from .errors import ModelLoadError, SDMagicError, example, option
from .quiet import silence_upstream_noise
from .schedulers import LMSScheduler
from .text import printable

# Importing diffusers creates its logging handlers; the noise filter goes on them straight after.
import diffusers  # noqa: E402,F401 - imported for its logging handlers, filtered below
import transformers  # noqa: E402,F401

# Some Flax modules log their deprecation while their classes are being defined, i.e. during
# the imports below: the library handlers must be filtered before them.
silence_upstream_noise()

from diffusers import (  # noqa: E402
    FlaxAutoencoderKL,
    FlaxDDIMScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxPNDMScheduler,
    FlaxStableDiffusionPipeline,
    FlaxUNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker_flax import (  # noqa: E402
    FlaxStableDiffusionSafetyChecker,
    FlaxStableDiffusionSafetyCheckerModule,
)
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    FlaxCLIPTextModel,
)
from transformers.tokenization_utils_base import AddedToken  # noqa: E402

silence_upstream_noise()

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
TINY = "tiny"

SCHEDULERS = {
    "pndm": FlaxPNDMScheduler,
    "ddim": FlaxDDIMScheduler,
    "lms": LMSScheduler,  # upstream's Flax LMS cannot be traced; see schedulers.py
    "dpm": FlaxDPMSolverMultistepScheduler,  # DPM-Solver++ multistep
}
_SCHEDULER_NAMES = {cls.__name__: name for name, cls in SCHEDULERS.items()}
_SCHEDULER_NAMES["FlaxLMSDiscreteScheduler"] = "lms"

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

# Flax weight file names in diffusers' layout, per component library.
_FLAX_WEIGHTS = {"diffusers": "diffusion_flax_model.msgpack", "transformers": "flax_model.msgpack"}
_WEIGHTLESS = {"tokenizer", "scheduler", "feature_extractor"}

# The largest default image side a model may declare (sample_size x the VAE's factor): the same
# bound as the sizes a user may ask for.
MAX_DEFAULT_SIDE = 4096
# Config files are a few kB; a tokenizer's vocabulary and merges about 1 MB each.
MAX_CONFIG_BYTES = 4 * 2**20
MAX_VOCABULARY_BYTES = 16 * 2**20

# diffusers' scheduler classes (PyTorch or Flax names) -> the sdmagic scheduler their config
# builds. Ones sdmagic does not have (Euler, ...) become PNDM, the SD 1.x default, which
# `--scheduler` can change; a name outside this table is refused.
_SCHEDULER_CLASSES = {
    "PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpm",
    "EulerDiscreteScheduler": "pndm", "EulerAncestralDiscreteScheduler": "pndm", "HeunDiscreteScheduler": "pndm",
    "DDPMScheduler": "pndm", "DPMSolverSinglestepScheduler": "pndm", "KDPM2DiscreteScheduler": "pndm",
    "KDPM2AncestralDiscreteScheduler": "pndm", "UniPCMultistepScheduler": "pndm", "DEISMultistepScheduler": "pndm",
}
_KNOWN_SCHEDULER_CLASSES = set(_SCHEDULER_CLASSES) | {
    f"Flax{name}" for name in ("PNDMScheduler", "DDIMScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
                               "DDPMScheduler", "EulerDiscreteScheduler", "KarrasVeScheduler")
}

# The (library, class) pairs a model_index.json entry may name, per component. Nothing is ever
# imported for them: they only say which of sdmagic's fixed loaders reads the component folder.
_COMPONENTS = {
    "unet": {("diffusers", "UNet2DConditionModel"), ("diffusers", "FlaxUNet2DConditionModel")},
    "vae": {("diffusers", "AutoencoderKL"), ("diffusers", "FlaxAutoencoderKL")},
    "text_encoder": {("transformers", "CLIPTextModel"), ("transformers", "FlaxCLIPTextModel")},
    "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    "scheduler": {("diffusers", name) for name in _KNOWN_SCHEDULER_CLASSES},
    "safety_checker": {
        ("stable_diffusion", "StableDiffusionSafetyChecker"), ("stable_diffusion", "FlaxStableDiffusionSafetyChecker"),
    },
    "feature_extractor": {("transformers", "CLIPImageProcessor"), ("transformers", "CLIPFeatureExtractor")},
}
_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHTED = ("unet", "vae", "text_encoder", "safety_checker")
# `_class_name` in a diffusers component config, per component.
_CONFIG_CLASSES = {
    "unet": {"UNet2DConditionModel", "FlaxUNet2DConditionModel"},
    "vae": {"AutoencoderKL", "FlaxAutoencoderKL"},
    "scheduler": _KNOWN_SCHEDULER_CLASSES,
}


def resolve_dtype(name: str | None, backend: str) -> str:
    """The dtype name to load with: bfloat16 on accelerators, float32 on CPU, unless given."""
    if name is None:
        return "float32" if backend == "cpu" else "bfloat16"
    if name not in DTYPES:
        raise SDMagicError(f"unknown dtype {printable(name)!r}: use one of {', '.join(DTYPES)}")
    return name


def check_scheduler_name(name: str | None) -> None:
    if name is not None and name not in SCHEDULERS:
        raise SDMagicError(
            f"unknown scheduler {printable(name)!r}: use one of {', '.join(SCHEDULERS)} (dpm = DPM-Solver++ multistep),"
            " or leave it out for the model's own"
        )


class SafetyCheckerModule(FlaxStableDiffusionSafetyCheckerModule):
    """diffusers' Flax safety checker with its cosine distance fixed for current JAX.

    Upstream calls `jnp.clip(..., a_min=...)`, which JAX removed, so the upstream module cannot run
    at all on jax 0.10. Same parameters, same thresholds, same arithmetic otherwise.
    """

    def __call__(self, clip_input):
        pooled_output = self.vision_model(clip_input)[1]
        image_embeds = self.visual_projection(pooled_output)
        special_cos_dist = _cosine_distance(image_embeds, self.special_care_embeds)
        cos_dist = _cosine_distance(image_embeds, self.concept_embeds)
        special_scores = jnp.round(special_cos_dist - self.special_care_embeds_weights[None, :], 3)
        is_special_care = jnp.any(special_scores > 0, axis=1, keepdims=True)
        # A lower threshold for every concept once any special-care concept is present.
        concept_scores = jnp.round(cos_dist - self.concept_embeds_weights[None, :] + is_special_care * 0.01, 3)
        return jnp.any(concept_scores > 0, axis=1)


class SafetyChecker(FlaxStableDiffusionSafetyChecker):
    """Loads the same files as diffusers' class, with the module that runs on current JAX."""

    module_class = SafetyCheckerModule


def _cosine_distance(emb_1, emb_2, eps=1e-12):
    norm_1 = emb_1 / jnp.clip(jnp.linalg.norm(emb_1, axis=1), min=eps)[:, None]
    norm_2 = emb_2 / jnp.clip(jnp.linalg.norm(emb_2, axis=1), min=eps)[:, None]
    return norm_1 @ norm_2.T


# What the setup line says about the safety checker: it runs, the user turned it off, or the
# model has none.
CHECKER_ON, CHECKER_OFF, CHECKER_NONE = "on", "off", "none shipped"


@dataclass
class LoadedModel:
    """A pipeline's modules with host-side parameters, ready to be placed on devices."""

    name: str
    source: str  # the folder it was read from
    pipeline: Any  # FlaxStableDiffusionPipeline: modules, tokenizer, configs
    # Host arrays: unet, vae, text_encoder, (safety_checker); the scheduler state is kept apart.
    # A Session sets this to None once the parameters are on the devices.
    params: dict | None
    scheduler: Any
    scheduler_state: Any
    scheduler_name: str
    dtype: str
    load_seconds: float
    feature_extractor: Any = None
    # CHECKER_ON, CHECKER_OFF (the model has one, the user turned it off) or CHECKER_NONE.
    safety_checker_state: str = CHECKER_NONE

    @property
    def has_safety_checker(self) -> bool:
        return self.safety_checker_state == CHECKER_ON

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's factor times the UNet's downsampling.

        Flax's UNet upsamples by exactly 2 and concatenates skip connections, so a latent side that
        does not halve cleanly through every down block fails; unlike PyTorch there is no resize.
        """
        downsamples = len(self.pipeline.unet.config.block_out_channels) - 1
        return self.vae_scale_factor * 2**downsamples

    @property
    def default_size(self) -> int:
        return int(self.pipeline.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.pipeline.unet.config.in_channels)

    @property
    def max_tokens(self) -> int:
        return int(self.pipeline.tokenizer.model_max_length)


# ----------------------------------------------------------------------------------------------
# Reading a model folder's files: sizes capped, JSON checked, values bounded
# ----------------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    """A config value as the user would see it in the file, cleaned and short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return printable(text, 40)


def _read_text(path: Path, where: str, limit: int) -> str:
    """A small text file's contents; regular files only (a FIFO or device would hang or never end)."""
    if not path.is_file():
        raise ModelLoadError(f"{where} is missing (or not a regular file): copy the whole pipeline folder")
    size = path.stat().st_size
    if size > limit:
        raise ModelLoadError(f"{where} is {size / 2**20:.1f} MiB, far more than such a file holds: not a usable model file")
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"could not read {where}: {printable(err)}") from None


def _read_json(path: Path, where: str, limit: int = MAX_CONFIG_BYTES) -> Any:
    text = _read_text(path, where, limit)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(f"{where} is not valid JSON ({printable(err)})") from None


_MISSING = object()


class _Config:
    """A component config (a JSON object) read through checked getters: every complaint names the
    file and the key, and no value of the wrong type or out of bounds gets through."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ModelLoadError(f"{where} is not a JSON object (it holds a {type(data).__name__})")
        self.data = data
        self.where = where

    def fail(self, key: str, expected: str) -> ModelLoadError:
        value = self.data.get(key, None)
        return ModelLoadError(f"{self.where}: {key}={_shown(value)} is not usable: {expected}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def _value(self, key: str, default: Any, expected: str) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise ModelLoadError(f"{self.where} has no {key}: {expected}")
        return default

    def int(self, key: str, low: int, high: int, default: Any = _MISSING) -> int:
        expected = f"{key} must be a whole number from {low} to {high}"
        value = self._value(key, default, expected)
        if not _is_int(value) or not low <= value <= high:
            raise self.fail(key, expected)
        return int(value)

    def ints(self, key: str, low: int, high: int, count: tuple[int, int], default: Any = _MISSING) -> tuple[int, ...]:
        expected = f"{key} must be a list of {count[0]} to {count[1]} whole numbers from {low} to {high}"
        value = self._value(key, default, expected)
        if (
            not isinstance(value, (list, tuple))
            or not count[0] <= len(value) <= count[1]
            or not all(_is_int(v) and low <= v <= high for v in value)
        ):
            raise self.fail(key, expected)
        return tuple(int(v) for v in value)

    def int_or_ints(self, key: str, low: int, high: int, length: int, default: Any = _MISSING) -> tuple[int, ...]:
        """One number for every level, or one per level."""
        expected = f"{key} must be a whole number from {low} to {high}, or a list of {length} of them"
        value = self._value(key, default, expected)
        if _is_int(value):
            value = [value] * length
        if (
            not isinstance(value, (list, tuple))
            or len(value) != length
            or not all(_is_int(v) and low <= v <= high for v in value)
        ):
            raise self.fail(key, expected)
        return tuple(int(v) for v in value)

    def number(self, key: str, low: float, high: float, default: Any = _MISSING) -> float:
        expected = f"{key} must be a number from {low:g} to {high:g}"
        value = self._value(key, default, expected)
        if not _is_number(value) or not low <= value <= high:
            raise self.fail(key, expected)
        return float(value)

    def choice(self, key: str, choices: tuple, default: Any = _MISSING) -> Any:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        value = self._value(key, default, f"{key} must be one of {shown}")
        if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
            raise self.fail(key, f"sdmagic supports {shown}")
        return value

    def choices(self, key: str, choices: tuple, length: int, default: Any = _MISSING) -> tuple:
        expected = f"{key} must list {length} of {', '.join(choices)}"
        value = self._value(key, default, expected)
        if not isinstance(value, (list, tuple)) or len(value) != length or not all(
            isinstance(v, str) and v in choices for v in value
        ):
            raise self.fail(key, expected)
        return tuple(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._value(key, default, f"{key} must be true or false")
        if not isinstance(value, bool):
            raise self.fail(key, "it must be true or false")
        return value

    def flags(self, key: str, length: int, default: bool) -> None:
        value = self._value(key, default, "")
        if isinstance(value, bool):
            return
        if not isinstance(value, (list, tuple)) or len(value) != length or not all(isinstance(v, bool) for v in value):
            raise self.fail(key, f"{key} must be true, false or a list of {length} of them")

    def class_name(self, allowed: set) -> None:
        name = self.data.get("_class_name")
        if name is not None and name not in allowed:
            raise ModelLoadError(
                f"{self.where} names class {_shown(name)}, which is not a class sdmagic loads"
                f" ({', '.join(sorted(allowed)[:4])}{', ...' if len(allowed) > 4 else ''})"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _only(config: dict, cls: Any, drop: tuple = ("self", "kwargs")) -> dict:
    """The keys of `config` that `cls.__init__` takes by name: nothing else reaches upstream code."""
    accepted = set(inspect.signature(cls.__init__).parameters) - set(drop)
    return {k: v for k, v in config.items() if k in accepted}


# ----------------------------------------------------------------------------------------------
# model_index.json: which components, each checked against the (library, class) pairs sdmagic knows
# ----------------------------------------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else with path syntax is meant as a folder."""
    return (
        model.startswith((".", "/", "~"))
        or "\\" in model
        or model.count("/") > 1
        or os.path.isabs(model)
    )


def _model_index(folder: Path) -> dict:
    """The folder's model_index.json, every entry checked. Raises ModelLoadError naming the entry."""
    index_file = folder / "model_index.json"
    if not index_file.exists():
        raise ModelLoadError(
            f"model folder {printable(str(folder))!r} has no model_index.json: point {option('model')} at a diffusers-layout"
            " folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    return check_model_index(_read_json(index_file, f"{printable(str(folder))}/model_index.json"), "model_index.json")


def check_model_index(index: Any, where: str = "model_index.json") -> dict:
    """`index` if every component entry names a (library, class) pair sdmagic loads, or [null, null].

    Nothing is imported for an entry, ever: an unknown pair is refused here, before any loader
    could see the folder.
    """
    if not isinstance(index, dict):
        raise ModelLoadError(f"{where} is not a JSON object (it holds a {type(index).__name__}): not a diffusers pipeline")
    for name, entry in index.items():
        if not isinstance(name, str) or name.startswith("_"):
            continue  # _class_name, _diffusers_version, ...: descriptive only, never used
        if name == "requires_safety_checker" and isinstance(entry, bool):
            continue
        pair = tuple(entry) if isinstance(entry, list) else None
        if pair == (None, None):
            continue  # a component the pipeline does not ship (e.g. no safety checker)
        if name in _COMPONENTS and pair in _COMPONENTS[name]:
            continue
        if name in _COMPONENTS and isinstance(pair, tuple) and len(pair) == 2:
            problem = f"names {_shown(list(pair))}, which is not a {name} class sdmagic loads"
        elif name in _COMPONENTS:
            problem = "is not a [library, class] pair"
        else:
            problem = f"names {_shown(entry)}, a component Stable Diffusion pipelines do not have"
        raise ModelLoadError(f"{where} entry {printable(name, 40)!r} {problem}: sdmagic refuses the folder")
    return index


def _ships(index: dict, part: str) -> bool:
    entry = index.get(part)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def check_model_folder(folder: Path, *, safety_checker: bool) -> dict:
    """Fail early, in one line, when a local folder lacks a part it needs; returns its checked index."""
    index = _model_index(folder)
    needed = list(_REQUIRED)
    if safety_checker:
        needed += [name for name in ("safety_checker", "feature_extractor") if _ships(index, name)]
    label = printable(str(folder))
    for part in needed:
        if not _ships(index, part):
            raise ModelLoadError(f"model folder {label!r} has no {part} in model_index.json")
        library = index[part][0]
        part_dir = folder / part
        if not part_dir.is_dir():
            raise ModelLoadError(f"model folder {label!r} lacks {part}/: copy the whole pipeline folder")
        if part in _WEIGHTLESS:
            continue
        if _weights_format(part_dir, library) is None:
            present = sorted(printable(p.name, 40) for p in part_dir.iterdir())[:8]
            raise ModelLoadError(
                f"model folder {label!r} has no weights in {part}/ (expected Flax msgpack or .safetensors,"
                f" found {', '.join(present) or 'nothing'})"
            )
    return index


PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_PT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model", "stable_diffusion": "model"}


def _weights_format(part_dir: Path, library: str) -> str | None:
    """'flax', 'safetensors' or 'pickle': what a component folder holds (Flax preferred), None if nothing."""
    if _flax_file(part_dir, library).is_file():
        return "flax"
    if _pytorch_file(part_dir, library, ".safetensors"):
        return "safetensors"
    if any(p.suffix in PICKLE_SUFFIXES for p in part_dir.iterdir()):
        return "pickle"
    return None


def _flax_file(part_dir: Path, library: str) -> Path:
    return part_dir / _FLAX_WEIGHTS.get(library if library in _FLAX_WEIGHTS else "transformers")


def _pytorch_file(part_dir: Path, library: str, suffix: str) -> Path | None:
    stems = [_PT_STEMS.get(library, "model"), "diffusion_pytorch_model", "model", "pytorch_model"]
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


def _torch_load(path: Path) -> dict[str, np.ndarray]:
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
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise ModelLoadError(f"torch's weights_only loader refused {name}: {printable(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{name} holds no state dict of tensors")
    return {
        k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        for k, v in state.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor)
    }


# ----------------------------------------------------------------------------------------------
# The Hub
# ----------------------------------------------------------------------------------------------


def _hub_error(model: str, revision: str | None, err: Exception) -> ModelLoadError:
    """Translate huggingface_hub's exceptions into one line that says what happened and what to do."""
    from huggingface_hub import errors as hub_errors

    name = printable(model)
    rev = f" (revision {printable(revision)!r})" if revision else ""
    offline = (
        f"connect to the internet, use a local folder, or {example('model', 'tiny')} offline"
    )
    # huggingface_hub reports a failed request for a file as "not in the local cache"
    # (LocalEntryNotFoundError) with the HTTP or connection error as its cause.
    cause = err
    if isinstance(err, hub_errors.LocalEntryNotFoundError) and isinstance(err.__cause__, Exception):
        cause = err.__cause__
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if isinstance(cause, hub_errors.GatedRepoError):
        return ModelLoadError(
            f"{name!r} is gated: accept its licence on its Hub page, then log in"
            " (`huggingface-cli login`, `notebook_login()` or HF_TOKEN) and run %sd_setup again"
        )
    if isinstance(cause, hub_errors.RevisionNotFoundError):
        return ModelLoadError(
            f"{name!r} has no revision {printable(revision)!r} on the Hub: check the branch, tag or commit name,"
            f" or leave {option('revision')} out for the repo's default branch"
        )
    # LocalEntryNotFoundError is an EntryNotFoundError too, but says nothing about the repo.
    if isinstance(cause, hub_errors.EntryNotFoundError) and not isinstance(cause, hub_errors.LocalEntryNotFoundError):
        if revision:
            hint = f"check {option('revision')}, or leave it out for the repo's default branch"
        else:
            hint = "is it a diffusers pipeline repo? For a single checkpoint file, download it and give its path"
        return ModelLoadError(f"{name!r}{rev} has no model_index.json or lacks a file sdmagic needs: {hint}")
    if isinstance(cause, hub_errors.RepositoryNotFoundError) or status == 404:
        return ModelLoadError(
            f"{name!r} was not found on the Hub{rev}: check the id, log in if it is private"
            f" (`huggingface-cli login`), use a local folder, or {example('model', 'tiny')} offline"
        )
    if status == 401:
        return ModelLoadError(
            f"the Hub refused {name!r} without a valid login (HTTP 401): log in (`huggingface-cli login`,"
            " `notebook_login()` or HF_TOKEN), or check the id"
        )
    if status == 403:
        return ModelLoadError(
            f"the Hub denied access to {name!r} (HTTP 403): your token may lack read access, or the repo's"
            " licence must be accepted on its Hub page first"
        )
    if status == 429:
        return ModelLoadError(f"the Hub is limiting requests (HTTP 429) for {name!r}: wait a minute and try again")
    if isinstance(status, int) and status >= 500:
        return ModelLoadError(
            f"the Hugging Face Hub failed (HTTP {status}) for {name!r}{rev}: it is having trouble; try again"
            " later, or use a local folder"
        )
    if isinstance(cause, hub_errors.HFValidationError):
        return ModelLoadError(f"{name!r} is neither an existing folder nor a valid Hub id: {printable(cause)}")
    if (
        isinstance(err, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled))
        or _is_network_error(cause)
    ):
        return ModelLoadError(
            f"could not reach the Hugging Face Hub for {name!r}{rev} and it is not in the local cache: {offline}"
        )
    if isinstance(cause, OSError):
        return ModelLoadError(f"could not load {name!r}{rev} from the Hub: {printable(cause)}")
    return ModelLoadError(f"could not load {name!r}{rev} from the Hub ({type(cause).__name__}: {printable(cause)})")


def _is_network_error(err: BaseException) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - huggingface_hub<1.0 depends on requests
        return False
    return isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the Hub? Checked first so that a machine without network
    gets one clear error in seconds instead of huggingface_hub's retries (about half a minute)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


# huggingface_hub (0.x) retries a request that failed with a 5xx or a dropped connection five
# times with backoff, silently: 23 s before the error. One retry after half a second rides out a
# blip; anything longer is an outage the user should hear about at once.
HUB_RETRIES = 1


@contextmanager
def _fast_hub_failures():
    from huggingface_hub import file_download

    original = getattr(file_download, "http_backoff", None)
    if original is None:  # a huggingface_hub without this helper has its own policy
        yield
        return
    file_download.http_backoff = functools.partial(original, max_retries=HUB_RETRIES, base_wait_time=0.5, max_wait_time=0.5)
    try:
        yield
    finally:
        file_download.http_backoff = original


def _fetch_from_hub(model: str, revision: str | None) -> Path:
    """Download (or find in the cache) the Flax files of a Hub pipeline; returns the snapshot folder.

    Without network (or with HF_HUB_OFFLINE=1) only the local cache is used. Tokens come from
    huggingface_hub's usual places (HF_TOKEN, `huggingface-cli login`, `notebook_login()`).
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    local_only = not _hub_reachable()
    with _fast_hub_failures():
        try:
            index_file = Path(hf_hub_download(model, "model_index.json", revision=revision, local_files_only=local_only))
        except Exception as err:  # noqa: BLE001 - every Hub failure becomes one clear line
            raise _hub_error(model, revision, err) from None
        # Checked before anything else is fetched: only the known components' folders are.
        index = check_model_index(_read_json(index_file, f"{printable(model)}: model_index.json"))
        folders = [name for name in _COMPONENTS if _ships(index, name)]
        allow = [f"{name}/*" for name in folders] + ["model_index.json"]
        # Flax weights first; PyTorch pickles are never fetched, let alone opened.
        ignore = ["*.bin", "*.safetensors", "*.ckpt", "*.pt", "*.pth", "*.onnx", "*.onnx_data", "*.xml", "*.pb"]
        try:
            folder = Path(
                snapshot_download(
                    model, revision=revision, allow_patterns=allow, ignore_patterns=ignore, local_files_only=local_only
                )
            )
            # Most repos ship only PyTorch-layout safetensors: fetch those for the parts without Flax
            # weights (the plain, full-precision file; not the .fp16 / .non_ema variants).
            lacking = [
                name for name in folders
                if name not in _WEIGHTLESS and (folder / name).is_dir()
                and _weights_format(folder / name, index[name][0]) is None
            ]
            if lacking:
                safetensors = [f"{name}/{stem}.safetensors" for name in lacking for stem in set(_PT_STEMS.values())]
                folder = Path(
                    snapshot_download(model, revision=revision, allow_patterns=safetensors, local_files_only=local_only)
                )
        except Exception as err:  # noqa: BLE001
            raise _hub_error(model, revision, err) from None
        return folder


def resolve_model_folder(model: str, revision: str | None, dtype: str) -> Path:
    """The local folder holding `model`: built (tiny), given (folder) or downloaded (Hub id)."""
    if not isinstance(model, str) or not model.strip():
        raise SDMagicError(f"{option('model')} needs a Hub id, a local folder or 'tiny'")
    if revision is not None and not isinstance(revision, str):
        raise SDMagicError(f"{option('revision')} needs a branch, tag or commit name")
    if model == TINY:
        if revision is not None:
            raise SDMagicError(f"{option('revision')} is for Hub ids: the built-in 'tiny' model has no revisions; leave it out")
        from .tiny import ensure_tiny_model

        return ensure_tiny_model()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{printable(model)!r} is a file, not a model folder: give the pipeline's folder, or a .safetensors checkpoint"
            )
        if revision is not None:
            raise SDMagicError(
                f"{option('revision')} is for Hub ids: {printable(model)!r} is a local folder, which has no revisions;"
                " leave it out"
            )
        return path
    if _looks_like_path(model):
        raise ModelLoadError(f"model folder {printable(model)!r} does not exist: check the path, or use {example('model', 'tiny')}")
    if revision is None and model == DEFAULT_MODEL:
        # The original notebook's choice: the Flax weights live on these branches of SD 1.4.
        revision = "bf16" if dtype == "bfloat16" else "flax"
    return _fetch_from_hub(model, revision)


# ----------------------------------------------------------------------------------------------
# Components from their checked configs
# ----------------------------------------------------------------------------------------------


def _make_scheduler(name: str | None, pipeline_scheduler: Any) -> tuple[Any, Any, str]:
    """The model's own scheduler or one of SCHEDULERS built from the model's scheduler config."""
    own = _SCHEDULER_NAMES.get(type(pipeline_scheduler).__name__, type(pipeline_scheduler).__name__)
    if name is None and own != "lms":
        return pipeline_scheduler, _built("scheduler state", pipeline_scheduler.create_state), own
    name = name or own
    config = dict(pipeline_scheduler.config)
    if name == "lms":
        scheduler = _built("the lms scheduler from the model's scheduler config", lambda: LMSScheduler(config))
        return scheduler, _built("the lms scheduler's state", scheduler.create_state), name
    cls = SCHEDULERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = {k: v for k, v in config.items() if k in accepted}
    if name == "dpm":
        config.update(algorithm_type="dpmsolver++", solver_order=2)
    scheduler = _built(f"the {name} scheduler from the model's scheduler config", lambda: cls.from_config(config))
    return scheduler, _built(f"the {name} scheduler's state", scheduler.create_state), name


def _built(what: str, build: Callable[[], Any]) -> Any:
    """`build()`, with any exception from upstream code turned into one line: a config that passed
    the checks can still hold a combination upstream refuses, and that is the user's file, not a bug."""
    try:
        return build()
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelLoadError(f"could not build {what}: {type(err).__name__}: {printable(first, 160)}") from None


def _caster(dtype: Any):
    """A host-side cast of floating arrays to `dtype` (integer arrays pass through)."""
    target = np.dtype(dtype)

    def cast(x):
        x = np.asarray(x)
        # copy=False: an array already in `dtype` is kept, not duplicated while its tree is rebuilt.
        return x.astype(target, copy=False) if np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16 else x

    return cast


def _cast_floats(tree: Any, dtype: Any) -> Any:
    """Cast floating leaves of one component to `dtype` on the host."""
    return jax.tree_util.tree_map(_caster(dtype), tree)


# PyTorch-config settings that change the network but that diffusers' Flax modules do not build:
# refuse them rather than build a different network that quietly draws wrong images.
_UNSUPPORTED = {
    "class_embed_type": None, "time_cond_proj_dim": None, "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_type": "positional",
    "encoder_hid_dim": None, "num_class_embeds": None, "addition_embed_type": None,
}


def _check_unet_config(c: _Config) -> None:
    c.class_name(_CONFIG_CLASSES["unet"])
    for key, default in _UNSUPPORTED.items():
        if c.get(key, default) != default:
            raise ModelLoadError(
                f"{c.where} sets {key}={printable(repr(c.get(key)), 40)}, which diffusers' Flax UNet2DConditionModel does not"
                " support: this model cannot run in sdmagic"
            )
    channels = c.ints("block_out_channels", 32, 8192, (1, 6))
    levels = len(channels)
    if any(n % 32 for n in channels):  # every resnet normalises in 32 groups
        raise c.fail("block_out_channels", "every entry must be a multiple of 32")
    c.choices("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D"), levels)
    c.choices("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D"), levels)
    c.choice("mid_block_type", ("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn")
    c.int("layers_per_block", 1, 8, 2)
    heads = c.int_or_ints("attention_head_dim", 1, 1024, levels, 8)
    for n, h in zip(channels, heads):
        if n % h:
            raise c.fail("attention_head_dim", f"it must divide every level's channels ({n} channels in {h} heads)")
    if c.get("num_attention_heads") is not None:
        raise c.fail("num_attention_heads", "diffusers' Flax UNet reads the head count from attention_head_dim only")
    c.int_or_ints("transformer_layers_per_block", 1, 16, levels, 1)
    c.int("cross_attention_dim", 1, 8192)
    c.int("in_channels", 1, 64, 4)
    c.int("out_channels", 1, 64, 4)
    c.int("sample_size", 1, MAX_DEFAULT_SIDE, 32)
    c.int("freq_shift", 0, 1000, 0)
    c.number("dropout", 0.0, 1.0, 0.0)
    for key in ("use_linear_projection", "flip_sin_to_cos", "split_head_dim", "use_memory_efficient_attention"):
        c.flag(key, key == "flip_sin_to_cos")
    c.flags("only_cross_attention", levels, False)


def _check_vae_config(c: _Config) -> None:
    c.class_name(_CONFIG_CLASSES["vae"])
    channels = c.ints("block_out_channels", 1, 8192, (1, 6))
    levels = len(channels)
    groups = c.int("norm_num_groups", 1, 1024, 32)
    if any(n % groups for n in channels):
        raise c.fail("block_out_channels", f"every entry must be a multiple of norm_num_groups ({groups})")
    c.choices("down_block_types", ("DownEncoderBlock2D",), levels)
    c.choices("up_block_types", ("UpDecoderBlock2D",), levels)
    c.int("layers_per_block", 1, 8, 1)
    c.int("latent_channels", 1, 64, 4)
    c.int("in_channels", 3, 3, 3)
    c.int("out_channels", 3, 3, 3)
    c.int("sample_size", 1, 16384, 32)
    c.number("scaling_factor", 1e-6, 1e3, 0.18215)
    c.choice("act_fn", ("silu",), "silu")


def _flax_module(cls: Any, config: dict, dtype: Any, where: str) -> Any:
    """A diffusers Flax module from a PyTorch or Flax component config (only the keys it takes)."""
    check = _check_unet_config if cls is FlaxUNet2DConditionModel else _check_vae_config
    check(_Config(config, where))
    accepted = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype"}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in accepted}
    return _built(f"the {cls.__name__.removeprefix('Flax')} from {where}", lambda: cls(**kwargs, dtype=dtype))


_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu", "swish", "tanh")


def _check_clip_encoder(c: _Config, *, vision: bool) -> None:
    hidden = c.int("hidden_size", 1, 8192, 768 if vision else 512)
    heads = c.int("num_attention_heads", 1, 256, 12 if vision else 8)
    if hidden % heads:
        raise c.fail("num_attention_heads", f"it must divide hidden_size ({hidden})")
    c.int("intermediate_size", 1, 65536, 3072 if vision else 2048)
    c.int("num_hidden_layers", 1, 64, 12)
    c.int("projection_dim", 1, 8192, 512)
    c.choice("hidden_act", _ACTIVATIONS, "quick_gelu")
    c.number("layer_norm_eps", 0.0, 1.0, 1e-5)
    if vision:
        size = c.int("image_size", 1, 1024, 224)
        patch = c.int("patch_size", 1, 1024, 32)
        if size % patch:
            raise c.fail("patch_size", f"it must divide image_size ({size})")
        c.int("num_channels", 3, 3, 3)
    else:
        vocab = c.int("vocab_size", 1, 1_000_000, 49408)
        c.int("max_position_embeddings", 1, 1024, 77)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if c.get(key) is not None:
                c.int(key, 0, vocab - 1)


def _text_config(folder: Path, label: str) -> CLIPTextConfig:
    where = f"{label}/text_encoder/config.json"
    raw = _Config(_read_json(folder / "text_encoder" / "config.json", where), where)
    data = raw.data
    if data.get("model_type") == "clip" and isinstance(data.get("text_config"), dict):
        data = data["text_config"]  # a full CLIP config: its text half, as transformers reads it
    config = _Config(data, where)
    _check_clip_encoder(config, vision=False)
    # Only the keys CLIPTextConfig takes: `auto_map` and the like never reach transformers.
    return _built(f"the text encoder config from {where}", lambda: CLIPTextConfig(**_only(config.data, CLIPTextConfig)))


def _checker_config(folder: Path, label: str) -> CLIPConfig:
    where = f"{label}/safety_checker/config.json"
    config = _Config(_read_json(folder / "safety_checker" / "config.json", where), where)
    vision = _Config(config.get("vision_config", {}), f"{where} (vision_config)")
    # Older files (SD 1.x's checker) also carry `vision_config_dict`, which transformers lets win.
    override = _Config(config.get("vision_config_dict", {}), f"{where} (vision_config_dict)")
    vision = _Config({**vision.data, **override.data}, f"{where} (vision_config)")
    _check_clip_encoder(vision, vision=True)
    projection = config.int("projection_dim", 1, 8192, 512)
    return _built(
        f"the safety checker config from {where}",
        lambda: CLIPConfig(vision_config=_only(vision.data, CLIPVisionConfig), projection_dim=projection),
    )


def _special_token(value: Any, where: str, key: str) -> Any:
    """A tokenizer_config special token: a string, or an AddedToken's fields."""
    if isinstance(value, str) and len(value) <= 100:
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str) and len(value["content"]) <= 100:
        flags = {k: v for k, v in value.items() if k in ("single_word", "lstrip", "rstrip", "normalized", "special")}
        if all(isinstance(v, bool) for v in flags.values()):
            return AddedToken(value["content"], **flags)
    raise ModelLoadError(f"{where}: {key}={_shown(value)} is not usable: a special token must be a short string")


_SPECIAL_TOKENS = ("unk_token", "bos_token", "eos_token", "pad_token")


def _tokenizer(folder: Path, label: str, text_config: CLIPTextConfig) -> CLIPTokenizer:
    """A CLIP tokenizer built from its vocabulary, merges and the few settings SD uses.

    Not through `from_pretrained`, which reads whatever the folder holds (tokenizer.json, chat
    templates, a config naming other tokenizer classes or remote code) and may consult AutoConfig.
    """
    part = folder / "tokenizer"
    where = f"{label}/tokenizer/tokenizer_config.json"
    config_file = part / "tokenizer_config.json"
    settings = _Config(_read_json(config_file, where) if config_file.exists() else {}, where)
    settings.choice("tokenizer_class", ("CLIPTokenizer", "CLIPTokenizerFast"), "CLIPTokenizer")
    positions = int(text_config.max_position_embeddings)
    # transformers' default for a missing value is 10**30; the text encoder's length is what SD means.
    max_length = settings.int("model_max_length", 1, positions, positions)
    errors = settings.choice("errors", ("replace", "strict", "ignore"), "replace")
    tokens = {key: settings.get(key) for key in _SPECIAL_TOKENS if settings.get(key) is not None}
    # As transformers does: without `added_tokens_decoder`, special_tokens_map.json has the last word.
    special_map = part / "special_tokens_map.json"
    if "added_tokens_decoder" not in settings.data and special_map.exists():
        mapped = _Config(_read_json(special_map, f"{label}/tokenizer/special_tokens_map.json"),
                         f"{label}/tokenizer/special_tokens_map.json")
        tokens.update({key: mapped.get(key) for key in _SPECIAL_TOKENS if mapped.get(key) is not None})
    kwargs = {key: _special_token(value, where, key) for key, value in tokens.items()}
    vocab_where = f"{label}/tokenizer/vocab.json"
    vocab = _read_json(part / "vocab.json", vocab_where, MAX_VOCABULARY_BYTES)
    # An id past the text encoder's embedding table would be clamped silently by the lookup.
    if not isinstance(vocab, dict) or not all(_is_int(i) and 0 <= i < text_config.vocab_size for i in vocab.values()):
        raise ModelLoadError(
            f"{vocab_where} is not a CLIP vocabulary of token -> id below the text encoder's"
            f" vocab_size ({text_config.vocab_size})"
        )
    _read_text(part / "merges.txt", f"{label}/tokenizer/merges.txt", MAX_VOCABULARY_BYTES)
    tokenizer = _built(
        f"the tokenizer from {label}/tokenizer/",
        lambda: CLIPTokenizer(str(part / "vocab.json"), str(part / "merges.txt"), errors=errors,
                              model_max_length=max_length, **kwargs),
    )
    if len(tokenizer) > text_config.vocab_size:
        raise ModelLoadError(
            f"{label}/tokenizer/ has {len(tokenizer)} tokens but text_encoder/config.json has vocab_size="
            f"{text_config.vocab_size}: the tokenizer and text encoder do not belong together"
        )
    return tokenizer


def _feature_extractor(folder: Path, label: str) -> CLIPImageProcessor:
    """The safety checker's image preprocessing; CLIP's standard one (what SD ships) if none is."""
    part = folder / "feature_extractor" / "preprocessor_config.json"
    if not (folder / "feature_extractor").is_dir():
        return CLIPImageProcessor()
    where = f"{label}/feature_extractor/preprocessor_config.json"
    c = _Config(_read_json(part, where), where)
    size = c.get("size", {"shortest_edge": 224})
    crop = c.get("crop_size", {"height": 224, "width": 224})
    # Older files give plain numbers; transformers reads them as these dicts.
    size = {"shortest_edge": size} if _is_int(size) else size
    crop = {"height": crop, "width": crop} if _is_int(crop) else crop
    if not (isinstance(size, dict) and _Config(size, where).int("shortest_edge", 1, 1024) > 0):
        raise c.fail("size", "it must be a number of pixels or {\"shortest_edge\": pixels}")
    if not isinstance(crop, dict):
        raise c.fail("crop_size", "it must be a number of pixels or {\"height\": ..., \"width\": ...}")
    crop_config = _Config(crop, f"{where} (crop_size)")
    height, width = crop_config.int("height", 1, 1024), crop_config.int("width", 1, 1024)
    if max(height, width) > size["shortest_edge"]:
        raise c.fail("crop_size", f"the crop must fit in the resized image (shortest edge {size['shortest_edge']})")
    for key in ("image_mean", "image_std"):
        value = c.get(key, [0.5, 0.5, 0.5])
        if not isinstance(value, list) or len(value) != 3 or not all(_is_number(v) for v in value):
            raise c.fail(key, "it must be a list of 3 numbers")
    if not all(v > 0 for v in c.get("image_std", [1, 1, 1])):
        raise c.fail("image_std", "every entry must be above 0")
    c.number("rescale_factor", 1e-6, 1.0, 1 / 255)
    settings = {**_only(c.data, CLIPImageProcessor), "size": size, "crop_size": crop}
    settings = {k: v for k, v in settings.items() if k not in ("resample",)}  # Pillow's, unused on the device
    return _built(f"the feature extractor from {where}", lambda: CLIPImageProcessor(**settings))


def _scheduler_config(folder: Path, label: str, index: dict | None) -> tuple[dict, str]:
    """The scheduler config's checked settings, and the sdmagic scheduler name its class maps to."""
    where = f"{label}/scheduler/scheduler_config.json"
    c = _Config(_read_json(folder / "scheduler" / "scheduler_config.json", where), where)
    c.class_name(_KNOWN_SCHEDULER_CLASSES)
    class_name = c.get("_class_name") or (index or {}).get("scheduler", [None, "PNDMScheduler"])[1]
    name = _SCHEDULER_CLASSES.get(str(class_name).removeprefix("Flax"), "pndm")
    steps = c.int("num_train_timesteps", 2, 10000, 1000)
    schedule = c.choice("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"), "linear")
    start = c.number("beta_start", 1e-8, 0.999, 0.0001)
    end = c.number("beta_end", 1e-8, 0.999, 0.02)
    if schedule != "squaredcos_cap_v2" and start >= end:
        raise c.fail("beta_start", f"it must be below beta_end ({end:g})")
    betas = c.get("trained_betas")
    if betas is not None and (
        not isinstance(betas, list) or len(betas) != steps or not all(_is_number(b) and 0 < b < 1 for b in betas)
    ):
        raise c.fail("trained_betas", f"it must be null or {steps} numbers between 0 and 1")
    c.choice("prediction_type", ("epsilon", "v_prediction"), "epsilon")
    c.int("steps_offset", 0, steps - 1, 0)
    for key in ("set_alpha_to_one", "skip_prk_steps", "clip_sample", "thresholding", "lower_order_final"):
        c.flag(key, False)
    if name == "dpm":
        c.int("solver_order", 1, 3, 2)
        c.choice("algorithm_type", ("dpmsolver++", "dpmsolver"), "dpmsolver++")
        c.choice("solver_type", ("midpoint", "heun"), "midpoint")
    return c.data, name


def _base_scheduler(folder: Path, label: str | None = None, index: dict | None = None) -> tuple[Any, str]:
    """The model's scheduler config as a Flax object, and the sdmagic scheduler it names.

    PyTorch-layout repos name PyTorch classes; one sdmagic does not have (e.g. Euler) becomes PNDM,
    the SD 1.x default, which `--scheduler` can change.
    """
    config, name = _scheduler_config(folder, label or printable(str(folder)), index)
    cls = FlaxPNDMScheduler if name in ("pndm", "lms") else SCHEDULERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    settings = {k: v for k, v in config.items() if k in accepted}
    return _built("the scheduler from scheduler/scheduler_config.json", lambda: cls.from_config(settings)), name


def _read_component_config(folder: Path, label: str, part: str) -> dict:
    where = f"{label}/{part}/config.json"
    return _Config(_read_json(folder / part / "config.json", where), where).data


def _modules(folder: Path, dtype: Any, with_checker: bool, index: dict | None = None, label: str | None = None) -> dict:
    """Flax modules built from a diffusers-layout folder's checked configs, without weights."""
    label = label or printable(str(folder))
    unet = _flax_module(FlaxUNet2DConditionModel, _read_component_config(folder, label, "unet"), dtype,
                        f"{label}/unet/config.json")
    vae = _flax_module(FlaxAutoencoderKL, _read_component_config(folder, label, "vae"), dtype, f"{label}/vae/config.json")
    text_config = _text_config(folder, label)
    text_encoder = _built("the text encoder", lambda: FlaxCLIPTextModel(text_config, _do_init=False, dtype=dtype))
    tokenizer = _tokenizer(folder, label, text_config)
    feature_extractor = checker = None
    if with_checker:
        feature_extractor = _feature_extractor(folder, label)
        checker_config = _checker_config(folder, label)
        side = checker_config.vision_config.image_size
        crop = feature_extractor.crop_size
        if (crop["height"], crop["width"]) != (side, side):
            raise ModelLoadError(
                f"{label}/feature_extractor crops {crop['height']}x{crop['width']} but the safety checker reads"
                f" {side}x{side} images: the two do not belong together"
            )
        checker = _built("the safety checker", lambda: SafetyChecker(checker_config, input_shape=(1, side, side, 3),
                                                                      _do_init=False))
    scheduler, scheduler_name = _base_scheduler(folder, label, index)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
               "feature_extractor": feature_extractor, "safety_checker": checker, "scheduler": scheduler,
               "scheduler_name": scheduler_name}
    _check_parts_fit(modules, label)
    return modules


def _check_parts_fit(modules: dict, label: str) -> None:
    """The components must work together: what each one's config says about the others."""
    unet, vae, text = modules["unet"].config, modules["vae"].config, modules["text_encoder"].config
    if not unet.in_channels == unet.out_channels == vae.latent_channels:
        raise ModelLoadError(
            f"{label}: the UNet takes {unet.in_channels} channels and gives {unet.out_channels}, the VAE has"
            f" {vae.latent_channels} latent channels: sdmagic draws from text alone, where all three are equal"
            " (an inpainting or other special model cannot run here)"
        )
    if unet.cross_attention_dim != text.hidden_size:
        raise ModelLoadError(
            f"{label}: unet/config.json has cross_attention_dim={unet.cross_attention_dim} but the text encoder's"
            f" hidden_size is {text.hidden_size}: the two do not belong together"
        )
    factor = 2 ** (len(vae.block_out_channels) - 1)
    multiple = factor * 2 ** (len(unet.block_out_channels) - 1)
    side = int(unet.sample_size) * factor
    if side > MAX_DEFAULT_SIDE or side % multiple:
        raise ModelLoadError(
            f"{label}/unet/config.json: sample_size={unet.sample_size} makes a default image side of {side} pixels,"
            f" which is not a multiple of {multiple} from {multiple} to {MAX_DEFAULT_SIDE}: not a usable model"
        )


def _shapes(module: Any, what: str = "the model") -> Any:
    """The parameter shapes of a Flax model, without initialising anything."""
    key = jax.random.PRNGKey(0)
    if hasattr(module, "input_shape"):  # transformers
        return _built(what, lambda: jax.eval_shape(lambda k: module.init_weights(k, module.input_shape), key))
    return _built(what, lambda: jax.eval_shape(module.init_weights, key))


def _pipeline(modules: dict, dtype: Any) -> Any:
    return FlaxStableDiffusionPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=modules["tokenizer"],
        unet=modules["unet"], scheduler=modules["scheduler"], safety_checker=modules["safety_checker"],
        feature_extractor=modules["feature_extractor"], dtype=dtype,
    )


# ----------------------------------------------------------------------------------------------
# Weights: every file checked before any is read, then read one component (one tensor) at a time
# ----------------------------------------------------------------------------------------------


def _msgpack_reader(path: Path, shapes: Any, what: str, dtype: Any) -> Callable[[], Any]:
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

        from flax.serialization import msgpack_restore

        try:
            # Mapped, not read into a bytes object: the file's pages stay reclaimable page cache
            # instead of a second, anonymous copy of the component beside its arrays.
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                params = msgpack_restore(data)
        except Exception as err:  # noqa: BLE001 - msgpack/flax raise a variety of types on a broken file
            raise ModelLoadError(f"could not read {what} as Flax msgpack: {printable(err)}") from None
        check_flax_tree(params, shapes, what)
        return _cast_floats(params, dtype)

    return read


def _safetensors_reader(stack: ExitStack, path: Path, module_shapes: Any, part: str, library: str, what: str,
                        dtype: Any) -> Callable[[], Any]:
    source = stack.enter_context(SafetensorsFile(path))
    plan = plan_pytorch_to_flax(
        dict(source.refs), module_shapes, diffusers_names=library == "diffusers", what=what,
        ignore=lambda key: key.endswith("position_ids"),
    )
    return lambda: run_plan(plan, source.read, _caster(dtype))


def _pickle_reader(path: Path, module_shapes: Any, library: str, what: str, dtype: Any) -> Callable[[], Any]:
    def read():
        state = _torch_load(path)
        plan = plan_pytorch_to_flax(state, module_shapes, diffusers_names=library == "diffusers", what=what,
                                    ignore=lambda key: key.endswith("position_ids"))
        state.clear()
        return run_plan(plan, None, _caster(dtype))

    return read


def _load_folder(folder: Path, label: str, dtype: str, safety_checker: bool, trust_pickle: bool):
    """A diffusers-layout folder (Flax msgpack, PyTorch-layout safetensors, or trusted pickles)."""
    index = check_model_folder(folder, safety_checker=safety_checker)
    ships_checker = _ships(index, "safety_checker")
    with_checker = safety_checker and ships_checker
    parts = [p for p in _WEIGHTED if p != "safety_checker" or with_checker]
    files = {}
    for part in parts:
        library = index[part][0]
        kind = _weights_format(folder / part, library)
        if kind == "flax":
            files[part] = (kind, _flax_file(folder / part, library))
        elif kind == "safetensors":
            files[part] = (kind, _pytorch_file(folder / part, library, ".safetensors"))
        else:
            path = next(p for p in sorted((folder / part).iterdir()) if p.suffix in PICKLE_SUFFIXES)
            if not trust_pickle:  # before anything else is read
                raise refuse_pickle(path)
            files[part] = (kind, path)
    dt = DTYPES[dtype]
    modules = _modules(folder, dt, with_checker=with_checker, index=index, label=label)
    with ExitStack() as stack:
        readers = {}
        # Every component's file is checked (header, or size) before any tensor of any is read.
        for part, (kind, path) in files.items():
            library = index[part][0]
            what = f"{label}/{part}/{printable(path.name)}"
            shapes = _shapes(modules[part], f"the {part} from {label}/{part}/config.json")
            if kind == "flax":
                readers[part] = _msgpack_reader(path, shapes, what, dt)
            elif kind == "safetensors":
                readers[part] = _safetensors_reader(stack, path, shapes, part, library, what, dt)
            else:
                readers[part] = _pickle_reader(path, shapes, library, what, dt)
        weights = {}
        for part in list(readers):
            weights[part] = readers.pop(part)()
    state = CHECKER_ON if with_checker else (CHECKER_OFF if ships_checker else CHECKER_NONE)
    return _pipeline(modules, dt), weights, modules["scheduler_name"], state


def _single_file(model: Any) -> Path | None:
    """The checkpoint file `model` names, if it names one (.safetensors or a pickle)."""
    if not isinstance(model, str):
        return None
    path = Path(model).expanduser()
    if path.suffix in (".safetensors",) + PICKLE_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {printable(model)!r} does not exist: check the path")
        return path
    return None


# The reference repos whose configs and tokenizer a bare checkpoint of each family uses.
_FAMILY_CONFIGS = {"sd1": "CompVis/stable-diffusion-v1-4", "sd2": "stabilityai/stable-diffusion-2-1"}


def _config_folder(config: str | None, family: str, revision: str | None) -> Path:
    name = config or _FAMILY_CONFIGS[family]
    if not isinstance(name, str) or not name.strip():
        raise SDMagicError(f"{option('config')} needs a diffusers-layout folder or a Hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        _model_index(path)
        return path
    if _looks_like_path(name):
        raise ModelLoadError(
            f"config folder {printable(name)!r} does not exist: give a diffusers-layout folder or a Hub id"
        )
    from huggingface_hub import snapshot_download

    with _fast_hub_failures():
        try:  # configs and tokenizer only: a few kB
            folder = Path(snapshot_download(name, revision=revision, allow_patterns=["*.json", "*.txt"],
                                            local_files_only=not _hub_reachable()))
        except Exception as err:  # noqa: BLE001
            raise _hub_error(name, revision, err) from None
    _model_index(folder)
    return folder


def _load_single_file(path: Path, config: str | None, dtype: str, revision: str | None, trust_pickle: bool):
    """An original-layout checkpoint: architecture from its keys, configs from `config`.

    A .safetensors file is renamed and checked against the architecture from its header alone;
    tensors are read only once every part fits.
    """
    dt = DTYPES[dtype]
    name = printable(path.name)
    with ExitStack() as stack:
        if path.suffix in PICKLE_SUFFIXES:
            if not trust_pickle:
                raise refuse_pickle(path)
            state, read = _torch_load(path), None
        else:
            source = stack.enter_context(SafetensorsFile(path))
            state, read = dict(source.refs), source.read
        family = detect_family(state)
        folder = _config_folder(config, family, revision)
        modules = _modules(folder, dt, with_checker=False, label=printable(config or str(folder)))
        unet_config, vae_config = dict(modules["unet"].config), dict(modules["vae"].config)
        conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
        if conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] != unet_config["in_channels"]:
            raise ModelLoadError(
                f"{name}'s UNet takes {conv_in.shape[1]} input channels, not {unet_config['in_channels']}: an"
                " inpainting or other special checkpoint, which cannot draw from text alone in sdmagic"
            )
        text_layers = modules["text_encoder"].config.num_hidden_layers
        unet_pt, vae_pt, text_pt = ldm_to_diffusers(state, unet_config, vae_config, family, text_layers)
        plans = {}
        for part, part_state in (("unet", unet_pt), ("vae", vae_pt), ("text_encoder", text_pt)):
            plans[part] = plan_pytorch_to_flax(
                part_state, _shapes(modules[part], f"the {part}"), diffusers_names=part != "text_encoder",
                what=f"{name} ({part})", ignore=lambda key: key.endswith("position_ids"),
            )
            part_state.clear()
        state.clear()
        weights = {part: run_plan(plans.pop(part), read, _caster(dt)) for part in list(plans)}
    return _pipeline(modules, dt), weights, modules["scheduler_name"]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    scheduler: str | None = None,
    safety_checker: bool = True,
    config: str | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load a pipeline's modules and host parameters. Raises ModelLoadError with what to do.

    `model`: 'tiny', a Hub id, a diffusers-layout folder (Flax msgpack or PyTorch-layout
    .safetensors weights), or a single-file checkpoint (.safetensors, original SD layout) whose
    configs and tokenizer come from `config` (a diffusers-layout folder or Hub id; default: the
    SD 1.x or 2.x reference repo, picked from the checkpoint's keys). Pickles (.ckpt, .bin, .pt)
    are refused unless `trust_pickle`, and then read only by torch's weights_only loader.

    Whatever a folder or file holds, a failure is one SDMagicError line; it is raised from here,
    after the loading frames are gone, so no partly read weights stay alive in its traceback.
    """
    check_scheduler_name(scheduler)
    if dtype not in DTYPES:
        raise SDMagicError(f"unknown dtype {printable(dtype)!r}: use one of {', '.join(DTYPES)}")
    try:
        return _load(model, revision, dtype, scheduler, safety_checker, config, trust_pickle)
    except SDMagicError as err:
        failure = (type(err), str(err))
    except Exception as err:  # noqa: BLE001
        # Something in the files no check above foresaw: still one line (with the exception's type,
        # to report), and the session lives on.
        failure = (ModelLoadError, f"could not load {printable(model)!r}: {type(err).__name__}: {printable(err)}")
    raise failure[0](failure[1])


def _load(model, revision, dtype, scheduler, safety_checker, config, trust_pickle) -> LoadedModel:
    start = time.perf_counter()
    silence_upstream_noise()  # upstream modules imported lazily since import time have loggers now
    single = _single_file(model)
    if single is not None:
        pipeline, weights, own = _load_single_file(single, config, dtype, revision, trust_pickle)
        return _loaded(model, str(single), pipeline, weights, scheduler or _own_scheduler(own), dtype, start)
    if config is not None:
        raise SDMagicError(f"{option('config')} is for single-file checkpoints; a model folder has its own configs")
    folder = resolve_model_folder(model, revision, dtype)
    label = printable(model) if model != TINY else "tiny"
    pipeline, weights, own, checker = _load_folder(folder, label, dtype, safety_checker, trust_pickle)
    return _loaded(model, str(folder), pipeline, weights, scheduler or _own_scheduler(own), dtype, start, checker)


def _own_scheduler(name: str) -> str | None:
    # The model's scheduler object is used as built from its config (None), except for LMS, whose
    # config arrives in a PNDM object: sdmagic's own LMS is built from it by name.
    return name if name == "lms" else None


def _loaded(name, source, pipeline, weights, scheduler, dtype, start, checker_state=None) -> LoadedModel:
    """The LoadedModel of a pipeline and its host weights, with `scheduler` (None: the model's own)."""
    sched, sched_state, sched_name = _make_scheduler(scheduler, pipeline.scheduler)
    if checker_state is None:
        checker_state = CHECKER_ON if "safety_checker" in weights else CHECKER_NONE
    return LoadedModel(
        name=name,
        source=source,
        pipeline=pipeline,
        params=weights,
        scheduler=sched,
        scheduler_state=sched_state,
        scheduler_name=sched_name,
        dtype=dtype,
        load_seconds=time.perf_counter() - start,
        feature_extractor=getattr(pipeline, "feature_extractor", None),
        safety_checker_state=checker_state,
    )


# ----------------------------------------------------------------------------------------------
# The built-in tiny and random models live in tiny.py, which builds on this module; their names
# stay importable from here (imported on first use, so that neither module needs the other first).
# ----------------------------------------------------------------------------------------------

_TINY_NAMES = (
    "TINY_VERSION", "RANDOM_ARCHITECTURES", "ensure_tiny_model", "random_model", "with_scheduler",
    "write_random_model", "write_tiny_model",
)


def __getattr__(name: str) -> Any:
    if name in _TINY_NAMES:
        from . import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
