"""CLIP's text and vision transformers, as transformers' PyTorch `CLIPTextModel` and
`CLIPVisionModel` compute them.

Both towers share one encoder: pre-LN layers of self-attention and a two-layer MLP, each added back
to the residual stream. The text tower attends causally and is read at the end-of-text token; the
vision tower attends over a class token and image patches and is read at the class token.

Parameters are FlaxCLIPTextModel's / FlaxCLIPVisionModel's trees (`text_shapes`, `vision_shapes`);
`text_shapes(cfg, projection=True)` is FlaxCLIPTextModelWithProjection's (SDXL's second text
encoder), whose bias-free `text_projection` maps the pooled output to `projection_dim` (`project`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .attention import attention
from .layers import ACTIVATIONS, conv2d, dense, layer_norm


def _from_dict(cls: type, d: dict) -> Any:
    """`cls` from the keys of `d` it names; missing or null values keep the class defaults."""
    values = {}
    for field in dataclasses.fields(cls):
        value = d.get(field.name)
        if value is not None:
            values[field.name] = type(field.default)(value)
    return cls(**values)


@dataclass(frozen=True)
class TextConfig:
    """The CLIPTextConfig fields the text tower uses, with CLIPTextConfig's defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        """From a text encoder's config.json, or a full CLIP config's `text_config` (as transformers'
        `CLIPTextConfig.from_pretrained` reads one)."""
        if isinstance(d.get("text_config"), dict):
            d = d["text_config"]
        return _from_dict(cls, d)


@dataclass(frozen=True)
class VisionConfig:
    """The CLIPVisionConfig fields the vision tower uses, with CLIPVisionConfig's defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        """From a vision model's config.json, or a full CLIP config's `vision_config`."""
        if isinstance(d.get("vision_config"), dict):
            d = d["vision_config"]
        return _from_dict(cls, d)


class TextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, L, D], after the final layer norm
    penultimate: jax.Array  # [B, L, D], the last layer's input, not normed (transformers' hidden_states[-2])
    pooled: jax.Array  # [B, D], last_hidden_state at the end-of-text token


# ---------------------------------------------------------------------------------------------- shapes


def _dense(c_in: int, c_out: int, bias: bool = True) -> dict:
    return {"kernel": (c_in, c_out), **({"bias": (c_out,)} if bias else {})}


def _norm(channels: int) -> dict:
    return {"scale": (channels,), "bias": (channels,)}


