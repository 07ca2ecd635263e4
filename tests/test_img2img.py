"""Image-to-image: sdmagic's compiled generate equals PyTorch diffusers' StableDiffusionImg2ImgPipeline
(0.39) for the same weights, init images and noise, within 2 of 255 levels; one executable serves
every strength and init image; an image does not depend on its batch or device count.

diffusers is fed sdmagic's noise contract: the VAE posterior's draw is normal(fold_in(K, 2)), the
added noise normal(K), Euler a's noise at evaluation n normal(fold_in(fold_in(K, 1), n)).
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sdmagic import generate as gen
from sdmagic.devices import find_devices
from sdmagic.errors import SDMagicError
from sdmagic.models import load_model
from sdmagic.schedulers import denoising_steps, make_sampler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders import vae as diffusers_vae  # noqa: E402
from diffusers.schedulers import scheduling_euler_ancestral_discrete  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

PROMPTS = ["a red fox in the snow", "a cat knight", "blue", "an astronaut riding a horse on mars",
           "a bowl of fruit", "", "a lighthouse at night", "red"]
NEGATIVE = "blurry"
SEED = 21
GUIDANCE = 6.0
STEPS = 4
SIZE = 64
TOLERANCE = 2  # levels of 255
SCHEDULER_CLASSES = {"pndm": "PNDMScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
                     "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}


# ----------------------------------------------------------------------------------------------
# Helpers (test_inpaint.py uses them too)
# ----------------------------------------------------------------------------------------------


def test_images(count=len(PROMPTS), size=SIZE, seed=0):
    """Smooth, varied uint8 [count, size, size, 3] images: each image's own pattern."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(count):
        f = rng.uniform(1, 4, size=(3, 2))
        p = rng.uniform(0, 6, size=3)
        out.append(np.stack([127.5 + 120 * np.sin(2 * np.pi * (f[c, 0] * x + f[c, 1] * y) + p[c]) for c in range(3)], -1))
    return np.round(np.stack(out)).astype(np.uint8)


test_images.__test__ = False  # a helper, not a test


class Engine:
    """A loaded model (host params, read once) with a sampler, its params on a device plan."""

    def __init__(self, loaded, devices=None, scheduler="pndm"):
        self.loaded = dataclasses.replace(loaded, sampler=make_sampler(scheduler, loaded.scheduler_config))
        self.plan = find_devices(devices)
        self.params = jax.device_put(loaded.params, self.plan.replicated)

    def key(self, mode, batch=len(PROMPTS), on_step=None):
        return gen.ShapeKey(steps=STEPS, height=SIZE, width=SIZE, batch=batch, safety=False,
                            scheduler=self.loaded.scheduler_name, dtype="float32", mode=mode,
                            step_progress=on_step is not None)

    def compile(self, mode, batch=len(PROMPTS), on_step=None):
        key = self.key(mode, batch, on_step)
        arguments = gen.argument_specs(self.loaded, key, self.plan, self.params)
        executable, _ = gen.compile_generate(self.loaded, key, self.plan, arguments, on_step=on_step)
        return executable

    def inputs(self, prompts, seeds, init, strength=None, mask=None):
        sd = self.loaded.model
        ids = np.asarray(sd.tokenize(list(prompts)), np.int32)[:, None]
        neg = np.asarray(sd.tokenize([NEGATIVE] * len(prompts)), np.int32)[:, None]
        ones = np.ones(ids.shape[::2], np.float32)
        out = dict(ids=ids, weights=ones, neg_ids=neg, neg_weights=ones, neg_empty=np.zeros(len(prompts), bool),
                   seeds=np.asarray(seeds, np.uint32), guidance=np.full(len(prompts), GUIDANCE, np.float32),
                   init=np.asarray(init, np.uint8),
                   start=np.int32(self.loaded.sampler.first_evaluation(STEPS, strength)))
        if mask is not None:
            out["mask"] = np.asarray(mask, np.float32)
        return out

    def run(self, executable, inputs):
        placed = {name: jax.device_put(x, self.plan.replicated if np.ndim(x) == 0 else self.plan.batch_sharded)
                  for name, x in inputs.items()}
        pixels, nsfw = executable(self.params, placed)
        assert not np.asarray(nsfw).any()
        return np.asarray(pixels)


def seeds_of(count=len(PROMPTS), first=SEED):
    return np.arange(first, first + count, dtype=np.uint32)


