"""Model folders, checkpoint files and Hub answers are data, never code, and never a traceback.

A model folder cannot make Python import anything; a folder without a safety checker loads; every
config value is bounded and every broken or hostile folder fails in one line that names the file
and key; a .safetensors file is checked from its header before any tensor is read; Hub failures say
what happened, without half a minute of silent retries.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import sdmagic
from sdmagic import models, sources
from sdmagic.errors import ModelLoadError, SDMagicError

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
UNET_MSGPACK = "unet/diffusion_flax_model.msgpack"


def tiny_copy(tiny_dir, target):
    """A copy of the tiny model whose weights are links: a test that changes a weight file replaces
    the link (`replace_file`), never writes through it into the shared tiny model."""

    def link_weights(src, dst):
        if src.endswith((".safetensors", ".msgpack")):
            os.symlink(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(tiny_dir, target, copy_function=link_weights)
    return target


def replace_file(path, data):
    path.unlink()
    path.write_bytes(data)


def edit_json(path, change):
    data = json.loads(path.read_text())
    data = change(data)
    path.write_text(json.dumps(data))


def one_line_error(model, **kwargs):
    with pytest.raises(SDMagicError) as info:
        models.load_model(str(model), **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message, message
    return message


# ------------------------------------------------------------------------------ nothing is imported

PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")

class CLIPTokenizer:  # what the entry names, in case a loader gets that far
    pass

Evil = CLIPTokenizer
"""


