"""sdmagic.nets.clip and sdmagic.nets.safety against PyTorch transformers' CLIPTextModel /
CLIPVisionModel / CLIPImageProcessor and diffusers' StableDiffusionSafetyChecker, on the same
random weights.

Every network runs under jax.jit with its config closed over, as sdmagic compiles it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import PIL
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import (
    CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel,
)

from sdmagic import convert, tiny
from sdmagic.nets import clip, safety

TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=16)
BOS, EOS = 998, 999  # the real vocabulary's last two ids, in miniature
TEXT_CASES = {
    # SD 1.x's tokenizer pads with the end-of-text token: the first one must be pooled, not the last.
    "sd1": {**TEXT, "hidden_act": "quick_gelu", "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS},
    # SD 2.x: OpenCLIP's exact gelu, padding with id 0; fewer tokens than positions.
    "sd2": {**TEXT, "hidden_act": "gelu", "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": 0},
    # SD 1.x's real config.json says eos_token_id 2 (written before transformers' fix): the pooled
    # token is then the highest id, and id 2 means nothing.
    "legacy-eos": {**TEXT, "hidden_act": "quick_gelu", "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
}
# (sequence length, end-of-text position per row, padding id)
TEXT_INPUTS = {"sd1": (77, (5, 40, 76), EOS), "sd2": (20, (1, 11, 19), 0), "legacy-eos": (77, (3, 60, 76), EOS)}

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, hidden_act="quick_gelu", projection_dim=16)
CHECKER = {"vision_config": VISION, "projection_dim": 16}


def _with_noisy_norms_and_biases(params: dict, seed: int) -> dict:
    """random_params makes biases 0 and norm scales 1; perturbed, every parameter shows in the output."""
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        spread = {"bias": 0.1, "scale": 0.2, "class_embedding": 0.5}.get(path[-1].key)
        return x if spread is None else x + rng.normal(0, spread, x.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(perturb, params)


def _load(model: torch.nn.Module, params: dict) -> torch.nn.Module:
    state = convert.flax_to_pytorch(params, diffusers_names=False)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model.eval()


def _max_diff(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    return float(np.abs(got - want).max())


def _bfloat16(params: dict) -> dict:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)


@functools.cache
def _text(case: str):
    """(TextConfig, params, the jitted encoder, PyTorch CLIPTextModel with the same weights, ids)."""
    cfg = clip.TextConfig.from_dict(TEXT_CASES[case])
    params = _with_noisy_norms_and_biases(tiny.random_params(clip.text_shapes(cfg), 0, "text_encoder"), 1)
    model = _load(CLIPTextModel(CLIPTextConfig(**TEXT_CASES[case])), params)
    length, eos_positions, pad = TEXT_INPUTS[case]
    ids = np.random.default_rng(3).integers(3, BOS, (len(eos_positions), length)).astype(np.int32)
    ids[:, 0] = BOS if case != "legacy-eos" else 0
    for row, eos in enumerate(eos_positions):
        ids[row, eos] = EOS
        ids[row, eos + 1 :] = pad
    encode = jax.jit(lambda p, i: clip.encode_text(p, cfg, i))
    return cfg, params, encode, model, ids


@functools.cache
def _vision():
    cfg = clip.VisionConfig.from_dict(VISION)
    params = _with_noisy_norms_and_biases(tiny.random_params(clip.vision_shapes(cfg), 0, "vision"), 1)
    model = _load(CLIPVisionModel(CLIPVisionConfig(**VISION)), params)
    pixels = np.random.default_rng(4).normal(size=(3, 32, 32, 3)).astype(np.float32)
    encode = jax.jit(lambda p, x: clip.encode_image(p, cfg, x))
    return cfg, params, encode, model, pixels


# ---------------------------------------------------------------------------------------------- configs


def test_text_config_reads_what_transformers_reads():
    full = {"model_type": "clip", "projection_dim": 768, "text_config": {"hidden_size": 768, "eos_token_id": 2}}
    for d in [*TEXT_CASES.values(), {}, full, {"hidden_act": "gelu", "unknown_key": 1, "pad_token_id": None}]:
        cfg = clip.TextConfig.from_dict(d)
        want = CLIPTextConfig(**d.get("text_config", d))
        for field in cfg.__dataclass_fields__:
            assert getattr(cfg, field) == getattr(want, field), (d, field)
    assert clip.TextConfig.from_dict(full).hidden_size == 768
    hash(clip.TextConfig.from_dict(TEXT_CASES["sd1"]))


def test_safety_config_lets_vision_config_dict_win_whole_as_clip_config_does():
    # SD 1.x's checker file carries both; a key only `vision_config` has falls back to the default.
    d = {"projection_dim": 24, "vision_config": {"hidden_size": 64, "num_hidden_layers": 3, "patch_size": 14},
         "vision_config_dict": {"hidden_size": 48, "patch_size": 16}}
    for config in (d, CHECKER, {}):
        cfg = safety.SafetyConfig.from_dict(config)
        want = CLIPConfig(**config)
        assert cfg.projection_dim == want.projection_dim
        for field in cfg.vision_config.__dataclass_fields__:
            assert getattr(cfg.vision_config, field) == getattr(want.vision_config, field), (config, field)
    assert safety.SafetyConfig.from_dict(d).vision_config.num_hidden_layers == 12
    hash(safety.SafetyConfig.from_dict(d))


@pytest.mark.parametrize("d", [
    None,
    {"size": 256, "crop_size": 240, "do_rescale": False},
    {"size": {"shortest_edge": 200}, "crop_size": {"height": 180, "width": 190}, "image_mean": 0.5, "image_std": 0.25},
    {"size": {"height": 100, "width": 120}, "crop_size": [90, 100], "rescale_factor": 0.5, "do_normalize": False},
])
def test_preprocess_reads_what_clip_image_processor_reads(d):
    processor = CLIPImageProcessor(**(d or {}))
    preprocess = safety.Preprocess.from_dict(d)
    size = (processor.size.get("shortest_edge"), processor.size.get("height"), processor.size.get("width"))
    assert size == (preprocess.shortest_edge, *(preprocess.size or (None, None)))
    crop = processor.crop_size
    assert (crop["height"], crop["width"]) == (preprocess.crop_height, preprocess.crop_width)
    hash(preprocess)


def test_shape_trees_are_the_flax_ports_trees():
    """The layout Flax msgpack files are in (the PyTorch names and shapes are checked by every
    strict load below)."""
    flax_clip = pytest.importorskip("transformers.models.clip.modeling_flax_clip")

    def traced(model, input_shape):
        params = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), input_shape))
        return jax.tree.map(lambda x: tuple(x.shape), params)

    text = flax_clip.FlaxCLIPTextModel(CLIPTextConfig(**TEXT_CASES["sd2"]), _do_init=False)
    assert clip.text_shapes(clip.TextConfig.from_dict(TEXT_CASES["sd2"])) == traced(text, (1, 77))
    vision = flax_clip.FlaxCLIPVisionModel(CLIPVisionConfig(**VISION), _do_init=False)
    assert clip.vision_shapes(clip.VisionConfig.from_dict(VISION)) == traced(vision, (1, 32, 32, 3))
    checker = safety.safety_shapes(safety.SafetyConfig.from_dict(CHECKER))
    assert checker["vision_model"] == clip.vision_shapes(clip.VisionConfig.from_dict(VISION))


# ---------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("case", TEXT_CASES)
def test_text_encoder_matches_transformers(case):
    _, params, encode, model, ids = _text(case)
    with torch.no_grad():
        want = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    got = encode(params, jnp.asarray(ids))
    assert _max_diff(got.last_hidden_state, want.last_hidden_state) < 2e-5
    assert _max_diff(got.penultimate, want.hidden_states[-2]) < 2e-5
    assert _max_diff(got.pooled, want.pooler_output) < 2e-5
    # The pooled tokens are the ones the case meant (not, say, the last padding token).
    _, eos_positions, _ = TEXT_INPUTS[case]
    rows = np.arange(len(eos_positions))
    np.testing.assert_array_equal(np.asarray(got.pooled), np.asarray(got.last_hidden_state)[rows, eos_positions])


def test_vision_tower_matches_transformers():
    _, params, encode, model, pixels = _vision()
    with torch.no_grad():
        want = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output
    assert _max_diff(encode(params, jnp.asarray(pixels)), want) < 2e-5


def test_configs_are_hashable_static_arguments():
    """jax.jit(..., static_argnums) hashes the config: the same numbers as closing over it."""
    cfg, params, encode, _, ids = _text("sd1")
    static = jax.jit(clip.encode_text, static_argnums=1)(params, cfg, jnp.asarray(ids))
    for a, b in zip(static, encode(params, jnp.asarray(ids))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_stays_close_to_float32():
    _, params, encode, _, ids = _text("sd1")
    f32, bf16 = encode(params, jnp.asarray(ids)), encode(_bfloat16(params), jnp.asarray(ids))
    assert bf16.last_hidden_state.dtype == jnp.bfloat16
    for a, b in zip(bf16, f32):
        assert _max_diff(a, b) < 0.15
        assert float(jnp.mean(jnp.abs(a.astype(jnp.float32) - b))) < 0.02
    _, params, encode, _, pixels = _vision()
    f32, bf16 = encode(params, jnp.asarray(pixels)), encode(_bfloat16(params), jnp.asarray(pixels))
    assert bf16.dtype == jnp.bfloat16
    assert _max_diff(bf16, f32) < 0.15


# ---------------------------------------------------------------------------------------------- safety checker


def _least_norm_direction(embeds: np.ndarray, targets: list[float]) -> np.ndarray:
    """A vector whose cosines with `embeds`' rows are proportional to `targets`."""
    unit = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    return np.linalg.lstsq(unit, np.asarray(targets, np.float64), rcond=None)[0].astype(np.float32)


