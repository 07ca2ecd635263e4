"""The random pipelines sdmagic builds itself, with no download: `tiny` on disk, full sizes in memory.

`tiny` (tests, demos, a first image in seconds) is written once in diffusers' PyTorch layout with
safetensors, as model repos publish it, and then loaded through exactly the same code path as a
real model. `random_model("sd1")` gives the bench a full-size Stable Diffusion 1.x in memory.

Nothing here traces or compiles anything: the parameter shapes follow from the configs (the nets'
shape functions) and the values come from numpy, one seeded generator per parameter. On 2 CPU
cores `tiny` builds in a fraction of a second (Flax's init took about 30 s, nearly all XLA
compiles) and SD 1.x's 1.07 B parameters in seconds rather than minutes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .compile_cache import sdmagic_home
from .convert import flax_to_pytorch
from .model import StableDiffusion
from .models import DTYPES, CHECKER_NONE, LoadedModel, check_scheduler_name, loaded, resolve_dtype
from .nets import clip, safety, unet, vae
from .tokenizer import CLIPTokenizer, write_byte_level_vocabulary

# Part of the cache folder's name: bump it whenever the bytes written change, so that an old cache
# is never mistaken for the current model (v1: Flax init; v2: numpy; v3: PyTorch-layout safetensors).
TINY_VERSION = "3"

# A build still running after this many seconds says what it is doing (one line on stderr);
# a fast or cached one prints nothing.
SLOW_BUILD_SECONDS = 1.5

# Architectures of the random pipelines: `tiny` for tests and demos, `tiny-sd2` for SD 2.x's code
# paths, `sd1` (Stable Diffusion 1.x's full size, 860M-parameter UNet) for benchmarks.
RANDOM_ARCHITECTURES = {
    "tiny": {
        # The shapes of diffusers' own Flax tests: a 2-level UNet on 32x32 latents, 2-level VAE.
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        ),
        "vae": dict(
            block_out_channels=(32, 64), sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        ),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    },
    # SD 2.x's shape in miniature: linear attention projections, head size instead of head count,
    # an OpenCLIP-style (gelu) text encoder, v-prediction.
    "tiny-sd2": {
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=24,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), use_linear_projection=True,
        ),
        "vae": dict(
            block_out_channels=(32, 64), sample_size=48,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        ),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
        "scheduler": dict(prediction_type="v_prediction"),
    },
    "sd1": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        "text": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            vocab_size=49408, hidden_act="quick_gelu",
        ),
    },
}

# The tiny safety checker: a 2-layer CLIP vision tower on 224x224 crops.
_TINY_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    image_size=224, patch_size=32, projection_dim=32,
)


# ----------------------------------------------------------------------------------------------
# The cached tiny model
# ----------------------------------------------------------------------------------------------


def ensure_tiny_model(root: Path | None = None) -> Path:
    """The tiny model's folder, written on first use (well under a second, no network)."""
    target = (root or sdmagic_home()) / f"tiny-v{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a concurrent or interrupted build never leaves a
    # half-written model that later loads would trust.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        with announce_if_slow("sdmagic: building the built-in tiny model (first use, a few seconds)..."):
            write_tiny_model(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextmanager
def announce_if_slow(message: str):
    """Print `message` on stderr once if the block is still running after SLOW_BUILD_SECONDS.

    A timer rather than a check between steps: the line appears while the slow step runs, and a
    fast build says nothing. stderr, like tqdm's bars, keeps stdout for results.
    """
    timer = threading.Timer(SLOW_BUILD_SECONDS, lambda: print(message, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()


# Stable Diffusion's scheduler: PNDM (PLMS), scaled-linear betas (SD 2.x adds v-prediction).
_SD_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None, "clip_sample": False,
}

# CLIPImageProcessor's settings as SD's feature_extractor/preprocessor_config.json has them.
_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": list(safety.CLIP_MEAN), "image_std": list(safety.CLIP_STD),
    "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}


# ----------------------------------------------------------------------------------------------
# Values: numpy, one generator per parameter
# ----------------------------------------------------------------------------------------------

# The standard deviation of an int16 drawn uniformly from all 65536 values.
_INT16_STD = math.sqrt((2**32 - 1) / 12)

# Cosine similarity never exceeds 1, so concept thresholds of 2 flag nothing; tests lower them to
# check that flagged images are blacked out. The concept embeddings are ones, as in diffusers.
_CONSTANTS = {"bias": 0.0, "scale": 1.0, "concept_embeds": 1.0, "special_care_embeds": 1.0,
              "concept_embeds_weights": 2.0, "special_care_embeds_weights": 2.0}


def _std(path: str, shape: tuple) -> float:
    """Kernels: variance 1/fan_in (LeCun, as Flax's default), which keeps activations O(1);
    embeddings: 0.02, as CLIP's."""
    if path.endswith("/kernel"):
        return 1.0 / math.sqrt(math.prod(shape[:-1]))
    return 0.02


def _leaf(path: str, shape: tuple, seed: int, dtype: Any) -> np.ndarray:
    name = path.rsplit("/", 1)[-1]
    if name in _CONSTANTS:
        return np.full(shape, _CONSTANTS[name], dtype)
    # Uniform with the intended variance rather than normal: raw PCG64 words read as int16 cost
    # less than half of numpy's normal sampler, which matters for SD 1.x's 1.07 B values. Seeded by
    # the parameter's path, so a value depends neither on the order nor on the other parameters.
    size = math.prod(shape)
    bits = np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(path.encode())]))
    raw = bits.random_raw(-(-size // 4)).view(np.int16)[:size]
    values = np.multiply(raw, np.float32(_std(path, shape) / _INT16_STD), dtype=np.float32).reshape(shape)
    return values if np.dtype(dtype) == np.float32 else values.astype(dtype)


def _flatten(tree: dict, prefix: str = "") -> dict[str, tuple]:
    flat = {}
    for name, value in tree.items():
        path = f"{prefix}/{name}" if prefix else name
        flat.update(_flatten(value, path) if isinstance(value, dict) else {path: value})
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return tree


def random_params(shapes: dict, seed: int, component: str, dtype: Any = np.float32) -> dict:
    """Random values for a tree of shapes; the same (seed, component, path) gives the same bytes."""
    flat = _flatten(shapes)
    # numpy releases the GIL while filling and scaling: threads use every core for SD 1.x.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        values = pool.map(lambda item: _leaf(f"{component}/{item[0]}", item[1], seed, dtype), flat.items())
        return _unflatten(dict(zip(flat, values)))


# ----------------------------------------------------------------------------------------------
# Random pipelines
# ----------------------------------------------------------------------------------------------


@dataclass
class _Parts:
    """A random pipeline's config files (as dicts, the way they are written to disk) and tokenizer."""

    unet: dict
    vae: dict
    text: dict
    scheduler: dict
    tokenizer: CLIPTokenizer

    def model(self) -> StableDiffusion:
        return StableDiffusion(
            text=clip.TextConfig.from_dict(self.text), unet=unet.UNetConfig.from_dict(self.unet),
            vae=vae.VAEConfig.from_dict(self.vae), tokenizer=self.tokenizer,
        )


def _parts(arch: str, tokenizer_dir: Path) -> _Parts:
    if arch not in RANDOM_ARCHITECTURES:
        raise ValueError(f"unknown random architecture {arch!r}: use one of {', '.join(RANDOM_ARCHITECTURES)}")
    spec = RANDOM_ARCHITECTURES[arch]
    write_byte_level_vocabulary(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_folder(tokenizer_dir)
    text = {
        "_name_or_path": "", "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": len(tokenizer), "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": 512, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **spec["text"],
    }
    return _Parts(
        unet={"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, **_lists(spec["unet"])},
        vae={"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
             **_lists(spec["vae"])},
        text=text,
        scheduler={**_SD_SCHEDULER, **spec.get("scheduler", {})},
        tokenizer=tokenizer,
    )


def _lists(config: dict) -> dict:
    """Tuples as JSON lists, as config files hold them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _weights(model: StableDiffusion, seed: int, dtype: Any = np.float32) -> dict:
    return {
        "unet": random_params(unet.unet_shapes(model.unet), seed, "unet", dtype),
        "vae": random_params(vae.vae_shapes(model.vae), seed, "vae", dtype),
        "text_encoder": random_params(clip.text_shapes(model.text), seed, "text_encoder", dtype),
    }


def random_model(
    arch: str = "sd1", *, dtype: str = "float32", scheduler: str | None = None, seed: int = 0
) -> LoadedModel:
    """A randomly initialised model of a real architecture, in memory: for benchmarks, no download.

    No safety checker; the parameters are host arrays in `dtype`, as `load_model` gives them.
    """
    check_scheduler_name(scheduler)
    dtype = resolve_dtype(dtype, "cpu")
    start = time.perf_counter()
    with announce_if_slow(f"sdmagic: building a random {arch} model in memory ({dtype})..."):
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            parts = _parts(arch, Path(tokenizer_dir))
        model = parts.model()
        # Drawn in float32 and cast leaf by leaf: the peak is the model in `dtype`, not in float32.
        weights = _weights(model, seed, DTYPES[dtype])
    return loaded(f"random {arch}", "memory", model, weights, parts.scheduler, parts.scheduler["_class_name"],
                  scheduler, dtype, start, CHECKER_NONE)


# ----------------------------------------------------------------------------------------------
# Writing diffusers' layout with PyTorch-layout safetensors (what model repos publish)
# ----------------------------------------------------------------------------------------------

_INDEX_ENTRIES = {
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_safetensors(path: Path, params: dict, *, diffusers_names: bool) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: np.ascontiguousarray(v) for k, v in flax_to_pytorch(params, diffusers_names=diffusers_names).items()}
    save_file(state, str(path), metadata={"format": "pt"})


def _write_folder(folder: Path, parts: _Parts, weights: dict, checker: tuple[dict, dict] | None) -> None:
    """The files a diffusers `save_pretrained` writes (PyTorch-layout safetensors), from configs and numpy weights."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae"):
        _write_json(folder / name / "config.json", getattr(parts, name))
        _write_safetensors(folder / name / "diffusion_pytorch_model.safetensors", weights[name], diffusers_names=True)
    _write_json(folder / "text_encoder" / "config.json", parts.text)
    _write_safetensors(folder / "text_encoder" / "model.safetensors", weights["text_encoder"], diffusers_names=False)
    _write_json(folder / "scheduler" / "scheduler_config.json", parts.scheduler)
    _write_json(folder / "feature_extractor" / "preprocessor_config.json", _PREPROCESSOR)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.39.0", **_INDEX_ENTRIES,
             "safety_checker": [None, None], "requires_safety_checker": checker is not None}
    if checker is not None:
        config, params = checker
        _write_json(folder / "safety_checker" / "config.json", config)
        _write_safetensors(folder / "safety_checker" / "model.safetensors", params, diffusers_names=False)
        # Listed under diffusers' class name, as in real SD repos.
        index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    _write_json(folder / "model_index.json", index)


def write_random_model(folder: Path, arch: str, *, seed: int = 0) -> Path:
    """Write a random pipeline of `arch` (no safety checker) in diffusers' layout, as tests need."""
    folder = Path(folder)
    parts = _parts(arch, folder / "tokenizer")
    _write_folder(folder, parts, _weights(parts.model(), seed), checker=None)
    return folder


def write_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """Write a miniature, randomly initialised SD 1.x-shaped pipeline in diffusers' layout.

    The shapes follow diffusers' own tests: a 2-level UNet (32/64 channels) on 32x32 latents, a
    2-level VAE (so 64x64 images), a 2-layer CLIP text encoder and a tiny CLIP safety checker whose
    concept thresholds are set so that it flags nothing by default.
    """
    folder = Path(folder)
    parts = _parts("tiny", folder / "tokenizer")
    checker_config = {
        "architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip",
        "projection_dim": _TINY_VISION["projection_dim"],
        "text_config": {k: v for k, v in parts.text.items() if k not in ("architectures", "_name_or_path")},
        "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                          "num_channels": 3, **_TINY_VISION},
    }
    checker_params = random_params(safety.safety_shapes(safety.SafetyConfig.from_dict(checker_config)), seed,
                                   "safety_checker")
    _write_folder(folder, parts, _weights(parts.model(), seed), checker=(checker_config, checker_params))
    return folder
