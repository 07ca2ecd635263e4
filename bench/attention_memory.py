"""Temporary memory of one SD 1.x UNet evaluation: plain XLA attention against the query-chunked default.

One 512x512 image (64x64 latents) with classifier-free guidance is a batch of 2 rows. Everything is
compiled for the CPU from abstract shapes (`jax.ShapeDtypeStruct`), so no weights are built or read
and nothing runs: the numbers are XLA's own buffer assignment (`compiled.memory_analysis()`).
Weights and inputs are arguments, not temporaries, so `temp` is what attention and the activations
cost on top of the model.

XLA's CPU backend has no bfloat16 convolution or matmul kernels: it computes them in float32, and
its default scheduler, which favours concurrency, converts every weight up front, so 2.7 GiB of
float32 weight copies would be counted that no accelerator makes. This bench therefore compiles
with the CPU's memory-minimising scheduler, as accelerators schedule;
`--cpu-default-scheduler` keeps XLA's default to show the difference.

    .venv/bin/python bench/attention_memory.py [--size 512] [--batch 2] [--dtype bfloat16 float32]
                                               [--max-scores 2**24 ...] [--cpu-default-scheduler]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_PARSER = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_PARSER.add_argument("--size", type=int, default=512, help="image side in pixels (latents are 1/8)")
_PARSER.add_argument("--batch", type=int, default=2, help="UNet rows (2 = one image with guidance)")
_PARSER.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=("bfloat16", "float32"))
_PARSER.add_argument("--max-scores", nargs="*", default=[], type=lambda s: int(eval(s, {})),  # noqa: S307 - "2**24"
                     help="MAX_SCORES values to try besides plain attention and the default")
_PARSER.add_argument("--cpu-default-scheduler", action="store_true",
                     help="keep XLA's concurrency-favouring CPU scheduler (counts float32 weight copies)")

if __name__ == "__main__":
    ARGS = _PARSER.parse_args()
    # Both must be set before JAX starts.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if not ARGS.cpu_default_scheduler:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
        ).strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sdmagic.nets import attention  # noqa: E402
from sdmagic.nets.unet import UNetConfig, apply_unet, unet_shapes  # noqa: E402
from sdmagic.tiny import RANDOM_ARCHITECTURES  # noqa: E402

PLAIN = 2**62  # never chunk: XLA's dot-product attention over every query at once
GIB = 2**30


def compile_unet(cfg: UNetConfig, *, size: int, batch: int, max_scores: int, dtype: jnp.dtype) -> tuple[object, float]:
    """One UNet evaluation compiled for the CPU on abstract weights of `dtype`; (executable, seconds)."""
    params = jax.tree_util.tree_map(
        lambda shape: jax.ShapeDtypeStruct(shape, dtype), unet_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)
    )
    latents = jax.ShapeDtypeStruct((batch, cfg.in_channels, size // 8, size // 8), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((batch,), jnp.float32)
    context = jax.ShapeDtypeStruct((batch, 77, cfg.cross_attention_dim[0]), dtype)
    saved, attention.MAX_SCORES = attention.MAX_SCORES, max_scores  # read while tracing
    try:
        start = time.perf_counter()
        # A fresh function each time: jit's trace cache would otherwise hand back the first trace.
        unet = jax.jit(lambda p, x, t, c: apply_unet(p, cfg, x, t, c))
        compiled = unet.lower(params, latents, timesteps, context).compile()
        return compiled, time.perf_counter() - start
    finally:
        attention.MAX_SCORES = saved


def _power(n: int) -> str:
    return f"2**{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def main(args: argparse.Namespace) -> None:
    cfg = UNetConfig.from_dict(RANDOM_ARCHITECTURES["sd1"]["unet"])
    images = args.batch / 2
    scheduler = "XLA's default (concurrency)" if args.cpu_default_scheduler else "memory-minimising"
    print(f"SD 1.x UNet, {args.size}x{args.size} ({args.size // 8}x{args.size // 8} latents), batch {args.batch}"
          f" ({images:g} image(s) with guidance); CPU, {scheduler} scheduler; jax {jax.__version__}")
    default = attention.MAX_SCORES
    runs = [("plain XLA attention", PLAIN), (f"chunked, default MAX_SCORES={_power(default)}", default)]
    runs += [(f"chunked, MAX_SCORES={_power(m)}", m) for m in args.max_scores]
    for dtype in args.dtype:
        for label, max_scores in runs:
            compiled, seconds = compile_unet(cfg, size=args.size, batch=args.batch, max_scores=max_scores,
                                             dtype=jnp.dtype(dtype))
            memory = compiled.memory_analysis()
            temp = memory.temp_size_in_bytes
            print(f"{dtype:8s} {label:38s} temp {temp / GIB:6.3f} GiB ({temp / images / GIB:.3f} GiB per image),"
                  f" weights {memory.argument_size_in_bytes / GIB:.2f} GiB, compile {seconds:5.1f} s")


if __name__ == "__main__":
    main(ARGS)
