"""What a per-step progress bar costs: the same cell with and without the loop's host callback.

    python bench/progress.py [--steps 50] [--runs 5]

Tiny model on 8 simulated CPU devices; runs alternate with and without, and the bar is shown
(tqdm on stderr) as a user would see it.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    import sdmagic

    session = sdmagic.setup("tiny", safety_checker=False, cache=False)
    prompts = [f"a lighthouse at dusk, number {i}" for i in range(session.batch)]

    def run(step_progress: bool) -> float:
        session.step_progress = step_progress
        return session.generate(prompts, seed=0, steps=args.steps).run_seconds

    run(False), run(True)  # compile both
    plain, stepped = [], []
    for _ in range(args.runs):
        plain.append(run(False))
        stepped.append(run(True))
    steps_seen = session.steps_reported
    session.close()
    a, b = statistics.median(plain), statistics.median(stepped)
    print(f"\n{len(prompts)} x 64x64, {args.steps} steps, {args.runs} runs each (tiny, 8 x cpu)")
    print(f"without step progress: {a:.3f} s per call (median; {', '.join(f'{x:.3f}' for x in plain)})")
    print(f"with step progress:    {b:.3f} s per call (median; {', '.join(f'{x:.3f}' for x in stepped)})")
    print(f"ratio {b / a:.3f}; {steps_seen} steps reported over {args.runs + 1} runs with the bar")
    return {"plain": a, "stepped": b, "ratio": b / a}


if __name__ == "__main__":
    main()
