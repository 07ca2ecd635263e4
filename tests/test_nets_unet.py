"""sdmagic's UNet equals PyTorch diffusers' UNet2DConditionModel on the same random weights.

Every parameter is random, norms and biases included, so a misplaced or ignored one shows. The
reference is the PyTorch class, loaded strictly from `flax_to_pytorch(params)`: a parameter tree
with a missing, extra or misshapen entry fails before anything is compared.
"""

import functools
import hashlib

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from sdmagic.convert import flax_to_pytorch
from sdmagic.nets import attention
from sdmagic.nets.unet import UNetConfig, apply_unet, unet_shapes
from sdmagic.tiny import RANDOM_ARCHITECTURES, random_params

TINY = dict(RANDOM_ARCHITECTURES["tiny"]["unet"], in_channels=4, out_channels=4)
TINY_SD2 = dict(RANDOM_ARCHITECTURES["tiny-sd2"]["unet"], in_channels=4, out_channels=4, upcast_attention=True)

# Transformers on both levels: two blocks deep on one, cross-attention only (no self-attention) on
# the other, with a context narrower than the channels.
EVERY_LEVEL_ATTENDS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1,
    transformer_layers_per_block=(1, 2), only_cross_attention=(True, False), cross_attention_dim=24,
)

# Every other setting off its default (downsample_padding 0 pads one side only).
SETTINGS = dict(
    TINY, flip_sin_to_cos=False, freq_shift=1, norm_num_groups=16, norm_eps=1e-6, center_input_sample=True,
    downsample_padding=0, mid_block_scale_factor=1.5,
)

# name -> (sdmagic's config, the same network as PyTorch's constructor takes it, latent side)
CASES = {
    "sd1": (TINY, TINY, 16),
    # Linear projections, a head count per level, upcast attention.
    "sd2": (TINY_SD2, TINY_SD2, 12),
    # The head count as num_attention_heads, where attention_head_dim (8 heads if it were read)
    # must be ignored: PyTorch's class refuses num_attention_heads, so its copy gets the count the
    # old way.
    "heads_depth_only_cross": (
        dict(TINY, num_attention_heads=(2, 4), attention_head_dim=8, **EVERY_LEVEL_ATTENDS),
        dict(TINY, attention_head_dim=(2, 4), **EVERY_LEVEL_ATTENDS),
        8,
    ),
    # On an odd latent side: 9 -> 4 -> 9, the upsampler follows the skip's size.
    "settings": (SETTINGS, SETTINGS, 9),
}

INTEGER_TIMESTEPS = np.array([999.0, 0.0], np.float32)
FRACTIONAL_TIMESTEPS = np.array([17.25, 500.5], np.float32)  # as Euler-type samplers pass them
CONTEXT_TOKENS = 7


def _params(cfg: UNetConfig, seed: int = 0) -> dict:
    """Random parameters with random (not 0 and 1) biases and norm scales."""
    params = random_params(unet_shapes(cfg), seed, "unet")
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        if path[-1].key in ("bias", "scale"):
            return x + np.float32(0.2) * rng.standard_normal(x.shape, dtype=np.float32)
        return x

    return jax.tree_util.tree_map_with_path(perturb, params)


def _reference(config: dict, params: dict) -> UNet2DConditionModel:
    model = UNet2DConditionModel(**config).eval()
    state = {k: torch.from_numpy(v) for k, v in flax_to_pytorch(params, diffusers_names=True).items()}
    model.load_state_dict(state, strict=True)
    return model


def _inputs(cfg: UNetConfig, side: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, cfg.in_channels, side, side), dtype=np.float32)
    context = rng.standard_normal((2, CONTEXT_TOKENS, cfg.cross_attention_dim[0]), dtype=np.float32)
    return sample, context


def _unet(cfg: UNetConfig):
    # A new function per call: jit caches traces per function, and `attention.MAX_SCORES` is read
    # while tracing.
    return jax.jit(lambda params, sample, timesteps, context: apply_unet(params, cfg, sample, timesteps, context))


@functools.cache
def _case(name: str) -> tuple:
    """(cfg, params, sample, context, {timesteps: sdmagic's output}) for a case, computed once."""
    config, _, side = CASES[name]
    cfg = UNetConfig.from_dict(config)
    params = _params(cfg)
    sample, context = _inputs(cfg, side)
    unet = _unet(cfg)
    outputs = {ts.tobytes(): np.asarray(unet(params, sample, ts, context))
               for ts in (INTEGER_TIMESTEPS, FRACTIONAL_TIMESTEPS)}
    return cfg, params, sample, context, outputs


