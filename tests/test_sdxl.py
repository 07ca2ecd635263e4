"""SDXL: sdmagic's StableDiffusionXL equals PyTorch diffusers' StableDiffusionXLPipeline on the same weights.

The built-in `tiny-sdxl` (SDXL's shape in miniature: a three-level text-time UNet, two text encoders
of different widths, the second with a projection) is the model throughout. PyTorch is the
reference at every level: the UNet's added (text-time) embedding and CLIPTextModelWithProjection
on random weights, the prompt embeddings of `encode_prompt`, whole images for the same initial
noise within 2 of 255 levels with and without a negative prompt (a negative prompt not given is
zeros, `force_zeros_for_empty_prompt`), and the weights read from a single SDXL file (Stability's
layout) as diffusers' own single-file loader reads it.
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdmagic import convert, models, tiny
from sdmagic.errors import SDMagicError
from sdmagic.generate import initial_noise
from sdmagic.model_xl import StableDiffusionXL
from sdmagic.nets import clip, unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a red fox in the snow", "a cat knight"]
NEGATIVES = ["blurry", "ugly, low quality"]
SEED = 11
GUIDANCE = 5.0
STEPS = 4
TOLERANCE = 2  # levels of 255
SIZE = 64  # tiny-sdxl's default side: 32 latents x the VAE's factor 2
FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
         "text_encoder_2": "model"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.write_random_model(tmp_path_factory.mktemp("tiny-sdxl") / "model", "tiny-sdxl", seed=5)


@pytest.fixture(scope="module")
def model(folder):
    return models.load_model(str(folder))


@pytest.fixture(scope="module")
def pipe(folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noisy(params: dict, seed: int) -> dict:
    """random_params makes biases 0 and norm scales 1; perturbed, every parameter shows in the output."""
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        return x + np.float32(0.2) * rng.standard_normal(x.shape, dtype=np.float32) if path[-1].key in ("bias", "scale") else x

    return jax.tree_util.tree_map_with_path(perturb, params)


def _torch_load(module, params: dict, diffusers_names: bool):
    state = {k: torch.from_numpy(v) for k, v in convert.flax_to_pytorch(params, diffusers_names=diffusers_names).items()}
    module.load_state_dict(state, strict=True)
    return module.eval()


def _ids(sd: StableDiffusionXL, texts: list[str]) -> np.ndarray:
    """[B, 2, 77]: each tokenizer's ids (the second pads with "!")."""
    return np.stack([tokenizer.input_ids(texts, sd.spec.max_tokens) for tokenizer in sd.tokenizers], axis=1)


_ENCODERS = {}


def _encoder(sd: StableDiffusionXL):
    """One jitted encode_prompt per model (the size is static), so equal shapes compile once."""
    return _ENCODERS.setdefault(id(sd), jax.jit(sd.encode_prompt, static_argnums=(4, 5)))


def _encode(model, texts: list[str], empty: bool = False) -> dict:
    sd = model.model
    ids = _ids(sd, texts)
    cond = _encoder(sd)(
        model.params, jnp.asarray(ids), jnp.ones(ids[:, 0].shape, jnp.float32), jnp.full(len(texts), empty), SIZE, SIZE)
    return {k: np.asarray(v) for k, v in cond.items()}


# ---------------------------------------------------------------------------------------------- the nets


