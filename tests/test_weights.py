"""Real-world weight layouts: PyTorch-layout safetensors (native), diffusers' Flax msgpack, single-file
checkpoints (SD 1.x and 2.x key names), pickles refused (and never run), Hub downloads that fetch
no pickle; none of it needs torch."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sdmagic
from sdmagic.convert import diffusers_to_ldm, flax_to_pytorch, ldm_to_diffusers, pytorch_to_flax
from sdmagic.errors import ModelLoadError, SDMagicError
from sdmagic.models import load_model, write_random_model
from sdmagic.nets import clip, safety, unet, vae
from sdmagic.weights import msgpack_serialize, shape_structs

from conftest import STEPS

PROMPTS = ["a red fox in the snow", "a cat knight", "a lighthouse"]
WEIGHTED = ("unet", "vae", "text_encoder", "safety_checker")
PT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
            "text_encoder": "model.safetensors", "safety_checker": "model.safetensors"}
FLAX_FILES = {"unet": "diffusion_flax_model.msgpack", "vae": "diffusion_flax_model.msgpack",
              "text_encoder": "flax_model.msgpack", "safety_checker": "flax_model.msgpack"}
# diffusers' Flax modules name list items `down_blocks_0`; transformers' keep `layers/0`.
DIFFUSERS_NAMES = {"unet": True, "vae": True, "text_encoder": False, "safety_checker": False}
SHAPES = {
    "unet": lambda config: unet.unet_shapes(unet.UNetConfig.from_dict(config)),
    "vae": lambda config: vae.vae_shapes(vae.VAEConfig.from_dict(config)),
    "text_encoder": lambda config: clip.text_shapes(clip.TextConfig.from_dict(config)),
    "safety_checker": lambda config: safety.safety_shapes(safety.SafetyConfig.from_dict(config)),
}


def pixels(result):
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def state_dict(folder, part):
    """A component's PyTorch-layout weights, as the folder's safetensors file holds them."""
    return load_file(str(folder / part / PT_FILES[part]))


def shapes(folder, part):
    return SHAPES[part](json.loads((folder / part / "config.json").read_text()))


def flax_tree(folder, part):
    """A component's weights in diffusers'/transformers' Flax layout (what their msgpack files hold)."""
    return pytorch_to_flax(state_dict(folder, part), shape_structs(shapes(folder, part)),
                           diffusers_names=DIFFUSERS_NAMES[part], what=part)


def leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def assert_same_weights(a, b):
    assert [path for path, _ in leaves(a)] == [path for path, _ in leaves(b)]
    for (_, x), (_, y) in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def as_flax_layout(source, target):
    """A copy of a PyTorch-layout folder as diffusers' Flax repos had it: msgpack weights only,
    Flax class names in model_index.json and the scheduler config."""
    shutil.copytree(source, target)
    index = json.loads((source / "model_index.json").read_text())
    for part in WEIGHTED:
        if not (source / part).is_dir():
            continue
        (target / part / FLAX_FILES[part]).write_bytes(msgpack_serialize(flax_tree(source, part)))
        (target / part / PT_FILES[part]).unlink()
        index[part] = [index[part][0], "Flax" + index[part][1]]
    index["scheduler"] = [index["scheduler"][0], "Flax" + index["scheduler"][1]]
    (target / "model_index.json").write_text(json.dumps(index))
    config_file = target / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["_class_name"] = "Flax" + config["_class_name"]
    config_file.write_text(json.dumps(config))
    return target


def as_single_file(source, path, family):
    """The pipeline's UNet, VAE and text encoder in one original-layout (LDM) checkpoint."""
    dicts = {part: state_dict(source, part) for part in ("unet", "vae", "text_encoder")}
    unet_config = json.loads((source / "unet" / "config.json").read_text())
    vae_config = json.loads((source / "vae" / "config.json").read_text())
    checkpoint = diffusers_to_ldm(dicts["unet"], dicts["vae"], dicts["text_encoder"], unet_config, vae_config, family)
    save_file(checkpoint, str(path))
    return path, checkpoint


@pytest.fixture(scope="module")
def flax_dir(tiny_dir, tmp_path_factory):
    return as_flax_layout(tiny_dir, tmp_path_factory.mktemp("flax-layout") / "model")


# ------------------------------------------------------------------------------------ no torch

