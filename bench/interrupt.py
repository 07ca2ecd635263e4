"""Ctrl-C in a real Jupyter kernel: how soon an interrupted %%sd cell stops, and how long the next
cell waits for work the interrupted one left on the devices.

    python bench/interrupt.py [--steps 30] [--calls 6] [--after 1.0]

Starts an IPython kernel (tiny model, 8 simulated CPU devices), times one call, then interrupts a
cell of `--calls` calls `--after` seconds in, as the notebook's stop button does (SIGINT).
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--after", type=float, default=1.0)
    args = parser.parse_args(argv)

    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    manager, client = start_new_kernel(kernel_name="python3", env=env)

    def wait_idle(msg_id: str) -> list[str]:
        printed = []
        while True:
            message = client.get_iopub_msg(timeout=600)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                printed.append(message["content"]["text"])
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                return printed

    def run(code: str) -> float:
        start = time.perf_counter()
        wait_idle(client.execute(code))
        return time.perf_counter() - start

    cell = f"%%sd --seed 1 --steps {args.steps}\n" + "a lighthouse at dusk\n" * 8
    try:
        run("%load_ext sdmagic\n%sd_setup --model tiny --no-cache")
        run(cell)  # compiles
        one_call = run(cell)
        # Inside the kernel, the moment the KeyboardInterrupt reaches the cell (IPython's
        # traceback rendering, which follows it, is not sdmagic's and is left out).
        many = "a lighthouse at dusk\\n" * (8 * args.calls)
        code = (
            "import time\n_t = time.perf_counter()\ntry:\n"
            f"    get_ipython().run_cell_magic('sd', '--seed 1 --steps {args.steps}', '{many}')\n"
            "except KeyboardInterrupt:\n    print(f'caught {time.perf_counter() - _t:.3f}')\n"
        )
        msg_id = client.execute(code)
        time.sleep(args.after)
        manager.interrupt_kernel()
        printed = "".join(wait_idle(msg_id))
        caught = float(printed.split("caught ")[1].split()[0])
        next_cell = run(f"%%sd --seed 2 --steps {args.steps}\na red fox\n")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    print(f"one call ({args.steps} steps, 8 images): {one_call:.2f} s")
    print(f"interrupt sent {args.after:.2f} s into a {args.calls}-call cell; KeyboardInterrupt at {caught:.2f} s"
          f" ({caught - args.after:+.2f} s)")
    print(f"next cell (one call): {next_cell:.2f} s = {next_cell / one_call:.2f} calls")
    return {"one_call": one_call, "caught": caught, "next_cell": next_cell}


if __name__ == "__main__":
    main()
