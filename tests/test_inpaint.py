"""Inpainting: sdmagic's compiled generate equals PyTorch diffusers' StableDiffusionInpaintPipeline
(0.39) for the same weights, init images, masks and noise, within 2 of 255 levels, with a
9-channel inpainting UNet and with an ordinary one (the per-step latent blend), at strength 1.0
(pure noise) and below; both composited the same way after decoding, so pixels outside the mask
are the init image's exactly. Also: init_images' masks (fit, blur, formats, hostile files).
"""

import numpy as np
import pytest
from PIL import Image

from sdmagic import generate as gen
from sdmagic import init_images
from sdmagic.errors import SDMagicError
from sdmagic.models import load_model
from sdmagic.tiny import write_random_model
from test_img2img import (
    GUIDANCE, NEGATIVE, PROMPTS, SCHEDULER_CLASSES, SIZE, STEPS, Engine, assert_close, draws, one_torch_thread,
    patch_draws, seeds_of, test_images, to_levels,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _mask_files(folder):
    """Two masks drawn on a 3:2 canvas (white = repaint): an ellipse and a bar, as PNGs."""
    yy, xx = np.mgrid[0:64, 0:96]
    ellipse = (((xx - 50) / 26.0) ** 2 + ((yy - 30) / 18.0) ** 2 <= 1) * 255
    bar = ((xx > 30) & (xx < 60)) * 255
    paths = []
    for name, array in (("ellipse.png", ellipse), ("bar.png", bar)):
        path = folder / name
        Image.fromarray(array.astype(np.uint8), "L").save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    """float32 [8, 64, 64]: the two masks fitted to 64x64 with a blur of 2, alternating per image."""
    paths = _mask_files(tmp_path_factory.mktemp("masks"))
    fitted = [init_images.mask_image(p, SIZE, SIZE, 2) for p in paths]
    return np.stack([fitted[i % 2] for i in range(len(PROMPTS))])


def composite_numpy(init, generated, mask):
    """generate.composite's formula in numpy (float32), for diffusers' output."""
    m = mask.astype(np.float32)[..., None]
    out = init.astype(np.float32) * (1 - m) + generated.astype(np.float32) * m
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def torch_inpaint(folder, sampler_name, init, mask, strength, seeds, monkeypatch, sampler, nine_channels):
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(str(folder), safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES[sampler_name]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    f = pipe.vae_scale_factor
    d = draws(seeds, (4, SIZE // f, SIZE // f))
    # diffusers encodes the init image (first) unless a 9-channel UNet starts from pure noise, then
    # always the masked image.
    posterior = [d["masked"]] if (nine_channels and strength == 1.0) else [d["init"], d["masked"]]
    vae_draws = patch_draws(monkeypatch, pipeline_stable_diffusion_inpaint, posterior=posterior, noise=d["noise"],
                            sampler=sampler, seeds=seeds, start=sampler.first_evaluation(STEPS, strength),
                            latent_shape=(4, SIZE // f, SIZE // f))
    # The mask as the 8-bit image it came from (mask_image's values are exactly k / 255).
    mask_images = [Image.fromarray(np.round(m * 255).astype(np.uint8), "L") for m in mask]
    with torch.no_grad(), one_torch_thread():
        out = pipe(PROMPTS, image=[Image.fromarray(x) for x in init], mask_image=mask_images, strength=strength,
                   negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   height=SIZE, width=SIZE, output_type="np").images
    assert not vae_draws.arrays
    return composite_numpy(init, to_levels(out), mask)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("tiny-inpaint"), "tiny-inpaint", seed=4)


@pytest.fixture(scope="module")
def nine(inpaint_dir):
    engine = Engine(load_model(str(inpaint_dir), safety_checker=False), scheduler="pndm")
    assert engine.loaded.model.inpainting
    return engine, engine.compile("inpaint")


@pytest.fixture(scope="module")
def four(tiny_dir):
    engine = Engine(load_model(str(tiny_dir), safety_checker=False), scheduler="euler-a")
    assert not engine.loaded.model.inpainting
    return engine, engine.compile("inpaint")


def _check_outside_the_mask(ours, init, mask):
    keep = mask == 0
    assert keep.any() and (mask == 1).any()
    np.testing.assert_array_equal(ours[keep], init[keep])
    # ... and the repainted region did change.
    assert np.abs(ours[mask == 1].astype(int) - init[mask == 1]).mean() > 5


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_inpainting_unet_equals_diffusers(nine, inpaint_dir, masks, strength, monkeypatch, compiles):
    engine, executable = nine
    init, seeds = test_images(seed=6), seeds_of(first=40)
    with compiles:
        ours = engine.run(executable, engine.inputs(PROMPTS, seeds, init, strength, masks))
    assert compiles.count == 0
    reference = torch_inpaint(inpaint_dir, "pndm", init, masks, strength, seeds, monkeypatch, engine.loaded.sampler,
                              nine_channels=True)
    assert_close(ours, reference)
    _check_outside_the_mask(ours, init, masks)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_ordinary_unet_inpainting_equals_diffusers(four, tiny_dir, masks, strength, monkeypatch):
    """The per-step blend (the init latents noised to the next evaluation's level outside the
    mask), with Euler a's own noise per evaluation."""
    engine, executable = four
    init, seeds = test_images(seed=7), seeds_of(first=50)
    ours = engine.run(executable, engine.inputs(PROMPTS, seeds, init, strength, masks))
    reference = torch_inpaint(tiny_dir, "euler-a", init, masks, strength, seeds, monkeypatch, engine.loaded.sampler,
                              nine_channels=False)
    assert_close(ours, reference)
    _check_outside_the_mask(ours, init, masks)


def test_a_new_mask_reuses_the_executable(four, compiles):
    """Another mask (here: keep everything) runs on the same executable and gives the init image
    back exactly; a mask is an argument, not compiled in."""
    engine, executable = four
    init = test_images(seed=8)
    keep_all = np.zeros((len(PROMPTS), SIZE, SIZE), np.float32)
    with compiles:
        out = engine.run(executable, engine.inputs(PROMPTS, seeds_of(), init, 1.0, keep_all))
    assert compiles.count == 0
    np.testing.assert_array_equal(out, init)


def test_the_latent_mask_is_diffusers_binarized_nearest_resize():
    """Binarized at 0.5 (VaeImageProcessor), then torch's nearest interpolate to the latent size."""
    rng = np.random.default_rng(0)
    mask = rng.uniform(0, 1, size=(2, 16, 24)).astype(np.float32)
    binary = torch.from_numpy(np.where(mask >= 0.5, 1.0, 0.0).astype(np.float32))[:, None]
    for factor in (2, 8):
        expected = torch.nn.functional.interpolate(binary, size=(16 // factor, 24 // factor)).numpy()
        np.testing.assert_array_equal(np.asarray(gen.latent_mask(mask, factor)), expected)


def test_composite_keeps_unmasked_pixels_exactly():
    init = np.array([[[[0, 128, 255], [10, 20, 30]]]], np.uint8)
    generated = np.array([[[[255, 0, 0], [200, 100, 50]]]], np.uint8)
    mask = np.array([[[0.0, 0.25]]], np.float32)
    out = np.asarray(gen.composite(init, generated, mask))
    np.testing.assert_array_equal(out[0, 0, 0], [0, 128, 255])
    np.testing.assert_array_equal(out[0, 0, 1], np.round(np.array([10, 20, 30]) * 0.75 + np.array([200, 100, 50]) * 0.25))


# ----------------------------------------------------------------------------------------------
# init_images.mask_image (and the shared file checks)
# ----------------------------------------------------------------------------------------------


def test_masks_are_fitted_like_their_images(tmp_path):
    """A 3:2 mask is scaled to cover the square and centre-cropped, as the init image is: the
    white bar in the middle third of a 96x64 mask stays in the middle of the 64x64 result."""
    _, bar = _mask_files(tmp_path)
    mask = init_images.mask_image(bar, 64, 64)
    assert mask.dtype == np.float32 and mask.shape == (64, 64)
    # 96 -> 96 wide at height 64, cropped 16 each side: columns 31..59 -> 15..43.
    assert mask[:, 20:40].min() > 0.9 and mask[:, :10].max() < 0.1 and mask[:, 50:].max() < 0.1
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, 31:60] = 255
    fitted = init_images.init_image(Image.fromarray(image), 64, 64)
    np.testing.assert_allclose(fitted[..., 0] / 255.0, mask, atol=1 / 255)


def test_mask_blur_is_pillows_gaussian_blur(tmp_path):
    _, bar = _mask_files(tmp_path)
    sharp = init_images.mask_image(bar, 64, 64, 0)
    blurred = init_images.mask_image(bar, 64, 64, 4)
    from PIL import ImageFilter

    expected = np.asarray(Image.fromarray(np.round(sharp * 255).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(4)))
    np.testing.assert_array_equal(np.round(blurred * 255).astype(np.uint8), expected)
    assert 0 < blurred[32, 14] < 1  # the edge is soft now
    assert ((blurred > 0) & (blurred < 1)).sum() > ((sharp > 0) & (sharp < 1)).sum()


def test_masks_are_made_binary_as_a1111_reads_them(tmp_path):
    """Luminance over 128 repaints (colour or grey); with transparency, the alpha channel is the
    mask: whatever is painted (even black) repaints, transparent pixels keep."""
    grey = np.zeros((8, 8, 3), np.uint8)
    grey[:, :2] = [100, 100, 100]
    grey[:, 2:4] = [200, 200, 200]
    grey[:, 4:6] = [255, 0, 0]  # red: luminance 76
    grey[:, 6:] = [255, 255, 0]  # yellow: 226
    Image.fromarray(grey).save(tmp_path / "grey.png")
    mask = init_images.mask_image(tmp_path / "grey.png", 8, 8)
    np.testing.assert_array_equal(mask[0], [0, 0, 1, 1, 0, 0, 1, 1])
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = [0, 0, 0, 255]  # opaque black strokes: repaint
    rgba[:, 4:] = [255, 255, 255, 0]  # transparent white: keep
    Image.fromarray(rgba, "RGBA").save(tmp_path / "strokes.png")
    mask = init_images.mask_image(tmp_path / "strokes.png", 8, 8)
    assert mask.dtype == np.float32 and mask[:, :4].min() == 1.0 and mask[:, 4:].max() == 0.0
    # A fully opaque RGBA image is read by luminance, as any other.
    rgba[..., 3] = 255
    mask = init_images.mask_image(Image.fromarray(rgba, "RGBA"), 8, 8)
    assert mask[:, :4].max() == 0.0 and mask[:, 4:].min() == 1.0


@pytest.mark.parametrize("blur", [-1, 1.5, "2", True, 10**9])
def test_bad_mask_blur_is_a_one_line_error(tmp_path, blur):
    _, bar = _mask_files(tmp_path)
    with pytest.raises(SDMagicError, match="mask_blur") as error:
        init_images.mask_image(bar, 64, 64, blur)
    assert "\n" not in str(error.value)