def draws(seeds, shape):
    """sdmagic's draws for these seeds, as numpy: the added noise and the two posterior samples."""
    keys = gen.image_keys(jnp.asarray(seeds))
    return {
        "noise": np.asarray(gen.initial_noise(jnp.asarray(seeds), shape)),
        "init": np.asarray(gen.stream_noise(keys, gen.INIT_POSTERIOR, shape)),
        "masked": np.asarray(gen.stream_noise(keys, gen.MASKED_POSTERIOR, shape)),
    }


def ancestral(seeds, n, shape):
    return np.asarray(gen.step_noise(gen.image_keys(jnp.asarray(seeds)), gen.ANCESTRAL, jnp.int32(n), shape))


class Draws:
    """Stands in for diffusers' randn_tensor in one module: hands out the given arrays in order."""

    def __init__(self, *arrays):
        self.arrays = list(arrays)

    def __call__(self, shape, *args, **kwargs):
        assert self.arrays, f"diffusers drew more noise than expected ({tuple(shape)})"
        array = self.arrays.pop(0)
        assert tuple(shape) == array.shape, (tuple(shape), array.shape)
        return torch.from_numpy(np.array(array))


def patch_draws(monkeypatch, pipeline_module, *, posterior, noise, sampler, seeds, start, latent_shape):
    """diffusers' draws replaced by sdmagic's: the VAE posterior's (a list, in order), the
    pipeline's noise, and Euler a's per step (absolute evaluations from `start`)."""
    vae_draws = Draws(*posterior)
    monkeypatch.setattr(diffusers_vae, "randn_tensor", vae_draws)
    monkeypatch.setattr(pipeline_module, "randn_tensor", Draws(noise))
    evaluations = sampler.evaluations(STEPS)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor",
                        Draws(*[ancestral(seeds, n, latent_shape) for n in range(start, evaluations)]))
    return vae_draws


