"""Writes demo/sdmagic_demo.ipynb (kept in git; edit here and re-run to change the notebook)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# sdmagic demo\n\n"
        "Stable Diffusion on JAX from notebook cells: the original Kaggle/Colab Flax workflow "
        "(setup, one prompt on every device, 8 different prompts, timing) in a few magics, on sdmagic's "
        "own JAX networks (the same numerics as PyTorch diffusers, any current JAX).\n\n"
        "**This notebook runs offline on `tiny`**, a built-in random miniature pipeline: it draws noise, "
        "not art, but exercises exactly the code real models use.\n\n"
        "**To use real weights**, on a TPU or GPU runtime (`pip install -U \"jax[tpu]\"` or "
        "`\"jax[cuda12]\"`), change the setup cell to\n\n"
        "```\n%sd_setup --model CompVis/stable-diffusion-v1-4\n```\n\n"
        "(bfloat16 on accelerators by default; log in with `huggingface-cli login` first if the model "
        "asks for it), and drop `--steps 25` or keep it with `--scheduler dpm`."
    ),
    new_code_cell(
        "import os\n"
        "# Simulate a TPU host's 8 devices when JAX runs on the CPU; no effect on a TPU or GPU.\n"
        "os.environ.setdefault(\"XLA_FLAGS\", \"--xla_force_host_platform_device_count=8\")\n"
        "%load_ext sdmagic\n"
        "# Defaults for every %%sd option can be set like this (see the README for the list).\n"
        "%config SDMagics.default_steps = 25"
    ),
    new_markdown_cell(
        "`--warmup` compiles the default shape now (or loads it from the compile cache, "
        "`~/.cache/sdmagic/compiled`, if an earlier session compiled it), so the first cell runs at once."
    ),
    new_code_cell("%sd_setup --model tiny --warmup"),
    new_markdown_cell("## One prompt on every device\n`--n 8` asks for 8 images of one prompt; seeds run 3, 4, ... 10."),
    new_code_cell("%%sd --seed 3 --n 8\na starfinder planet landscape, concept art, 4k"),
    new_markdown_cell(
        "## Eight different prompts, saved\nOne per line; `#` lines are comments. Same shape as before, so nothing "
        "compiles. `--save` writes each image as a PNG carrying its settings (AUTOMATIC1111's `parameters`)."
    ),
    new_code_cell(
        "%%sd --seed 42 --negative \"blurry, low quality\" --save output/saved\n"
        "# a comment line is skipped\n"
        "a cat knight in heavy armour, digital painting\n"
        "a lighthouse at dusk, oil on canvas\n"
        "an astronaut riding a horse on mars\n"
        "a bowl of ramen, studio photo\n"
        "a red fox in the snow\n"
        "a steam train crossing a viaduct\n"
        "a watercolour of a mountain lake\n"
        "a robot reading a book in a library"
    ),
    new_markdown_cell("## Compile time against inference time"),
    new_code_cell("%sd_time"),
    new_code_cell("%sd_time --runs 3"),
    new_markdown_cell(
        "## Options per line\nAfter ` -- `, a line can set its own seed, number of images, guidance, negative "
        "prompt, steps or size. Lines of another size run in their own compiled calls."
    ),
    new_code_cell(
        "%%sd --seed 7\n"
        "a red fox in the snow -- --seed 100 --n 2 --guidance 5\n"
        "a lighthouse at dusk\n"
        "a wide mountain panorama -- --width 128"
    ),
    new_markdown_cell("## History, and making a saved image again"),
    new_code_cell("%sd_history"),
    new_code_cell(
        "import glob\n"
        "saved = sorted(glob.glob(\"output/saved/*-42-*.png\"))[-1]\n"
        "print(saved)\n"
        "%sd_from_png $saved"
    ),
    new_markdown_cell(
        "## Samplers\nThe ones AUTOMATIC1111 users know, by the same names in the PNG parameters: `pndm` (PLMS), "
        "`ddim`, `lms`, `lms-karras`, `dpm` (DPM++ 2M), `dpm-karras`, `euler`, `euler-a` (Euler a). Euler a draws "
        "fresh noise every step, from each image's own seed, so its images too are the same on 1 device or 8."
    ),
    new_code_cell("%sd_setup --model tiny --scheduler euler-a"),
    new_code_cell("%%sd --seed 3 --n 4\na starfinder planet landscape, concept art, 4k"),
    new_markdown_cell(
        "## Prompts as AUTOMATIC1111 users write them\n`(word:1.3)` weighs a word more, `(word)` by 1.1, "
        "`[word]` less (`\\(` for a literal bracket). Prompts past 75 tokens are read in 75-token chunks "
        "(up to 600 tokens), each chunk count compiling once."
    ),
    new_code_cell(
        "%%sd --seed 3\n"
        "a (red:1.4) fox in the [snow]\n"
        + "a very long prompt, " * 12 + "in the style of an old master"
    ),
    new_markdown_cell(
        "## Image-to-image and inpainting\nStart from a picture: `--init` (resized to cover the size, "
        "centre-cropped), `--strength` (how much to change it: 0.75 by default; `int(steps * strength)` steps "
        "run). Add `--mask` (white = repaint) to inpaint: the rest of the picture stays exactly as it was. "
        "A new picture, mask or strength compiles nothing. Here the picture and mask are made in the notebook."
    ),
    new_code_cell(
        "import numpy as np\n"
        "from PIL import Image, ImageDraw\n\n"
        "picture = Image.new(\"RGB\", (64, 64), \"#4a7fb5\")\n"
        "ImageDraw.Draw(picture).ellipse((12, 20, 52, 60), fill=\"#d9a441\")\n"
        "picture.save(\"output/init.png\")\n"
        "mask = Image.new(\"L\", (64, 64), 0)\n"
        "ImageDraw.Draw(mask).rectangle((0, 0, 63, 24), fill=255)  # repaint the sky\n"
        "mask.save(\"output/mask.png\")\n"
        "picture.resize((128, 128))"
    ),
    new_code_cell(
        "%%sd --seed 5 --init output/init.png\n"
        "a sunset over a hill -- --strength 0.5\n"
        "a sunset over a hill -- --strength 0.9\n"
        "a stormy sky over a hill -- --mask output/mask.png --mask-blur 2"
    ),
    new_markdown_cell(
        "## LoRA\n`%sd_setup --lora FILE[:WEIGHT]` merges kohya/A1111 or diffusers/PEFT LoRA files into the "
        "weights at load; `%sd_lora FILE WEIGHT` changes a weight later without reloading the model or "
        "compiling. Here a small random LoRA for `tiny` is written first (a real one comes from Civitai or the Hub)."
    ),
    new_code_cell(
        "from safetensors.numpy import save_file\n\n"
        "rng = np.random.default_rng(0)\n"
        "key = \"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v\"\n"
        "save_file({f\"{key}.lora_down.weight\": rng.normal(0, 1, (4, 32)).astype(np.float32),\n"
        "           f\"{key}.lora_up.weight\": rng.normal(0, 1, (64, 4)).astype(np.float32),\n"
        "           f\"{key}.alpha\": np.asarray(4, np.float32)}, \"output/style.safetensors\")"
    ),
    new_code_cell("%sd_setup --model tiny --lora output/style.safetensors:0.8"),
    new_code_cell("%%sd --seed 3 --n 4\na starfinder planet landscape, concept art, 4k"),
    new_code_cell("%sd_lora output/style.safetensors 0\n%sd_lora output/style.safetensors 1.5"),
    new_code_cell("%%sd --seed 3 --n 4\na starfinder planet landscape, concept art, 4k"),
    new_markdown_cell(
        "## SDXL\n`tiny-sdxl` is SDXL's architecture in miniature: two text encoders, pooled text and size "
        "conditioning. A real one: `%sd_setup --model stabilityai/stable-diffusion-xl-base-1.0` (1024x1024)."
    ),
    new_code_cell("%sd_setup --model tiny-sdxl"),
    new_code_cell("%%sd --seed 3 --n 4\na starfinder planet landscape, concept art, 4k"),
    new_markdown_cell("## The same from plain Python"),
    new_code_cell(
        "import sdmagic\n\n"
        "session = sdmagic.setup(model=\"tiny\")\n"
        "result = session.generate([\"a red fox in the snow\", \"a cat knight\"], seed=3, steps=25)\n"
        "print(result)\n"
        "result.grid(cols=2)"
    ),
    new_code_cell("result.images[0].resize((256, 256))"),
]

notebook = new_notebook(cells=cells)
notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
path = Path(__file__).with_name("sdmagic_demo.ipynb")
nbformat.write(notebook, path)
print(f"wrote {path}")
