"""One attention entry point for every network; it picks the kernel by platform and shape.

- NVIDIA GPUs, half precision, head sizes cuDNN takes: `jax.nn.dot_product_attention(...,
  implementation="cudnn")`, cuDNN's fused flash attention (memory linear in tokens).
- Elsewhere XLA's dot-product attention. It materialises the [queries, keys] score matrix per head,
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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, heads: int, causal: bool = False,
              max_scores: int | None = None) -> jax.Array:
    """Multi-head attention over [batch, tokens, heads * head_dim] projections, scaled by
    1/sqrt(head_dim). Scores and softmax are float32 whatever the inputs' dtype, on every kernel
    (what diffusers' `upcast_attention` asks for); returns [batch, q tokens, heads * head_dim] in
    q's dtype."""
    batch, q_len, width = q.shape
    head_dim = width // heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, head_dim)  # noqa: E731 - BTNH
    qh, kh, vh = split(q), split(k), split(v.astype(q.dtype))
    kh = kh.astype(q.dtype)
    scale = 1.0 / math.sqrt(head_dim)
    if _use_cudnn(q, head_dim):
        out = jax.nn.dot_product_attention(qh, kh, vh, scale=scale, is_causal=causal, implementation="cudnn")
        return out.reshape(batch, q_len, width)
    chunk = query_chunk(q_len, k.shape[1], heads, max_scores)
    if chunk == q_len or causal:
        out = jax.nn.dot_product_attention(qh, kh, vh, scale=scale, is_causal=causal, implementation="xla")
        return out.reshape(batch, q_len, width)
    chunks = qh.reshape(batch, q_len // chunk, chunk, heads, head_dim).transpose(1, 0, 2, 3, 4)
    out = jax.lax.map(
        lambda qc: jax.nn.dot_product_attention(qc, kh, vh, scale=scale, implementation="xla"), chunks
    )
    return out.transpose(1, 0, 2, 3, 4).reshape(batch, q_len, width)
