"""Stable Diffusion's VAE (diffusers' AutoencoderKL): the encoder and the decoder, as PyTorch computes them.

Parameters are the tree of diffusers' Flax port (`vae_shapes`); the arithmetic is the PyTorch
class's. Where the Flax port differed it is wrong and not followed: the mid-block attention's
GroupNorm uses the VAE's epsilon (1e-6), not 1e-5.

Images and latents are NCHW at the boundary, as PyTorch's; NHWC inside. The computation runs in the
parameters' dtype. `scaling_factor` and `shift_factor` are the caller's to apply.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sdmagic.nets.attention import attention
from sdmagic.nets.layers import conv2d, dense, group_norm

# Every GroupNorm of diffusers' Encoder and Decoder (resnets, mid-block attention, conv_norm_out).
EPS = 1e-6

# DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The AutoencoderKL config.json keys that shape the network; defaults as the PyTorch class's."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int | tuple[int, ...] = 32
    force_upcast: bool = True
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> VAEConfig:
        """From a (PyTorch or Flax) AutoencoderKL config.json dict; unknown keys are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names})

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)


# ----------------------------------------------------------------------------------------------
# Parameter shapes: FlaxAutoencoderKL's tree
# ----------------------------------------------------------------------------------------------


def _conv_shape(c_in: int, c_out: int, size: int = 3) -> dict:
    return {"kernel": (size, size, c_in, c_out), "bias": (c_out,)}


def _dense_shape(c_in: int, c_out: int) -> dict:
    return {"kernel": (c_in, c_out), "bias": (c_out,)}


def _norm_shape(channels: int) -> dict:
    return {"scale": (channels,), "bias": (channels,)}


def _resnet_shape(c_in: int, c_out: int) -> dict:
    shapes = {"norm1": _norm_shape(c_in), "conv1": _conv_shape(c_in, c_out),
              "norm2": _norm_shape(c_out), "conv2": _conv_shape(c_out, c_out)}
    if c_in != c_out:
        shapes["conv_shortcut"] = _conv_shape(c_in, c_out, 1)
    return shapes


def _mid_block_shape(cfg: VAEConfig) -> dict:
    c = cfg.block_out_channels[-1]
    shapes = {"resnets_0": _resnet_shape(c, c)}
    if cfg.mid_block_add_attention:
        shapes["attentions_0"] = {
            "group_norm": _norm_shape(c), **{name: _dense_shape(c, c) for name in ("query", "key", "value", "proj_attn")}
        }
    shapes["resnets_1"] = _resnet_shape(c, c)
    return shapes


def vae_shapes(cfg: VAEConfig) -> dict:
    """The parameter tree's shapes: {"encoder", "decoder", "quant_conv", "post_quant_conv"}, the
    last two only where the config uses them."""
    channels, latent = cfg.block_out_channels, cfg.latent_channels

    encoder = {"conv_in": _conv_shape(cfg.in_channels, channels[0])}
    out = channels[0]
    for i in range(cfg.levels):
        c_in, out = out, channels[i]
        block = {f"resnets_{j}": _resnet_shape(c_in if j == 0 else out, out) for j in range(cfg.layers_per_block)}
        if i < cfg.levels - 1:
            block["downsamplers_0"] = {"conv": _conv_shape(out, out)}
        encoder[f"down_blocks_{i}"] = block
    encoder.update(
        mid_block=_mid_block_shape(cfg), conv_norm_out=_norm_shape(out), conv_out=_conv_shape(out, 2 * latent)
    )

    decoder = {"conv_in": _conv_shape(latent, channels[-1]), "mid_block": _mid_block_shape(cfg)}
    out = channels[-1]
    for i, ch in enumerate(reversed(channels)):
        prev, out = out, ch
        block = {f"resnets_{j}": _resnet_shape(prev if j == 0 else out, out) for j in range(cfg.layers_per_block + 1)}
        if i < cfg.levels - 1:
            block["upsamplers_0"] = {"conv": _conv_shape(out, out)}
        decoder[f"up_blocks_{i}"] = block
    decoder.update(conv_norm_out=_norm_shape(out), conv_out=_conv_shape(out, cfg.out_channels))

    shapes = {"encoder": encoder, "decoder": decoder}
    if cfg.use_quant_conv:
        shapes["quant_conv"] = _conv_shape(2 * latent, 2 * latent, 1)
    if cfg.use_post_quant_conv:
        shapes["post_quant_conv"] = _conv_shape(latent, latent, 1)
    return shapes


# ----------------------------------------------------------------------------------------------
# Blocks (NHWC)
# ----------------------------------------------------------------------------------------------


def _norm_silu(params: dict, cfg: VAEConfig, x: jax.Array) -> jax.Array:
    return jax.nn.silu(group_norm(params, x, groups=cfg.norm_num_groups, eps=EPS))