def test_text_time_unet_equals_pytorch():
    config = dict(tiny.RANDOM_ARCHITECTURES["tiny-sdxl"]["unet"], in_channels=4, out_channels=4)
    cfg = unet.UNetConfig.from_dict(config)
    params = _noisy(tiny.random_params(unet.unet_shapes(cfg), 0, "unet"), 1)
    reference = _torch_load(diffusers.UNet2DConditionModel(**config), params, diffusers_names=True)
    rng = np.random.default_rng(2)
    sample = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    timesteps = np.array([999.0, 17.25], np.float32)
    context = rng.standard_normal((2, 7, 80), dtype=np.float32)
    text_embeds = rng.standard_normal((2, 24), dtype=np.float32)
    # Sizes as SDXL sees them: a square 1024 image, and a cropped, resized portrait.
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [1344, 768, 64, 32, 1152, 896]], np.float32)
    run = jax.jit(lambda p, x, t, c, e, i: unet.apply_unet(p, cfg, x, t, c, {"text_embeds": e, "time_ids": i}))
    got = np.asarray(run(params, sample, timesteps, context, text_embeds, time_ids))
    with torch.no_grad():
        want = reference(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                         added_cond_kwargs={"text_embeds": torch.from_numpy(text_embeds),
                                            "time_ids": torch.from_numpy(time_ids)}).sample.numpy()
    scale = np.abs(want).max()
    assert scale > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
    # The added conditioning reaches the output: other sizes or another pooled embedding change it.
    other_ids = np.asarray(run(params, sample, timesteps, context, text_embeds, time_ids[::-1].copy()))
    other_text = np.asarray(run(params, sample, timesteps, context, -text_embeds, time_ids))
    assert np.abs(other_ids[0] - got[0]).max() > 1e-2 * scale
    assert np.abs(other_text - got).max() > 1e-2 * scale
    with pytest.raises(ValueError, match="added_cond"):
        unet.apply_unet(params, cfg, sample, timesteps, context)


def test_shapes_are_the_full_size_sdxl_networks(tmp_path):
    """SDXL base's UNet (2.57 B parameters) and bigG text encoder, built on PyTorch's meta device:
    every weight's name and shape fills sdmagic's tree one to one."""
    parts = tiny._parts("sdxl", tmp_path / "tokenizer")
    sd = parts.model()
    assert sd.spec.default_size == 1024
    shapes = sd.param_shapes()
    with torch.device("meta"):
        references = {
            "unet": diffusers.UNet2DConditionModel(**{k: v for k, v in parts.unet.items() if not k.startswith("_")}),
            "text_encoder_2": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**parts.text_2)),
        }
    for part, module in references.items():
        state = {k: convert.TensorRef(k, tuple(v.shape), "F32") for k, v in module.state_dict().items()}
        plan = convert.plan_pytorch_to_flax(state, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32),
                                                                shapes[part], is_leaf=lambda x: isinstance(x, tuple)),
                                            diffusers_names=part == "unet", what=part,
                                            ignore=lambda key: key.endswith("position_ids"))
        assert len(plan.steps) == len(tiny._flatten(shapes[part]))
    assert sum(np.prod(s) for s in tiny._flatten(shapes["unet"]).values()) == 2_567_463_684


def test_text_encoder_with_projection_equals_transformers():
    config = tiny.RANDOM_ARCHITECTURES["tiny-sdxl"]["text_2"]
    full = dict(config, vocab_size=1000, max_position_embeddings=77)
    cfg = clip.TextConfig.from_dict(full)
    params = _noisy(tiny.random_params(clip.text_shapes(cfg, projection=True), 0, "text_encoder_2"), 3)
    reference = _torch_load(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**full)), params,
                            diffusers_names=False)
    ids = np.random.default_rng(4).integers(3, 998, (3, 77)).astype(np.int32)
    ids[:, 0] = 0
    for row, eos in enumerate((4, 30, 76)):  # the legacy rule (eos_token_id 2): the highest id is pooled
        ids[row, eos], ids[row, eos + 1:] = 999, 0
    out = jax.jit(lambda p, i: clip.encode_text(p, cfg, i))(params, ids)
    text_embeds = np.asarray(clip.project(params, out.pooled))
    with torch.no_grad():
        want = reference(torch.from_numpy(ids).long(), output_hidden_states=True)
    np.testing.assert_allclose(text_embeds, want.text_embeds.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.penultimate), want.hidden_states[-2].numpy(), rtol=0, atol=1e-5)
    assert text_embeds.shape == (3, 24)


# ---------------------------------------------------------------------------------------------- prompts


