"""Reading a model folder's config files: sizes capped, JSON checked, every value bounded.

A model folder is data from anywhere. Every config value sdmagic reads goes through `Config`'s
checked getters first, so a broken or hostile file fails in one line that names the file and the
key, before anything is built or any weight is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .text import printable

# The largest default image side a model may declare (sample_size x the VAE's factor): the same
# bound as the sizes a user may ask for.
MAX_DEFAULT_SIDE = 4096
# Config files are a few kB; a tokenizer's vocabulary and merges about 1 MB each.
MAX_CONFIG_BYTES = 4 * 2**20
MAX_VOCABULARY_BYTES = 16 * 2**20


def shown(value: Any) -> str:
    """A config value as the user would see it in the file, cleaned and short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return printable(text, 40)


def read_text(path: Path, where: str, limit: int) -> str:
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


def read_json(path: Path, where: str, limit: int = MAX_CONFIG_BYTES) -> Any:
    text = read_text(path, where, limit)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(f"{where} is not valid JSON ({printable(err)})") from None


_MISSING = object()


class Config:
    """A component config (a JSON object) read through checked getters: every complaint names the
    file and the key, and no value of the wrong type or out of bounds gets through."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ModelLoadError(f"{where} is not a JSON object (it holds a {type(data).__name__})")
        self.data = data
        self.where = where

    def fail(self, key: str, expected: str) -> ModelLoadError:
        value = self.data.get(key, None)
        return ModelLoadError(f"{self.where}: {key}={shown(value)} is not usable: {expected}")

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
        if not is_int(value) or not low <= value <= high:
            raise self.fail(key, expected)
        return int(value)

    def ints(self, key: str, low: int, high: int, count: tuple[int, int], default: Any = _MISSING) -> tuple[int, ...]:
        expected = f"{key} must be a list of {count[0]} to {count[1]} whole numbers from {low} to {high}"
        value = self._value(key, default, expected)
        if (
            not isinstance(value, (list, tuple))
            or not count[0] <= len(value) <= count[1]
            or not all(is_int(v) and low <= v <= high for v in value)
        ):
            raise self.fail(key, expected)
        return tuple(int(v) for v in value)

    def int_or_ints(self, key: str, low: int, high: int, length: int, default: Any = _MISSING) -> tuple[int, ...]:
        """One number for every level, or one per level."""
        expected = f"{key} must be a whole number from {low} to {high}, or a list of {length} of them"
        value = self._value(key, default, expected)
        if is_int(value):
            value = [value] * length
        if (
            not isinstance(value, (list, tuple))
            or len(value) != length
            or not all(is_int(v) and low <= v <= high for v in value)
        ):
            raise self.fail(key, expected)
        return tuple(int(v) for v in value)

    def number(self, key: str, low: float, high: float, default: Any = _MISSING) -> float:
        expected = f"{key} must be a number from {low:g} to {high:g}"
        value = self._value(key, default, expected)
        if not is_number(value) or not low <= value <= high:
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
                f"{self.where} names class {shown(name)}, which is not a class sdmagic loads"
                f" ({', '.join(sorted(allowed)[:4])}{', ...' if len(allowed) > 4 else ''})"
            )


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)



# ----------------------------------------------------------------------------------------------
# Component configs: what sdmagic's networks build, bounded
# ----------------------------------------------------------------------------------------------

# diffusers' scheduler classes (PyTorch or Flax names) a scheduler config may name. What each
# becomes is `schedulers.sampler_name_for`'s choice; a name outside this set is refused.
SCHEDULER_CLASSES = {
    prefix + name
    for prefix in ("", "Flax")
    for name in (
        "PNDMScheduler", "DDIMScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
        "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DDPMScheduler",
        "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
        "UniPCMultistepScheduler", "DEISMultistepScheduler", "KarrasVeScheduler",
    )
}
# `_class_name` in a diffusers component config, per component.
CONFIG_CLASSES = {
    "unet": {"UNet2DConditionModel", "FlaxUNet2DConditionModel"},
    "vae": {"AutoencoderKL", "FlaxAutoencoderKL"},
    "scheduler": SCHEDULER_CLASSES,
}

# UNet settings that change the network in ways sdmagic's UNet does not build (SD 1.x/2.x and
# SDXL use none of them): refuse them rather than build a different network that quietly draws
# wrong images.
_UNSUPPORTED = {
    "class_embed_type": None, "time_cond_proj_dim": None, "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_type": "positional",
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_class_embeds": None,
    "act_fn": "silu", "dual_cross_attention": False, "attention_type": "default", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "reverse_transformer_layers_per_block": None,
    "class_embeddings_concat": False, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "cross_attention_norm": None, "mid_block_only_cross_attention": None,
}


def check_unet_config(c: Config) -> None:
    c.class_name(CONFIG_CLASSES["unet"])
    for key, default in _UNSUPPORTED.items():
        if c.get(key, default) != default:
            raise ModelLoadError(
                f"{c.where} sets {key}={printable(repr(c.get(key)), 40)}, which Stable Diffusion 1.x/2.x and SDXL UNets"
                " do not use and sdmagic's UNet does not build: this model cannot run in sdmagic"
            )
    # SDXL's added conditioning: the pooled text embedding and 6 micro-conditioning numbers.
    if c.choice("addition_embed_type", (None, "text_time"), None) == "text_time":
        time_dim = c.int("addition_time_embed_dim", 2, 4096)
        if time_dim % 2:
            raise c.fail("addition_time_embed_dim", "it must be even (sine and cosine halves)")
        c.int("projection_class_embeddings_input_dim", 6 * time_dim + 1, 65536)
    channels = c.ints("block_out_channels", 1, 8192, (1, 6))
    levels = len(channels)
    groups = c.int("norm_num_groups", 1, 1024, 32)
    if any(n % groups for n in channels):  # every resnet normalises in norm_num_groups groups
        raise c.fail("block_out_channels", f"every entry must be a multiple of norm_num_groups ({groups})")
    c.number("norm_eps", 1e-12, 1.0, 1e-5)
    c.choices("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D"), levels)
    c.choices("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D"), levels)
    c.choice("mid_block_type", ("UNetMidBlock2DCrossAttn", None), "UNetMidBlock2DCrossAttn")
    c.int_or_ints("layers_per_block", 1, 8, levels, 2)
    # diffusers' historical naming: attention_head_dim is the head COUNT unless num_attention_heads is given.
    heads_key = "num_attention_heads" if c.get("num_attention_heads") is not None else "attention_head_dim"
    heads = c.int_or_ints(heads_key, 1, 1024, levels, 8)
    for n, h in zip(channels, heads):
        if n % h:
            raise c.fail(heads_key, f"it must divide every level's channels ({n} channels in {h} heads)")
    c.int_or_ints("transformer_layers_per_block", 1, 16, levels, 1)
    c.int_or_ints("cross_attention_dim", 1, 8192, levels)
    c.int("in_channels", 1, 64, 4)
    c.int("out_channels", 1, 64, 4)
    c.int("sample_size", 1, MAX_DEFAULT_SIDE, 32)
    c.number("freq_shift", 0, 1000, 0)
    c.number("dropout", 0.0, 1.0, 0.0)
    c.number("mid_block_scale_factor", 1e-6, 1e3, 1.0)
    c.int("downsample_padding", 0, 8, 1)
    for key in ("use_linear_projection", "flip_sin_to_cos", "upcast_attention", "center_input_sample",
                "split_head_dim", "use_memory_efficient_attention"):
        if key == "upcast_attention" and c.get(key, False) is None:
            continue  # SDXL's config says null: PyTorch reads it as false (sdmagic always upcasts)
        c.flag(key, key == "flip_sin_to_cos")
    c.flags("only_cross_attention", levels, False)


def check_vae_config(c: Config) -> None:
    c.class_name(CONFIG_CLASSES["vae"])
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
    c.choice("shift_factor", (None,), None)  # SD 3 / Flux VAEs shift latents; SD 1.x/2.x and SDXL do not
    for key in ("latents_mean", "latents_std"):  # per-channel latent statistics (Playground v2.5's VAE)
        c.choice(key, (None,), None)
    c.choice("act_fn", ("silu",), "silu")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        c.flag(key, True)
    c.flag("force_upcast", True)


_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu", "swish", "tanh")


def check_clip_encoder(c: Config, *, vision: bool) -> None:
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


# Resize and crop sides of the safety checker's preprocessing: its resampling tables grow with them.
MAX_PREPROCESS_SIDE = 1024
PILLOW_BICUBIC = 3


def _pixel_size(c: Config, key: str, *, shortest_edge: bool) -> None:
    """A size as transformers' get_size_dict reads it: a number, [height, width] or a dict
    ({"shortest_edge": n} only where the processor resizes by the shortest edge)."""
    value = c.get(key)
    if value is None:
        return  # CLIPImageProcessor's default
    if isinstance(value, dict):
        names = ("shortest_edge",) if shortest_edge and "shortest_edge" in value else ("height", "width")
        sides = [value.get(name) for name in names]
    elif isinstance(value, list):
        sides = value if len(value) == 2 else [None]
    else:
        sides = [value]
    if not all(is_int(side) and 1 <= side <= MAX_PREPROCESS_SIDE for side in sides):
        shapes = '{"shortest_edge": n}, ' if shortest_edge else ""
        raise c.fail(key, f"it must be a number of pixels from 1 to {MAX_PREPROCESS_SIDE}, [height, width],"
                          f' {shapes}or {{"height": h, "width": w}}')


def check_preprocessor_config(c: Config) -> None:
    """The feature extractor settings the safety checker's preprocessing (nets/safety.py) reads,
    bounded: resize and crop sides in pixels, three means, three positive deviations, and the steps
    it always takes (a bicubic resize, a centre crop) not switched off."""
    _pixel_size(c, "size", shortest_edge=True)
    _pixel_size(c, "crop_size", shortest_edge=False)
    for key, positive in (("image_mean", False), ("image_std", True)):
        value = c.get(key)
        values = [value] * 3 if is_number(value) else value
        usable = isinstance(values, list) and len(values) == 3 and all(is_number(v) for v in values)
        if value is not None and not (usable and (not positive or all(v > 0 for v in values))):
            raise c.fail(key, f"it must be a number or a list of 3{' above 0' if positive else ''}")
    c.number("rescale_factor", 1e-6, 1.0, 1 / 255)
    for key in ("do_rescale", "do_normalize", "do_convert_rgb"):
        c.flag(key, True)
    for key in ("do_resize", "do_center_crop"):
        if not c.flag(key, True):
            raise c.fail(key, "sdmagic always resizes and centre-crops the safety checker's input, as Stable"
                              " Diffusion's feature extractors do")
    resample = c.get("resample", PILLOW_BICUBIC)
    if not (is_int(resample) and resample == PILLOW_BICUBIC):
        raise c.fail("resample", f"sdmagic resizes with Pillow's bicubic filter ({PILLOW_BICUBIC}), as CLIP's"
                                 " preprocessing does")


def read_scheduler_config(folder: Path, label: str, index: dict | None) -> tuple[dict, str]:
    """The scheduler config's checked settings, and the diffusers class it names (without "Flax")."""
    where = f"{label}/scheduler/scheduler_config.json"
    c = Config(read_json(folder / "scheduler" / "scheduler_config.json", where), where)
    c.class_name(SCHEDULER_CLASSES)
    class_name = c.get("_class_name") or (index or {}).get("scheduler", [None, "PNDMScheduler"])[1]
    class_name = str(class_name).removeprefix("Flax")
    steps = c.int("num_train_timesteps", 2, 10000, 1000)
    schedule = c.choice("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"), "linear")
    start = c.number("beta_start", 1e-8, 0.999, 0.0001)
    end = c.number("beta_end", 1e-8, 0.999, 0.02)
    if schedule != "squaredcos_cap_v2" and start >= end:
        raise c.fail("beta_start", f"it must be below beta_end ({end:g})")
    betas = c.get("trained_betas")
    if betas is not None and (
        not isinstance(betas, list) or len(betas) != steps or not all(is_number(b) and 0 < b < 1 for b in betas)
    ):
        raise c.fail("trained_betas", f"it must be null or {steps} numbers between 0 and 1")
    c.choice("prediction_type", ("epsilon", "v_prediction", "sample"), "epsilon")
    c.int("steps_offset", 0, steps - 1, 0)
    c.choice("timestep_spacing", ("leading", "linspace", "trailing", None), None)
    for key in ("set_alpha_to_one", "skip_prk_steps", "clip_sample", "thresholding", "lower_order_final",
                "use_karras_sigmas"):
        c.flag(key, False)
    return c.data, class_name


