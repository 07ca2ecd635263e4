"""The random pipelines sdmagic builds itself, with no download: `tiny` on disk, full sizes in memory.

`tiny` (tests, demos, a first image in seconds) and `tiny-sdxl` (SDXL's shape in miniature: two
text encoders, the second with a projection, a text-time UNet) are written once in diffusers'
PyTorch layout with safetensors, as model repos publish them, and then loaded through exactly the
same code path as a real model. `random_model("sd1")` / `random_model("sdxl")` give the bench a
full-size Stable Diffusion 1.x / XL in memory.

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
from .model_xl import StableDiffusionXL
from .models import DTYPES, CHECKER_NONE, LoadedModel, check_scheduler_name, loaded, part_dtype, param_shapes, resolve_dtype
from .nets import clip, safety, unet, vae
from .tokenizer import CLIPTokenizer, write_byte_level_vocabulary

# Part of the cache folder's name: bump it whenever the bytes written change, so that an old cache
# is never mistaken for the current model (v1: Flax init; v2: numpy; v3: PyTorch-layout safetensors).
TINY_VERSION = "3"
# The same for `tiny-sdxl`'s folder (v1: the first).
TINY_SDXL_VERSION = "1"
# Built-in architecture -> its cache folder's version.
_BUILT_IN_VERSIONS = {"tiny": TINY_VERSION, "tiny-sdxl": TINY_SDXL_VERSION}

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
    # SDXL's shape in miniature (as diffusers' own SDXL tests): a 3-level text-time UNet with linear
    # projections and more transformer layers deeper down, two text encoders of different widths (the
    # second with a projection and OpenCLIP's gelu), SDXL's VAE settings and Euler scheduler.
    "tiny-sdxl": {
        "unet": dict(
            block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
            cross_attention_dim=80, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=72,
        ),
        "vae": dict(
            block_out_channels=(32, 64), sample_size=64, scaling_factor=0.13025, force_upcast=True,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        ),
        # The token ids SDXL's text configs give (eos 2: transformers' legacy pooling at the argmax id).
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     bos_token_id=0, eos_token_id=2, pad_token_id=1),
        "text_2": dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       hidden_act="gelu", projection_dim=24, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        "scheduler": "sdxl",
    },
    # SDXL base 1.0's configs (2.6 B-parameter UNet, CLIP ViT-L and OpenCLIP bigG), for benchmarks.
    "sdxl": {
        "unet": dict(
            block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024, scaling_factor=0.13025,
            force_upcast=True, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=49408, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
                     pad_token_id=1),
        "text_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       vocab_size=49408, hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2,
                       pad_token_id=1),
        "scheduler": "sdxl",
    },
}

# `tiny` with an inpainting UNet (SD 1.5/2 inpainting's shape): 9 input channels, the latents,
# the mask and the masked image's latents.
RANDOM_ARCHITECTURES["tiny-inpaint"] = {
    **RANDOM_ARCHITECTURES["tiny"], "unet": dict(RANDOM_ARCHITECTURES["tiny"]["unet"], in_channels=9),
}

# The tiny safety checker: a 2-layer CLIP vision tower on 224x224 crops.
_TINY_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    image_size=224, patch_size=32, projection_dim=32,
)


# ----------------------------------------------------------------------------------------------
# The cached tiny model
# ----------------------------------------------------------------------------------------------


def ensure_tiny_model(root: Path | None = None, *, arch: str = "tiny") -> Path:
    """A built-in tiny model's folder (`arch`: "tiny" or "tiny-sdxl"), written on first use (well
    under a second, no network)."""
    if arch not in _BUILT_IN_VERSIONS:
        raise ValueError(f"unknown built-in model {arch!r}: use one of {', '.join(_BUILT_IN_VERSIONS)}")
    target = (root or sdmagic_home()) / f"{arch}-v{_BUILT_IN_VERSIONS[arch]}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a concurrent or interrupted build never leaves a
    # half-written model that later loads would trust.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        with announce_if_slow(f"sdmagic: building the built-in {arch} model (first use, a few seconds)..."):
            if arch == "tiny":
                write_tiny_model(staging)
            else:
                write_random_model(staging, arch)
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

# SDXL base's scheduler: Euler, scaled-linear betas, "leading" spacing (its scheduler_config.json).
_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading",
    "trained_betas": None, "clip_sample": False, "interpolation_type": "linear", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "use_karras_sigmas": False,
}
_SCHEDULERS = {"sd": _SD_SCHEDULER, "sdxl": _SDXL_SCHEDULER}

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
    """A random pipeline's config files (as dicts, the way they are written to disk) and tokenizer(s);
    an SDXL pipeline also has `text_2` and `tokenizer_2`."""

    unet: dict
    vae: dict
    text: dict
    scheduler: dict
    tokenizer: CLIPTokenizer
    text_2: dict | None = None
    tokenizer_2: CLIPTokenizer | None = None

    def model(self) -> StableDiffusion | StableDiffusionXL:
        configs = dict(text=clip.TextConfig.from_dict(self.text), unet=unet.UNetConfig.from_dict(self.unet),
                       vae=vae.VAEConfig.from_dict(self.vae), tokenizer=self.tokenizer)
        if self.text_2 is None:
            return StableDiffusion(**configs)
        return StableDiffusionXL(**configs, text_2=clip.TextConfig.from_dict(self.text_2), tokenizer_2=self.tokenizer_2)


# SDXL's second tokenizer pads with "!" (id 0 in CLIP's vocabulary and in the byte-level one).
_SDXL_PAD = "!"


def _parts(arch: str, tokenizer_dir: Path) -> _Parts:
    """The configs of `arch`, its tokenizer written to `tokenizer_dir` (and an SDXL one's second
    tokenizer beside it, in `tokenizer_2`)."""
    if arch not in RANDOM_ARCHITECTURES:
        raise ValueError(f"unknown random architecture {arch!r}: use one of {', '.join(RANDOM_ARCHITECTURES)}")
    spec = RANDOM_ARCHITECTURES[arch]
    write_byte_level_vocabulary(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_folder(tokenizer_dir)

    def text_config(settings: dict, architecture: str) -> dict:
        return {
            "_name_or_path": "", "architectures": [architecture], "model_type": "clip_text_model",
            "vocab_size": len(tokenizer), "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "projection_dim": 512, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **settings,
        }

    scheduler = spec.get("scheduler", {})
    parts = _Parts(
        unet={"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, **_lists(spec["unet"])},
        vae={"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
             **_lists(spec["vae"])},
        text=text_config(spec["text"], "CLIPTextModel"),
        scheduler=dict(_SCHEDULERS[scheduler]) if isinstance(scheduler, str) else {**_SD_SCHEDULER, **scheduler},
        tokenizer=tokenizer,
    )
    if "text_2" in spec:
        folder_2 = tokenizer_dir.with_name("tokenizer_2")
        write_byte_level_vocabulary(folder_2)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = folder_2 / name
            path.write_text(json.dumps({**json.loads(path.read_text()), "pad_token": _SDXL_PAD}, indent=2) + "\n")
        parts.text_2 = text_config(spec["text_2"], "CLIPTextModelWithProjection")
        parts.tokenizer_2 = CLIPTokenizer.from_folder(folder_2, pad_token=_SDXL_PAD)
    return parts


def _lists(config: dict) -> dict:
    """Tuples as JSON lists, as config files hold them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _weights(model: StableDiffusion | StableDiffusionXL, seed: int, dtype: str = "float32") -> dict:
    """Random weights for every component of `model` (no safety checker), each in the dtype the
    loader would keep it in for a model loaded in `dtype`."""
    return {part: random_params(shapes, seed, part, DTYPES[part_dtype(model, part, dtype)])
            for part, shapes in param_shapes(model).items() if part != "safety_checker"}


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
        with tempfile.TemporaryDirectory() as tokenizer_root:
            parts = _parts(arch, Path(tokenizer_root) / "tokenizer")
        model = parts.model()
        # Drawn in float32 and cast leaf by leaf: the peak is the model in `dtype`, not in float32.
        weights = _weights(model, seed, dtype)
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