@contextlib.contextmanager
def one_torch_thread():
    """PyTorch's CPU thread pool spins badly on 2 shared cores (a 1 s pipeline run took 12 s); the
    tiny pipelines need no parallelism."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def to_levels(images):
    return (np.asarray(images) * 255).round().astype(np.uint8)


def assert_close(ours, reference):
    diff = np.abs(ours.astype(int) - reference.astype(int))
    assert diff.max() <= TOLERANCE, f"max difference {diff.max()} levels (mean {diff.mean():.3f})"
    assert reference.std() > 10  # the images have content
    print(f"max difference {diff.max()} levels, mean {diff.mean():.4f}")
    return int(diff.max())


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def torch_img2img(folder, sampler_name, init, strength, seeds, monkeypatch, sampler, latent_shape):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(folder), safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES[sampler_name]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    d = draws(seeds, latent_shape)
    vae_draws = patch_draws(monkeypatch, module, posterior=[d["init"]], noise=d["noise"], sampler=sampler,
                            seeds=seeds, start=sampler.first_evaluation(STEPS, strength), latent_shape=latent_shape)
    with torch.no_grad(), one_torch_thread():
        out = pipe(PROMPTS, image=[Image.fromarray(x) for x in init], strength=strength,
                   negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, output_type="np").images
    assert not vae_draws.arrays
    return to_levels(out)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir), safety_checker=False)


@pytest.fixture(scope="module")
def engine8(tiny):
    return Engine(tiny)


@pytest.fixture(scope="module")
def plms_img2img(engine8):
    return engine8.compile("img2img")


def _latent_shape(engine):
    spec = engine.loaded.model.spec
    return (spec.latent_channels, SIZE // spec.scale_factor, SIZE // spec.scale_factor)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_plms_img2img_equals_diffusers(engine8, plms_img2img, tiny_dir, strength, monkeypatch, compiles):
    init = test_images()
    seeds = seeds_of()
    with compiles:
        ours = engine8.run(plms_img2img, engine8.inputs(PROMPTS, seeds, init, strength))
    assert compiles.count == 0  # the one executable, whatever the strength
    reference = torch_img2img(tiny_dir, "pndm", init, strength, seeds, monkeypatch, engine8.loaded.sampler,
                              _latent_shape(engine8))
    assert_close(ours, reference)


def test_euler_a_img2img_equals_diffusers(tiny, tiny_dir, monkeypatch):
    """Ancestral noise is drawn by absolute evaluation, also when the run starts part way."""
    engine = Engine(tiny, scheduler="euler-a")
    executable = engine.compile("img2img")
    init = test_images(seed=1)
    seeds = seeds_of(first=5)
    ours = engine.run(executable, engine.inputs(PROMPTS, seeds, init, 0.5))
    reference = torch_img2img(tiny_dir, "euler-a", init, 0.5, seeds, monkeypatch, engine.loaded.sampler,
                              _latent_shape(engine))
    assert_close(ours, reference)


def test_new_init_images_and_strengths_reuse_the_executable(engine8, plms_img2img, compiles):
    """Init image and strength are arguments: other values run on the same executable (nothing
    compiles) and change the images; the same values give the same images."""
    seeds = seeds_of()
    with compiles:
        a = engine8.run(plms_img2img, engine8.inputs(PROMPTS, seeds, test_images(seed=2), 0.5))
        b = engine8.run(plms_img2img, engine8.inputs(PROMPTS, seeds, test_images(seed=3), 0.5))
        c = engine8.run(plms_img2img, engine8.inputs(PROMPTS, seeds, test_images(seed=2), 0.75))
        again = engine8.run(plms_img2img, engine8.inputs(PROMPTS, seeds, test_images(seed=2), 0.5))
    assert compiles.count == 0
    np.testing.assert_array_equal(a, again)
    assert np.abs(a.astype(int) - b).mean() > 5 and np.abs(a.astype(int) - c).mean() > 1
    # Strengths of the same step count are the same start: nothing about them is compiled in.
    sampler = engine8.loaded.sampler
    assert sampler.first_evaluation(STEPS, 0.5) == sampler.first_evaluation(STEPS, 0.74) == 2


def test_strength_one_keeps_some_of_the_init_image(engine8, plms_img2img):
    """As diffusers: img2img at strength 1.0 adds the first timestep's noise to the init image's
    latents (sqrt(acp) x + sqrt(1 - acp) n for PLMS), it is not text-to-image from pure noise: the
    init image still changes the result, and the start latents are not noise * init_noise_sigma."""
    seeds = seeds_of()
    a = engine8.run(plms_img2img, engine8.inputs(PROMPTS, seeds, test_images(seed=4), 1.0))
    b = engine8.run(plms_img2img, engine8.inputs(PROMPTS, seeds, test_images(seed=5), 1.0))
    assert np.abs(a.astype(int) - b).mean() > 1
    sampler = engine8.loaded.sampler
    x0, noise = jnp.ones((1, 4, 2, 2)), jnp.zeros((1, 4, 2, 2))
    t = int(sampler.timesteps(STEPS)[0])
    acp = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    np.testing.assert_allclose(np.asarray(sampler.add_noise(STEPS, 0, x0, noise)), acp[t] ** 0.5, rtol=1e-5)


def test_an_image_does_not_depend_on_its_batch_or_devices(tiny, engine8, plms_img2img):
    """Images 2 and 5 of the 8-device batch, made alone on one device in a batch of 2 (by an
    executable that also reports progress: once per denoising step that runs, from 0)."""
    init = test_images()
    seeds = seeds_of()
    eight = engine8.run(plms_img2img, engine8.inputs(PROMPTS, seeds, init, 0.5))
    one = Engine(tiny, devices=1)
    pick = [2, 5]
    reported = []
    executable = one.compile("img2img", batch=2, on_step=lambda step: reported.append(int(step)))
    for strength in (0.5, 1.0):
        reported.clear()
        alone = one.run(executable, one.inputs([PROMPTS[i] for i in pick], seeds[pick], init[pick], strength))
        jax.effects_barrier()
        # PLMS evaluates once more than it steps; only the steps count.
        assert reported == list(range(denoising_steps(STEPS, strength))), (strength, reported)
        if strength == 0.5:
            assert np.abs(alone.astype(int) - eight[pick]).max() <= 1


def test_no_denoising_step_is_refused_by_the_count():
    """strength * steps < 1 runs no step (diffusers then fails): denoising_steps says 0, which the
    session turns into an error; the smallest strength that runs one step runs exactly one."""
    assert denoising_steps(STEPS, 0.2) == 0
    assert denoising_steps(STEPS, 0.25) == 1


# ----------------------------------------------------------------------------------------------
# init_images.init_image: fitting, orientation, transparency, hostile files
# ----------------------------------------------------------------------------------------------


def _png_claiming(path, width, height):
    """A few-byte PNG whose header claims width x height (its pixel data is not there)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def test_init_images_cover_the_size_and_are_cropped_in_the_centre(tmp_path):
    """A1111's "Crop and resize": scaled to cover, centre kept, the overhang cut off equally."""
    from sdmagic import init_images

    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :32] = [255, 0, 0]
    wide[:, 32:96] = [0, 255, 0]
    wide[:, 96:] = [0, 0, 255]
    # Scale 1: exactly the middle square.
    np.testing.assert_array_equal(init_images.init_image(Image.fromarray(wide), 64, 64), wide[:, 32:96])
    # Downscaled (Lanczos) from a file: still the green centre; the red and blue bands are cut off
    # (only Lanczos's ringing reaches the outermost columns).
    big = np.repeat(np.repeat(wide, 2, axis=0), 2, axis=1)
    Image.fromarray(big).save(tmp_path / "wide.png")
    fitted = init_images.init_image(tmp_path / "wide.png", 32, 32)
    assert fitted.shape == (32, 32, 3) and fitted.dtype == np.uint8
    assert np.abs(fitted[:, 2:-2].astype(int) - [0, 255, 0]).max() <= 2
    assert np.abs(fitted.astype(int) - [0, 255, 0]).max() <= 20
    # A tall target from a wide image: the full height covers, the sides are cut.
    tall = init_images.init_image(Image.fromarray(wide), 16, 64)
    assert tall.shape == (64, 16, 3) and np.abs(tall.astype(int) - [0, 255, 0]).max() <= 20
    # Upscaled: a 16x8 image for 64x64 fills it (no padding): the middle 8x8, 8 times larger.
    small = init_images.init_image(Image.fromarray(wide[::8, ::8]), 64, 64)
    assert np.abs(small[:, 8:56].astype(int) - [0, 255, 0]).max() <= 40


