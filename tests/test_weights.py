"""Real-world weight layouts, loaded without torch: PyTorch-layout safetensors, single-file
checkpoints (SD 1.x and 2.x key names), pickles refused, SD 2.x v-prediction."""

import importlib.util
import json
import os
import pickle
import shutil
import time

import jax
import numpy as np
import pytest
from flax.serialization import msgpack_restore
from safetensors.numpy import save_file

import sdmagic
from sdmagic.convert import diffusers_to_ldm, flax_to_pytorch, ldm_to_diffusers, pytorch_to_flax
from sdmagic.errors import ModelLoadError, SDMagicError

from conftest import STEPS

PROMPTS = ["a red fox in the snow", "a cat knight", "a lighthouse"]
FLAX_FILES = {"diffusers": "diffusion_flax_model.msgpack", "transformers": "flax_model.msgpack"}
PT_FILES = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


def pixels(result):
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def flax_params(folder, part):
    index = json.loads((folder / "model_index.json").read_text())
    library = index[part][0] if index[part][0] in FLAX_FILES else "transformers"
    return library, msgpack_restore((folder / part / FLAX_FILES[library]).read_bytes())


def as_pytorch_layout(source, target, parts=("unet", "vae", "text_encoder", "safety_checker")):
    """A copy of a Flax-layout folder whose weights are PyTorch-layout safetensors only."""
    shutil.copytree(source, target)
    for part in parts:
        if not (source / part).is_dir():
            continue
        library, params = flax_params(source, part)
        (target / part / FLAX_FILES[library]).unlink()
        save_file(flax_to_pytorch(params, diffusers_names=library == "diffusers"), str(target / part / PT_FILES[library]))
    # PyTorch-layout repos name the PyTorch scheduler class.
    config_file = target / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["_class_name"] = config["_class_name"].removeprefix("Flax")
    config_file.write_text(json.dumps(config))
    return target


def as_single_file(source, path, family):
    """The pipeline's UNet, VAE and text encoder in one original-layout (LDM) checkpoint."""
    dicts = {}
    for part in ("unet", "vae", "text_encoder"):
        library, params = flax_params(source, part)
        dicts[part] = flax_to_pytorch(params, diffusers_names=library == "diffusers")
    unet_config = json.loads((source / "unet" / "config.json").read_text())
    vae_config = json.loads((source / "vae" / "config.json").read_text())
    checkpoint = diffusers_to_ldm(dicts["unet"], dicts["vae"], dicts["text_encoder"], unet_config, vae_config, family)
    save_file(checkpoint, str(path))
    return path, checkpoint


def test_torch_is_not_installed():
    # The point of these tests: everything below loads with numpy and safetensors only.
    assert importlib.util.find_spec("torch") is None


def test_conversion_round_trips_every_weight(tiny_dir):
    from sdmagic.models import load_model, _shapes, _modules

    modules = _modules(tiny_dir, np.float32, with_checker=True)
    for part in ("unet", "vae", "text_encoder", "safety_checker"):
        library, params = flax_params(tiny_dir, part)
        diffusers = library == "diffusers"
        back = pytorch_to_flax(flax_to_pytorch(params, diffusers_names=diffusers), _shapes(modules[part]),
                               diffusers_names=diffusers, what=part)
        flat_a, flat_b = jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(back)
        assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
        for (_, a), (_, b) in zip(flat_a, flat_b):
            np.testing.assert_array_equal(a, b)
    assert load_model  # the public loader is what the next tests use


def test_pytorch_layout_safetensors_folder_gives_the_same_images(tiny_dir, tmp_path, session8):
    folder = as_pytorch_layout(tiny_dir, tmp_path / "pt-layout")
    assert not list(folder.rglob("*.msgpack"))
    original = session8.generate(PROMPTS, seed=21, steps=STEPS)
    session = sdmagic.setup(str(folder))
    assert session.safety_checker  # the checker's safetensors were converted too
    converted = session.generate(PROMPTS, seed=21, steps=STEPS)
    session.close()
    assert np.abs(pixels(converted) - pixels(original)).max() <= 2
    assert pixels(original).std() > 10