@pytest.fixture
def payload(tmp_path, monkeypatch):
    """A package `m.tokenizer.payload` in the current directory, which IPython puts on sys.path:
    importing it creates the marker file."""
    marker = tmp_path / "imported-marker"
    package = tmp_path / "cwd" / "m" / "tokenizer"
    package.mkdir(parents=True)
    (tmp_path / "cwd" / "m" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.syspath_prepend(str(tmp_path / "cwd"))
    yield marker
    for name in [n for n in sys.modules if n == "m" or n.startswith("m.")]:
        del sys.modules[name]


@pytest.mark.parametrize(
    "entry, value",
    [
        ("tokenizer", ["m.tokenizer.payload", "CLIPTokenizer"]),
        ("scheduler", ["m.tokenizer.payload", "FlaxPNDMScheduler"]),
        ("feature_extractor", ["m.tokenizer.payload", "CLIPImageProcessor"]),
        ("safety_checker", ["m.tokenizer.payload", "Evil"]),
        ("controlnet", ["m.tokenizer.payload", "Evil"]),
    ],
)
def test_a_model_index_entry_never_imports_what_it_names(tiny_dir, tmp_path, payload, entry, value):
    folder = tiny_copy(tiny_dir, tmp_path / "model")
    # A real package of that name in the folder too, where a loader might look for it.
    shutil.copytree(payload.parent / "cwd" / "m", folder / "m")
    edit_json(folder / "model_index.json", lambda index: {**index, entry: value})
    for checker in (True, False):  # every entry is checked, used or not
        message = one_line_error(folder, safety_checker=checker)
        assert f"entry '{entry}'" in message and "m.tokenizer.payload" in message
    assert not payload.exists()
    assert "m.tokenizer.payload" not in sys.modules


def test_config_files_cannot_make_upstream_import_anything(tiny_dir, tmp_path, payload):
    folder = tiny_copy(tiny_dir, tmp_path / "model")
    for part in ("text_encoder", "tokenizer", "feature_extractor", "safety_checker"):
        (folder / part / "payload.py").write_text(PAYLOAD.format(marker=str(payload)))
    remote = {"AutoConfig": "payload.Evil", "AutoModel": "payload.Evil", "AutoTokenizer": ["payload.Evil", None],
              "AutoImageProcessor": "payload.Evil"}
    edit_json(folder / "text_encoder" / "config.json", lambda c: {**c, "auto_map": remote, "trust_remote_code": True})
    edit_json(folder / "safety_checker" / "config.json", lambda c: {**c, "auto_map": remote})
    edit_json(folder / "feature_extractor" / "preprocessor_config.json",
              lambda c: {**c, "auto_map": remote, "image_processor_type": "payload.Evil"})
    # No tokenizer_class: transformers would consult AutoConfig on the folder's config.json.
    edit_json(folder / "tokenizer" / "tokenizer_config.json",
              lambda c: {k: v for k, v in c.items() if k != "tokenizer_class"} | {"auto_map": remote})
    (folder / "tokenizer" / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": remote}))
    model = models.load_model(str(folder))  # the keys are never handed to transformers: it loads
    assert model.safety_checker_state == "on"
    assert not payload.exists()
    # A diffusers config naming a class: refused, not looked up.
    edit_json(folder / "scheduler" / "scheduler_config.json", lambda c: {**c, "_class_name": "m.tokenizer.payload"})
    message = one_line_error(folder)
    assert "scheduler_config.json" in message and "m.tokenizer.payload" in message
    assert not payload.exists()


# ------------------------------------------------------------------------------ no safety checker


def without_checker(tiny_dir, target, keep_extractor=False):
    folder = tiny_copy(tiny_dir, target)
    parts = ["safety_checker"] + ([] if keep_extractor else ["feature_extractor"])
    for part in parts:
        shutil.rmtree(folder / part, ignore_errors=True)
    # What save_pretrained writes for a pipeline without a checker.
    edit_json(folder / "model_index.json", lambda index: {**index, **{part: [None, None] for part in parts}})
    return folder


def test_a_folder_without_a_safety_checker_loads_and_draws(tiny_dir, tmp_path):
    folder = without_checker(tiny_dir, tmp_path / "no-checker")
    for wanted in (True, False):
        model = models.load_model(str(folder), safety_checker=wanted)
        assert model.safety_checker_state == "none shipped" and "safety_checker" not in model.params
    session = sdmagic.setup(str(folder), devices=1, safety_checker=True)
    try:
        assert not session.safety_checker and session.model.safety_checker_state == "none shipped"
    finally:
        session.close()


def test_safety_checker_states(tiny_dir, tmp_path):
    assert models.load_model("tiny").safety_checker_state == "on"
    assert models.load_model("tiny", safety_checker=False).safety_checker_state == "off"
    # A checker without a feature extractor: CLIP's standard preprocessing, as SD ships it.
    folder = tiny_copy(tiny_dir, tmp_path / "no-extractor")
    shutil.rmtree(folder / "feature_extractor")
    edit_json(folder / "model_index.json", lambda index: {**index, "feature_extractor": [None, None]})
    model = models.load_model(str(folder))
    assert model.safety_checker_state == "on"
    from transformers import CLIPImageProcessor

    standard = CLIPImageProcessor()  # what transformers preprocesses with when given no settings
    preprocess = model.model.preprocess
    assert standard.size == {"shortest_edge": preprocess.shortest_edge} and preprocess.size is None
    assert standard.crop_size == {"height": preprocess.crop_height, "width": preprocess.crop_width} == {
        "height": 224, "width": 224}
    assert (standard.rescale_factor, tuple(standard.image_mean), tuple(standard.image_std)) == (
        preprocess.rescale_factor, preprocess.image_mean, preprocess.image_std)


# ------------------------------------------------------------------------------ hostile folders


def set_key(part_file, key, value):
    def change(path):
        edit_json(path / part_file, lambda c: {**c, key: value})

    return change


def write(part_file, text):
    def change(path):
        (path / part_file).unlink()
        (path / part_file).write_text(text)

    return change


def fifo(part_file):
    def change(path):
        (path / part_file).unlink()
        os.mkfifo(path / part_file)

    return change


def junk_weights(path):
    replace_file(path / UNET_WEIGHTS, b"\xc1junk" * 100)


def other_weights(path):
    (path / UNET_WEIGHTS).unlink()
    os.symlink(path / VAE_WEIGHTS, path / UNET_WEIGHTS)


def flax_tree(folder, part, shapes):
    """A component's weights in the layout of diffusers' Flax msgpack files."""
    from safetensors.numpy import load_file

    from sdmagic.convert import pytorch_to_flax
    from sdmagic.weights import shape_structs

    config = json.loads((folder / part / "config.json").read_text())
    state = load_file(str(folder / part / "diffusion_pytorch_model.safetensors"))
    return pytorch_to_flax(state, shape_structs(shapes(config)), diffusers_names=True, what=part)


# A part that ships only Flax msgpack (as diffusers' Flax repos did) is read by the msgpack reader.
def junk_msgpack(path):
    (path / UNET_WEIGHTS).unlink()
    (path / UNET_MSGPACK).write_bytes(b"\xc1junk" * 100)


def other_msgpack(path):
    from sdmagic.nets import vae
    from sdmagic.weights import msgpack_serialize

    (path / UNET_WEIGHTS).unlink()
    vae_tree = flax_tree(path, "vae", lambda config: vae.vae_shapes(vae.VAEConfig.from_dict(config)))
    (path / UNET_MSGPACK).write_bytes(msgpack_serialize(vae_tree))


def without_special_tokens_map(change):
    def changed(path):
        (path / "tokenizer" / "special_tokens_map.json").unlink()
        change(path)

    return changed


# Checks that sdmagic.configs.check_preprocessor_config makes; models.py does not call it yet.

HOSTILE = [
    ("index is a list", write("model_index.json", "[1, 2]"), r"model_index.json is not a JSON object"),
    ("index is not JSON", write("model_index.json", "{nope"), r"model_index.json is not valid JSON"),
    ("index nests deeply", write("model_index.json", "[" * 100000 + "]" * 100000), r"model_index.json is not valid JSON"),
    ("index is huge", write("model_index.json", " " * (5 * 2**20) + "{}"), r"model_index.json is 5.0 MiB"),
    ("entry of a wrong class", set_key("model_index.json", "unet", ["diffusers", "AutoencoderKL"]),
     r"entry 'unet' names \[\"diffusers\", \"AutoencoderKL\"\], which is not a unet class"),
    ("entry not a pair", set_key("model_index.json", "vae", "AutoencoderKL"), r"entry 'vae' is not a \[library, class\] pair"),
    ("unet config is a list", write("unet/config.json", "[]"), r"unet/config.json is not a JSON object"),
    ("no block channels", set_key("unet/config.json", "block_out_channels", []), r"unet/config.json: block_out_channels=\[\]"),
    ("zero head dim", set_key("unet/config.json", "attention_head_dim", 0), r"attention_head_dim=0 is not usable"),
    ("head dim not dividing", set_key("unet/config.json", "attention_head_dim", 7), r"attention_head_dim=7 .* must divide"),
    ("absurd sample size", set_key("unet/config.json", "sample_size", 2000000000), r"sample_size=2000000000 is not usable"),
    ("default side too big", set_key("unet/config.json", "sample_size", 3000), r"default image side of 6000 pixels"),
    ("default side too big", set_key("unet/config.json", "sample_size", 4000), r"default image side of 8000 pixels, more than 4096"),
    ("layers as text", set_key("unet/config.json", "layers_per_block", "two"), r"layers_per_block=\"two\""),
    ("layers as a bool", set_key("unet/config.json", "layers_per_block", True), r"layers_per_block=true"),
    ("unknown block", set_key("unet/config.json", "down_block_types", ["DownBlock2D", "EvilBlock"]), r"down_block_types="),
    # The value as the file has it, or one per UNet level (the form sdmagic's config holds it in).
    ("unet and text mismatch", set_key("unet/config.json", "cross_attention_dim", 64),
     r"unet/config.json has cross_attention_dim=(64|\[64, 64\]) .* hidden_size is 32"),
    ("unet channels", set_key("unet/config.json", "in_channels", 5), r"UNet takes 5 channels"),
    # An inpainting config (9 channels) over an ordinary UNet's weights: the weights do not fit.
    ("inpainting config, ordinary weights", set_key("unet/config.json", "in_channels", 9), r"conv_in"),
    ("unet class name", set_key("unet/config.json", "_class_name", "os.system"), r"unet/config.json names class \"os.system\""),
    ("vae groups", set_key("vae/config.json", "norm_num_groups", 0), r"norm_num_groups=0"),
    ("vae latents", set_key("vae/config.json", "latent_channels", 8), r"VAE has 8 latent channels"),
    ("vae scaling", set_key("vae/config.json", "scaling_factor", "big"), r"scaling_factor=\"big\""),
    ("text heads", set_key("text_encoder/config.json", "hidden_size", 30), r"num_attention_heads=4 .* divide hidden_size \(30\)"),
    ("text layers", set_key("text_encoder/config.json", "num_hidden_layers", 100000), r"num_hidden_layers=100000"),
    ("text activation", set_key("text_encoder/config.json", "hidden_act", "evil"), r"hidden_act=\"evil\""),
    ("text config not JSON", write("text_encoder/config.json", "\x1b[31m{"), r"text_encoder/config.json is not valid JSON"),
    ("max length absurd", set_key("tokenizer/tokenizer_config.json", "model_max_length", 10**9), r"model_max_length=1000000000"),
    ("max length zero", set_key("tokenizer/tokenizer_config.json", "model_max_length", 0), r"model_max_length=0"),
    ("tokenizer class", set_key("tokenizer/tokenizer_config.json", "tokenizer_class", "m.payload.Evil"), r"tokenizer_class="),
    # As in transformers, special_tokens_map.json has the last word: its tokens are the ones used.
    ("special token", without_special_tokens_map(set_key("tokenizer/tokenizer_config.json", "eos_token", ["x"])),
     r"tokenizer/tokenizer_config.json: eos_token=\[\"x\"\] is not usable"),
    ("special token in the map", set_key("tokenizer/special_tokens_map.json", "eos_token", ["x"]),
     r"eos_token=\[\"x\"\] is not usable"),
    ("special token's file", set_key("tokenizer/special_tokens_map.json", "eos_token", ["x"]),
     r"tokenizer/special_tokens_map.json: eos_token=\[\"x\"\]"),
    ("vocabulary a list", write("tokenizer/vocab.json", "[1]"), r"vocab.json is not a CLIP vocabulary"),
    ("vocabulary a FIFO", fifo("tokenizer/vocab.json"), r"vocab.json is missing \(or not a regular file\)"),
    ("config a FIFO", fifo("unet/config.json"), r"unet/config.json is missing \(or not a regular file\)"),
    ("beta schedule", set_key("scheduler/scheduler_config.json", "beta_schedule", "cosine"), r"beta_schedule=\"cosine\""),
    ("train steps", set_key("scheduler/scheduler_config.json", "num_train_timesteps", 0), r"num_train_timesteps=0"),
    ("trained betas", set_key("scheduler/scheduler_config.json", "trained_betas", "abc"), r"trained_betas=\"abc\""),
    ("prediction", set_key("scheduler/scheduler_config.json", "prediction_type", "x0"), r"prediction_type=\"x0\""),
    # Some samplers predict from `sample`; PNDM, the model's own here, does not.
    ("prediction the sampler lacks", set_key("scheduler/scheduler_config.json", "prediction_type", "sample"),
     r"the pndm scheduler cannot use this model's scheduler config: .*prediction_type 'sample'"),
    # A crop larger than the resize is padded, as in transformers; one the checker cannot read is not.
    ("crop not the checker's size", set_key("feature_extractor/preprocessor_config.json", "crop_size", 1000),
     r"feature_extractor crops 1000x1000 but the safety checker reads 224x224 images"),
    ("resize absurd", set_key("feature_extractor/preprocessor_config.json", "size", {"shortest_edge": 10**9}),
     r"preprocessor_config.json: size=\{\"shortest_edge\": 1000000000\} is not usable"),
    ("deviation zero", set_key("feature_extractor/preprocessor_config.json", "image_std", [0.5, 0, 0.5]),
     r"preprocessor_config.json: image_std=\[0.5, 0, 0.5\] is not usable"),
    ("no centre crop", set_key("feature_extractor/preprocessor_config.json", "do_center_crop", False),
     r"preprocessor_config.json: do_center_crop=false is not usable"),
    ("checker patches", lambda p: edit_json(p / "safety_checker" / "config.json",
                                            lambda c: {**c, "vision_config": {**c["vision_config"], "patch_size": 33}}),
     r"patch_size=33 .* divide image_size \(224\)"),
    ("junk safetensors", junk_weights, r"diffusion_pytorch_model.safetensors is not a usable safetensors file"),
    ("another part's safetensors", other_weights, r"unet/diffusion_pytorch_model.safetensors: \d+ weights missing"),
    ("junk msgpack", junk_msgpack, r"could not read .*unet/diffusion_flax_model.msgpack as Flax msgpack: \w"),
    ("another part's msgpack", other_msgpack, r"unet/diffusion_flax_model.msgpack: \d+ weights missing"),
]


@pytest.mark.parametrize("change, message", [pytest.param(*case[1:3], id=case[0], marks=case[3:]) for case in HOSTILE])
def test_a_broken_or_hostile_folder_fails_in_one_line(tiny_dir, tmp_path, change, message):
    folder = tiny_copy(tiny_dir, tmp_path / "model")
    change(folder)
    import re

    assert re.search(message, one_line_error(folder)), one_line_error(folder)


@pytest.mark.parametrize("settings", [
    {},  # transformers' defaults
    # CompVis/stable-diffusion-v1-4's file (bare numbers) and stabilityai/stable-diffusion-2-1's (dicts).
    {"crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
     "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
     "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224},
    {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
     "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
     "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
     "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}},
])
def test_the_preprocessor_check_accepts_what_stable_diffusion_ships(settings):
    from sdmagic.configs import Config, check_preprocessor_config

    check_preprocessor_config(Config(settings, "feature_extractor/preprocessor_config.json"))


def test_a_crop_larger_than_the_resize_loads_and_is_padded(tiny_dir, tmp_path):
    from transformers import CLIPImageProcessor

    from sdmagic.nets import safety

    folder = tiny_copy(tiny_dir, tmp_path / "model")
    settings_file = folder / "feature_extractor" / "preprocessor_config.json"
    edit_json(settings_file, lambda c: {**c, "size": {"shortest_edge": 200}})
    model = models.load_model(str(folder))
    assert model.safety_checker_state == "on"
    preprocess = model.model.preprocess
    assert (preprocess.shortest_edge, preprocess.crop_height, preprocess.crop_width) == (200, 224, 224)
    # transformers centres the 200-pixel side in the 224-pixel crop between zeros: so does sdmagic.
    image = np.random.default_rng(3).integers(0, 256, (1, 64, 48, 3), dtype=np.uint8)
    want = CLIPImageProcessor(**json.loads(settings_file.read_text()))(list(image), return_tensors="np")
    got = np.asarray(safety.clip_pixels(image, preprocess))
    np.testing.assert_array_equal(got, want["pixel_values"].transpose(0, 2, 3, 1))
    black = (0 - np.asarray(preprocess.image_mean, np.float32)) / np.asarray(preprocess.image_std, np.float32)
    np.testing.assert_array_equal(got[0, :, :12], np.broadcast_to(black, (224, 12, 3)))


def test_a_bad_scheduler_swap_is_one_line(tiny_dir, tmp_path):
    folder = tiny_copy(tiny_dir, tmp_path / "model")
    # A model whose own sampler (DDIM) predicts from `sample`, which PNDM cannot.
    edit_json(folder / "scheduler" / "scheduler_config.json",
              lambda c: {**c, "_class_name": "DDIMScheduler", "prediction_type": "sample"})
    model = models.load_model(str(folder), safety_checker=False)
    assert model.scheduler_name == "ddim"
    message = one_line_error(folder, scheduler="pndm", safety_checker=False)
    assert "pndm" in message and "does not support prediction_type 'sample'" in message
    with pytest.raises(ModelLoadError, match="pndm scheduler cannot use") as info:
        models.with_scheduler(model, "pndm")
    assert "\n" not in str(info.value)
    assert models.with_scheduler(model, "euler").scheduler_name == "euler"
    # The cosine schedule, which the Flax-era LMS refused, every sampler now runs.
    edit_json(folder / "scheduler" / "scheduler_config.json", lambda c: {**c, "beta_schedule": "squaredcos_cap_v2"})
    assert models.load_model(str(folder), scheduler="lms", safety_checker=False).scheduler_name == "lms"


def test_revision_with_tiny_or_a_folder_is_refused(tiny_dir):
    with pytest.raises(SDMagicError, match="revision is for Hub ids.*'tiny'"):
        models.load_model("tiny", revision="flax")
    with pytest.raises(SDMagicError, match="revision is for Hub ids.*local folder"):
        models.load_model(str(tiny_dir), revision="main")


# ------------------------------------------------------------------------------ validate before reading

MEASURE = """
import json, resource, struct, sys
from pathlib import Path
from sdmagic import models
from sdmagic.errors import ModelLoadError

def junk(path, size):
    # One junk float32 key of `size` bytes, as a sparse file: nothing is written, all reads are zeros.
    header = json.dumps({"junk": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)

target, tiny, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if target == "folder":
    model = Path(sys.argv[4])
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # a link to the tiny model's
    junk(model / "unet" / "diffusion_pytorch_model.safetensors", size)
else:
    model = Path(sys.argv[4]) / "junk.safetensors"
    junk(model, size)
models.load_model("tiny", safety_checker=False)  # everything imported and warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    models.load_model(str(model), config=str(tiny) if target == "file" else None)
    message = None
except ModelLoadError as err:
    message = str(err)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"message": message, "peak_growth_mb": (after - before) / 1024}))
"""


@pytest.mark.parametrize("target", ["folder", "file"])
def test_a_junk_safetensors_file_is_refused_from_its_header(tiny_dir, tmp_path, target):
    size = 200 * 2**20
    work = tiny_copy(tiny_dir, tmp_path / "model") if target == "folder" else tmp_path
    script = tmp_path / "measure.py"
    script.write_text(textwrap.dedent(MEASURE))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(sdmagic.__file__)))}
    out = subprocess.run([sys.executable, str(script), target, str(tiny_dir), str(size), str(work)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["message"] and "\n" not in result["message"]
    expected = "unet/diffusion_pytorch_model.safetensors: " if target == "folder" else "no 'model.diffusion_model.' keys"
    assert expected in result["message"], result
    # Reading the tensor would take 200 MB (and the old loader held two copies): nothing is read.
    assert result["peak_growth_mb"] < 40, result


def test_every_part_is_checked_before_any_tensor_is_read(tiny_dir, tmp_path, monkeypatch):
    from sdmagic import convert

    folder = tiny_copy(tiny_dir, tmp_path / "pt")
    reads = []
    real_read = convert.SafetensorsFile.read
    monkeypatch.setattr(convert.SafetensorsFile, "read",
                        lambda self, ref: reads.append((str(self.path), ref.key)) or real_read(self, ref))
    # The last part read (the safety checker) has one weight of the wrong shape.
    from safetensors.numpy import load_file, save

    checker_file = folder / "safety_checker" / "model.safetensors"
    state = load_file(str(checker_file))
    state["concept_embeds"] = np.zeros((5, 5), np.float32)
    replace_file(checker_file, save(state))
    message = one_line_error(folder)
    assert "concept_embeds" in message and "shape (5, 5)" in message
    assert reads == []  # the UNet, VAE and text encoder were checked, not read
    model = models.load_model(str(folder), safety_checker=False)
    assert len(reads) == len(set(reads)) > 100  # then each tensor read once
    assert model.safety_checker_state == "off"


def test_a_header_claiming_a_huge_size_is_refused(tmp_path):
    from sdmagic.convert import SafetensorsFile

    path = tmp_path / "lie.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="header claims 1099511627776 bytes"):
        SafetensorsFile(path)
    path.write_bytes(b"\x02")
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        SafetensorsFile(path)


def test_single_file_family_and_renaming_work_from_the_header(tiny_dir, tmp_path):
    from test_weights import as_single_file

    from sdmagic.convert import SafetensorsFile, TensorRef, detect_family, ldm_to_diffusers

    path, checkpoint = as_single_file(tiny_dir, tmp_path / "tiny.safetensors", "sd1")
    unet_config = json.loads((tiny_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((tiny_dir / "vae" / "config.json").read_text())
    with SafetensorsFile(path) as f:
        refs = dict(f.refs)
    assert detect_family(refs) == "sd1"
    from_refs = ldm_to_diffusers(dict(refs), unet_config, vae_config, "sd1")
    from_arrays = ldm_to_diffusers(dict(checkpoint), unet_config, vae_config, "sd1")
    for a, b in zip(from_refs, from_arrays):
        assert a.keys() == b.keys()
        assert all(isinstance(v, TensorRef) and v.shape == b[k].shape for k, v in a.items())


# ------------------------------------------------------------------------------ the Hub


class FakeHub:
    """Stands in for huggingface_hub's HTTP session: every request gets `status` (or a dropped
    connection), and its backoff sleeps are recorded instead of slept."""

    def __init__(self, monkeypatch, tmp_path, status, headers=None):
        import requests
        from huggingface_hub import constants
        from huggingface_hub.utils import _http

        self.requests, self.sleeps = [], []
        self.status, self.headers = status, headers or {}
        monkeypatch.setattr(_http, "get_session", lambda: self)
        monkeypatch.setattr(_http.time, "sleep", self.sleeps.append)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
        self._requests_module = requests

    def request(self, method, url, **kwargs):
        requests = self._requests_module
        self.requests.append(url)
        if self.status is None:
            raise requests.ConnectionError("connection reset by peer")
        response = requests.Response()
        response.status_code, response.url, response.reason, response._content = self.status, url, "fake", b""
        response.headers.update(self.headers)
        response.request = requests.Request(method, url).prepare()
        return response


@pytest.mark.parametrize(
    "status, headers, revision, message",
    [
        (401, {"X-Error-Message": "Invalid credentials in Authorization header"}, None, r"HTTP 401.*log in"),
        (401, {"X-Error-Code": "RepoNotFound"}, None, r"was not found on the Hub.*log in if it is private"),
        (403, {}, None, r"denied access .*HTTP 403"),
        (403, {"X-Error-Code": "GatedRepo"}, None, r"is gated: accept its licence"),
        (404, {"X-Error-Code": "RepoNotFound"}, "main", r"was not found on the Hub"),
        (404, {"X-Error-Code": "RevisionNotFound"}, "flax", r"has no revision 'flax'"),
        (404, {"X-Error-Code": "EntryNotFound"}, "flax", r"has no model_index.json.*check revision"),
        (500, {}, None, r"Hub failed \(HTTP 500\).*try again later"),
        (503, {}, "bf16", r"Hub failed \(HTTP 503\).*try again later"),
        (None, {}, None, r"could not reach the Hugging Face Hub"),
    ],
)
def test_hub_answers_say_what_happened_quickly(monkeypatch, tmp_path, status, headers, revision, message):
    import re

    hub = FakeHub(monkeypatch, tmp_path, status, headers)
    with pytest.raises(ModelLoadError) as info:
        models.load_model("someone/some-model", revision=revision)
    text = str(info.value)
    assert re.search(message, text) and "\n" not in text, text
    assert "--revision flax" not in text and "revision flax" not in text  # never the revision that failed
    # huggingface_hub alone retries a 5xx or a dropped connection 5 times over 23 s.
    assert len(hub.requests) <= 2 and sum(hub.sleeps) <= 1, (hub.requests, hub.sleeps)