def test_init_images_are_upright_rgb_on_white(tmp_path):
    from sdmagic import init_images

    # EXIF orientation 6 (shown rotated 90 degrees clockwise): a 32x16 image reads as 16x32.
    array = np.zeros((16, 32, 3), np.uint8)
    array[:, :16] = 255  # white on the left: after the turn, at the top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / "turned.png", exif=exif)
    upright = init_images.init_image(tmp_path / "turned.png", 16, 32)
    assert upright[:16].min() == 255 and upright[16:].max() == 0
    # Transparent pixels flatten onto white; grey images become RGB.
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = [255, 0, 0, 255]
    flat = init_images.init_image(Image.fromarray(rgba, "RGBA"), 8, 8)
    np.testing.assert_array_equal(flat[:, :4], np.broadcast_to([255, 0, 0], (8, 4, 3)))
    np.testing.assert_array_equal(flat[:, 4:], np.full((8, 4, 3), 255))
    grey = init_images.init_image(Image.fromarray(np.full((8, 8), 77, np.uint8), "L"), 8, 8)
    assert grey.shape == (8, 8, 3) and (grey == 77).all()


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"),
    ("folder", "is a folder"),
    ("text", "not a PNG, JPEG, WebP or BMP"),
    ("gif", "not a PNG, JPEG, WebP or BMP"),
    ("claims 81 Mpx", "too large"),
    ("claims 10 Gpx", "too large"),
    ("truncated", "cannot read"),
    ("a number", "file path or a PIL image"),
])
def test_hostile_or_wrong_files_are_one_line_errors(tmp_path, case, words):
    from sdmagic import init_images
    from sdmagic.errors import magic_style

    good = np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    if case == "folder":
        path = tmp_path
    elif case == "text":
        path.write_text("import os  # not an image\n")
    elif case == "gif":
        Image.fromarray(good).save(path, format="GIF")
    elif case == "claims 81 Mpx":
        _png_claiming(path, 9000, 9000)
    elif case == "claims 10 Gpx":
        _png_claiming(path, 100000, 100000)
    elif case == "truncated":
        Image.fromarray(good).save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "a number":
        path = 3
    for reader in (lambda: init_images.init_image(path, 64, 64), lambda: init_images.mask_image(path, 64, 64, 0)):
        with pytest.raises(SDMagicError, match=words) as error:
            reader()
        assert "\n" not in str(error.value)
    with magic_style(), pytest.raises(SDMagicError, match="--init"):
        init_images.init_image(path, 64, 64)
    with magic_style(), pytest.raises(SDMagicError, match="--mask"):
        init_images.mask_image(path, 64, 64, 0)


def test_the_pixel_cap_is_checked_before_decoding(tmp_path, monkeypatch):
    """A file over the cap is refused from its header: no pixel is decoded."""
    from sdmagic import init_images

    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(path)
    monkeypatch.setattr(init_images, "MAX_PIXELS", 40 * 50 - 1)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(SDMagicError, match="50x40"):
        init_images.init_image(path, 64, 64)
    assert not decoded
    with pytest.raises(SDMagicError, match="too large"):
        init_images.init_image(Image.new("RGB", (50, 40)), 64, 64)