# Run with torch, flax, diffusers and transformers unimportable: loading must need none of them
# (torch is installed in the test environment as the reference; a user's may lack it).
WITHOUT_FRAMEWORKS = """
import json, sys
BLOCKED = ("torch", "flax", "diffusers", "transformers")
for name in BLOCKED:
    sys.modules[name] = None  # `import torch` now raises ImportError
import numpy as np
import jax
from sdmagic.errors import ModelLoadError
from sdmagic.models import load_model

folder, single_file, pickle_file = sys.argv[1:]
from_folder = load_model(folder)
from_file = load_model(single_file, config=folder)
try:
    load_model(pickle_file, trust_pickle=True)
    refusal = None
except ModelLoadError as err:
    refusal = str(err)
same = all(
    all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(from_folder.params[part]),
                                             jax.tree_util.tree_leaves(from_file.params[part])))
    for part in ("unet", "vae", "text_encoder")
)
print(json.dumps({
    "checker": from_folder.has_safety_checker,
    "parts": sorted(from_folder.params),
    "single_file_parts": sorted(from_file.params),
    "same": same,
    "refusal": refusal,
    "imported": sorted(k for k in sys.modules if k.split(".")[0] in BLOCKED and sys.modules[k] is not None),
}))
"""


def test_loading_needs_no_torch(tiny_dir, tmp_path):
    single, _ = as_single_file(tiny_dir, tmp_path / "tiny-sd1.safetensors", "sd1")
    marker, trusted = tmp_path / "pwned", tmp_path / "model.ckpt"
    trusted.write_bytes(pickle.dumps({"state_dict": Payload(str(marker))}))
    out = subprocess.run([sys.executable, "-c", WITHOUT_FRAMEWORKS, str(tiny_dir), str(single), str(trusted)],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["checker"] and report["parts"] == ["safety_checker", "text_encoder", "unet", "vae"]
    assert report["single_file_parts"] == ["text_encoder", "unet", "vae"] and report["same"]
    assert report["imported"] == []
    # A trusted pickle is read only by torch's weights_only loader: without torch, it is not read at all.
    refusal = report["refusal"]
    assert "weights_only" in refusal and "torch is not installed" in refusal and "\n" not in refusal
    assert not marker.exists()


# ------------------------------------------------------------------------------------ layouts


def test_conversion_round_trips_every_weight(tiny_dir):
    for part in WEIGHTED:
        state = state_dict(tiny_dir, part)
        tree = pytorch_to_flax(dict(state), shape_structs(shapes(tiny_dir, part)),
                               diffusers_names=DIFFUSERS_NAMES[part], what=part)
        assert jax.tree_util.tree_map(lambda x: tuple(x.shape), tree) == shapes(tiny_dir, part)
        back = flax_to_pytorch(tree, diffusers_names=DIFFUSERS_NAMES[part])
        assert sorted(back) == sorted(state)
        for key, value in state.items():
            np.testing.assert_array_equal(back[key], value)


def test_our_msgpack_is_flax_msgpack(flax_dir, tiny_dir):
    # The Flax copies the tests load are in the format Flax itself reads (and so writes).
    serialization = pytest.importorskip("flax.serialization")
    for part in WEIGHTED:
        restored = serialization.msgpack_restore((flax_dir / part / FLAX_FILES[part]).read_bytes())
        assert_same_weights(restored, flax_tree(tiny_dir, part))


def test_a_flax_msgpack_folder_gives_the_same_images(flax_dir, session8):
    assert not list(flax_dir.rglob("*.safetensors"))
    original = session8.generate(PROMPTS, seed=21, steps=STEPS)
    session = sdmagic.setup(str(flax_dir))
    try:
        assert session.safety_checker  # the checker's msgpack was read too
        from_flax = session.generate(PROMPTS, seed=21, steps=STEPS)
    finally:
        session.close()
    # The same weights, bit for bit, through another reader: the same images.
    np.testing.assert_array_equal(pixels(from_flax), pixels(original))
    assert pixels(original).std() > 10


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["safetensors", "flax"])
def test_dtype_is_applied_while_reading(tiny_dir, flax_dir, layout, dtype):
    model = load_model(str(tiny_dir if layout == "safetensors" else flax_dir), dtype=dtype)
    assert model.has_safety_checker
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(model.params)} == {dtype}