def test_dtype_is_applied_while_reading(tiny_dir, tmp_path):
    from sdmagic.models import load_model

    folder = as_pytorch_layout(tiny_dir, tmp_path / "pt-layout")
    model = load_model(str(folder), dtype="bfloat16", safety_checker=False)
    dtypes = {str(x.dtype) for x in jax.tree_util.tree_leaves(model.params)}
    assert dtypes == {"bfloat16"}


def test_single_file_checkpoint_gives_the_same_images(tiny_dir, tmp_path, session8):
    path, checkpoint = as_single_file(tiny_dir, tmp_path / "tiny-sd1.safetensors", "sd1")
    assert any(k.startswith("model.diffusion_model.input_blocks.1.0.in_layers") for k in checkpoint)
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0") for k in checkpoint)
    original = session8.generate(PROMPTS, seed=5, steps=STEPS)
    session = sdmagic.setup(str(path), config=str(tiny_dir))
    assert not session.safety_checker  # single files carry none
    result = session.generate(PROMPTS, seed=5, steps=STEPS)
    session.close()
    assert np.abs(pixels(result) - pixels(original)).max() <= 2


def test_single_file_with_the_wrong_config_says_so(tmp_path, tiny_dir):
    from sdmagic.models import write_random_model

    sd2 = write_random_model(tmp_path / "sd2", "tiny-sd2")
    path, _ = as_single_file(tiny_dir, tmp_path / "tiny-sd1.safetensors", "sd1")
    with pytest.raises(ModelLoadError, match=r"(does not match|not this architecture|does not have).*try config"):
        sdmagic.setup(str(path), config=str(sd2))


# ------------------------------------------------------------------------------------ pickles


