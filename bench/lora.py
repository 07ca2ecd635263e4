"""What a LoRA costs at setup, and what `%sd_lora FILE WEIGHT` saves against loading the model again.

    python bench/lora.py [--arch sd1] [--rank 32] [--dtype bfloat16]

Writes a random model of `--arch` in diffusers' layout (safetensors) and a kohya LoRA of `--rank`
on every attention projection of its UNet and text encoder, then, in one process, on 1 device:
- setup without the LoRA, and with it (the merge's cost at load);
- `session.set_lora(file, new weight)` (what `%sd_lora` does: only the touched layers, recomputed
  from their kept base values and sent to the device) against a second setup with the new weight
  (what changing a weight would cost without it);
- the host memory the kept base values take.
Prints each figure and the ratios; alternates the order of the two setups over `--runs`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def attention_kernels(tree: dict, prefix: tuple = ()) -> list[tuple[tuple, tuple]]:
    """(path, kernel shape) of every attention projection (q, k, v, out) in a parameter tree."""
    found = []
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            found += attention_kernels(value, path)
        elif key == "kernel" and len(value.shape) == 2 and path[-2] in (
                "to_q", "to_k", "to_v", "to_out_0", "q_proj", "k_proj", "v_proj", "out_proj"):
            found.append((path, tuple(value.shape)))
    return found


def write_kohya_lora(path: Path, params: dict, rank: int, seed: int = 0) -> int:
    """A kohya file on every attention projection; kohya's names are the Flax-port path joined by
    '_' (diffusers' module name with '.' as '_'). Returns the number of layers."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    layers = [("lora_unet_", p[1:], s) for p, s in attention_kernels({"unet": params["unet"]})]
    layers += [("lora_te_", p[1:], s) for p, s in attention_kernels({"text_encoder": params["text_encoder"]})]
    for prefix, leaf_path, (fan_in, fan_out) in layers:
        name = prefix + "_".join(leaf_path[:-1])
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, fan_in)) / np.sqrt(fan_in)).astype(np.float16)
        tensors[f"{name}.lora_up.weight"] = (rng.standard_normal((fan_out, rank)) * 0.01).astype(np.float16)
        tensors[f"{name}.alpha"] = np.asarray(rank / 2, np.float16)
    save_file(tensors, str(path))
    return len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd1")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import jax

    import sdmagic
    from sdmagic.tiny import write_random_model

    with tempfile.TemporaryDirectory() as scratch:
        folder = write_random_model(Path(scratch) / "model", args.arch)
        from sdmagic.models import load_model

        shapes = load_model(str(folder), dtype="float32").params
        lora_file = Path(scratch) / "style.safetensors"
        layers = write_kohya_lora(lora_file, shapes, args.rank)
        del shapes
        print(f"{args.arch} ({args.dtype}), a rank-{args.rank} kohya LoRA on {layers} attention layers,"
              f" {os.path.getsize(lora_file) / 1e6:.0f} MB; 1 of {jax.device_count()} device(s)")

        def timed_setup(**options):
            start = time.perf_counter()
            session = sdmagic.setup(str(folder), dtype=args.dtype, devices=1, cache=False, **options)
            return session, time.perf_counter() - start

        plain, merged, changes = [], [], []
        for run in range(args.runs):
            order = ("plain", "lora") if run % 2 == 0 else ("lora", "plain")
            for which in order:
                if which == "plain":
                    session, seconds = timed_setup()
                    plain.append(seconds)
                    session.close()
                    continue
                session, seconds = timed_setup(lora=[(lora_file, 0.8)])
                merged.append(seconds)
                for weight in (0.5, 1.0):
                    start = time.perf_counter()
                    session.set_lora(lora_file, weight)
                    jax.block_until_ready(session.params)
                    changes.append(time.perf_counter() - start)
                kept = sum(np.asarray(v).nbytes for v in session.loras.base.values())
                session.close()

        # The merge alone, on host weights as setup has them before placing: read, match, merge.
        from sdmagic.merged_loras import lora_set

        host = load_model(str(folder), dtype=args.dtype)
        merges = []
        for _ in range(args.runs):
            start = time.perf_counter()
            merged_set = lora_set([(lora_file, 0.8)], host.params, host.model)
            merged_set.merged_leaves()
            merges.append(time.perf_counter() - start)
        merge = statistics.median(merges)

        setup_plain, setup_lora, change = (statistics.median(x) for x in (plain, merged, changes))
        print(f"the merge alone (read, match, merge on the host): {merge:.2f} s")
        print(f"setup without the LoRA: {setup_plain:.2f} s   with it: {setup_lora:.2f} s"
              f"   (the merge adds {setup_lora - setup_plain:.2f} s)")
        print(f"%sd_lora weight change: {change:.2f} s   against setup again with the new weight: {setup_lora:.2f} s"
              f"   ratio {change / setup_lora:.3f}")
        print(f"host memory kept for re-merging (the touched layers' base values): {kept / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
