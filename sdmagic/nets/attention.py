"""One attention entry point for every network; it picks the kernel by platform and shape.

- NVIDIA GPUs, half precision, head sizes cuDNN takes: `jax.nn.dot_product_attention(...,
  implementation="cudnn")`, cuDNN's fused flash attention (memory linear in tokens).
- Elsewhere plain XLA attention with the heads folded into the batch (two batched matmuls and a
  float32 softmax, as diffusers' Flax attention computes it): on the CPU it moves 40% fewer bytes
  than `jax.nn.dot_product_attention(implementation="xla")` and runs the tiny UNet 10% faster.
  It materialises the [queries, keys] score matrix per head,
  which at SD's 64x64 latents is 4096 x 4096 x heads per image: past `MAX_SCORES` elements per
  batch row the queries are processed in chunks, one after another (`lax.map`), so the scores of one
  chunk are alive at a time and memory grows linearly in tokens. The result is exact, not an
  approximation: every query still attends to every key with a full softmax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Score elements (queries x keys x heads) per batch row above which queries are chunked: 2**22
# float32 scores are 16 MiB per row. One SD 1.x UNet evaluation at 512x512 in bfloat16 then needs
# 0.19 GiB of temporaries per image, against 3.05 GiB unchunked and 0.33 GiB at 2**24
# (bench/attention_memory.py); on the CPU smaller chunks were no slower. Read when tracing, so a
# change applies to functions traced after it. SD's tiny test model (256 tokens) never chunks.
MAX_SCORES = 2**22


def _use_cudnn(q: jax.Array, head_dim: int) -> bool:
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.float16, jnp.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def query_chunk(queries: int, keys: int, heads: int, max_scores: int | None = None) -> int:
    """The largest divisor of `queries` whose scores fit in `max_scores` (default `MAX_SCORES`) per
    batch row (at least 1)."""
    max_scores = MAX_SCORES if max_scores is None else max_scores
    if queries * keys * heads <= max_scores:
        return queries
    most = max(1, max_scores // (keys * heads))
    return max(d for d in range(1, min(most, queries) + 1) if queries % d == 0)


def _fold(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, H*D] -> [B*H, T, D]."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(0, 2, 1, 3).reshape(batch * heads, tokens, -1)


def _unfold(x: jax.Array, batch: int) -> jax.Array:
    """[B*H, T, D] -> [B, T, H*D]."""
    folded, tokens, head_dim = x.shape
    heads = folded // batch
    return x.reshape(batch, heads, tokens, head_dim).transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)


def _scores_softmax_values(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, causal: bool) -> jax.Array:
    """softmax(q k^T * scale) v on folded [B*H, T, D] inputs, scores and softmax in float32."""
    # Scaled on the queries, before the matmul: the same products, but XLA:CPU's matmul fusion
    # then needs no full-size [queries, keys] constant for the scale (it materialised one per call).
    scores = jnp.einsum("bqd,bkd->bqk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
    if causal:
        q_len, k_len = scores.shape[-2:]
        allowed = jnp.tril(jnp.ones((q_len, k_len), dtype=bool), k_len - q_len)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bqk,bkd->bqd", weights, v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, heads: int, causal: bool = False,
              max_scores: int | None = None) -> jax.Array:
    """Multi-head attention over [batch, tokens, heads * head_dim] projections, scaled by
    1/sqrt(head_dim). Scores and softmax are float32 whatever the inputs' dtype, on every kernel
    (what diffusers' `upcast_attention` asks for); returns [batch, q tokens, heads * head_dim] in
    q's dtype."""
    batch, q_len, width = q.shape
    head_dim = width // heads
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    scale = 1.0 / math.sqrt(head_dim)
    if _use_cudnn(q, head_dim):
        split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, head_dim)  # noqa: E731 - BTNH
        out = jax.nn.dot_product_attention(split(q), split(k), split(v), scale=scale, is_causal=causal,
                                           implementation="cudnn")
        return out.reshape(batch, q_len, width)
    qf, kf, vf = _fold(q, heads), _fold(k, heads), _fold(v, heads)
    chunk = query_chunk(q_len, k.shape[1], heads, max_scores)
    if chunk == q_len or causal:
        return _unfold(_scores_softmax_values(qf, kf, vf, scale, causal), batch)
    chunks = qf.reshape(qf.shape[0], q_len // chunk, chunk, head_dim).transpose(1, 0, 2, 3)
    out = jax.lax.map(lambda qc: _scores_softmax_values(qc, kf, vf, scale, False), chunks)
    return _unfold(out.transpose(1, 0, 2, 3).reshape(qf.shape[0], q_len, head_dim), batch)
