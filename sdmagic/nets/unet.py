"""Stable Diffusion's conditional UNet (diffusers' UNet2DConditionModel), as PyTorch computes it.

SD 1.x / 2.x, and SDXL's (`addition_embed_type="text_time"`: the pooled text embedding and the six
micro-conditioning numbers, original size, crop corner and target size, are embedded and added to
the timestep embedding; transformer depth and head count per level).

Parameters are the tree of diffusers' Flax port (`unet_shapes`); the arithmetic is the PyTorch
class's: exact GELU in the GEGLU feed-forward, the transformers' GroupNorm at epsilon 1e-6 and the
resnets' at `norm_eps`, a float32 sinusoidal timestep embedding that takes fractional timesteps.

Samples are NCHW at the boundary, as PyTorch's; NHWC inside. The computation runs in the
parameters' dtype; the timestep sinusoid is float32 and cast to it, as diffusers does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdmagic.nets.attention import attention
from sdmagic.nets.layers import conv2d, dense, gelu, group_norm, layer_norm

# Transformer2DModel's GroupNorm and BasicTransformerBlock's LayerNorms: fixed in diffusers, not
# read from the config.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
TRANSFORMER_LAYER_NORM_EPS = 1e-5

# The feed-forward's hidden width is this many times the transformer's width (diffusers' `mult`).
FEED_FORWARD_MULT = 4


# The per-level keys' PyTorch defaults, which apply to every level.
_PER_LEVEL_DEFAULTS = {"layers_per_block": 2, "transformer_layers_per_block": 1, "only_cross_attention": False,
                       "cross_attention_dim": 1280}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The UNet2DConditionModel config.json keys that shape the network, per level where diffusers
    allows a per-level value; defaults as the PyTorch class's (SD 1.x)."""

    in_channels: int = 4
    out_channels: int = 4
    # PyTorch's class has no default size (None); 32 is the Flax class's and sdmagic's config check's.
    sample_size: int = 32
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    # None: no mid block at all (diffusers allows it).
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    # Head COUNT per level: `num_attention_heads` if the config gives it, else `attention_head_dim`,
    # which is what diffusers historically (mis)named the head count.
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)
    cross_attention_dim: tuple[int, ...] = (1280, 1280, 1280, 1280)
    use_linear_projection: bool = False
    # Scores and softmax in float32. `attention` always computes them so (for every dtype and
    # kernel), so the flag needs no separate path; it is kept so configs round-trip.
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    center_input_sample: bool = False
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    # SDXL: "text_time" adds an embedding of [pooled text embedding | sinusoids of the time ids]
    # (`projection_class_embeddings_input_dim` wide, each of the 6 time ids in
    # `addition_time_embed_dim` sinusoids) to the timestep embedding. None: SD 1.x/2.x.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @classmethod
    def from_dict(cls, config: dict) -> UNetConfig:
        """From a (PyTorch or Flax) UNet2DConditionModel config.json dict; unknown keys are ignored,
        per-level keys given as one value apply to every level."""
        d = {f.name: f.default for f in dataclasses.fields(cls)} | _PER_LEVEL_DEFAULTS
        d.update({k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in d})
        levels = len(d["block_out_channels"])

        def per_level(value: Any) -> tuple:
            return tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels

        # `or`, not `is None`, exactly as diffusers resolves it.
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        return cls(**{
            **d,
            # SDXL's config has null: the PyTorch class then does not upcast (sdmagic always does).
            "upcast_attention": bool(d["upcast_attention"]),
            "layers_per_block": per_level(d["layers_per_block"]),
            "num_attention_heads": per_level(heads),
            "transformer_layers_per_block": per_level(d["transformer_layers_per_block"]),
            "only_cross_attention": tuple(bool(v) for v in per_level(d["only_cross_attention"])),
            "cross_attention_dim": per_level(d["cross_attention_dim"]),
        })

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def text_time(self) -> bool:
        """SDXL's added conditioning: apply_unet needs `added_cond`."""
        return self.addition_embed_type == "text_time"


def _reversed(values: tuple) -> tuple:
    return tuple(reversed(values))


# ----------------------------------------------------------------------------------------------
# Parameter shapes: FlaxUNet2DConditionModel's tree
# ----------------------------------------------------------------------------------------------