def test_single_file_checkpoint_loads_the_folders_model(tiny_dir, tmp_path):
    # Images are a function of the networks' configs, the weights and the sampler alone: all three
    # equal (the weights bit for bit) means the folder's images. Single files' images against
    # PyTorch's pipeline: tests/test_reference.py.
    path, checkpoint = as_single_file(tiny_dir, tmp_path / "tiny-sd1.safetensors", "sd1")
    assert any(k.startswith("model.diffusion_model.input_blocks.1.0.in_layers") for k in checkpoint)
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0") for k in checkpoint)
    folder = load_model(str(tiny_dir), safety_checker=False)
    single = load_model(str(path), config=str(tiny_dir))
    assert not single.has_safety_checker  # single files carry none
    assert single.model == folder.model and single.scheduler_config == folder.scheduler_config
    assert single.sampler.name == folder.sampler.name
    assert_same_weights(single.params, folder.params)


def test_single_file_with_the_wrong_config_says_so(tmp_path, tiny_dir):
    sd2 = write_random_model(tmp_path / "sd2", "tiny-sd2")
    path, _ = as_single_file(tiny_dir, tmp_path / "tiny-sd1.safetensors", "sd1")
    with pytest.raises(ModelLoadError, match=r"(does not match|not this architecture|does not have).*try config"):
        sdmagic.setup(str(path), config=str(sd2))