def encoder_shapes(cfg: Any) -> dict:
    """FlaxCLIPEncoder's parameter shapes (layers keyed "0", "1", ...)."""
    h, mlp = cfg.hidden_size, cfg.intermediate_size
    layer = {
        "layer_norm1": _norm(h),
        "self_attn": {name: _dense(h, h) for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "layer_norm2": _norm(h),
        "mlp": {"fc1": _dense(h, mlp), "fc2": _dense(mlp, h)},
    }
    return {"layers": {str(i): layer for i in range(cfg.num_hidden_layers)}}


def text_shapes(cfg: Any, *, projection: bool = False) -> dict:
    """FlaxCLIPTextModel's parameter shapes for a TextConfig (or transformers' CLIPTextConfig);
    with `projection`, FlaxCLIPTextModelWithProjection's (plus `text_projection`, no bias)."""
    h = cfg.hidden_size
    head = {"text_projection": _dense(h, cfg.projection_dim, bias=False)} if projection else {}
    return {**head, "text_model": {
        "embeddings": {
            "token_embedding": {"embedding": (cfg.vocab_size, h)},
            "position_embedding": {"embedding": (cfg.max_position_embeddings, h)},
        },
        "encoder": encoder_shapes(cfg),
        "final_layer_norm": _norm(h),
    }}


def vision_shapes(cfg: Any) -> dict:
    """FlaxCLIPVisionModel's parameter shapes for a VisionConfig (or transformers' CLIPVisionConfig)."""
    h, patch = cfg.hidden_size, cfg.patch_size
    return {"vision_model": {
        "embeddings": {
            "class_embedding": (h,),
            "patch_embedding": {"kernel": (patch, patch, cfg.num_channels, h)},
            "position_embedding": {"embedding": ((cfg.image_size // patch) ** 2 + 1, h)},
        },
        "pre_layrnorm": _norm(h),  # sic: transformers' name
        "encoder": encoder_shapes(cfg),
        "post_layernorm": _norm(h),
    }}


# ---------------------------------------------------------------------------------------------- networks


def _encoder_layer(params: dict, cfg: Any, x: jax.Array, causal: bool) -> jax.Array:
    attn = params["self_attn"]
    h = layer_norm(params["layer_norm1"], x, eps=cfg.layer_norm_eps)
    h = attention(dense(attn["q_proj"], h), dense(attn["k_proj"], h), dense(attn["v_proj"], h),
                  heads=cfg.num_attention_heads, causal=causal)
    x = x + dense(attn["out_proj"], h)
    h = layer_norm(params["layer_norm2"], x, eps=cfg.layer_norm_eps)
    h = ACTIVATIONS[cfg.hidden_act](dense(params["mlp"]["fc1"], h))
    return x + dense(params["mlp"]["fc2"], h)


def encoder(params: dict, cfg: Any, x: jax.Array, *, causal: bool) -> tuple[jax.Array, jax.Array]:
    """CLIPEncoder over [B, T, D]: (the last layer's output, the last layer's input)."""
    layers = params["layers"]
    penultimate = x
    for i in range(cfg.num_hidden_layers):
        penultimate = x
        x = _encoder_layer(layers[str(i)], cfg, x, causal)
    return x, penultimate


def encode_text(params: dict, cfg: TextConfig, ids: jax.Array) -> TextOutput:
    """CLIPTextModel on token ids [B, L] (L <= max_position_embeddings), with its causal mask and no
    padding mask, as Stable Diffusion pipelines call it. Computes in the parameters' dtype."""
    p = params["text_model"]
    tokens = p["embeddings"]["token_embedding"]["embedding"]
    positions = p["embeddings"]["position_embedding"]["embedding"]
    length = ids.shape[1]
    if length > positions.shape[0]:
        raise ValueError(f"{length} tokens, but the text encoder has {positions.shape[0]} positions")
    x = jnp.take(tokens, ids, axis=0) + positions[:length].astype(tokens.dtype)
    x, penultimate = encoder(p["encoder"], cfg, x, causal=True)
    last = layer_norm(p["final_layer_norm"], x, eps=cfg.layer_norm_eps)
    if cfg.eos_token_id == 2:
        # transformers' rule for configs written before its eos_token_id fix (SD 1.x's among them):
        # the end-of-text token is the highest id in the sequence.
        eos = jnp.argmax(ids.astype(jnp.int32), axis=-1)
    else:
        # The first end-of-text token: padding may repeat it.
        eos = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
    return TextOutput(last, penultimate, pooled)


def project(params: dict, pooled: jax.Array) -> jax.Array:
    """CLIPTextModelWithProjection's `text_embeds` [B, projection_dim]: the pooled output through
    `text_projection` (no bias). `params` is the whole text encoder's tree."""
    return dense(params["text_projection"], pooled.astype(params["text_projection"]["kernel"].dtype))


def encode_image(params: dict, cfg: VisionConfig, pixels: jax.Array) -> jax.Array:
    """CLIPVisionModel's pooled output [B, D] for normalised pixels [B, image_size, image_size, C]
    (NHWC). Computes in the parameters' dtype."""
    p = params["vision_model"]
    emb = p["embeddings"]
    dtype = emb["patch_embedding"]["kernel"].dtype
    if pixels.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"images of {pixels.shape[1]}x{pixels.shape[2]}, but the vision model takes "
                         f"{cfg.image_size}x{cfg.image_size}")
    x = conv2d(emb["patch_embedding"], pixels.astype(dtype), stride=cfg.patch_size, padding=0)
    batch = x.shape[0]
    # Row-major over the patch grid, as PyTorch's flatten(2) of NCHW.
    x = x.reshape(batch, -1, cfg.hidden_size)
    cls = jnp.broadcast_to(emb["class_embedding"].astype(dtype), (batch, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + emb["position_embedding"]["embedding"].astype(dtype)
    x = layer_norm(p["pre_layrnorm"], x, eps=cfg.layer_norm_eps)
    x, _ = encoder(p["encoder"], cfg, x, causal=False)
    return layer_norm(p["post_layernorm"], x[:, 0], eps=cfg.layer_norm_eps)
