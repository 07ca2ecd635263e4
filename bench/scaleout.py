"""Multi-host overhead: `sdmagic run` as one process of 8 devices against two processes of 4 (JAX's
multi-controller runtime, gloo on 127.0.0.1), the same 8 simulated CPU devices in all, so that the
ratio is what running as several processes costs. The issue asks for at least 0.9.

    python bench/scaleout.py [--images 160] [--steps 5] [--size 64] [--rounds 2]

Steady-state images/s from outside the command: each configuration makes a small run (`--warm`
images) and a large one (`--images`), both from compiled code already on disk, and the rate is
(large - small) / (time large - time small): process start, joining, model load and loading the
executable cancel out, while everything per image (the calls, PNG writing, manifests, every
process finishing) counts. Configurations alternate (ABBA) so that drift hits both alike. Tiny model.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LINES = 20  # the prompt file; --n makes the image count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(processes: int, images: int, args, work: Path, name: str) -> float:
    """Seconds from starting every process of `sdmagic run` to the last one's exit."""
    devices = 8 // processes
    per_line = -(-images // PROMPT_LINES)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    prompts = work / "prompts.txt"
    port = _free_port()
    out = work / name
    procs, logs = [], []
    start = time.perf_counter()
    try:
        for i in range(processes):
            hosts = (["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
                     if processes > 1 else [])
            log = open(work / f"{name}-{i}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sdmagic", "run", str(prompts), "--out", str(out), "--model", "tiny",
                 "--steps", str(args.steps), "--height", str(args.size), "--width", str(args.size), "--seed", "1",
                 "--n", str(per_line), "--no-safety-checker", "--cache-dir", str(work / "compiled"), "--quiet", *hosts],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            ))
        for proc in procs:
            code = proc.wait(args.timeout)
            if code != 0:
                logs[procs.index(proc)].seek(0)
                raise SystemExit(f"{name}: sdmagic run exited with {code}:\n{logs[procs.index(proc)].read()[-3000:]}")
        return time.perf_counter() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for log in logs:
            log.close()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=160, help="images of the large run (default 160)")
    parser.add_argument("--warm", type=int, default=20, help="images of the small run (default 20)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (default 2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds any one run may take")
    args = parser.parse_args(argv)
    if args.images <= args.warm:
        parser.error("--images must be more than --warm")
    # --n per line rounds the counts up to whole prompt lines
    big = -(-args.images // PROMPT_LINES) * PROMPT_LINES
    small = -(-args.warm // PROMPT_LINES) * PROMPT_LINES
    names = {1: "one process x 8 devices", 2: "two processes x 4 devices"}
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="sdmagic-scaleout-") as scratch:
        work = Path(scratch)
        os.chmod(work, 0o700)
        (work / "prompts.txt").write_text("\n".join(f"a lighthouse on a cliff, study {i}" for i in range(PROMPT_LINES)) + "\n")
        for processes in (1, 2):  # compile once per configuration (kept in work/compiled)
            run_once(processes, small, args, work, f"compile-{processes}")
        count = 0
        for round_ in range(args.rounds):
            for processes in ((1, 2) if round_ % 2 == 0 else (2, 1)):
                count += 1
                t_small = run_once(processes, small, args, work, f"small-{count}")
                t_big = run_once(processes, big, args, work, f"big-{count}")
                rate = (big - small) / (t_big - t_small)
                rates[processes].append(rate)
                print(f"  {names[processes]}: {small} images in {t_small:.1f} s, {big} in {t_big:.1f} s"
                      f" -> {rate:.2f} images/s", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    ratio = two / one
    print(f"{names[1]}: {one:.2f} images/s")
    print(f"{names[2]}: {two:.2f} images/s")
    print(f"ratio (two processes / one): {ratio:.3f}  (issue 12 wants >= 0.9)"
          f"  [{args.steps} steps, {args.size}x{args.size}, {big - small} images counted per run, medians of {args.rounds}]")
    return {"one": one, "two": two, "ratio": ratio, "runs": rates}


if __name__ == "__main__":
    main()