def _cosines(embeds: np.ndarray, direction: np.ndarray) -> np.ndarray:
    unit = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    return unit @ direction / np.linalg.norm(direction)


@functools.cache
def _checker():
    """A checker whose concepts and thresholds sort four images into: flagged outright; flagged only
    because a special-care concept lowered every threshold by 0.01; the same concept score but no
    special care, so not flagged; nowhere near."""
    cfg = safety.SafetyConfig.from_dict(CHECKER)
    params = _with_noisy_norms_and_biases(tiny.random_params(safety.safety_shapes(cfg), 0, "safety_checker"), 1)
    clip_input = np.random.default_rng(5).normal(size=(4, 32, 32, 3)).astype(np.float32)
    model = _load(StableDiffusionSafetyChecker(CLIPConfig(**CHECKER)), params)
    with torch.no_grad():
        pooled = model.vision_model(torch.from_numpy(clip_input.transpose(0, 3, 1, 2)))[1]
        embeds = model.visual_projection(pooled).numpy()
    rng = np.random.default_rng(6)
    params["concept_embeds"] = rng.normal(size=(17, 16)).astype(np.float32)
    params["special_care_embeds"] = rng.normal(size=(3, 16)).astype(np.float32)
    params["concept_embeds_weights"] = np.full(17, 1.5, np.float32)  # cosines never reach 1.5
    params["special_care_embeds_weights"] = np.full(3, 1.5, np.float32)
    concept = _least_norm_direction(embeds, [0.9, 0.5, 0.5, 0.1])
    params["concept_embeds"][7] = concept
    # Images 1 and 2 score -0.005 on concept 7: below 0 alone, above it with special care's 0.01.
    params["concept_embeds_weights"][7] = _cosines(embeds, concept)[1] + 0.005
    special = _least_norm_direction(embeds, [0.1, 0.8, 0.1, 0.1])
    params["special_care_embeds"][2] = special
    params["special_care_embeds_weights"][2] = _cosines(embeds, special)[[0, 1]].mean()
    check = jax.jit(lambda p, x: safety.check(p, cfg, x))
    return params, check, _load(model, params), clip_input


