"""What keeping one call in flight costs: a cell of several calls with 1 and with 2 calls started
ahead of the host (sdmagic.session.MAX_CALLS_IN_FLIGHT), runs alternating.

    python bench/in_flight.py [--calls 4] [--steps 20] [--runs 5]

One call in flight lets Ctrl-C stop a cell at once and leaves no abandoned work for the next cell;
this checks that it does not slow a multi-call cell down. Tiny model on 8 simulated CPU devices.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    import sdmagic
    import sdmagic.session as session_module

    session = sdmagic.setup("tiny", safety_checker=False, cache=False)
    prompts = [f"a lighthouse at dusk, number {i}" for i in range(session.batch * args.calls)]
    default = session_module.MAX_CALLS_IN_FLIGHT

    def run(in_flight: int) -> float:
        session_module.MAX_CALLS_IN_FLIGHT = in_flight
        try:
            return session.generate(prompts, seed=1, steps=args.steps, progress=False).run_seconds
        finally:
            session_module.MAX_CALLS_IN_FLIGHT = default

    run(1)  # compile
    seconds = {1: [], 2: []}
    for _ in range(args.runs):
        for depth in (1, 2):
            seconds[depth].append(run(depth))
    one, two = statistics.median(seconds[1]), statistics.median(seconds[2])
    print(f"{len(prompts)} images in {args.calls} calls of {session.batch}, {args.steps} steps, median of {args.runs}:")
    print(f"  1 call in flight (sdmagic's default: {default}): {one:.3f} s")
    print(f"  2 calls in flight:                        {two:.3f} s")
    print(f"  ratio 1 / 2: {one / two:.3f}")
    return {"one": one, "two": two, "ratio": one / two}


if __name__ == "__main__":
    main()
