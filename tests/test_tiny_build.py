"""The built-in random models: built with numpy in a fraction of a second, loadable, deterministic."""

import json
import tempfile
from pathlib import Path

import flax.linen
import jax
import numpy as np
import pytest

import sdmagic
from conftest import STEPS
from sdmagic import models, tiny


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def traced_shapes(module) -> dict:
    """What the module's own init would create, traced (jax.eval_shape): nothing runs."""
    return {
        "/".join(str(k.key) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(models._shapes(module))[0]
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny model as a first use writes it: through the cache and its staging folder."""
    return tiny.ensure_tiny_model(tmp_path_factory.mktemp("sdmagic-home"))


def test_the_built_model_loads_draws_and_its_checker_flags_nothing(built):
    assert built.name == f"tiny-v{tiny.TINY_VERSION}" and [p.name for p in built.parent.iterdir()] == [built.name]
    session = sdmagic.setup(str(built), devices=1)
    try:
        assert session.safety_checker
        weights = session.params["safety_checker"]
        assert np.all(np.asarray(weights["concept_embeds_weights"]) == 2.0)
        result = session.generate(["a red fox in the snow", "a lighthouse at dusk"], seed=3, steps=STEPS)
    finally:
        session.close()
    images = np.stack([np.asarray(image, dtype=np.float32) for image in result.images])
    assert images.shape == (2, 64, 64, 3)
    assert result.nsfw == [False, False]
    # Not flat, not saturated, and the prompt matters: the text encoder's values reach the image.
    assert all(image.std() > 10 for image in images)
    assert np.abs(images[0] - images[1]).mean() > 1


def test_two_builds_are_byte_identical_and_the_seed_matters(built, tmp_path):
    again = tiny.write_tiny_model(tmp_path / "again")
    assert files(again) == files(built)
    other = tiny.write_tiny_model(tmp_path / "other", seed=1)
    unet = "unet/diffusion_flax_model.msgpack"
    assert files(other)[unet] != files(built)[unet]
    assert files(other)["unet/config.json"] == files(built)["unet/config.json"]


def test_the_build_initialises_no_module_and_compiles_nothing(tmp_path, monkeypatch, compiles):
    def refuse(*args, **kwargs):
        raise AssertionError("the tiny model's build initialised a Flax module")

    for name in ("init", "init_with_output"):
        monkeypatch.setattr(flax.linen.Module, name, refuse)
    monkeypatch.setattr(jax, "eval_shape", refuse)
    with compiles:
        tiny.write_tiny_model(tmp_path / "model")
    assert compiles.count == 0
    assert (tmp_path / "model" / "unet" / "diffusion_flax_model.msgpack").stat().st_size > 1_000_000


def test_the_folder_is_diffusers_flax_layout(built):
    index = json.loads((built / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "FlaxStableDiffusionSafetyChecker"]
    assert index["unet"] == ["diffusers", "FlaxUNet2DConditionModel"]
    for part in ("feature_extractor", "tokenizer", "scheduler"):
        assert (built / part).is_dir()
    checker_config = json.loads((built / "safety_checker" / "config.json").read_text())
    assert checker_config["architectures"] == ["StableDiffusionSafetyChecker"]


@pytest.mark.parametrize("arch", ["tiny", "tiny-sd2", "sd1"])
def test_shapes_from_the_configs_equal_the_modules(arch):
    """The shapes derived from the configs against the modules' own (sd1: what the bench builds)."""
    with tempfile.TemporaryDirectory() as folder:
        parts = tiny._parts(arch, Path(folder), np.float32)
    text = models.FlaxCLIPTextModel(parts.text_config, _do_init=False)
    assert tiny._flatten(tiny.unet_shapes(dict(parts.unet.config))) == traced_shapes(parts.unet)
    assert tiny._flatten(tiny.vae_shapes(dict(parts.vae.config))) == traced_shapes(parts.vae)
    assert tiny._flatten(tiny.clip_text_shapes(parts.text_config)) == traced_shapes(text)


def test_safety_checker_shapes_equal_the_module(built):
    config = models.CLIPConfig.from_pretrained(str(built / "safety_checker"))
    checker = models.SafetyChecker(config, _do_init=False)
    assert tiny._flatten(tiny.safety_checker_shapes(config)) == traced_shapes(checker)


def test_random_model_in_memory_initialises_no_unet_or_vae(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("random_model initialised a module")

    for cls in (models.FlaxUNet2DConditionModel, models.FlaxAutoencoderKL):
        monkeypatch.setattr(cls, "init_weights", refuse)
    model = tiny.random_model("tiny", dtype="bfloat16", seed=2)
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(model.params)} == {"bfloat16"}
    assert model.source == "memory" and not model.has_safety_checker


def test_the_status_line_only_when_the_build_is_slow(tmp_path, monkeypatch, capsys):
    line = "sdmagic: building the built-in tiny model"
    monkeypatch.setattr(tiny, "SLOW_BUILD_SECONDS", 60.0, raising=False)
    tiny.ensure_tiny_model(tmp_path / "fast")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""

    monkeypatch.setattr(tiny, "SLOW_BUILD_SECONDS", 0.0, raising=False)  # every build counts as slow
    folder = tiny.ensure_tiny_model(tmp_path / "slow")
    captured = capsys.readouterr()
    assert captured.err.count(line) == 1 and "\n" == captured.err[-1] and captured.out == ""
    assert tiny.ensure_tiny_model(tmp_path / "slow") == folder  # cached: nothing to say
    assert capsys.readouterr().err == ""
    assert [p.name for p in (tmp_path / "slow").iterdir()] == [folder.name]  # no staging left behind
