"""The random pipelines sdmagic builds itself, with no download: `tiny` on disk, full sizes in memory.

`tiny` (tests, demos, a first image in seconds) is written once in diffusers' Flax layout and then
loaded through exactly the same code path as a real model. `random_model("sd1")` gives the bench a
full-size Stable Diffusion 1.x in memory.

Nothing here initialises a Flax module or compiles anything: the parameter shapes follow from the
configs (the same arithmetic as diffusers' and transformers' `setup` methods) and the values come
from numpy, one seeded generator per parameter. On 2 CPU cores `tiny` builds in a fraction of a
second (Flax's init took about 30 s, nearly all XLA compiles) and SD 1.x's 1.07 B parameters in
seconds rather than minutes.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .compile_cache import sdmagic_home
from .models import (
    DTYPES,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    FlaxAutoencoderKL,
    FlaxCLIPTextModel,
    FlaxPNDMScheduler,
    FlaxStableDiffusionPipeline,
    FlaxUNet2DConditionModel,
    LoadedModel,
    _loaded,
    _make_scheduler,
    check_scheduler_name,
    resolve_dtype,
)

# Part of the cache folder's name: bump it whenever the bytes written change, so that an old cache
# is never mistaken for the current model (v1: Flax init; v2: numpy).
TINY_VERSION = "2"

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


def _tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every character is a token. Offline, exact."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _sd_scheduler(**overrides) -> Any:
    """Stable Diffusion's scheduler: PNDM (PLMS), scaled-linear betas (SD 2.x adds v-prediction)."""
    return FlaxPNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **overrides,
    )


# ----------------------------------------------------------------------------------------------
# Parameter shapes from the configs: {name: {... name: shape}} in Flax's naming
# ----------------------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int, size: int = 3, bias: bool = True) -> dict:
    return {"kernel": (size, size, c_in, c_out), **({"bias": (c_out,)} if bias else {})}


def _dense(c_in: int, c_out: int, bias: bool = True) -> dict:
    return {"kernel": (c_in, c_out), **({"bias": (c_out,)} if bias else {})}


def _norm(channels: int) -> dict:
    return {"scale": (channels,), "bias": (channels,)}


def _resnet(c_in: int, c_out: int, temb: int | None) -> dict:
    """diffusers' FlaxResnetBlock2D (UNet, with a time embedding) or the VAE's (temb None)."""
    shapes = {"norm1": _norm(c_in), "conv1": _conv(c_in, c_out)}
    if temb is not None:
        shapes["time_emb_proj"] = _dense(temb, c_out)
    shapes.update(norm2=_norm(c_out), conv2=_conv(c_out, c_out))
    if c_in != c_out:
        shapes["conv_shortcut"] = _conv(c_in, c_out, 1)
    return shapes