def test_ldm_renaming_is_one_to_one(tiny_dir):
    unet_config = json.loads((tiny_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((tiny_dir / "vae" / "config.json").read_text())
    dicts = {part: state_dict(tiny_dir, part) for part in ("unet", "vae", "text_encoder")}
    ldm = diffusers_to_ldm(dicts["unet"], dicts["vae"], dicts["text_encoder"], unet_config, vae_config, "sd1")
    assert len(ldm) == sum(len(d) for d in dicts.values())  # no two weights collapsed into one name
    unet_pt, vae_pt, text_pt = ldm_to_diffusers(dict(ldm), unet_config, vae_config, "sd1")
    assert unet_pt.keys() == dicts["unet"].keys() and vae_pt.keys() == dicts["vae"].keys()
    assert text_pt.keys() == dicts["text_encoder"].keys()


# ------------------------------------------------------------------------------------ pickles


class Payload:
    """Unpickling this creates a marker file: proof of code running."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def with_unet_file(source, target, name, data):
    """A copy of the folder whose UNet weights are `data` in unet/`name` instead of safetensors."""
    shutil.copytree(source, target)
    (target / "unet" / PT_FILES["unet"]).unlink()
    (target / "unet" / name).write_bytes(data)
    return target


@pytest.mark.parametrize("layout", ["folder", "single-file"])
@pytest.mark.parametrize("trust", [False, True])
def test_a_malicious_pickle_never_runs(tiny_dir, tmp_path, layout, trust):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"state_dict": Payload(str(marker))})
    if layout == "folder":
        model = str(with_unet_file(tiny_dir, tmp_path / "model", "diffusion_pytorch_model.bin", data))
    else:
        (tmp_path / "model.ckpt").write_bytes(data)
        model = str(tmp_path / "model.ckpt")
    with pytest.raises(ModelLoadError) as info:
        sdmagic.setup(model, safety_checker=False, trust_pickle=trust)
    message = str(info.value)
    if trust:
        # Trusted, it is read only by torch's weights_only loader, which refuses anything but tensors.
        assert "weights_only loader refused" in message
    else:
        assert "pickle" in message and "run any code" in message and "safetensors" in message
    assert "\n" not in message and not marker.exists()


def test_a_trusted_pickle_of_tensors_loads_the_same_weights(tiny_dir, tmp_path):
    torch = pytest.importorskip("torch")

    def saved(state):
        buffer = io.BytesIO()
        torch.save(jax.tree_util.tree_map(torch.from_numpy, state), buffer)
        return buffer.getvalue()

    expected = load_model(str(tiny_dir), safety_checker=False).params
    folder = with_unet_file(tiny_dir, tmp_path / "model", "diffusion_pytorch_model.bin",
                            saved(state_dict(tiny_dir, "unet")))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(str(folder), safety_checker=False)
    assert_same_weights(load_model(str(folder), safety_checker=False, trust_pickle=True).params, expected)

    # A single-file .ckpt, its tensors under "state_dict" as the original SD checkpoints have them.
    _, checkpoint = as_single_file(tiny_dir, tmp_path / "tiny-sd1.safetensors", "sd1")
    (tmp_path / "tiny-sd1.ckpt").write_bytes(saved({"state_dict": checkpoint}))
    from_ckpt = load_model(str(tmp_path / "tiny-sd1.ckpt"), config=str(tiny_dir), trust_pickle=True)
    assert_same_weights(from_ckpt.params, expected)


# ------------------------------------------------------------------------------------ SD 2.x


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("tiny-sd2") / "model", "tiny-sd2")


def test_sd2_single_file_with_open_clip_keys(sd2_dir, tmp_path):
    path, checkpoint = as_single_file(sd2_dir, tmp_path / "tiny-sd2.safetensors", "sd2")
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight") for k in checkpoint)
    # SD 2.x checkpoints hold one more OpenCLIP block than the text encoder reads: it is dropped.
    extra = {k.replace("resblocks.1.", "resblocks.2."): v for k, v in checkpoint.items() if "resblocks.1." in k}
    save_file({**checkpoint, **extra}, str(path))
    folder = load_model(str(sd2_dir))
    # From the configs: the default side from the UNet's sample size (as 768 for SD 2.x), and
    # v-prediction from the scheduler's. (Its images against PyTorch's: tests/test_reference.py.)
    assert folder.default_size == 48 and folder.scheduler_config["prediction_type"] == "v_prediction"
    single = load_model(str(path), config=str(sd2_dir))
    assert single.model == folder.model and single.scheduler_config == folder.scheduler_config
    assert_same_weights(single.params, folder.params)


# ------------------------------------------------------------------------------------ Hub


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


def test_hub_fetch_takes_configs_then_safetensors_then_msgpack_and_never_a_pickle(monkeypatch, tmp_path, tiny_dir):
    import huggingface_hub

    from sdmagic import sources

    # A repo as the Hub holds them: safetensors beside pickles and fp16 variants; one part (the
    # VAE) published as Flax msgpack only.
    repo = tmp_path / "repo"
    shutil.copytree(tiny_dir, repo)
    for part in WEIGHTED:
        stem = PT_FILES[part].removesuffix(".safetensors")
        (repo / part / f"{stem}.bin").write_bytes(b"a pickle the loader must not fetch")
        (repo / part / f"{stem}.fp16.safetensors").write_bytes(b"a variant the loader must not fetch")
    (repo / "vae" / FLAX_FILES["vae"]).write_bytes(msgpack_serialize(flax_tree(tiny_dir, "vae")))
    (repo / "vae" / PT_FILES["vae"]).unlink()
    snapshot = tmp_path / "snapshot"
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, local_files_only=False):
        # What huggingface_hub does: fetch the repo's files the patterns allow into one snapshot folder.
        calls.append(list(allow_patterns))
        for file in repo.rglob("*"):
            name = file.relative_to(repo).as_posix()
            if file.is_file() and any(fnmatch(name, p) for p in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, name, **kw: str(repo / name))
    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    model = load_model("someone/sd-repo")
    assert len(calls) == 3
    configs, plain, flax = calls
    assert all(p.endswith((".json", ".txt")) for p in configs)  # configs and tokenizer: no weights
    assert all(p.endswith(".safetensors") for p in plain) and "unet/diffusion_pytorch_model.safetensors" in plain
    assert flax == ["vae/*.msgpack"]  # only for the part that lacks safetensors
    fetched = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert not [name for name in fetched if name.endswith((".bin", ".fp16.safetensors"))]
    assert "vae/diffusion_flax_model.msgpack" in fetched
    assert model.has_safety_checker
    assert_same_weights(model.params, load_model(str(tiny_dir)).params)


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("act_fn", "gelu")])
def test_a_unet_setting_sd_does_not_use_is_refused(tiny_dir, tmp_path, key, value):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    config_file = folder / "unet" / "config.json"
    # The values SD 1.x/2.x have, written out as PyTorch configs do.
    config = {**json.loads(config_file.read_text()), "class_embed_type": None, "act_fn": "silu",
              "center_input_sample": False}
    config_file.write_text(json.dumps({**config, key: value}))
    with pytest.raises(ModelLoadError, match=f"{key}='{value}'.*do not use"):
        sdmagic.setup(str(folder))
    config_file.write_text(json.dumps(config))
    session = sdmagic.setup(str(folder), cache=False, devices=1)
    session.close()
