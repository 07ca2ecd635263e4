"""sdmagic against the original notebook's pipeline call, side by side in one process.

    python bench/speed.py            # tiny model, 8 simulated CPU devices (a few minutes on 2 cores)
    python bench/speed.py --full     # SD 1.x full size, random weights, 512x512, bfloat16: an accelerator

(a) the original Kaggle/Colab notebook: `pipeline(shard(prompt_ids), replicate(params), rng,
jit=True)`, then `numpy_to_pil` and a grid; (b) `Session.generate` on the same model, prompts,
steps and size, then its grid. Both without the safety checker (upstream's cannot run on current
JAX), on the same weights (sdmagic's trees keep the Flax ports' layout; see seed.py). Steady-state
runs alternate a, b, a, b, ... so drift hits both alike.

Then: sdmagic with DPM-Solver++ at 25 steps against PNDM at 50, and the first call after a
restart (a fresh process on a warm cache) against a cold first call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full-size SD 1.x (random weights) at 512x512 in bfloat16")
    parser.add_argument("--devices", type=int, default=None, help="use the first N devices (default: all)")
    parser.add_argument("--steps", type=int, default=50, help="PNDM steps (default 50, as in the notebook)")
    parser.add_argument("--dpm-steps", type=int, default=25, help="DPM-Solver++ steps to compare (default 25)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's, 64 tiny / 512 full)")
    parser.add_argument("--runs", type=int, default=5, help="steady-state runs of each path (default 5)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 with --full, else float32")
    parser.add_argument("--skip-restart", action="store_true", help="do not measure the first call after a restart")
    parser.add_argument("--restart-steps", type=int, nargs="*", default=None,
                        help="steps at which to measure a restart (default: --steps, and 5 for tiny, where the run"
                             " rather than the compile dominates a 50-step first call on the CPU)")
    parser.add_argument("--restart-probe", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms in a thread."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def added(self) -> int:
        return self.peak - self.start


def device_peak_bytes(devices) -> int | None:
    """Sum over devices of the runtime's peak bytes in use (GPU/TPU); None where not reported."""
    total = 0
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:
            return None
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        total += stats["peak_bytes_in_use"]
    return total


# ---------------------------------------------------------------------------------------------- models


def load(args, scheduler=None):
    from sdmagic import models

    if args.full:
        return models.random_model("sd1", dtype=args.dtype, scheduler=scheduler)
    return models.load_model("tiny", dtype=args.dtype, scheduler=scheduler, safety_checker=False)


def plain_grid(images, cols):
    """The original notebook's image_grid: paste the images into rows x cols."""
    from PIL import Image

    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", size=(cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ---------------------------------------------------------------------------------------------- restart


def restart_probe(args) -> None:
    """Run in a fresh process: set up on a cache dir and time the first call (compile + run)."""
    import jax

    from sdmagic.compile_cache import ExecutableStore, configure_jax_cache
    from sdmagic.devices import find_devices
    from sdmagic.session import Session

    cache = Path(args.restart_probe)
    plan = find_devices(args.devices)
    model = load(args)
    configure_jax_cache(cache)
    session = Session(model, plan, executable_store=ExecutableStore(cache))
    prompts = [f"restart probe {i}" for i in range(session.batch)]
    seconds, result = timed(
        lambda: session.generate(prompts, seed=0, steps=args.steps, height=args.size, width=args.size, progress=False)
    )
    print(json.dumps({
        "first_call": seconds,
        "compile": result.compile_seconds,
        "run": result.run_seconds,
        "source": result.compiled_from,
        "backend": jax.default_backend(),
    }))