def test_safety_checker_flags_what_diffusers_flags_including_special_care():
    params, check, model, clip_input = _checker()
    _, want = model(torch.from_numpy(clip_input.transpose(0, 3, 1, 2)), np.zeros((4, 8, 8, 3)))
    got = check(params, jnp.asarray(clip_input))
    assert got.dtype == jnp.bool_
    assert want == [True, True, False, False]  # the construction above did what it says
    assert np.asarray(got).tolist() == want
    # Without the special-care concept image 1 is no longer flagged: the 0.01 was what did it.
    without = {**params, "special_care_embeds_weights": np.full(3, 1.5, np.float32)}
    _, want = _load(model, without)(torch.from_numpy(clip_input.transpose(0, 3, 1, 2)), np.zeros((4, 8, 8, 3)))
    _load(model, params)
    assert np.asarray(check(without, jnp.asarray(clip_input))).tolist() == want == [True, False, False, False]


# ---------------------------------------------------------------------------------------------- preprocessing

PREPROCESSORS = {
    "standard": None,
    # CompVis' older feature-extractor file: bare numbers.
    "numbers": {"size": 40, "crop_size": 32, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    "dicts": {"size": {"shortest_edge": 48}, "crop_size": {"height": 40, "width": 44}, "rescale_factor": 0.004},
    "exact size": {"size": {"height": 30, "width": 50}, "crop_size": {"height": 24, "width": 48}},
    "switched off": {"do_rescale": False, "do_normalize": False},
    # A crop larger than the resized image: transformers pads with zeros.
    "padded crop": {"size": 20, "crop_size": {"height": 25, "width": 40}},
}
# Downscaled and upscaled, wider and taller, one side kept.
IMAGE_SIZES = ((96, 128), (512, 384), (20, 24), (224, 300))
PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


@pytest.mark.parametrize("name", PREPROCESSORS)
def test_clip_pixels_equal_clip_image_processor_on_pil_images(name):
    d = PREPROCESSORS[name]
    processor = CLIPImageProcessor(**(d or {}))
    preprocess = safety.Preprocess.from_dict(d)
    rng = np.random.default_rng(7)
    # Every size for the standard preprocessing (each size is a compile), two for the others.
    sizes = IMAGE_SIZES if d is None else IMAGE_SIZES[:2]
    if name == "exact size" and PILLOW_13:
        sizes += ((64, 64),)  # -> 30x50: Pillow 13 resamples vertically first
    for height, width in sizes:
        # Noise, the hardest case: every rounding between and after Pillow's passes shows.
        images = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        want = processor([Image.fromarray(image) for image in images], return_tensors="np")["pixel_values"]
        got = np.asarray(jax.jit(safety.clip_pixels, static_argnums=1)(jnp.asarray(images), preprocess))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1), err_msg=f"{height}x{width}")


def test_pillow_taps_stay_inside_int32():
    """255 x the positive coefficients of any window, plus Pillow's rounding half, fit in int32."""
    for in_size, out_size in ((512, 224), (4096, 224), (7, 300), (224, 224), (1000, 3)):
        index, fixed = safety.pillow_taps(in_size, out_size)
        assert index.min() >= 0 and index.max() < in_size
        assert (255 * np.where(fixed > 0, fixed.astype(np.int64), 0).sum(axis=1) + 2**21).max() < 2**31
        # Each window's coefficients sum to 1 in Pillow's fixed point (up to its per-tap rounding).
        assert np.abs(fixed.astype(np.int64).sum(axis=1) - 2**22).max() <= fixed.shape[1]