def resnet_block(params: dict, cfg: VAEConfig, x: jax.Array) -> jax.Array:
    """ResnetBlock2D without a time embedding; a 1x1 convolution on the shortcut when the width changes."""
    h = conv2d(params["conv1"], _norm_silu(params["norm1"], cfg, x))
    h = conv2d(params["conv2"], _norm_silu(params["norm2"], cfg, h))
    if "conv_shortcut" in params:
        x = conv2d(params["conv_shortcut"], x, padding=0)
    return x + h


def mid_attention(params: dict, cfg: VAEConfig, x: jax.Array) -> jax.Array:
    """The mid-block's self-attention over all positions: one head as wide as the channels, residual."""
    batch, height, width, channels = x.shape
    tokens = group_norm(params["group_norm"], x, groups=cfg.norm_num_groups, eps=EPS)
    tokens = tokens.reshape(batch, height * width, channels)
    q, k, v = (dense(params[name], tokens) for name in ("query", "key", "value"))
    out = dense(params["proj_attn"], attention(q, k, v, heads=1))
    return x + out.reshape(x.shape)


def mid_block(params: dict, cfg: VAEConfig, x: jax.Array) -> jax.Array:
    """UNetMidBlock2D: resnet, attention (unless the config leaves it out), resnet."""
    x = resnet_block(params["resnets_0"], cfg, x)
    if cfg.mid_block_add_attention:
        x = mid_attention(params["attentions_0"], cfg, x)
    return resnet_block(params["resnets_1"], cfg, x)


def downsample(params: dict, x: jax.Array) -> jax.Array:
    """The encoder's Downsample2D: zero padding on the right and bottom only, then a 3x3 stride-2
    convolution (the original LDM code's asymmetric padding, which the weights were trained with)."""
    return conv2d(params["conv"], x, stride=2, padding=((0, 1), (0, 1)))


def upsample(params: dict, x: jax.Array) -> jax.Array:
    """Upsample2D: nearest-neighbour x2, then a 3x3 convolution."""
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return conv2d(params["conv"], x.reshape(batch, 2 * height, 2 * width, channels))


def _to_nhwc(x: jax.Array, dtype: Any) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1)).astype(dtype)


def _to_nchw_float32(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# The two halves
# ----------------------------------------------------------------------------------------------


def encoder(params: dict, cfg: VAEConfig, x: jax.Array) -> jax.Array:
    """diffusers' Encoder (double_z): NHWC images -> NHWC moments, 2 * latent_channels wide."""
    x = conv2d(params["conv_in"], x)
    for i in range(cfg.levels):
        block = params[f"down_blocks_{i}"]
        for j in range(cfg.layers_per_block):
            x = resnet_block(block[f"resnets_{j}"], cfg, x)
        if i < cfg.levels - 1:
            x = downsample(block["downsamplers_0"], x)
    x = mid_block(params["mid_block"], cfg, x)
    return conv2d(params["conv_out"], _norm_silu(params["conv_norm_out"], cfg, x))


def decoder(params: dict, cfg: VAEConfig, z: jax.Array) -> jax.Array:
    """diffusers' Decoder: NHWC latents -> NHWC images, 2**(levels - 1) times larger."""
    x = conv2d(params["conv_in"], z)
    x = mid_block(params["mid_block"], cfg, x)
    for i in range(cfg.levels):
        block = params[f"up_blocks_{i}"]
        for j in range(cfg.layers_per_block + 1):
            x = resnet_block(block[f"resnets_{j}"], cfg, x)
        if i < cfg.levels - 1:
            x = upsample(block["upsamplers_0"], x)
    return conv2d(params["conv_out"], _norm_silu(params["conv_norm_out"], cfg, x))


def encode(params: dict, cfg: VAEConfig, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, in_channels, H, W] (about [-1, 1]) -> the latent distribution's (mean, logvar),
    each [B, latent_channels, h, w] in float32 (H and W halved, rounded down, levels - 1 times), logvar
    clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution. Not scaled by scaling_factor."""
    moments = encoder(params["encoder"], cfg, _to_nhwc(images, params["encoder"]["conv_in"]["kernel"].dtype))
    if cfg.use_quant_conv:
        moments = conv2d(params["quant_conv"], moments, padding=0)
    mean, logvar = jnp.split(_to_nchw_float32(moments), 2, axis=1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def decode(params: dict, cfg: VAEConfig, latents: jax.Array) -> jax.Array:
    """Latents [B, latent_channels, h, w] (already divided by scaling_factor) -> images
    [B, out_channels, h * 2**(levels - 1), w * 2**(levels - 1)] in float32, about [-1, 1], unclipped."""
    z = _to_nhwc(latents, params["decoder"]["conv_in"]["kernel"].dtype)
    if cfg.use_post_quant_conv:
        z = conv2d(params["post_quant_conv"], z, padding=0)
    return _to_nchw_float32(decoder(params["decoder"], cfg, z))
