"""Execute the demo notebook in a real Jupyter kernel and keep the executed copy with its images.

    python demo/run_demo.py            # writes demo/sdmagic_demo.executed.ipynb and demo/output/*.png
"""

import argparse
import base64
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def run(notebook: Path, executed: Path, images_dir: Path, timeout: int = 900) -> int:
    nb = nbformat.read(notebook, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
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