def test_encode_prompt_equals_diffusers(model, pipe):
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, negative_prompt=NEGATIVES, device="cpu")
        _, blank, _, blank_pooled = pipe.encode_prompt(PROMPTS, negative_prompt=["", ""], device="cpu")
        _, zeros, _, zeros_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    ours = _encode(model, PROMPTS)
    assert ours["context"].shape == (2, 77, 80) and ours["text_embeds"].shape == (2, 24)
    np.testing.assert_allclose(ours["context"], embeds.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours["text_embeds"], pooled.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours["time_ids"], [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2)
    ours_negative = _encode(model, NEGATIVES)
    np.testing.assert_allclose(ours_negative["context"], negative.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours_negative["text_embeds"], negative_pooled.numpy(), rtol=0, atol=1e-5)
    # A negative prompt given as "" is encoded; one not given is zeros (force_zeros_for_empty_prompt).
    ours_blank = _encode(model, ["", ""])
    np.testing.assert_allclose(ours_blank["context"], blank.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours_blank["text_embeds"], blank_pooled.numpy(), rtol=0, atol=1e-5)
    assert np.abs(blank.numpy()).max() > 0.1
    ours_zeros = _encode(model, ["", ""], empty=True)
    assert not zeros.numpy().any() and not zeros_pooled.numpy().any()
    assert not ours_zeros["context"].any() and not ours_zeros["text_embeds"].any()


def test_emphasis_is_applied_to_each_encoders_states_on_its_own(model, pipe):
    """A1111's emphasis on SDXL: each embedder's hidden states weighted and their mean restored on
    their own (not over the two side by side), checked against diffusers' embeddings by that formula."""
    with torch.no_grad():
        embeds = pipe.encode_prompt(PROMPTS, negative_prompt=NEGATIVES, device="cpu")[0].numpy()
    weights = np.ones((2, 77), np.float32)
    weights[0, 1:6], weights[1, 3:5], weights[1, 7] = 1.3, 1 / 1.1, 1.21
    sd = model.model
    ids = _ids(sd, PROMPTS)
    cond = _encoder(sd)(model.params, jnp.asarray(ids), jnp.asarray(weights), jnp.zeros(2, bool), SIZE, SIZE)
    want = []
    for states in (embeds[..., :32], embeds[..., 32:]):  # text_encoder's 32 wide, text_encoder_2's 48
        weighted = states * weights[..., None]
        want.append(weighted * (states.mean(axis=(1, 2)) / weighted.mean(axis=(1, 2)))[:, None, None])
    np.testing.assert_allclose(np.asarray(cond["context"]), np.concatenate(want, axis=-1), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(cond["context"]) - embeds).max() > 0.1  # the weights did something
    # The pooled embedding is the text encoder's own: emphasis does not touch it.
    np.testing.assert_array_equal(np.asarray(cond["text_embeds"]), _encode(model, PROMPTS)["text_embeds"])


def test_without_force_zeros_an_empty_prompt_is_encoded(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "model")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    loaded = models.load_model(str(copy))
    assert loaded.model.force_zeros_for_empty_prompt is False
    np.testing.assert_array_equal(_encode(loaded, ["", ""], empty=True)["context"], _encode(loaded, ["", ""])["context"])


def test_chunks_are_encoded_one_by_one_and_pooled_from_the_first(model):
    sd = model.model
    ids = np.concatenate([_ids(sd, PROMPTS), _ids(sd, NEGATIVES)], axis=-1)  # two chunks of 77 per prompt
    cond = _encoder(sd)(
        model.params, jnp.asarray(ids), jnp.ones(ids[:, 0].shape, jnp.float32), jnp.zeros(2, bool), 96, 128)
    first, second = _encode(model, PROMPTS), _encode(model, NEGATIVES)
    np.testing.assert_allclose(np.asarray(cond["context"]), np.concatenate([first["context"], second["context"]], axis=1),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cond["text_embeds"]), first["text_embeds"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cond["time_ids"]), [[96, 128, 0, 0, 96, 128]] * 2)


# ---------------------------------------------------------------------------------------------- images