def _transformer(channels: int, heads: int, depth: int, context: int, linear: bool, only_cross: bool) -> dict:
    """diffusers' FlaxTransformer2DModel: head size channels // heads, GEGLU feed-forward."""
    inner = heads * (channels // heads)
    projection = _dense(channels, inner) if linear else _conv(channels, inner, 1)

    def attention(kv_in: int) -> dict:
        return {"to_q": _dense(inner, inner, False), "to_k": _dense(kv_in, inner, False),
                "to_v": _dense(kv_in, inner, False), "to_out_0": _dense(inner, inner)}

    block = {
        "attn1": attention(context if only_cross else inner), "attn2": attention(context),
        "ff": {"net_0": {"proj": _dense(inner, inner * 8)}, "net_2": _dense(inner * 4, inner)},
        "norm1": _norm(inner), "norm2": _norm(inner), "norm3": _norm(inner),
    }
    return {
        "norm": _norm(channels), "proj_in": projection,
        **{f"transformer_blocks_{i}": block for i in range(depth)},
        "proj_out": _dense(inner, inner) if linear else _conv(inner, inner, 1),
    }


def _per_block(value: Any, blocks: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * blocks


def unet_shapes(config: dict) -> dict:
    """FlaxUNet2DConditionModel's parameter shapes for `config` (as its config.json)."""
    if config.get("addition_embed_type") is not None or config.get("num_attention_heads") is not None:
        raise ValueError("random UNets support neither addition embeddings nor num_attention_heads")
    channels = list(config["block_out_channels"])
    n = len(channels)
    temb = channels[0] * 4
    heads = _per_block(config["attention_head_dim"], n)  # diffusers' historical name for the head count
    depth = _per_block(config.get("transformer_layers_per_block", 1), n)
    only_cross = _per_block(config.get("only_cross_attention", False), n)
    context, layers = config["cross_attention_dim"], config["layers_per_block"]
    linear = config.get("use_linear_projection", False)

    shapes = {
        "conv_in": _conv(config["in_channels"], channels[0]),
        "time_embedding": {"linear_1": _dense(channels[0], temb), "linear_2": _dense(temb, temb)},
    }
    out = channels[0]
    for i, kind in enumerate(config["down_block_types"]):
        c_in, out = out, channels[i]
        block = {}
        for j in range(layers):
            block[f"resnets_{j}"] = _resnet(c_in if j == 0 else out, out, temb)
            if kind == "CrossAttnDownBlock2D":
                block[f"attentions_{j}"] = _transformer(out, heads[i], depth[i], context, linear, only_cross[i])
        if i < n - 1:
            block["downsamplers_0"] = {"conv": _conv(out, out)}
        shapes[f"down_blocks_{i}"] = block
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        c = channels[-1]
        shapes["mid_block"] = {
            "resnets_0": _resnet(c, c, temb),
            "attentions_0": _transformer(c, heads[-1], depth[-1], context, linear, False),
            "resnets_1": _resnet(c, c, temb),
        }
    reversed_channels, reversed_heads = channels[::-1], heads[::-1]
    reversed_depth, reversed_cross = depth[::-1], only_cross[::-1]
    out = reversed_channels[0]
    for i, kind in enumerate(config["up_block_types"]):
        prev, out = out, reversed_channels[i]
        skip_in = reversed_channels[min(i + 1, n - 1)]
        block = {}
        for j in range(layers + 1):
            skip = skip_in if j == layers else out
            block[f"resnets_{j}"] = _resnet((prev if j == 0 else out) + skip, out, temb)
            if kind == "CrossAttnUpBlock2D":
                block[f"attentions_{j}"] = _transformer(
                    out, reversed_heads[i], reversed_depth[i], context, linear, reversed_cross[i]
                )
        if i < n - 1:
            block["upsamplers_0"] = {"conv": _conv(out, out)}
        shapes[f"up_blocks_{i}"] = block
    shapes["conv_norm_out"] = _norm(channels[0])
    shapes["conv_out"] = _conv(channels[0], config["out_channels"])
    return shapes


def vae_shapes(config: dict) -> dict:
    """FlaxAutoencoderKL's parameter shapes for `config` (as its config.json)."""
    channels, layers, latent = list(config["block_out_channels"]), config["layers_per_block"], config["latent_channels"]
    n, c = len(channels), channels[-1]

    def attention(ch: int) -> dict:
        return {"group_norm": _norm(ch), **{name: _dense(ch, ch) for name in ("query", "key", "value", "proj_attn")}}

    mid = {"resnets_0": _resnet(c, c, None), "attentions_0": attention(c), "resnets_1": _resnet(c, c, None)}
    encoder = {"conv_in": _conv(config["in_channels"], channels[0])}
    out = channels[0]
    for i in range(n):
        c_in, out = out, channels[i]
        block = {f"resnets_{j}": _resnet(c_in if j == 0 else out, out, None) for j in range(layers)}
        if i < n - 1:
            block["downsamplers_0"] = {"conv": _conv(out, out)}
        encoder[f"down_blocks_{i}"] = block
    encoder.update(mid_block=mid, conv_norm_out=_norm(c), conv_out=_conv(c, 2 * latent))
    decoder = {"conv_in": _conv(latent, c), "mid_block": mid}
    out = c
    for i, ch in enumerate(channels[::-1]):
        prev, out = out, ch
        block = {f"resnets_{j}": _resnet(prev if j == 0 else out, out, None) for j in range(layers + 1)}
        if i < n - 1:
            block["upsamplers_0"] = {"conv": _conv(out, out)}
        decoder[f"up_blocks_{i}"] = block
    decoder.update(conv_norm_out=_norm(channels[0]), conv_out=_conv(channels[0], config["out_channels"]))
    return {
        "encoder": encoder, "decoder": decoder,
        "quant_conv": _conv(2 * latent, 2 * latent, 1), "post_quant_conv": _conv(latent, latent, 1),
    }


def _clip_encoder(config: Any) -> dict:
    h, mlp = config.hidden_size, config.intermediate_size
    layer = {
        "layer_norm1": _norm(h),
        "self_attn": {name: _dense(h, h) for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "layer_norm2": _norm(h),
        "mlp": {"fc1": _dense(h, mlp), "fc2": _dense(mlp, h)},
    }
    return {"layers": {str(i): layer for i in range(config.num_hidden_layers)}}


def clip_text_shapes(config: Any) -> dict:
    """FlaxCLIPTextModel's parameter shapes for a CLIPTextConfig."""
    h = config.hidden_size
    return {"text_model": {
        "embeddings": {
            "token_embedding": {"embedding": (config.vocab_size, h)},
            "position_embedding": {"embedding": (config.max_position_embeddings, h)},
        },
        "encoder": _clip_encoder(config),
        "final_layer_norm": _norm(h),
    }}


def safety_checker_shapes(config: Any) -> dict:
    """diffusers' Flax safety checker (a CLIP vision tower and 17 + 3 concepts) for a CLIPConfig."""
    vision = config.vision_config
    h, patch = vision.hidden_size, vision.patch_size
    return {
        "vision_model": {"vision_model": {
            "embeddings": {
                "class_embedding": (h,),
                "patch_embedding": _conv(vision.num_channels, h, patch, bias=False),
                "position_embedding": {"embedding": ((vision.image_size // patch) ** 2 + 1, h)},
            },
            "pre_layrnorm": _norm(h),  # sic: transformers' name
            "encoder": _clip_encoder(vision),
            "post_layernorm": _norm(h),
        }},
        "visual_projection": _dense(h, config.projection_dim, False),
        "concept_embeds": (17, config.projection_dim),
        "special_care_embeds": (3, config.projection_dim),
        "concept_embeds_weights": (17,),
        "special_care_embeds_weights": (3,),
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
    """A random pipeline's components without weights: configs, tokenizer, scheduler."""

    unet: Any  # FlaxUNet2DConditionModel (a module definition; nothing initialised)
    vae: Any  # FlaxAutoencoderKL
    text_config: Any  # CLIPTextConfig
    tokenizer: Any
    scheduler: Any
    feature_extractor: Any


def _parts(arch: str, tokenizer_dir: Path, dtype: Any) -> _Parts:
    if arch not in RANDOM_ARCHITECTURES:
        raise ValueError(f"unknown random architecture {arch!r}: use one of {', '.join(RANDOM_ARCHITECTURES)}")
    spec = RANDOM_ARCHITECTURES[arch]
    tokenizer = _tiny_tokenizer(tokenizer_dir)
    text_config = CLIPTextConfig(
        **{"vocab_size": len(tokenizer), **spec["text"]},
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _Parts(
        unet=FlaxUNet2DConditionModel(in_channels=4, out_channels=4, dtype=dtype, **spec["unet"]),
        vae=FlaxAutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, dtype=dtype, **spec["vae"]),
        text_config=text_config,
        tokenizer=tokenizer,
        scheduler=_sd_scheduler(**spec.get("scheduler", {})),
        feature_extractor=CLIPImageProcessor(
            crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}, do_convert_rgb=True
        ),
    )


def _weights(parts: _Parts, seed: int, dtype: Any = np.float32) -> dict:
    return {
        "unet": random_params(unet_shapes(dict(parts.unet.config)), seed, "unet", dtype),
        "vae": random_params(vae_shapes(dict(parts.vae.config)), seed, "vae", dtype),
        "text_encoder": random_params(clip_text_shapes(parts.text_config), seed, "text_encoder", dtype),
    }


def _in_memory_pipeline(parts: _Parts, dtype: Any) -> Any:
    # _do_init=False: the text encoder's shapes are traced (no compile), its weights come from us.
    text_encoder = FlaxCLIPTextModel(parts.text_config, _do_init=False, dtype=dtype)
    return FlaxStableDiffusionPipeline(
        vae=parts.vae, text_encoder=text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=parts.scheduler, safety_checker=None, feature_extractor=parts.feature_extractor, dtype=dtype,
    )


def random_model(
    arch: str = "sd1", *, dtype: str = "float32", scheduler: str | None = None, seed: int = 0
) -> LoadedModel:
    """A randomly initialised pipeline of a real architecture, in memory: for benchmarks, no download.

    No safety checker; the parameters are host arrays in `dtype`, as `load_model` gives them.
    """
    check_scheduler_name(scheduler)
    dtype = resolve_dtype(dtype, "cpu")
    start = time.perf_counter()
    with announce_if_slow(f"sdmagic: building a random {arch} model in memory ({dtype})..."):
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            parts = _parts(arch, Path(tokenizer_dir), DTYPES[dtype])
        # Drawn in float32 and cast leaf by leaf: the peak is the model in `dtype`, not in float32.
        weights = _weights(parts, seed, DTYPES[dtype])
        pipeline = _in_memory_pipeline(parts, DTYPES[dtype])
    return _loaded(f"random {arch}", "memory", pipeline, weights, scheduler, dtype, start)


def with_scheduler(model: LoadedModel, scheduler: str) -> LoadedModel:
    """The same modules and host parameters with another scheduler (built from the model's config)."""
    check_scheduler_name(scheduler)
    sched, state, name = _make_scheduler(scheduler, model.pipeline.scheduler)
    return replace(model, scheduler=sched, scheduler_state=state, scheduler_name=name)


# ----------------------------------------------------------------------------------------------
# Writing diffusers' Flax layout
# ----------------------------------------------------------------------------------------------

_INDEX_ENTRIES = {
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "scheduler": ["diffusers", "FlaxPNDMScheduler"],
    "text_encoder": ["transformers", "FlaxCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "FlaxUNet2DConditionModel"],
    "vae": ["diffusers", "FlaxAutoencoderKL"],
}


def _write_msgpack(path: Path, params: dict) -> None:
    from flax.serialization import msgpack_serialize

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgpack_serialize(params))


def _write_folder(folder: Path, parts: _Parts, weights: dict, safety: tuple[Any, dict] | None) -> None:
    """The files FlaxStableDiffusionPipeline.save_pretrained writes, from configs and numpy weights."""
    from diffusers import __version__ as diffusers_version

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae"):
        getattr(parts, name).save_config(str(folder / name))
        _write_msgpack(folder / name / "diffusion_flax_model.msgpack", weights[name])
    # transformers' save_pretrained names the architecture without "Flax"; configs only here.
    text_config = CLIPTextConfig.from_dict(parts.text_config.to_dict())
    text_config.architectures = ["CLIPTextModel"]
    text_config.save_pretrained(str(folder / "text_encoder"))
    _write_msgpack(folder / "text_encoder" / "flax_model.msgpack", weights["text_encoder"])
    parts.tokenizer.save_pretrained(str(folder / "tokenizer"))
    parts.scheduler.save_config(str(folder / "scheduler"))
    parts.feature_extractor.save_pretrained(str(folder / "feature_extractor"))
    index = {"_class_name": "FlaxStableDiffusionPipeline", "_diffusers_version": diffusers_version, **_INDEX_ENTRIES}
    index["safety_checker"] = [None, None]
    if safety is not None:
        config, params = safety
        config.save_pretrained(str(folder / "safety_checker"))
        _write_msgpack(folder / "safety_checker" / "flax_model.msgpack", params)
        # Listed under diffusers' class name, as in real SD repos, so that any diffusers-layout
        # reader sees the usual model_index.json.
        index["safety_checker"] = ["stable_diffusion", "FlaxStableDiffusionSafetyChecker"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_random_model(folder: Path, arch: str, *, seed: int = 0) -> Path:
    """Write a random pipeline of `arch` (no safety checker) in diffusers' Flax layout, as tests need."""
    folder = Path(folder)
    parts = _parts(arch, folder / "tokenizer", np.float32)
    _write_folder(folder, parts, _weights(parts, seed), safety=None)
    return folder


def write_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """Write a miniature, randomly initialised SD 1.x-shaped pipeline in diffusers' Flax layout.

    The shapes follow diffusers' own Flax tests: a 2-level UNet (32/64 channels) on 32x32 latents,
    a 2-level VAE (so 64x64 images), a 2-layer CLIP text encoder and a tiny CLIP safety checker
    whose concept thresholds are set so that it flags nothing by default.
    """
    folder = Path(folder)
    parts = _parts("tiny", folder / "tokenizer", np.float32)
    safety_config = CLIPConfig(
        text_config=parts.text_config.to_dict(), vision_config=CLIPVisionConfig(**_TINY_VISION).to_dict(),
        projection_dim=_TINY_VISION["projection_dim"],
    )
    safety_config.architectures = ["StableDiffusionSafetyChecker"]
    safety_params = random_params(safety_checker_shapes(safety_config), seed, "safety_checker")
    _write_folder(folder, parts, _weights(parts, seed), safety=(safety_config, safety_params))
    return folder
