"""sdmagic's images equal PyTorch diffusers' StableDiffusionPipeline for the same weights and noise.

PyTorch diffusers is the code the weights were trained with, so it is the reference: the tiny SD 1.x
and SD 2.x (v-prediction) models, from a folder and from a single original-layout file, on 8 and on
1 device, within 2 of 255 levels, for every sampler whose PyTorch twin takes the same noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdmagic
from sdmagic.convert import diffusers_to_ldm
from sdmagic.generate import initial_noise
from sdmagic.tiny import write_random_model

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red fox in the snow", "a cat knight", "blue", "an astronaut riding a horse on mars"]
SEED = 11
GUIDANCE = 6.0
NEGATIVE = "blurry"
STEPS = 4
TOLERANCE = 2  # levels of 255


def torch_images(folder, scheduler_class=None, steps=STEPS, size=None):
    """PyTorch diffusers' pipeline on the same folder, fed sdmagic's initial noise."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                             requires_safety_checker=False)
    if scheduler_class is not None:
        pipe.scheduler = getattr(diffusers, scheduler_class).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    f = pipe.vae_scale_factor
    seeds = jnp.arange(SEED, SEED + len(PROMPTS), dtype=jnp.uint32)
    noise = np.asarray(initial_noise(seeds, (pipe.unet.config.in_channels, size // f, size // f)))
    with torch.no_grad():
        out = pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=steps,
                   guidance_scale=GUIDANCE, latents=torch.from_numpy(noise), height=size, width=size,
                   output_type="np").images
    return (np.asarray(out) * 255).round().astype(np.uint8)


def sdmagic_images(session, steps=STEPS, size=None):
    result = session.generate(PROMPTS, seed=SEED, steps=steps, guidance=GUIDANCE, negative=NEGATIVE,
                              height=size, width=size)
    assert [info.seed for info in result.info] == list(range(SEED, SEED + len(PROMPTS)))
    return np.stack([np.asarray(image) for image in result.images])


def as_single_file(folder, path, family):
    """The folder's UNet, VAE and text encoder in one original-layout (LDM) checkpoint."""
    import json

    from safetensors.numpy import load_file, save_file

    files = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    state = {part: load_file(str(folder / part / f"{stem}.safetensors")) for part, stem in files.items()}
    configs = {part: json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae")}
    save_file(diffusers_to_ldm(state["unet"], state["vae"], state["text_encoder"], configs["unet"], configs["vae"],
                               family), str(path))


def assert_close(ours, reference):
    diff = np.abs(ours.astype(int) - reference.astype(int))
    assert diff.max() <= TOLERANCE, f"max difference {diff.max()} levels (mean {diff.mean():.3f})"
    # Not trivially equal because both are blank: the images have content.
    assert reference.std() > 10


def test_the_initial_noise_is_each_images_own_draw():
    seeds = jnp.arange(SEED, SEED + 4, dtype=jnp.uint32)
    noise = np.asarray(initial_noise(seeds, (4, 8, 8)))
    np.testing.assert_array_equal(noise[3], np.asarray(jax.random.normal(jax.random.PRNGKey(SEED + 3), (4, 8, 8))))


@pytest.fixture(scope="module")
def sd1_reference(tiny_dir):
    return torch_images(tiny_dir)


@pytest.mark.parametrize("which", ["session8", "session1"])
def test_sd1_images_equal_pytorch_diffusers(which, sd1_reference, request):
    session = request.getfixturevalue(which)
    assert_close(sdmagic_images(session), sd1_reference)


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("tiny-sd2"), "tiny-sd2", seed=3)


def test_sd2_v_prediction_images_equal_pytorch_diffusers(sd2_dir):
    session = sdmagic.setup(str(sd2_dir), safety_checker=False, cache=False)
    try:
        assert_close(sdmagic_images(session), torch_images(sd2_dir))
    finally:
        session.close()


def test_single_files_equal_pytorch_diffusers(tiny_dir, sd2_dir, tmp_path):
    """An original-layout checkpoint written from each folder gives PyTorch's images for that folder."""
    for folder, family in ((tiny_dir, "sd1"), (sd2_dir, "sd2")):
        path = tmp_path / f"{family}.safetensors"
        as_single_file(folder, path, family)
        session = sdmagic.setup(str(path), config=str(folder), safety_checker=False, cache=False)
        try:
            assert_close(sdmagic_images(session), torch_images(folder))
        finally:
            session.close()


# Samplers whose PyTorch twins draw no noise of their own (Euler a does: its noise follows
# sdmagic's seed contract instead, and is compared step by step in test_schedulers.py).
@pytest.mark.parametrize("name, scheduler_class", [
    ("ddim", "DDIMScheduler"), ("lms", "LMSDiscreteScheduler"), ("dpm", "DPMSolverMultistepScheduler"),
    ("euler", "EulerDiscreteScheduler"),
])
def test_other_samplers_equal_pytorch_diffusers(tiny_dir, name, scheduler_class):
    session = sdmagic.setup(str(tiny_dir), scheduler=name, safety_checker=False, cache=False)
    try:
        assert_close(sdmagic_images(session, steps=6), torch_images(tiny_dir, scheduler_class, steps=6))
    finally:
        session.close()