def _torch_images(pipe, negative):
    f = pipe.vae_scale_factor
    noise = np.array(initial_noise(jnp.arange(SEED, SEED + len(PROMPTS), dtype=jnp.uint32), (4, SIZE // f, SIZE // f)))
    with torch.no_grad():
        out = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=torch.from_numpy(noise), height=SIZE, width=SIZE, output_type="np").images
    return (np.asarray(out) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def session(folder):
    """The compiled generate (sdmagic.generate), both prompts in one call."""
    import sdmagic

    session = sdmagic.setup(str(folder), devices=1, per_device_batch=2)
    yield session
    session.close()


def test_images_equal_diffusers_with_and_without_a_negative_prompt(session, pipe, compiles):
    for negative in ("blurry", None):
        with compiles:
            result = session.generate(PROMPTS, seed=SEED, steps=STEPS, guidance=GUIDANCE, negative=negative)
        ours = np.stack([np.asarray(image) for image in result.images])
        reference = _torch_images(pipe, None if negative is None else [negative] * len(PROMPTS))
        diff = np.abs(ours.astype(int) - reference.astype(int))
        assert diff.max() <= TOLERANCE, f"negative {negative!r}: max difference {diff.max()} levels (mean {diff.mean():.3f})"
        assert reference.std() > 10  # content, not blank
        assert np.abs(reference[0].astype(int) - reference[1]).mean() > 1  # and the prompt matters
    # Whether a negative prompt was given is an argument, not a shape: the second call compiled nothing.
    assert compiles.count == 0


# ---------------------------------------------------------------------------------------------- loading


def test_tiny_sdxl_is_built_in_and_loads_like_a_folder():
    loaded = models.load_model("tiny-sdxl")
    assert isinstance(loaded.model, StableDiffusionXL)
    assert loaded.source.endswith(f"tiny-sdxl-v{tiny.TINY_SDXL_VERSION}")
    assert (loaded.default_size, loaded.max_tokens, loaded.scheduler_name) == (SIZE, 77, "euler")
    assert sorted(loaded.params) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert jax.tree.map(np.shape, loaded.params) == jax.tree.map(
        tuple, loaded.model.param_shapes(), is_leaf=lambda x: isinstance(x, tuple))
    assert loaded.params["text_encoder_2"]["text_projection"]["kernel"].shape == (48, 24)
    assert [t.pad_token_id for t in loaded.model.tokenizers] == [513, 0]  # "<|endoftext|>", "!"
    assert not loaded.has_safety_checker
    with pytest.raises(SDMagicError, match="no revisions"):
        models.load_model("tiny-sdxl", revision="main")


def test_a_float16_model_keeps_the_sdxl_vae_in_float32(folder):
    half = models.load_model(str(folder), dtype="float16")
    dtypes = {part: {str(leaf.dtype) for leaf in jax.tree.leaves(tree)} for part, tree in half.params.items()}
    assert dtypes == {"unet": {"float16"}, "text_encoder": {"float16"}, "text_encoder_2": {"float16"},
                      "vae": {"float32"}}
    bf16 = models.load_model(str(folder), dtype="bfloat16")
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(bf16.params["vae"])} == {"bfloat16"}
    random = tiny.random_model("tiny-sdxl", dtype="float16").params
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(random["vae"])} == {"float32"}
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(random["unet"])} == {"float16"}


def test_sdxl_base_model_index_is_accepted():
    from sdmagic.sources import check_model_index

    index = {  # stabilityai/stable-diffusion-xl-base-1.0's model_index.json
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True, "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "feature_extractor": [None, None], "image_encoder": [None, None],
    }
    assert check_model_index(index) is index
    with pytest.raises(SDMagicError, match="force_zeros_for_empty_prompt"):
        check_model_index({**index, "force_zeros_for_empty_prompt": "yes"})


def _edit(path, **changes):
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in {**data, **changes}.items() if v is not _DROP}))


_DROP = object()


