"""sdmagic.nets.vae against PyTorch diffusers' AutoencoderKL on the same random weights."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from sdmagic import convert, tiny
from sdmagic.nets import vae

LEVELS3 = dict(
    block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
# The optional parts left out: no quant convolutions, no mid-block attention, one level.
BARE = dict(block_out_channels=(32,), use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)

# (config, image height and width). 3-level: non-square, an odd image height (the encoder's
# right/bottom-only padding decides the downsampled size) and odd latent sides.
CASES = {
    "tiny": (tiny.RANDOM_ARCHITECTURES["tiny"]["vae"], (32, 32)),
    "3-level": (LEVELS3, (21, 44)),
    "bare": (BARE, (8, 12)),
}


# Jitted with the config static: one compilation per case instead of one per operation.
_encode = jax.jit(vae.encode, static_argnums=1)
_decode = jax.jit(vae.decode, static_argnums=1)


def _with_noisy_norms_and_biases(params: dict, seed: int) -> dict:
    """random_params makes biases 0 and norm scales 1; perturbed, every parameter shows in the output."""
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        spread = {"bias": 0.1, "scale": 0.2}.get(path[-1].key)
        return x if spread is None else x + rng.normal(0, spread, x.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(perturb, params)


@functools.cache
def _pair(case: str):
    """(reference PyTorch model, its config as VAEConfig, the same weights as a JAX tree)."""
    config, _ = CASES[case]
    model = AutoencoderKL(**config).eval()
    cfg = vae.VAEConfig.from_dict(dict(model.config))
    params = _with_noisy_norms_and_biases(tiny.random_params(vae.vae_shapes(cfg), 0, "vae"), 1)
    state = convert.flax_to_pytorch(params, diffusers_names=True)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model, cfg, params


def _inputs(case: str, cfg: vae.VAEConfig):
    _, (height, width) = CASES[case]
    rng = np.random.default_rng(2)
    factor = 2 ** (cfg.levels - 1)
    images = rng.uniform(-1, 1, (2, cfg.in_channels, height, width)).astype(np.float32)
    latents = rng.normal(size=(2, cfg.latent_channels, height // factor, width // factor)).astype(np.float32)
    return images, latents


@functools.cache
def _reference(case: str):
    model, cfg, _ = _pair(case)
    images, latents = _inputs(case, cfg)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images)).latent_dist
        decoded = model.decode(torch.from_numpy(latents)).sample
    return dist.mean.numpy(), dist.logvar.numpy(), decoded.numpy()


def _relative(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want)
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_pytorch(case):
    _, cfg, params = _pair(case)
    images, latents = _inputs(case, cfg)
    ref_mean, ref_logvar, ref_images = _reference(case)
    mean, logvar = _encode(params, cfg, images)
    decoded = _decode(params, cfg, latents)
    assert mean.dtype == logvar.dtype == decoded.dtype == jnp.float32
    assert _relative(mean, ref_mean) < 2e-5
    assert _relative(logvar, ref_logvar) < 2e-5
    assert _relative(decoded, ref_images) < 2e-5


def test_mid_attention_uses_the_vae_epsilon():
    # On small activations GroupNorm's epsilon dominates the variance: the Flax port's 1e-5 would
    # be far off here, PyTorch's 1e-6 is not.
    model, cfg, params = _pair("tiny")
    x = np.random.default_rng(3).normal(0, 1e-3, (1, 64, 4, 6)).astype(np.float32)
    with torch.no_grad():
        want = model.decoder.mid_block.attentions[0](torch.from_numpy(x)).numpy()
    got = vae.mid_attention(params["decoder"]["mid_block"]["attentions_0"], cfg, jnp.transpose(x, (0, 2, 3, 1)))
    assert _relative(jnp.transpose(got, (0, 3, 1, 2)), want) < 2e-5


def test_logvar_is_clamped_as_pytorch():
    _, cfg, params = _pair("tiny")
    params = jax.tree.map(lambda x: x, params)  # new dicts: the cached tree stays as it was
    bias = np.array(params["quant_conv"]["bias"])
    bias[cfg.latent_channels] = 100.0  # the first log-variance channel, far above 20
    bias[cfg.latent_channels + 1] = -100.0
    params["quant_conv"]["bias"] = bias
    images, _ = _inputs("tiny", cfg)
    _, logvar = _encode(params, cfg, images)
    assert np.all(np.asarray(logvar[:, 0]) == 20.0) and np.all(np.asarray(logvar[:, 1]) == -30.0)


def test_bfloat16_stays_close_to_float32():
    _, cfg, params = _pair("3-level")
    images, latents = _inputs("3-level", cfg)
    ref_mean, _, ref_images = _reference("3-level")
    half = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    mean, _ = _encode(half, cfg, images)
    decoded = _decode(half, cfg, latents)
    # Close, but not float32's answer: the work really ran in bfloat16.
    assert 1e-4 < _relative(mean, ref_mean) < 5e-2
    assert 1e-4 < _relative(decoded, ref_images) < 5e-2


def test_jit_with_the_config_closed_over():
    _, cfg, params = _pair("bare")
    _, latents = _inputs("bare", cfg)
    decoded = jax.jit(lambda p, z: vae.decode(p, cfg, z))(params, latents)
    assert _relative(decoded, _reference("bare")[2]) < 2e-5


@pytest.mark.parametrize("case", CASES)
def test_shapes_are_the_pytorch_state_dict(case):
    model, cfg, _ = _pair(case)
    zeros = jax.tree.map(np.zeros, vae.vae_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    ours = {name: value.shape for name, value in convert.flax_to_pytorch(zeros, diffusers_names=True).items()}
    assert ours == {name: tuple(value.shape) for name, value in model.state_dict().items()}


@pytest.mark.parametrize("case", ["tiny", "3-level"])
def test_shapes_are_the_flax_port_tree(case):
    # The tree Flax msgpack files hold (the names PyTorch files are converted to). The Flax port
    # leaves diffusers in 0.40; until then it is the reference.
    flax_vae = pytest.importorskip("diffusers.models.vae_flax")
    _, cfg, _ = _pair(case)
    module = flax_vae.FlaxAutoencoderKL(**CASES[case][0])
    tree = jax.eval_shape(module.init_weights, jax.random.key(0))
    assert jax.tree.map(lambda x: tuple(x.shape), tree) == vae.vae_shapes(cfg)


def test_shapes_leave_out_unused_parts():
    shapes = vae.vae_shapes(vae.VAEConfig.from_dict(BARE))
    assert set(shapes) == {"encoder", "decoder"}
    assert set(shapes["decoder"]["mid_block"]) == {"resnets_0", "resnets_1"}
    assert "downsamplers_0" not in shapes["encoder"]["down_blocks_0"]
    assert "upsamplers_0" not in shapes["decoder"]["up_blocks_0"]


def test_config_from_dict():
    default = vae.VAEConfig.from_dict({})
    assert (default.in_channels, default.out_channels, default.latent_channels) == (3, 3, 4)
    assert (default.block_out_channels, default.layers_per_block, default.norm_num_groups) == ((64,), 1, 32)
    assert (default.scaling_factor, default.shift_factor, default.force_upcast) == (0.18215, None, True)
    assert default.use_quant_conv and default.use_post_quant_conv and default.mid_block_add_attention

    sdxl = vae.VAEConfig.from_dict({
        "_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "scaling_factor": 0.13025, "sample_size": 1024, "force_upcast": False, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * 4, "latents_mean": None,
    })
    assert sdxl.block_out_channels == (128, 256, 512, 512) and sdxl.levels == 4
    assert (sdxl.layers_per_block, sdxl.scaling_factor, sdxl.sample_size, sdxl.force_upcast) == (2, 0.13025, 1024, False)
    same = vae.VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.13025,
                         sample_size=1024, force_upcast=False)
    assert sdxl == same and hash(sdxl) == hash(same)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sdxl.latent_channels = 8