def measure_restart(args, steps: int) -> dict:
    """Three fresh processes: cold cache, warm cache, and a cache whose executable file was lost."""
    cache = Path(tempfile.mkdtemp(prefix="sdmagic-bench-cache-"))
    command = [sys.executable, os.path.abspath(__file__), "--restart-probe", str(cache), "--steps", str(steps),
               "--dtype", args.dtype]
    if args.full:
        command.append("--full")
    if args.devices:
        command += ["--devices", str(args.devices)]
    if args.size:
        command += ["--size", str(args.size)]

    def probe():
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"restart probe failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    try:
        cold = probe()
        warm = probe()
        # A lost executable file is compiled again from scratch (JAX's persistent cache does not
        # serve it: an executable stored from a cache hit does not run when loaded) and stored.
        shutil.rmtree(cache / "executables")
        xla_only = probe()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"steps": steps, "cold": cold, "warm": warm, "xla_only": xla_only}


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.full else "float32")
    if args.restart_probe:
        restart_probe(args)
        return {}

    import jax
    import numpy as np
    from flax.jax_utils import replicate

    from sdmagic.compile_cache import configure_jax_cache
    from sdmagic.devices import default_per_device_batch, find_devices
    from sdmagic.models import with_scheduler
    from sdmagic.session import Session

    # Both paths compile from scratch: no cache from an earlier run may flatter either.
    configure_jax_cache(None)
    plan = find_devices(args.devices)
    devices = list(plan.devices)
    per_device = default_per_device_batch(plan)
    batch = plan.count * per_device
    model = load(args)
    sys.path.insert(0, str(Path(__file__).parent))
    from seed import seed_pipeline_for

    pipe = seed_pipeline_for(model)
    size = args.size or model.default_size
    prompts = [f"a photograph of an astronaut riding a horse, number {i}" for i in range(batch)]
    cols = min(batch, 4)
    label = "SD 1.x full size, random weights" if args.full else "tiny"
    print(f"{label}: {batch} images of {size}x{size} per call ({plan.describe()}, {per_device} per device),"
          f" {args.steps} PNDM steps, {args.dtype}; {args.runs} runs each", flush=True)

    # ---- (a) the original notebook's way
    host_params = dict(model.params, scheduler=pipe.scheduler.create_state())
    with PeakRSS() as orig_mem:
        p_params = replicate(host_params, devices)
        jax.block_until_ready(p_params)
    # shard() as in the notebook, but over the devices chosen (pmap takes the first N devices).
    prompt_ids = pipe.prepare_inputs(prompts).reshape(plan.count, per_device, -1)
    rng = jax.random.split(jax.random.PRNGKey(0), plan.count)

    def original():
        images = pipe(prompt_ids, p_params, rng, args.steps, height=size, width=size, jit=True).images
        images = images.reshape((-1,) + images.shape[-3:])
        pil = pipe.numpy_to_pil(np.asarray(images))
        return plain_grid(pil, cols)

    orig_first, _ = timed(original)
    print(f"original first call {orig_first:.1f} s", flush=True)

    # ---- (b) sdmagic
    with PeakRSS() as sd_mem:
        session = Session(replace(model), plan, per_device_batch=per_device)
    placed = session.params

    def ours():
        result = session.generate(prompts, seed=0, steps=args.steps, height=size, width=size, progress=False)
        return result, plain_grid(result.images, cols)

    sd_first, (first_result, _) = timed(ours)
    print(f"sdmagic first call {sd_first:.1f} s (compile {first_result.compile_seconds:.1f} s)", flush=True)

    orig_runs, sd_runs = [], []
    for _ in range(args.runs):
        orig_runs.append(timed(original)[0])
        sd_runs.append(timed(ours)[0])
    orig_med, sd_med = statistics.median(orig_runs), statistics.median(sd_runs)
    # Captions cost a little Pillow work per image; shown apart so the ratio compares like with like.
    caption_seconds = statistics.median(timed(lambda: first_result.grid(cols))[0] for _ in range(5))
    device_peak = device_peak_bytes(devices)
    p_params = host_params = None  # the original's copies go before the DPM session places its own

    # ---- DPM-Solver++ at fewer steps against PNDM at the notebook's 50
    session.close()
    del placed
    dpm_session = Session(with_scheduler(model, "dpm"), plan, per_device_batch=per_device)
    dpm_first = dpm_session.generate(prompts, seed=0, steps=args.dpm_steps, height=size, width=size, progress=False)
    dpm_runs = [
        dpm_session.generate(prompts, seed=0, steps=args.dpm_steps, height=size, width=size, progress=False).run_seconds
        for _ in range(args.runs)
    ]
    dpm_session.close()
    dpm_med = statistics.median(dpm_runs)

    if args.restart_steps is None:
        args.restart_steps = [args.steps] if args.full else sorted({args.steps, 5}, reverse=True)
    restart = [] if args.skip_restart else [measure_restart(args, steps) for steps in args.restart_steps]

    figures = {
        "config": label, "batch": batch, "size": size, "steps": args.steps, "dtype": args.dtype,
        "devices": plan.describe(), "runs": args.runs,
        "original": {"first_call": orig_first, "compile_estimate": orig_first - orig_med, "median": orig_med,
                     "per_image": orig_med / batch, "place_params_peak_rss": orig_mem.added, "runs": orig_runs},
        "sdmagic": {"first_call": sd_first, "compile": first_result.compile_seconds, "median": sd_med,
                    "per_image": sd_med / batch, "place_params_peak_rss": sd_mem.added, "runs": sd_runs,
                    "captioned_grid": caption_seconds},
        "ratio": sd_med / orig_med,
        "dpm": {"steps": args.dpm_steps, "compile": dpm_first.compile_seconds, "median": dpm_med,
                "per_image": dpm_med / batch},
        "device_peak_bytes": device_peak,
        "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "restart": restart,
    }
    print_table(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


def print_table(f: dict) -> None:
    mb = lambda b: f"{b / 2**20:,.0f} MB"  # noqa: E731
    o, s = f["original"], f["sdmagic"]
    rows = [
        ("", "original notebook", "sdmagic", "sdmagic / original"),
        ("first call (compile + run), s", f"{o['first_call']:.2f}", f"{s['first_call']:.2f}", f"{s['first_call'] / o['first_call']:.2f}"),
        ("  of which compile, s", f"{o['compile_estimate']:.2f} (first - median)", f"{s['compile']:.2f} (measured)", ""),
        (f"steady state per batch of {f['batch']}, s (median)", f"{o['median']:.3f}", f"{s['median']:.3f}", f"{f['ratio']:.3f}"),
        ("steady state per image, s", f"{o['per_image']:.4f}", f"{s['per_image']:.4f}", f"{f['ratio']:.3f}"),
        ("host memory added placing params (peak)", mb(o["place_params_peak_rss"]), mb(s["place_params_peak_rss"]),
         f"{s['place_params_peak_rss'] / max(1, o['place_params_peak_rss']):.2f}"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    print(f"{f['config']}: {f['batch']} x {f['size']}x{f['size']}, {f['steps']} PNDM steps, {f['dtype']}, {f['devices']}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip())
    print(f"(runs, s: original {', '.join(f'{x:.3f}' for x in o['runs'])}; sdmagic {', '.join(f'{x:.3f}' for x in s['runs'])})")
    print(f"sdmagic's captioned grid adds {s['captioned_grid'] * 1000:.1f} ms per batch over the plain grid both paths make")
    d = f["dpm"]
    print(f"\nseconds per image: PNDM {f['steps']} steps {s['per_image']:.4f}, DPM-Solver++ {d['steps']} steps"
          f" {d['per_image']:.4f} = {d['per_image'] / s['per_image']:.2f}x")
    if f["device_peak_bytes"] is not None:
        print(f"device memory peak (all devices): {mb(f['device_peak_bytes'])}")
    print(f"process peak RSS: {mb(f['process_peak_rss'])}")
    for r in f["restart"]:
        cold, warm, xla = r["cold"], r["warm"], r["xla_only"]
        print(f"\nfirst call after a restart (a fresh process), {r['steps']} steps, {f['batch']} images:")
        print(f"  cold cache                     {cold['first_call']:6.2f} s = compile {cold['compile']:.2f} + run {cold['run']:.2f}")
        print(f"  warm cache (saved executable)  {warm['first_call']:6.2f} s = load {warm['compile']:.2f} + run {warm['run']:.2f}"
              f"  -> {warm['first_call'] / cold['first_call']:.0%} of cold; compile part {warm['compile'] / cold['compile']:.0%}")
        print(f"  executable file lost           {xla['first_call']:6.2f} s = compile {xla['compile']:.2f} + run {xla['run']:.2f}"
              f"  -> {xla['first_call'] / cold['first_call']:.0%} of cold; compile part {xla['compile'] / cold['compile']:.0%}")


if __name__ == "__main__":
    main()
