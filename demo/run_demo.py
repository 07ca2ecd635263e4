"""Execute the demo notebook in a real Jupyter kernel and keep the executed copy with its images.

    python demo/run_demo.py            # writes demo/sdmagic_demo.executed.ipynb and demo/output/*.png

Each code cell is printed as it starts (its first line) and timed when it ends, so a long cell
shows where the run is.
"""

import argparse
import base64
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


class CellProgress:
    """nbclient hooks: `[3/9] %sd_setup --model tiny` when a code cell starts, its seconds when it ends."""

    def __init__(self, nb, out=sys.stdout):
        self.total = sum(1 for cell in nb.cells if cell.cell_type == "code" and cell.source.strip())
        self.done = 0
        self.started = 0.0
        self.out = out

    def on_cell_execute(self, cell, cell_index, **kwargs):
        self.done += 1
        self.started = time.perf_counter()
        first_line = cell.source.strip().splitlines()[0]
        if len(first_line) > 72:
            first_line = first_line[:71] + "…"
        print(f"[{self.done}/{self.total}] {first_line}", file=self.out, flush=True)

    def on_cell_executed(self, cell, cell_index, execute_reply=None, **kwargs):
        status = (execute_reply or {}).get("content", {}).get("status", "ok")
        note = "" if status == "ok" else f" ({status})"
        print(f"      done in {time.perf_counter() - self.started:.1f} s{note}", file=self.out, flush=True)


def run(notebook: Path, executed: Path, images_dir: Path, timeout: int = 900) -> int:
    nb = nbformat.read(notebook, as_version=4)
    start = time.perf_counter()
    progress = CellProgress(nb)
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}},
        on_cell_execute=progress.on_cell_execute, on_cell_executed=progress.on_cell_executed,
    ).execute()
    nbformat.write(nb, executed)
    images_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                count += 1
                (images_dir / f"cell{index:02d}_{count}.png").write_bytes(base64.b64decode(png))
    print(f"executed {notebook.name} in {time.perf_counter() - start:.0f} s -> {executed}; {count} images in {images_dir}")
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebook", type=Path, default=HERE / "sdmagic_demo.ipynb")
    parser.add_argument("--out", type=Path, default=HERE / "sdmagic_demo.executed.ipynb")
    parser.add_argument("--images", type=Path, default=HERE / "output")
    args = parser.parse_args()
    return 0 if run(args.notebook, args.out, args.images) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
