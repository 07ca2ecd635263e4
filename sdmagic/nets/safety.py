"""Stable Diffusion's safety checker, as diffusers' PyTorch `StableDiffusionSafetyChecker` decides,
and CLIPImageProcessor's preprocessing for it, on the device.

The checker embeds an image with a CLIP vision tower and its visual projection, and flags it when
the cosine similarity to any of 17 concept embeddings passes that concept's threshold. Three
"special care" concepts lower every concept's threshold by 0.01 once any of them passes its own.

Parameters are diffusers' Flax safety checker's tree (`safety_shapes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .clip import VisionConfig, encode_image, vision_shapes
from .layers import dense

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: CLIPImageProcessor's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CONCEPTS, SPECIAL_CARE_CONCEPTS = 17, 3


@dataclass(frozen=True)
class SafetyConfig:
    """The CLIPConfig fields StableDiffusionSafetyChecker uses: its vision tower and projection width."""

    vision_config: VisionConfig = VisionConfig()
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, d: dict) -> "SafetyConfig":
        """From a StableDiffusionSafetyChecker's config.json (a CLIPConfig).

        As CLIPConfig does, an older file's `vision_config_dict` replaces `vision_config` whole: its
        missing keys take CLIPVisionConfig's defaults, not `vision_config`'s values.
        """
        vision = d.get("vision_config_dict")
        if vision is None:
            vision = d.get("vision_config") or {}
        projection = d.get("projection_dim")
        return cls(VisionConfig.from_dict(vision), 512 if projection is None else int(projection))


def safety_shapes(cfg: SafetyConfig) -> dict:
    """diffusers' Flax safety checker's parameter shapes."""
    return {
        "vision_model": vision_shapes(cfg.vision_config),
        "visual_projection": {"kernel": (cfg.vision_config.hidden_size, cfg.projection_dim)},
        "concept_embeds": (CONCEPTS, cfg.projection_dim),
        "special_care_embeds": (SPECIAL_CARE_CONCEPTS, cfg.projection_dim),
        "concept_embeds_weights": (CONCEPTS,),
        "special_care_embeds_weights": (SPECIAL_CARE_CONCEPTS,),
    }


def _pair(value, what: str) -> tuple[int, int] | int:
    """transformers' get_size_dict forms: a number, [height, width], or a dict."""
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        return int(value["height"]), int(value["width"])
    raise ValueError(f"unusable {what}: {value!r}")


def _triple(value) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class Preprocess:
    """What CLIPImageProcessor does to an image: resize (bicubic), centre crop, rescale, normalise."""

    shortest_edge: int | None = 224  # the shorter side resized to this, keeping the aspect ratio,
    size: tuple[int, int] | None = None  # or, when shortest_edge is None, resized to (height, width)
    crop_height: int = 224
    crop_width: int = 224
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocess":
        """From a preprocessor_config.json, read as CLIPImageProcessor reads it; None: CLIP's standard
        224-pixel preprocessing (what SD ships)."""
        if d is None:
            return cls()
        size = _pair(d.get("size") or 224, "size")  # a bare number is a shortest edge
        crop = _pair(d.get("crop_size") or 224, "crop_size")  # a bare number is a square
        if isinstance(crop, int):
            crop = (crop, crop)
        rescale = d.get("rescale_factor")
        mean = d.get("image_mean")
        std = d.get("image_std")
        # Steps switched off become identities, so that clip_pixels needs no flags.
        if d.get("do_rescale") is False:
            rescale = 1.0
        if d.get("do_normalize") is False:
            mean, std = 0.0, 1.0
        return cls(
            shortest_edge=size if isinstance(size, int) else None,
            size=None if isinstance(size, int) else size,
            crop_height=crop[0],
            crop_width=crop[1],
            rescale_factor=1 / 255 if rescale is None else float(rescale),
            image_mean=CLIP_MEAN if mean is None else _triple(mean),
            image_std=CLIP_STD if std is None else _triple(std),
        )


# Pillow's fixed-point resampling: coefficients and sums carry this many fractional bits
# (Resample.c's PRECISION_BITS), which keeps 255 x the coefficients of a tap window inside int32.
_PRECISION_BITS = 22


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), in float64 as Resample.c evaluates it."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pillow_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bicubic resampling of one axis from `in_size` to `out_size` samples, as Resample.c's
    precompute_coeffs and normalize_coeffs_8bpc compute it: (input index, fixed-point coefficient),
    both int32 [out_size, taps]. Downscaling widens the kernel by the scale (antialiasing)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    # C's (int) casts truncate; the window is clamped to the image.
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    offsets = np.arange(taps)
    inside = offsets[None, :] < (stop - first)[:, None]
    distance = (offsets[None, :] + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale)
    weights = np.where(inside, _bicubic(distance), 0.0)
    total = np.zeros((out_size, 1))
    for t in range(taps):  # summed in Pillow's order, so that the normalised doubles are its own
        total = total + weights[:, t : t + 1]
    weights = np.where(total != 0.0, weights / np.where(total != 0.0, total, 1.0), weights)
    fixed = np.trunc(weights * (1 << _PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5)).astype(np.int32)
    index = np.minimum(first[:, None] + offsets[None, :], in_size - 1).astype(np.int32)
    return index, fixed