# SDXL base's model_index.json, but for the weights' folders (its scheduler, no safety checker).
_SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.39.0", "force_zeros_for_empty_prompt": True,
    "add_watermarker": None, "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _write_folder(folder: Path, parts: _Parts, weights: dict, checker: tuple[dict, dict] | None) -> None:
    """The files a diffusers `save_pretrained` writes (PyTorch-layout safetensors), from configs and numpy weights."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae"):
        _write_json(folder / name / "config.json", getattr(parts, name))
        _write_safetensors(folder / name / "diffusion_pytorch_model.safetensors", weights[name], diffusers_names=True)
    _write_json(folder / "text_encoder" / "config.json", parts.text)
    _write_safetensors(folder / "text_encoder" / "model.safetensors", weights["text_encoder"], diffusers_names=False)
    _write_json(folder / "scheduler" / "scheduler_config.json", parts.scheduler)
    if parts.text_2 is not None:  # SDXL: the second encoder (its tokenizer is written already), no checker
        _write_json(folder / "text_encoder_2" / "config.json", parts.text_2)
        _write_safetensors(folder / "text_encoder_2" / "model.safetensors", weights["text_encoder_2"],
                           diffusers_names=False)
        index = {**_SDXL_INDEX, "scheduler": ["diffusers", parts.scheduler["_class_name"]]}
        _write_json(folder / "model_index.json", index)
        return
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
    """Write a random pipeline of `arch` (no safety checker) in diffusers' layout, as tests need
    (`tiny-sdxl`: as `sdmagic.setup("tiny-sdxl")` builds it)."""
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
