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
    # one prompt on every device, 8 prompts, per-line options, the image made again from its PNG,
    # Euler a's four images, weighted and long prompts, img2img and inpainting, LoRA at 0.8 and
    # at 1.5, tiny-sdxl
    assert [r["data"]["text/html"].count("<figcaption") for r in results] == [8, 8, 4, 1, 4, 2, 3, 4, 4, 4]
    html = "".join(r["data"]["text/html"] for r in results)
    assert "img2img 0.5" in html and "img2img 0.9" in html and "inpaint 1" in html
    assert all("image/png" in r["data"] for r in results)
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "sdmagic: 8 x cpu" in streams and "images/s" in streams and "median of 3 runs" in streams
    assert "warm-up: 8 x 64x64, 25 pndm steps" in streams and "output/saved/" in streams
    assert "model tiny (euler-a, float32" in streams
    assert "LoRA style x0.8" in streams and "LoRA: no LoRA" in streams and "LoRA: style x1.5" in streams
    assert "model tiny-sdxl (euler, float32" in streams
    # Quiet: no deprecation noise (sdmagic imports no upstream model code), no errors.
    assert "deprecated" not in streams and "IProgress" not in streams
    assert not [o for o in outputs if o.output_type == "error"]
    assert len(list(images.glob("*.png"))) >= 4


def test_generating_on_tiny_imports_no_upstream_model_code(tiny_dir):
    """sdmagic runs its own networks: diffusers, transformers, Flax and torch stay out of the process."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        import sdmagic
        session = sdmagic.setup("tiny", devices=1, cache=False)
        result = session.generate(["a red fox"], seed=1, steps=2)
        assert len(result.images) == 1
        print(sorted({name.split(".")[0] for name in sys.modules} & {"diffusers", "transformers", "flax", "torch"}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
