"""The seed notebook's pipeline (diffusers 0.39's FlaxStableDiffusionPipeline) for the benches.

sdmagic no longer runs upstream's Flax code; the benches still compare against it, on the same
weights: sdmagic's parameter trees keep the names and layouts of diffusers' Flax ports, so the
upstream modules take them as they are. Needs the `reference` extra (diffusers, transformers, flax).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# Upstream's "Flax classes are deprecated" notices (some at import time): nothing to act on here.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from sdmagic.tokenizer import write_byte_level_vocabulary


def _configs_from_folder(folder: Path) -> dict:
    read = lambda part, name="config.json": json.loads((folder / part / name).read_text())  # noqa: E731
    return {"unet": read("unet"), "vae": read("vae"), "text": read("text_encoder"),
            "scheduler": read("scheduler", "scheduler_config.json"), "tokenizer": folder / "tokenizer"}


def seed_pipeline(configs: dict, tokenizer_dir: Path | None = None, dtype=None):
    """FlaxStableDiffusionPipeline (no safety checker) from config dicts (unet, vae, text, scheduler)."""
    from diffusers import FlaxAutoencoderKL, FlaxPNDMScheduler, FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel

    import jax.numpy as jnp
    dtype = dtype or jnp.float32
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    unet = FlaxUNet2DConditionModel.from_config(strip(configs["unet"]), dtype=dtype)
    vae = FlaxAutoencoderKL.from_config(strip(configs["vae"]), dtype=dtype)
    text = FlaxCLIPTextModel(CLIPTextConfig(**strip(configs["text"])), _do_init=False, dtype=dtype)
    scheduler = FlaxPNDMScheduler.from_config(strip(configs["scheduler"]))
    if tokenizer_dir is None:
        tokenizer_dir = Path(tempfile.mkdtemp(prefix="seed-tokenizer-"))
        write_byte_level_vocabulary(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return FlaxStableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None, dtype=dtype)


def seed_pipeline_for(model, dtype=None) -> object:
    """The seed's pipeline for a LoadedModel from `load_model` (a folder) or `random_model` (memory)."""
    if model.source == "memory":
        from sdmagic.tiny import _parts

        arch = model.name.removeprefix("random ")
        with tempfile.TemporaryDirectory() as folder:
            parts = _parts(arch, Path(folder))
        return seed_pipeline({"unet": parts.unet, "vae": parts.vae, "text": parts.text, "scheduler": parts.scheduler},
                             dtype=dtype)
    configs = _configs_from_folder(Path(model.source))
    return seed_pipeline(configs, configs["tokenizer"], dtype=dtype)