class Payload:
    """Unpickling this creates a marker file: proof of code running."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["folder", "single-file"])
@pytest.mark.parametrize("trust", [False, True])
def test_a_malicious_pickle_never_runs(tiny_dir, tmp_path, layout, trust):
    marker = tmp_path / "pwned"
    if layout == "folder":
        folder = as_pytorch_layout(tiny_dir, tmp_path / "model", parts=("vae", "text_encoder"))
        (folder / "unet" / "diffusion_flax_model.msgpack").unlink()
        target = folder / "unet" / "diffusion_pytorch_model.bin"
        model = str(folder)
    else:
        target = tmp_path / "model.ckpt"
        model = str(target)
    target.write_bytes(pickle.dumps({"state_dict": Payload(str(marker))}))
    with pytest.raises(ModelLoadError) as info:
        sdmagic.setup(model, safety_checker=False, trust_pickle=trust)
    message = str(info.value)
    if trust:
        # Only torch's weights_only loader may read it, and torch is not installed here.
        assert "weights_only" in message and "torch is not installed" in message
    else:
        assert "pickle" in message and "run any code" in message and "safetensors" in message
    assert "\n" not in message and not marker.exists()


# ------------------------------------------------------------------------------------ SD 2.x


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    from sdmagic.models import write_random_model

    return write_random_model(tmp_path_factory.mktemp("tiny-sd2") / "model", "tiny-sd2")


def test_sd2_v_prediction_matches_diffusers(sd2_dir):
    from diffusers import FlaxStableDiffusionPipeline
    from flax.jax_utils import replicate

    from sdmagic.generate import initial_noise

    session = sdmagic.setup(str(sd2_dir), devices=1)
    assert session.model.default_size == 48  # from the UNet's sample size, as 768 for SD 2.x
    assert session.model.scheduler.config.prediction_type == "v_prediction"
    ours = session.generate(PROMPTS[:1], seed=9, steps=STEPS)
    session.close()
    assert ours.images[0].size == (48, 48)

    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(str(sd2_dir), safety_checker=None)
    latent = (4, 48 // 2, 48 // 2)
    noise = np.asarray(initial_noise(np.array([9], np.uint32), latent))
    devices = jax.devices()[:1]
    ids = pipe.prepare_inputs(PROMPTS[:1])
    out = pipe(ids[None], replicate(params, devices), jax.random.split(jax.random.PRNGKey(0), 1), STEPS,
               latents=noise[None], jit=True).images
    reference = (np.asarray(out).reshape(1, 48, 48, 3) * 255).round().astype(np.int16)
    assert np.abs(pixels(ours) - reference).max() <= 2 and reference.std() > 10


def test_sd2_single_file_with_open_clip_keys(sd2_dir, tmp_path):
    path, checkpoint = as_single_file(sd2_dir, tmp_path / "tiny-sd2.safetensors", "sd2")
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight") for k in checkpoint)
    # SD 2.x checkpoints hold one more OpenCLIP block than the text encoder reads: it is dropped.
    extra = {k.replace("resblocks.1.", "resblocks.2."): v for k, v in checkpoint.items() if "resblocks.1." in k}
    save_file({**checkpoint, **extra}, str(path))
    flax_session = sdmagic.setup(str(sd2_dir), devices=1)
    original = flax_session.generate(PROMPTS, seed=2, steps=STEPS)
    flax_session.close()
    session = sdmagic.setup(str(path), config=str(sd2_dir), devices=1)
    result = session.generate(PROMPTS, seed=2, steps=STEPS)
    session.close()
    assert np.abs(pixels(result) - pixels(original)).max() <= 2


def test_ldm_renaming_is_one_to_one(tiny_dir):
    unet_config = json.loads((tiny_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((tiny_dir / "vae" / "config.json").read_text())
    dicts = {p: flax_to_pytorch(flax_params(tiny_dir, p)[1], diffusers_names=p != "text_encoder")
             for p in ("unet", "vae", "text_encoder")}
    ldm = diffusers_to_ldm(dicts["unet"], dicts["vae"], dicts["text_encoder"], unet_config, vae_config, "sd1")
    assert len(ldm) == sum(len(d) for d in dicts.values())  # no two weights collapsed into one name
    unet, vae, text = ldm_to_diffusers(dict(ldm), unet_config, vae_config, "sd1")
    assert unet.keys() == dicts["unet"].keys() and vae.keys() == dicts["vae"].keys()
    assert text.keys() == dicts["text_encoder"].keys()


# ------------------------------------------------------------------------------------ offline


def test_offline_unknown_id_fails_fast_and_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(SDMagicError) as info:
        sdmagic.setup("nobody-here/no-such-model-xyz")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "nobody-here/no-such-model-xyz" in message and "\n" not in message
    assert "offline" in message.lower() or "cache" in message.lower()
    assert os.environ.get("HF_TOKEN", "never-set") not in message or "HF_TOKEN" not in os.environ


def test_hub_repo_with_only_safetensors_fetches_those_and_never_pickles(monkeypatch, tmp_path, tiny_dir):
    import huggingface_hub

    from sdmagic import models

    full = as_pytorch_layout(tiny_dir, tmp_path / "repo")
    (full / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle the loader must not fetch")
    configs_only = tmp_path / "configs-only"
    shutil.copytree(full, configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    calls = []

    def snapshot_download(repo, revision=None, allow_patterns=None, ignore_patterns=None, local_files_only=False):
        calls.append((allow_patterns, ignore_patterns))
        fetched = any(p.endswith(".safetensors") for p in allow_patterns)
        return str(full if fetched else configs_only)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: str(full / name))
    monkeypatch.setattr(models, "_hub_reachable", lambda: True)
    model = models.load_model("someone/pt-only", safety_checker=False)
    assert model.params["unet"] and len(calls) == 2
    first, second = calls
    assert "*.bin" in first[1] and "*.safetensors" in first[1]  # Flax first, nothing PyTorch
    assert all(p.endswith(".safetensors") for p in second[0])  # then safetensors only, never a pickle
    assert "unet/diffusion_pytorch_model.safetensors" in second[0]


def test_a_unet_config_flax_cannot_build_is_refused(tiny_dir, tmp_path):
    folder = as_pytorch_layout(tiny_dir, tmp_path / "pt-layout")
    config_file = folder / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(class_embed_type="timestep", act_fn="silu", center_input_sample=False)  # PyTorch-only keys
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="class_embed_type='timestep'.*does not support"):
        sdmagic.setup(str(folder))
    config.pop("class_embed_type")
    config_file.write_text(json.dumps(config))
    session = sdmagic.setup(str(folder), cache=False, devices=1)  # other PyTorch-only keys are fine
    session.close()
