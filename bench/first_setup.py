"""The first `sdmagic.setup("tiny")` (the model is built) against a cached one, in fresh processes.

    python bench/first_setup.py [--runs 5] [--random-sd1]

Each run is a new Python process on 8 simulated CPU devices, as a new notebook kernel would be:
"first" on an empty SDMAGIC_HOME, "cached" on one that already holds the tiny model; runs
alternate first, cached, first, ... so drift hits both alike. Importing sdmagic (and JAX) is timed
apart and is the same for both. All runs share one warmed compile cache, so the only difference
between the two is building the model. `--random-sd1` also times building the full-size SD 1.x
random model in memory (what `bench/speed.py --full` starts with).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY_LINE = "building the built-in tiny model"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--random-sd1", action="store_true", help="also time random_model('sd1') in memory (bfloat16)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--probe", choices=["setup", "sd1"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def probe(kind: str) -> None:
    """In a fresh process: time the imports, then setup('tiny') or random_model('sd1')."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    start = time.perf_counter()
    import sdmagic
    import sdmagic.models
    import sdmagic.session  # noqa: F401 - what setup imports, timed here rather than in setup

    imported = time.perf_counter()
    if kind == "setup":
        session = sdmagic.setup("tiny")
        figures = {"setup": time.perf_counter() - imported}
        session.close()
    else:
        import jax

        model = sdmagic.models.random_model("sd1", dtype="bfloat16")
        figures = {"build": time.perf_counter() - imported,
                   "parameters": sum(x.size for x in jax.tree_util.tree_leaves(model.params))}
    print(json.dumps({"import": imported - start, **figures}))


def run_probe(kind: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", kind],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} probe failed:\n{out.stderr[-3000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["status_line"] = TINY_LINE in out.stderr
    return figures


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s median ({', '.join(f'{v:.2f}' for v in values)})"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probe:
        probe(args.probe)
        return {}
    work = Path(tempfile.mkdtemp(prefix="sdmagic-bench-first-"))
    try:
        env = {**os.environ, "SDMAGIC_CACHE_DIR": str(work / "compiled")}
        cached_home = work / "cached-home"
        run_probe("setup", {**env, "SDMAGIC_HOME": str(cached_home)})  # builds the model, warms the caches
        first, cached, imports, lines = [], [], [], {"first": 0, "cached": 0}
        for i in range(args.runs):
            for kind, home in (("first", work / f"empty-home-{i}"), ("cached", cached_home)):
                figures = run_probe("setup", {**env, "SDMAGIC_HOME": str(home)})
                (first if kind == "first" else cached).append(figures["setup"])
                imports.append(figures["import"])
                lines[kind] += figures["status_line"]
        results = {"first": statistics.median(first), "cached": statistics.median(cached),
                   "ratio": statistics.median(first) / statistics.median(cached), "import": statistics.median(imports),
                   "runs": {"first": first, "cached": cached, "import": imports}, "status_lines": lines}
        print(f"\nsdmagic.setup('tiny') in a fresh process, 8 x cpu, {args.runs} runs each (alternating)")
        print(f"first (empty SDMAGIC_HOME): {summary(first)}")
        print(f"cached:                     {summary(cached)}")
        print(f"ratio first / cached: {results['ratio']:.2f}")
        print(f"import sdmagic + JAX (not included above): {summary(imports)}")
        print(f"status line printed: {lines['first']} of {args.runs} first runs,"
              f" {lines['cached']} of {args.runs} cached")
        if args.random_sd1:
            figures = run_probe("sd1", env)
            results["random_sd1"] = figures
            print(f"random_model('sd1', bfloat16): {figures['build']:.1f} s"
                  f" for {figures['parameters'] / 1e9:.2f} B parameters")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