@pytest.mark.parametrize("change, message", [
    (lambda m: _edit(m / "unet" / "config.json", addition_embed_type=_DROP), r"lacks addition_embed_type \"text_time\""),
    (lambda m: _edit(m / "unet" / "config.json", projection_class_embeddings_input_dim=81),
     r"projection_class_embeddings_input_dim=81, but 6 x addition_time_embed_dim \(8\) \+ text_encoder_2's projection_dim \(24\) is 72"),
    (lambda m: _edit(m / "unet" / "config.json", addition_embed_type="text_image"), r"addition_embed_type=\"text_image\""),
    (lambda m: _edit(m / "unet" / "config.json", cross_attention_dim=32), r"hidden_size is 32 \+ 48"),
    (lambda m: _edit(m / "model_index.json", text_encoder=[None, None]), r"SDXL refiner"),
    (lambda m: _edit(m / "model_index.json", text_encoder_2=_DROP, tokenizer_2=_DROP), r"an SDXL UNet needs both"),
    (lambda m: shutil.rmtree(m / "tokenizer_2"), r"lacks tokenizer_2/"),
    (lambda m: _edit(m / "vae" / "config.json", latents_mean=[0.0] * 4), r"latents_mean=.* sdmagic supports null"),
], ids=["no text_time", "added width", "other addition", "context width", "refiner", "no second encoder",
        "no second tokenizer", "latents mean"])
def test_a_broken_sdxl_folder_fails_in_one_line(folder, tmp_path, change, message):
    copy = shutil.copytree(folder, tmp_path / "model")
    change(copy)
    with pytest.raises(SDMagicError) as info:
        models.load_model(str(copy))
    assert "\n" not in str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


# ---------------------------------------------------------------------------------------------- single files


def _single_file(folder, path):
    """The folder's weights as one SDXL checkpoint in Stability's layout."""
    from safetensors.numpy import load_file, save_file

    state = {part: load_file(str(folder / part / f"{stem}.safetensors")) for part, stem in FILES.items()}
    configs = {part: json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae")}
    checkpoint = convert.diffusers_to_sgm(state, configs["unet"], configs["vae"])
    save_file({k: np.ascontiguousarray(v) for k, v in checkpoint.items()}, str(path))
    return state, checkpoint


def test_a_single_sdxl_file_loads_the_folders_weights(folder, model, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    state, checkpoint = _single_file(folder, path)
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "first_stage_model.decoder.conv_out.weight"} <= set(checkpoint)
    # OpenCLIP's projection is x @ text_projection: [in, out], the Linear weight transposed.
    assert checkpoint["conditioner.embedders.1.model.text_projection"].shape == (48, 24)
    single = models.load_model(str(path), config=str(folder))
    assert isinstance(single.model, StableDiffusionXL)
    assert jax.tree.structure(single.params) == jax.tree.structure(model.params)
    for got, want in zip(jax.tree.leaves(single.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(got, want)
    # diffusers' own single-file loader reads the same file as the same weights: the names are SDXL's.
    reference = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), add_watermarker=False)
    for part, weights in state.items():
        theirs = getattr(reference, part).state_dict()
        assert sorted(theirs) == sorted(weights), part
        for key, value in weights.items():
            np.testing.assert_array_equal(theirs[key].numpy(), value, err_msg=f"{part}: {key}")


def test_a_broken_sdxl_file_fails_in_one_line(folder, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "sdxl.safetensors"
    _, checkpoint = _single_file(folder, path)
    cases = {
        "refiner": ({k.replace("embedders.1.", "embedders.0."): v for k, v in checkpoint.items()
                     if not k.startswith("conditioner.embedders.0.")}, None, r"SDXL refiner"),
        "one encoder": ({k: v for k, v in checkpoint.items() if not k.startswith("conditioner.embedders.1.")}, None,
                        r"lacks a text encoder"),
        "sd1 config": (checkpoint, "sd1", r"is an SDXL checkpoint but .* is an SD 1.x/2.x pipeline"),
        "no projection": ({k: v for k, v in checkpoint.items() if not k.endswith("text_projection")}, None,
                          r"\(text_encoder_2\): 1 weights missing, e.g. 'text_projection.kernel'"),
        "stray key": ({**checkpoint, "conditioner.embedders.1.model.extra": np.zeros(2, np.float32)}, None,
                      r"e.g. 'conditioner.embedders.1.model.extra'"),
    }
    sd1 = tiny.ensure_tiny_model()
    for name, (state, config, message) in cases.items():
        broken = tmp_path / f"{name.replace(' ', '-')}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(broken))
        with pytest.raises(SDMagicError) as info:
            models.load_model(str(broken), config=str(sd1 if config == "sd1" else folder))
        assert "\n" not in str(info.value)
        assert re.search(message, str(info.value)), (name, str(info.value))