def _conv_shape(c_in: int, c_out: int, size: int = 3) -> dict:
    return {"kernel": (size, size, c_in, c_out), "bias": (c_out,)}


def _dense_shape(c_in: int, c_out: int, bias: bool = True) -> dict:
    return {"kernel": (c_in, c_out), **({"bias": (c_out,)} if bias else {})}


def _norm_shape(channels: int) -> dict:
    return {"scale": (channels,), "bias": (channels,)}


def _resnet_shape(c_in: int, c_out: int, temb: int) -> dict:
    shapes = {"norm1": _norm_shape(c_in), "conv1": _conv_shape(c_in, c_out), "time_emb_proj": _dense_shape(temb, c_out),
              "norm2": _norm_shape(c_out), "conv2": _conv_shape(c_out, c_out)}
    if c_in != c_out:
        shapes["conv_shortcut"] = _conv_shape(c_in, c_out, 1)
    return shapes


def _attention_shape(width: int, kv_width: int) -> dict:
    return {"to_q": _dense_shape(width, width, False), "to_k": _dense_shape(kv_width, width, False),
            "to_v": _dense_shape(kv_width, width, False), "to_out_0": _dense_shape(width, width)}


def _transformer_shape(cfg: UNetConfig, channels: int, heads: int, depth: int, context: int, only_cross: bool) -> dict:
    inner = heads * (channels // heads)
    hidden = inner * FEED_FORWARD_MULT
    block = {
        "attn1": _attention_shape(inner, context if only_cross else inner), "attn2": _attention_shape(inner, context),
        "ff": {"net_0": {"proj": _dense_shape(inner, 2 * hidden)}, "net_2": _dense_shape(hidden, inner)},
        "norm1": _norm_shape(inner), "norm2": _norm_shape(inner), "norm3": _norm_shape(inner),
    }
    linear = cfg.use_linear_projection
    return {
        "norm": _norm_shape(channels),
        "proj_in": _dense_shape(channels, inner) if linear else _conv_shape(channels, inner, 1),
        **{f"transformer_blocks_{i}": block for i in range(depth)},
        "proj_out": _dense_shape(inner, channels) if linear else _conv_shape(inner, channels, 1),
    }


def unet_shapes(cfg: UNetConfig | dict) -> dict:
    """FlaxUNet2DConditionModel's parameter tree for `cfg` (or its config.json dict), as shapes."""
    if isinstance(cfg, dict):
        cfg = UNetConfig.from_dict(cfg)
    channels, temb, n = cfg.block_out_channels, cfg.time_embed_dim, cfg.levels
    shapes = {
        "conv_in": _conv_shape(cfg.in_channels, channels[0]),
        "time_embedding": {"linear_1": _dense_shape(channels[0], temb), "linear_2": _dense_shape(temb, temb)},
    }
    if cfg.text_time:
        shapes["add_embedding"] = {
            "linear_1": _dense_shape(cfg.projection_class_embeddings_input_dim, temb), "linear_2": _dense_shape(temb, temb),
        }
    out = channels[0]
    for i, kind in enumerate(cfg.down_block_types):
        c_in, out = out, channels[i]
        block = {}
        for j in range(cfg.layers_per_block[i]):
            block[f"resnets_{j}"] = _resnet_shape(c_in if j == 0 else out, out, temb)
            if kind == "CrossAttnDownBlock2D":
                block[f"attentions_{j}"] = _transformer_shape(
                    cfg, out, cfg.num_attention_heads[i], cfg.transformer_layers_per_block[i],
                    cfg.cross_attention_dim[i], cfg.only_cross_attention[i],
                )
        if i < n - 1:
            block["downsamplers_0"] = {"conv": _conv_shape(out, out)}
        shapes[f"down_blocks_{i}"] = block
    if cfg.mid_block_type is not None:
        c = channels[-1]
        shapes["mid_block"] = {
            "resnets_0": _resnet_shape(c, c, temb),
            "attentions_0": _transformer_shape(cfg, c, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                                               cfg.cross_attention_dim[-1], False),
            "resnets_1": _resnet_shape(c, c, temb),
        }
    up = _up_levels(cfg)
    out = channels[-1]
    for i, kind in enumerate(cfg.up_block_types):
        prev, out = out, up["channels"][i]
        skip_in = up["channels"][min(i + 1, n - 1)]
        layers = up["layers"][i] + 1
        block = {}
        for j in range(layers):
            skip = skip_in if j == layers - 1 else out
            block[f"resnets_{j}"] = _resnet_shape((prev if j == 0 else out) + skip, out, temb)
            if kind == "CrossAttnUpBlock2D":
                block[f"attentions_{j}"] = _transformer_shape(
                    cfg, out, up["heads"][i], up["depth"][i], up["context"][i], up["only_cross"][i]
                )
        if i < n - 1:
            block["upsamplers_0"] = {"conv": _conv_shape(out, out)}
        shapes[f"up_blocks_{i}"] = block
    shapes["conv_norm_out"] = _norm_shape(channels[0])
    shapes["conv_out"] = _conv_shape(channels[0], cfg.out_channels)
    return shapes


def _up_levels(cfg: UNetConfig) -> dict[str, tuple]:
    """The per-level settings in the up path's order (deepest level first), as diffusers reverses them."""
    return {
        "channels": _reversed(cfg.block_out_channels), "layers": _reversed(cfg.layers_per_block),
        "heads": _reversed(cfg.num_attention_heads), "depth": _reversed(cfg.transformer_layers_per_block),
        "context": _reversed(cfg.cross_attention_dim), "only_cross": _reversed(cfg.only_cross_attention),
    }


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' Timesteps: [B] (possibly fractional) timesteps -> [B, dim] float32 sinusoids."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _resnet(p: dict, x: jax.Array, temb_act: jax.Array, cfg: UNetConfig, output_scale: float = 1.0) -> jax.Array:
    """ResnetBlock2D; `temb_act` is silu(time embedding), which every resnet applies first."""
    h = conv2d(p["conv1"], jax.nn.silu(group_norm(p["norm1"], x, groups=cfg.norm_num_groups, eps=cfg.norm_eps)))
    h = h + dense(p["time_emb_proj"], temb_act)[:, None, None, :]
    h = conv2d(p["conv2"], jax.nn.silu(group_norm(p["norm2"], h, groups=cfg.norm_num_groups, eps=cfg.norm_eps)))
    shortcut = conv2d(p["conv_shortcut"], x, padding=0) if "conv_shortcut" in p else x
    out = shortcut + h
    return out if output_scale == 1.0 else out / jnp.asarray(output_scale, out.dtype)


def _attention(p: dict, x: jax.Array, context: jax.Array, heads: int) -> jax.Array:
    """diffusers' Attention: bias-free q/k/v projections, scaled dot-product attention, output projection.

    Projections of the same input run as one matmul over the concatenated kernels (q, k and v for
    self-attention; k and v of the text for cross-attention): fewer, larger matmuls, same sums."""
    if context is x:
        qkv = jnp.matmul(x, jnp.concatenate([p["to_q"]["kernel"], p["to_k"]["kernel"], p["to_v"]["kernel"]], axis=1)
                         .astype(x.dtype))
        q, k, v = jnp.split(qkv, 3, axis=-1)
    else:
        q = dense(p["to_q"], x)
        kv = jnp.matmul(context, jnp.concatenate([p["to_k"]["kernel"], p["to_v"]["kernel"]], axis=1).astype(context.dtype))
        k, v = jnp.split(kv, 2, axis=-1)
    return dense(p["to_out_0"], attention(q, k, v, heads=heads))


def _feed_forward(p: dict, x: jax.Array) -> jax.Array:
    """FeedForward with GEGLU: one projection to [hidden | gate], hidden * exact_gelu(gate), back down."""
    hidden, gate = jnp.split(dense(p["net_0"]["proj"], x), 2, axis=-1)
    return dense(p["net_2"], hidden * gelu(gate))


def _transformer_block(p: dict, x: jax.Array, context: jax.Array, heads: int, only_cross: bool) -> jax.Array:
    """BasicTransformerBlock: pre-LayerNorm self-attention (cross-attention when `only_cross`),
    cross-attention, feed-forward, each added to the residual stream."""
    h = layer_norm(p["norm1"], x, eps=TRANSFORMER_LAYER_NORM_EPS)
    x = x + _attention(p["attn1"], h, context if only_cross else h, heads)
    h = layer_norm(p["norm2"], x, eps=TRANSFORMER_LAYER_NORM_EPS)
    x = x + _attention(p["attn2"], h, context, heads)
    h = layer_norm(p["norm3"], x, eps=TRANSFORMER_LAYER_NORM_EPS)
    return x + _feed_forward(p["ff"], h)


def _transformer(p: dict, x: jax.Array, context: jax.Array, cfg: UNetConfig, heads: int, depth: int,
                 only_cross: bool) -> jax.Array:
    """Transformer2DModel on NHWC: GroupNorm, proj_in (1x1 conv, or linear on tokens), `depth`
    blocks, proj_out, plus the input."""
    batch, height, width, channels = x.shape
    h = group_norm(p["norm"], x, groups=cfg.norm_num_groups, eps=TRANSFORMER_GROUP_NORM_EPS)
    if cfg.use_linear_projection:
        h = dense(p["proj_in"], h.reshape(batch, height * width, channels))
    else:
        h = conv2d(p["proj_in"], h, padding=0).reshape(batch, height * width, -1)
    for i in range(depth):
        h = _transformer_block(p[f"transformer_blocks_{i}"], h, context, heads, only_cross)
    if cfg.use_linear_projection:
        h = dense(p["proj_out"], h).reshape(batch, height, width, channels)
    else:
        h = conv2d(p["proj_out"], h.reshape(batch, height, width, -1), padding=0)
    return h + x


def _downsample(p: dict, x: jax.Array, padding: int) -> jax.Array:
    """Downsample2D: 3x3 convolution, stride 2; padding 0 means diffusers' one extra row and column."""
    pad = ((padding, padding), (padding, padding)) if padding else ((0, 1), (0, 1))
    return conv2d(p["conv"], x, stride=2, padding=pad)


def _upsample(p: dict, x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Upsample2D: nearest-neighbour to `size` (twice the input unless a skip's odd size asks
    otherwise, as PyTorch's F.interpolate), then a 3x3 convolution."""
    for axis, out in ((1, size[0]), (2, size[1])):
        x = _nearest(x, axis, out)
    return conv2d(p["conv"], x)


def _nearest(x: jax.Array, axis: int, out: int) -> jax.Array:
    size = x.shape[axis]
    if out == 2 * size:
        return jnp.repeat(x, 2, axis=axis)
    # PyTorch's nearest index for any other size: floor(dst * (in / out)) in float32.
    index = np.minimum(np.floor(np.arange(out, dtype=np.float32) * np.float32(size / out)).astype(np.int32), size - 1)
    return jnp.take(x, index, axis=axis)


def _down_block(p: dict, x: jax.Array, temb_act: jax.Array, context: jax.Array, cfg: UNetConfig,
                level: int) -> tuple[jax.Array, list[jax.Array]]:
    """CrossAttnDownBlock2D / DownBlock2D: resnets (each followed by a transformer in the cross-
    attention kind), then the downsampler; returns the output and every skip it leaves, in order."""
    skips = []
    for j in range(cfg.layers_per_block[level]):
        x = _resnet(p[f"resnets_{j}"], x, temb_act, cfg)
        if f"attentions_{j}" in p:
            x = _transformer(p[f"attentions_{j}"], x, context, cfg, cfg.num_attention_heads[level],
                             cfg.transformer_layers_per_block[level], cfg.only_cross_attention[level])
        skips.append(x)
    if "downsamplers_0" in p:
        x = _downsample(p["downsamplers_0"], x, cfg.downsample_padding)
        skips.append(x)
    return x, skips


def _mid_block(p: dict, x: jax.Array, temb_act: jax.Array, context: jax.Array, cfg: UNetConfig) -> jax.Array:
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet (never cross-attention only)."""
    scale = cfg.mid_block_scale_factor
    x = _resnet(p["resnets_0"], x, temb_act, cfg, scale)
    x = _transformer(p["attentions_0"], x, context, cfg, cfg.num_attention_heads[-1],
                     cfg.transformer_layers_per_block[-1], False)
    return _resnet(p["resnets_1"], x, temb_act, cfg, scale)


def _up_block(p: dict, x: jax.Array, skips: list[jax.Array], temb_act: jax.Array, context: jax.Array,
              cfg: UNetConfig, i: int, upsample_to: tuple[int, int] | None) -> jax.Array:
    """CrossAttnUpBlock2D / UpBlock2D: each resnet takes x and the latest of `skips` (last in,
    first out) concatenated on channels, a transformer after each in the cross-attention kind, then
    the upsampler to `upsample_to` (the size of the skip the next block takes first)."""
    up = _up_levels(cfg)
    for j, skip in enumerate(reversed(skips)):
        x = _resnet(p[f"resnets_{j}"], jnp.concatenate([x, skip], axis=-1), temb_act, cfg)
        if f"attentions_{j}" in p:
            x = _transformer(p[f"attentions_{j}"], x, context, cfg, up["heads"][i], up["depth"][i], up["only_cross"][i])
    if "upsamplers_0" in p:
        x = _upsample(p["upsamplers_0"], x, upsample_to)
    return x


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


def added_embedding(params: dict, cfg: UNetConfig, added_cond: dict, dtype: Any) -> jax.Array:
    """SDXL's "text_time" embedding [B, time_embed_dim]: the pooled text embedding [B, P] next to
    the float32 sinusoids of each of the 6 time ids [B, 6], through add_embedding (linear, silu,
    linear), as diffusers' UNet2DConditionModel.get_aug_embed."""
    text_embeds, time_ids = added_cond["text_embeds"], added_cond["time_ids"]
    batch = text_embeds.shape[0]
    sinusoids = timestep_embedding(jnp.asarray(time_ids, jnp.float32).reshape(-1), cfg.addition_time_embed_dim,
                                   flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift).reshape(batch, -1)
    # PyTorch concatenates a half-precision pooled embedding with float32 sinusoids (promoted to
    # float32) and casts the result to the embedding's dtype: the same here.
    added = jnp.concatenate([text_embeds.astype(jnp.float32), sinusoids], axis=-1).astype(dtype)
    p = params["add_embedding"]
    return dense(p["linear_2"], jax.nn.silu(dense(p["linear_1"], added)))


def apply_unet(params: dict, cfg: UNetConfig, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
               added_cond: dict | None = None) -> jax.Array:
    """The predicted noise (or v, or whatever the model was trained on) for `sample` [B, C, H, W]
    at `timesteps` ([B] or a scalar, float32, fractional allowed) given `context` [B, L, D] (the
    text encoder's hidden states); returns [B, out_channels, H, W] in the parameters' dtype.

    `added_cond` (SDXL, `cfg.text_time`): {"text_embeds": [B, P] the second text encoder's
    projected pooled output, "time_ids": [B, 6] (original height, width, crop top, left, target
    height, width)}; ignored by SD 1.x/2.x UNets."""
    dtype = params["conv_in"]["kernel"].dtype
    x = jnp.transpose(sample, (0, 2, 3, 1)).astype(dtype)
    context = context.astype(dtype)
    if cfg.center_input_sample:
        x = 2 * x - 1.0

    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (x.shape[0],))
    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                               freq_shift=cfg.freq_shift).astype(dtype)
    temb = dense(params["time_embedding"]["linear_2"], jax.nn.silu(dense(params["time_embedding"]["linear_1"], t_emb)))
    if cfg.text_time:
        if added_cond is None:
            raise ValueError("this UNet (addition_embed_type 'text_time', SDXL) needs added_cond: text_embeds and time_ids")
        temb = temb + added_embedding(params, cfg, added_cond, dtype)
    temb_act = jax.nn.silu(temb)

    x = conv2d(params["conv_in"], x)
    skips = [x]
    for i in range(cfg.levels):
        x, block_skips = _down_block(params[f"down_blocks_{i}"], x, temb_act, context, cfg, i)
        skips += block_skips
    if cfg.mid_block_type is not None:
        x = _mid_block(params["mid_block"], x, temb_act, context, cfg)
    for i, layers in enumerate(_up_levels(cfg)["layers"]):
        block_skips, skips = skips[-(layers + 1):], skips[:-(layers + 1)]
        upsample_to = skips[-1].shape[1:3] if skips else None
        x = _up_block(params[f"up_blocks_{i}"], x, block_skips, temb_act, context, cfg, i, upsample_to)

    x = jax.nn.silu(group_norm(params["conv_norm_out"], x, groups=cfg.norm_num_groups, eps=cfg.norm_eps))
    x = conv2d(params["conv_out"], x)
    return jnp.transpose(x, (0, 3, 1, 2))