@pytest.mark.parametrize("name", CASES)
def test_unet_equals_pytorch(name):
    cfg, params, sample, context, outputs = _case(name)
    reference = _reference(CASES[name][1], params)
    side = CASES[name][2]
    for timesteps in (INTEGER_TIMESTEPS, FRACTIONAL_TIMESTEPS):
        with torch.no_grad():
            want = reference(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context))
        want = want.sample.numpy()
        got = outputs[timesteps.tobytes()]
        assert got.shape == want.shape == (2, cfg.out_channels, side, side)
        scale = np.abs(want).max()
        assert scale > 0.1  # a real signal, not a network that collapsed to zero
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale, err_msg=f"{name}, timesteps {timesteps}")
    # Matching PyTorch at both sets of timesteps means nothing if they made no difference.
    assert np.abs(outputs[INTEGER_TIMESTEPS.tobytes()] - outputs[FRACTIONAL_TIMESTEPS.tobytes()]).max() > 1e-3 * scale


def test_chunked_attention_equals_unchunked_inside_the_unet(monkeypatch):
    cfg, params, sample, context, outputs = _case("sd1")
    whole = outputs[FRACTIONAL_TIMESTEPS.tobytes()]
    # The tiny model at its own size never chunks: 16x16 latents at its attention level, 8 heads.
    side = cfg.sample_size // 2
    assert attention.query_chunk(side * side, side * side, 8) == side * side

    # 8 heads over 8x8 tokens at the attention level: self-attention now runs one query at a time,
    # cross-attention (7 keys) 16 at a time.
    monkeypatch.setattr(attention, "MAX_SCORES", 1000)
    traced = _unet(cfg).trace(params, sample, FRACTIONAL_TIMESTEPS, context)
    assert "scan" in str(traced.jaxpr)
    chunked = np.asarray(traced.lower().compile()(params, sample, FRACTIONAL_TIMESTEPS, context))
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def _leaf_lines(shapes: dict, prefix: str = "") -> list[str]:
    lines = []
    for name, value in shapes.items():
        path = f"{prefix}/{name}" if prefix else name
        lines += _leaf_lines(value, path) if isinstance(value, dict) else [f"{path} {tuple(value)}"]
    return lines


# The tree tiny.py's unet_shapes (and diffusers' FlaxUNet2DConditionModel) built before the shapes
# moved into sdmagic/nets/unet.py: (leaves, sha256 of the sorted "path shape" lines).
OLD_TREES = {
    "tiny": (304, "1c8dfc6254160b30cc6720c663756894f578cba88115eb8fa140342cf4f87dfe"),
    "tiny-sd2": (304, "65ff7ee3f57967cbff329771dc6333692f880bc24a55296080c483d905fad5e8"),
    "sd1": (686, "f8fb6fd06336dc87338b32b4ca94176dc7f31d9c209d0b4b26c8c8abcf9fb061"),
}


@pytest.mark.parametrize("arch", OLD_TREES)
def test_unet_shapes_equal_the_old_tree(arch):
    config = dict(RANDOM_ARCHITECTURES[arch]["unet"], in_channels=4, out_channels=4)
    lines = sorted(_leaf_lines(unet_shapes(UNetConfig.from_dict(config))))
    assert (len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()) == OLD_TREES[arch]
    assert unet_shapes(config) == unet_shapes(UNetConfig.from_dict(config))  # a dict is read as its config


def test_config_reads_diffusers_keys():
    sd1 = UNetConfig.from_dict({**RANDOM_ARCHITECTURES["sd1"]["unet"], "unknown_key": 1, "_class_name": "UNet2DCondition"})
    assert sd1 == UNetConfig(cross_attention_dim=(768,) * 4, sample_size=64)  # the rest are PyTorch's defaults
    assert hash(sd1) == hash(UNetConfig.from_dict(RANDOM_ARCHITECTURES["sd1"]["unet"]))
    two = {"block_out_channels": [32, 64]}
    assert UNetConfig.from_dict(two).layers_per_block == (2, 2)
    # attention_head_dim is the head count unless num_attention_heads is given (and not None).
    assert UNetConfig.from_dict({**two, "attention_head_dim": [2, 4]}).num_attention_heads == (2, 4)
    heads = {"attention_head_dim": 4}
    assert UNetConfig.from_dict({**two, **heads, "num_attention_heads": None}).num_attention_heads == (4, 4)
    assert UNetConfig.from_dict({**two, **heads, "num_attention_heads": 1}).num_attention_heads == (1, 1)
    assert UNetConfig.from_dict({**two, "only_cross_attention": [True, False]}).only_cross_attention == (True, False)
