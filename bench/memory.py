"""Device memory of sdmagic's compiled generate for full-size SD 1.x at 512x512 in bfloat16.

    python bench/memory.py                 # 1 and 4 images per call, 50 PNDM steps, CPU
    python bench/memory.py --batch 1 8     # other call sizes

Compiles (nothing runs, no weights are made: the arguments are abstract shapes) the exact function
`Session` compiles, on one CPU device, and prints XLA's `memory_analysis()` of each executable:
temporary buffers (activations, attention scores, ...) and arguments (weights, token ids) per image.
The last line is the figure the README quotes. `--seed` compiles the seed notebook's pipeline
(diffusers 0.39's FlaxStableDiffusionPipeline._generate, from the `reference` extra) on the same
shapes for a side-by-side ratio; `--plain-attention` measures sdmagic with attention that never
chunks its queries.

XLA's CPU backend has no bfloat16 convolution or matmul kernels: by default its scheduler converts
every bfloat16 weight to float32 up front and keeps those copies alive together (about 2.7 GB for
SD 1.x's UNet), which no accelerator does. `--cpu-scheduler memory` (the default here) turns that
scheduler off (`--xla_cpu_enable_concurrency_optimized_scheduler=false`) so the figures show what
the program itself needs; `--cpu-scheduler default` keeps XLA's defaults. Both pipelines are
measured under the same setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

GB = 1e9


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="images per call (default 1 4)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cpu-scheduler", choices=("memory", "default"), default="memory",
                        help="XLA CPU scheduling: memory (no up-front float32 weight copies) or XLA's default")
    parser.add_argument("--seed", action="store_true", help="also compile the seed notebook's pipeline")
    parser.add_argument("--plain-attention", action="store_true", help="also measure unchunked attention")
    return parser.parse_args(argv)


def sd1_parts():
    from sdmagic.tiny import _parts

    with tempfile.TemporaryDirectory() as folder:
        return _parts("sd1", Path(folder))


def abstract_model(dtype):
    """Full-size SD 1.x with ShapeDtypeStructs for weights: what compiling needs, no memory."""
    from sdmagic.models import LoadedModel, make_sampler, param_shapes

    parts = sd1_parts()
    model = parts.model()
    return LoadedModel(name="sd1 (abstract)", source="memory", model=model, params=param_shapes(model),
                       sampler=make_sampler("pndm", parts.scheduler), scheduler_config=parts.scheduler,
                       dtype=str(dtype), load_seconds=0.0)


def analysed(compiled, batch: int, seconds: float) -> dict:
    memory = compiled.memory_analysis()
    return {"batch": batch, "temp": memory.temp_size_in_bytes, "arguments": memory.argument_size_in_bytes,
            "compile": seconds}


def measure_sdmagic(model, batch: int, steps: int, size: int, dtype) -> dict:
    from sdmagic import generate as gen
    from sdmagic.devices import find_devices
    from sdmagic.weights import shape_structs

    plan = find_devices(1)
    key = gen.ShapeKey(steps=steps, height=size, width=size, batch=batch, safety=False, scheduler=model.scheduler_name,
                       dtype=str(dtype))
    arguments = gen.argument_specs(model, key, plan, shape_structs(model.params, dtype, plan.replicated))
    executable, seconds = gen.compile_generate(model, key, plan, arguments)
    return analysed(executable, batch, seconds)


def measure_seed(batch: int, steps: int, size: int, dtype) -> dict:
    """diffusers 0.39's `_generate`, jitted as its `pipeline(..., jit=True)` does per device."""
    import time

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).parent))
    from seed import seed_pipeline

    from sdmagic.models import param_shapes
    from sdmagic.weights import shape_structs

    parts = sd1_parts()
    pipe = seed_pipeline({"unet": parts.unet, "vae": parts.vae, "text": parts.text, "scheduler": parts.scheduler},
                         dtype=dtype)
    shapes = param_shapes(parts.model())
    params = {name: shape_structs(shapes[name], dtype) for name in ("unet", "vae", "text_encoder")}
    params["scheduler"] = jax.eval_shape(pipe.scheduler.create_state)
    ids = jax.ShapeDtypeStruct((batch, 77), jnp.int32)
    latents = jax.ShapeDtypeStruct((batch, 4, size // 8, size // 8), jnp.float32)

    def generate(params, ids, neg_ids, latents, guidance):
        return pipe._generate(ids, params, jax.random.PRNGKey(0), steps, size, size, guidance, latents, neg_ids)

    start = time.perf_counter()
    compiled = jax.jit(generate).lower(params, ids, ids, latents, jax.ShapeDtypeStruct((), jnp.float32)).compile()
    return analysed(compiled, batch, time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.cpu_scheduler == "memory":  # read when JAX starts its CPU backend, so set before importing it
        flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax
    import jax.numpy as jnp

    from sdmagic.nets import attention

    dtype = jnp.dtype(args.dtype)
    model = abstract_model(dtype)
    print(f"SD 1.x full size, {args.size}x{args.size}, {args.dtype}, {args.steps} PNDM steps, "
          f"{jax.devices()[0].platform} ({args.cpu_scheduler} scheduler), jax {jax.__version__}", flush=True)
    rows = {}

    def show(label, r):
        rows[(label, r["batch"])] = r
        print(f"  {label:30s} {r['batch']} image(s)/call: temp {r['temp'] / GB:6.2f} GB"
              f" ({r['temp'] / r['batch'] / GB:.2f} GB/image), arguments {r['arguments'] / GB:.2f} GB"
              f" ({r['arguments'] / r['batch'] / GB:.2f} GB/image), compiled in {r['compile']:.1f} s", flush=True)

    for batch in args.batch:
        show("sdmagic", measure_sdmagic(model, batch, args.steps, args.size, dtype))
    if args.plain_attention:
        saved = attention.MAX_SCORES
        attention.MAX_SCORES = 2**62
        try:
            for batch in args.batch:
                show("sdmagic, attention unchunked", measure_sdmagic(model, batch, args.steps, args.size, dtype))
        finally:
            attention.MAX_SCORES = saved
    if args.seed:
        for batch in args.batch:
            show("seed notebook's pipeline", measure_seed(batch, args.steps, args.size, dtype))
        for batch in args.batch:
            ratio = rows[("sdmagic", batch)]["temp"] / rows[("seed notebook's pipeline", batch)]["temp"]
            print(f"  temp memory sdmagic / seed at {batch} image(s)/call: {ratio:.2f}")
    worst = max(r["temp"] / r["batch"] for (label, _), r in rows.items() if label == "sdmagic")
    print(f"compiled temp memory per image at {args.size}x{args.size}: {worst / GB:.2f} GB")


if __name__ == "__main__":
    main()