def _resample(x: jax.Array, axis: int, taps: tuple[np.ndarray, np.ndarray]) -> jax.Array:
    """One Pillow resampling pass over `axis` of int32 levels: exact integer sums, rounded half up
    and clipped to 0..255 as Pillow does between and after its passes."""
    index, fixed = taps
    shape = [1] * x.ndim
    shape[axis] = index.shape[0]
    total = jnp.int32(1 << (_PRECISION_BITS - 1))
    for t in range(index.shape[1]):
        total = total + jnp.take(x, jnp.asarray(index[:, t]), axis=axis) * jnp.asarray(fixed[:, t]).reshape(shape)
    return jnp.clip(total >> _PRECISION_BITS, 0, 255)


def _centre_crop(taps: tuple[np.ndarray, np.ndarray], crop: int) -> tuple[np.ndarray, np.ndarray]:
    """The taps of transformers' center_crop of the resized axis: its middle `crop` samples, the
    image centred between zeros where the crop is the larger (all-zero coefficients give level 0)."""
    index, fixed = taps
    resized = np.arange(crop) + (index.shape[0] - crop) // 2
    inside = ((resized >= 0) & (resized < index.shape[0]))[:, None]
    resized = np.clip(resized, 0, index.shape[0] - 1)
    return np.where(inside, index[resized], 0), np.where(inside, fixed[resized], 0)


def resized_size(height: int, width: int, preprocess: Preprocess) -> tuple[int, int]:
    """The (height, width) CLIPImageProcessor resizes an image to, before cropping."""
    if preprocess.shortest_edge is None:
        return preprocess.size
    # transformers' get_resize_output_image_size: the long side truncated, not rounded.
    shortest = preprocess.shortest_edge
    resized_long = int(shortest * max(height, width) / min(height, width))
    return (shortest, resized_long) if height <= width else (resized_long, shortest)


def clip_pixels(images: jax.Array, preprocess: Preprocess) -> jax.Array:
    """CLIPImageProcessor's preprocessing of images [B, H, W, 3] with values 0..255 (uint8, or
    whole numbers in another dtype), on the device: returns NHWC float32 equal to what it computes
    from the same images as PIL images.

    As transformers does: Pillow's bicubic resize (Pillow 13's: its fixed-point arithmetic, its
    order of passes and its rounding to whole levels after each), centre crop (padding with zeros
    where the crop is larger), rescale in float64, normalise in float32. Only the cropped rows and
    columns are resampled.
    """
    _, height, width, channels = images.shape
    new_h, new_w = resized_size(height, width, preprocess)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = images.astype(jnp.int32)
    else:
        x = jnp.clip(jnp.round(images), 0, 255).astype(jnp.int32)
    columns = _centre_crop(pillow_taps(width, new_w), preprocess.crop_width)
    rows = _centre_crop(pillow_taps(height, new_h), preprocess.crop_height)
    # The order of the passes shows in the rounding between them. Pillow resamples horizontally
    # first, unless (since Pillow 13) the height shrinks by more than twice as many pixels as the width.
    if new_h < height and height - new_h > 2 * (width - new_w):
        x = _resample(_resample(x, 1, rows), 2, columns)
    else:
        x = _resample(_resample(x, 2, columns), 1, rows)
    # Rescaling and normalising depend only on the level and the channel: one table of
    # transformers' own float64-then-float32 arithmetic.
    levels = (np.arange(256, dtype=np.float64) * preprocess.rescale_factor).astype(np.float32)
    mean = np.asarray(preprocess.image_mean, np.float32)
    std = np.asarray(preprocess.image_std, np.float32)
    table = (levels[:, None] - mean) / std
    return jnp.asarray(table)[x, jnp.arange(channels)]


def _cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
    """[A, B] cosines, rows normalised as torch.nn.functional.normalize does (norm at least eps).
    diffusers calls this cosine_distance."""
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), eps)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=1, keepdims=True), eps)
    # Full float32: accelerators' default matmul precision (bfloat16 passes, TF32) would move the
    # third decimal the thresholds are read at.
    return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def check(params: dict, cfg: SafetyConfig, clip_input: jax.Array) -> jax.Array:
    """bool[B]: which images StableDiffusionSafetyChecker flags, for clip_pixels' output [B, S, S, 3]."""
    pooled = encode_image(params["vision_model"], cfg.vision_config, clip_input)
    # Scores in float32 whatever the compute dtype: they are compared to thresholds at 3 decimals
    # (diffusers casts its cosines to float32 too).
    embeds = dense(params["visual_projection"], pooled).astype(jnp.float32)
    f32 = lambda name: params[name].astype(jnp.float32)  # noqa: E731
    special = _cosine_similarity(embeds, f32("special_care_embeds"))
    concepts = _cosine_similarity(embeds, f32("concept_embeds"))
    # diffusers' forward rounds each score to 3 decimals before comparing it to 0.
    special_scores = jnp.round(special - f32("special_care_embeds_weights"), 3)
    special_care = jnp.any(special_scores > 0, axis=1, keepdims=True)
    adjustment = jnp.where(special_care, jnp.float32(0.01), jnp.float32(0.0))
    concept_scores = jnp.round(concepts - f32("concept_embeds_weights") + adjustment, 3)
    return jnp.any(concept_scores > 0, axis=1)
