"""The few building blocks every network here shares, as PyTorch computes them.

Activations are NHWC (images) or [batch, tokens, channels] (sequences). Weights may be bfloat16:
normalisation statistics are always taken in float32 and the result cast back to the input's dtype,
as PyTorch's autocast and diffusers' fp16 pipelines effectively do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense(params: dict, x: jax.Array) -> jax.Array:
    """x @ kernel (+ bias); kernel [in, out]."""
    y = jnp.matmul(x, params["kernel"].astype(x.dtype))
    if "bias" in params:
        y = y + params["bias"].astype(x.dtype)
    return y


def conv2d(params: dict, x: jax.Array, *, stride: int = 1, padding: int | tuple = 1) -> jax.Array:
    """NHWC convolution with an HWIO kernel; `padding` as PyTorch's (symmetric, per side) or
    ((top, bottom), (left, right))."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    y = jax.lax.conv_general_dilated(
        x, params["kernel"].astype(x.dtype), window_strides=(stride, stride), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if "bias" in params:
        y = y + params["bias"].astype(x.dtype)
    return y


def group_norm(params: dict, x: jax.Array, *, groups: int, eps: float) -> jax.Array:
    """torch.nn.GroupNorm over NHWC (or [B, T, C]): statistics per sample and group, in float32.

    One pass over x for both statistics (E[x^2] - E[x]^2, as Flax's norms): the activations are
    read once instead of twice, which measurably speeds up the UNet on the CPU; in float32 the
    result equals PyTorch's to ~1e-6 on SD's activations (the reference tests check it)."""
    shape = x.shape
    xf = x.astype(jnp.float32).reshape(shape[0], -1, groups, shape[-1] // groups)
    mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(xf), axis=(1, 3), keepdims=True) - jnp.square(mean), 0.0)
    xf = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(shape)
    y = xf * params["scale"].astype(jnp.float32) + params["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def layer_norm(params: dict, x: jax.Array, *, eps: float) -> jax.Array:
    """torch.nn.LayerNorm over the last axis, statistics in float32 (one pass, as group_norm)."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * params["scale"].astype(jnp.float32) + params["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's default GELU: exact (erf), not the tanh approximation Flax defaults to."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's x * sigmoid(1.702 x) (transformers' "quick_gelu")."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# transformers' ACT2FN names -> functions (the ones CLIP configs use).
ACTIVATIONS = {
    "gelu": gelu,
    "quick_gelu": quick_gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}
