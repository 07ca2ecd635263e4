"""The built-in random models: built with numpy in a fraction of a second, loadable, deterministic."""

import json
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

import sdmagic
from conftest import STEPS
from sdmagic import tiny
from sdmagic.convert import TensorRef, plan_pytorch_to_flax
from sdmagic.nets import clip, safety, unet, vae
from sdmagic.weights import shape_structs

WEIGHT_FILES = [
    "safety_checker/model.safetensors", "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_state_dict_fills_the_tree(module, shapes: dict, *, diffusers_names: bool) -> None:
    """The PyTorch module's state dict (names and shapes; a meta-device module holds no values)
    fills `shapes` one to one, through the same conversion plan a load uses."""
    state = {key: TensorRef(key, tuple(value.shape), "F32") for key, value in module.state_dict().items()}
    plan = plan_pytorch_to_flax(dict(state), shape_structs(shapes), diffusers_names=diffusers_names,
                                what=type(module).__name__)  # raises on a missing, extra or misshapen weight
    assert len(plan.steps) == len(state) == len(tiny._flatten(shapes))


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
    for name in WEIGHT_FILES:
        assert files(other)[name] != files(built)[name]
    assert files(other)["unet/config.json"] == files(built)["unet/config.json"]


def test_the_build_traces_nothing_and_compiles_nothing(tmp_path, monkeypatch, compiles):
    def refuse(*args, **kwargs):
        raise AssertionError("the tiny model's build traced a function for its shapes")

    # Shapes come from the configs' arithmetic, values from numpy: no module is traced or run.
    monkeypatch.setattr(jax, "eval_shape", refuse)
    with compiles:
        tiny.write_tiny_model(tmp_path / "model")
    assert compiles.count == 0
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 1_000_000


def test_the_folder_is_what_pytorch_diffusers_and_transformers_load(built):
    """diffusers' PyTorch layout with safetensors, as model repos publish it: PyTorch's own classes
    load every component with no weight missing, extra or misshapen."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    index = json.loads((built / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    weights = [str(p.relative_to(built)) for p in sorted(built.rglob("*")) if p.is_file()
               and p.suffix in (".safetensors", ".msgpack", ".bin", ".ckpt", ".pt", ".pth")]
    assert weights == WEIGHT_FILES
    for part, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL),
                      ("text_encoder", transformers.CLIPTextModel), ("safety_checker", StableDiffusionSafetyChecker)):
        _, info = cls.from_pretrained(str(built / part), output_loading_info=True)
        problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        assert not any(problems.values()), (part, problems)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(built))
    assert isinstance(pipe.scheduler, diffusers.PNDMScheduler)
    assert isinstance(pipe.tokenizer, transformers.CLIPTokenizer)
    assert isinstance(pipe.feature_extractor, transformers.CLIPImageProcessor)
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker)
    assert bool((pipe.safety_checker.concept_embeds_weights == 2.0).all())  # read, not initialised


@pytest.mark.parametrize("arch", ["tiny", "tiny-sd2", "sd1"])
def test_shapes_from_the_configs_equal_the_pytorch_modules(arch):
    """The nets' shape trees against the PyTorch classes built from the same config files
    (sd1: what the bench builds). On the meta device: no memory, nothing initialised."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    with tempfile.TemporaryDirectory() as folder:
        parts = tiny._parts(arch, Path(folder))
    with torch.device("meta"):
        torch_unet = diffusers.UNet2DConditionModel.from_config(parts.unet)
        torch_vae = diffusers.AutoencoderKL.from_config(parts.vae)
        torch_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**parts.text))
    model = parts.model()
    assert_state_dict_fills_the_tree(torch_unet, unet.unet_shapes(model.unet), diffusers_names=True)
    assert_state_dict_fills_the_tree(torch_vae, vae.vae_shapes(model.vae), diffusers_names=True)
    assert_state_dict_fills_the_tree(torch_text, clip.text_shapes(model.text), diffusers_names=False)


def test_safety_checker_shapes_equal_the_pytorch_module(built):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    config = json.loads((built / "safety_checker" / "config.json").read_text())
    with torch.device("meta"):
        checker = StableDiffusionSafetyChecker(transformers.CLIPConfig(**config))
    shapes = safety.safety_shapes(safety.SafetyConfig.from_dict(config))
    assert_state_dict_fills_the_tree(checker, shapes, diffusers_names=False)


def test_random_model_in_memory_traces_and_compiles_nothing(monkeypatch, compiles):
    def refuse(*args, **kwargs):
        raise AssertionError("random_model traced a function for its shapes")

    monkeypatch.setattr(jax, "eval_shape", refuse)
    with compiles:
        model = tiny.random_model("tiny", dtype="bfloat16", seed=2)
    assert compiles.count == 0
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(model.params)} == {"bfloat16"}
    assert model.source == "memory" and not model.has_safety_checker
    shapes = {"unet": unet.unet_shapes(model.model.unet), "vae": vae.vae_shapes(model.model.vae),
              "text_encoder": clip.text_shapes(model.model.text)}
    assert jax.tree_util.tree_map(lambda x: tuple(x.shape), model.params) == shapes


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
