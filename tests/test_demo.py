"""The demo notebook, executed top to bottom in a real Jupyter kernel (nbclient), offline on tiny."""

import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def test_demo_notebook_runs_and_shows_images(tmp_path):
    executed = tmp_path / "executed.ipynb"
    images = tmp_path / "images"
    subprocess.run(
        [sys.executable, str(ROOT / "demo" / "run_demo.py"), "--out", str(executed), "--images", str(images)],
        check=True,
        timeout=900,
    )
    nb = nbformat.read(executed, as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    results = [o for o in outputs if "<GenerationResult" in o.get("data", {}).get("text/plain", "")]
    # one prompt on every device, 8 prompts, per-line options, the image made again from its PNG
    assert [r["data"]["text/html"].count("<figcaption") for r in results] == [8, 8, 4, 1]
    assert all("image/png" in r["data"] for r in results)
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "sdmagic: 8 x cpu" in streams and "images/s" in streams and "median of 3 runs" in streams
    assert "warm-up: 8 x 64x64, 25 pndm steps" in streams and "output/saved/" in streams
    # Quiet: none of the frozen upstream's deprecation noise, no errors.
    assert "deprecated" not in streams and "IProgress" not in streams
    assert not [o for o in outputs if o.output_type == "error"]
    assert len(list(images.glob("*.png"))) >= 4


def test_quiet_drops_only_the_upstream_noise():
    import logging

    import sdmagic.models  # noqa: F401  (installs the filters)
    from sdmagic.quiet import silence_upstream_noise

    seen = []
    catcher = logging.Handler()
    catcher.emit = lambda record: seen.append(record.getMessage())
    library = logging.getLogger("diffusers")  # diffusers does not propagate to the root logger
    library.addHandler(catcher)
    try:
        logger = logging.getLogger("diffusers.models.some_new_module")
        silence_upstream_noise()
        logger.warning("Flax classes are deprecated and will be removed in Diffusers v0.40.0.")
        logger.warning("a real problem with the weights")
    finally:
        library.removeHandler(catcher)
    assert seen == ["a real problem with the weights"]
