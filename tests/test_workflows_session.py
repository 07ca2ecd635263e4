"""Image-to-image, inpainting, LoRA and A1111 prompts through the session, the magics and PNG files.

The engine's numerics against diffusers are tested in test_img2img.py, test_inpaint.py, test_lora.py,
test_prompt_weights.py and test_sdxl.py; here: what a user sees. Options are checked before any
device work, a new init image, mask, strength or LoRA weight compiles nothing, PNG parameters say how
an image was made, and an image depends only on its own settings.
"""

import warnings

import numpy as np
import pytest
from PIL import Image

import sdmagic
from sdmagic.errors import SDMagicError
from sdmagic.saving import read_parameters

STEPS = 4


def _picture(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth colour fields (not white noise), so the VAE sees something like a picture.
    base = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    return Image.fromarray(base).resize(size, Image.BICUBIC)


def _mask(size=(64, 64)) -> Image.Image:
    mask = np.zeros(size[::-1], np.uint8)
    mask[16:48, 8:40] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("workflow-images")
    _picture(1).save(folder / "init.png")
    _picture(2, (96, 80)).save(folder / "other.png")
    _mask().save(folder / "mask.png")
    return folder


def _pixels(result, i=0):
    return np.asarray(result.images[i], dtype=np.int16)


def test_img2img_is_reproducible_and_batch_independent(session8, session1, files):
    init = files / "init.png"
    a = session8.generate(["a lake", "a hill"], seed=5, steps=STEPS, init_image=init, strength=0.5)
    b = session1.generate(["a hill"], seed=6, steps=STEPS, init_image=init, strength=0.5)
    assert np.array_equal(_pixels(a, 1), _pixels(b, 0))
    assert a.info[0].strength == 0.5 and a.info[0].init == "init.png"
    # The picture matters (the tiny model's random VAE cannot reproduce it, so no closeness test).
    txt = session8.generate(["a lake"], seed=5, steps=STEPS)
    other = session8.generate(["a lake"], seed=5, steps=STEPS, init_image=files / "other.png", strength=0.5)
    assert not np.array_equal(_pixels(a), _pixels(txt))
    assert not np.array_equal(_pixels(a), _pixels(other))


def test_new_init_mask_or_strength_compiles_nothing(session8, files, compiles):
    init, other, mask = files / "init.png", files / "other.png", files / "mask.png"
    session8.generate(["warm"], seed=1, steps=STEPS, init_image=init, strength=0.5)
    session8.generate(["warm"], seed=1, steps=STEPS, init_image=init, mask=mask)
    with compiles:
        first = session8.generate(["a boat"], seed=2, steps=STEPS, init_image=other, strength=0.75)
        second = session8.generate(["a boat"], seed=2, steps=STEPS, init_image=other, strength=1.0)
        session8.generate(["a boat"], seed=2, steps=STEPS, init_image=other, mask=mask, strength=0.5, mask_blur=3)
    assert compiles.count == 0
    assert not np.array_equal(_pixels(first), _pixels(second))


def test_inpainting_keeps_pixels_outside_the_mask(session8, files):
    init = np.asarray(Image.open(files / "init.png").convert("RGB"))
    result = session8.generate(["a red door"], seed=3, steps=STEPS, init_image=files / "init.png",
                               mask=files / "mask.png")
    out = np.asarray(result.images[0])
    keep = np.asarray(Image.open(files / "mask.png")) == 0
    assert np.array_equal(out[keep], init[keep])
    assert not np.array_equal(out[~keep], init[~keep])
    assert result.info[0].strength == 1.0 and result.info[0].mask_blur == 0


def test_cell_lines_take_init_mask_and_strength(tiny_shell, files):
    from IPython.utils.capture import capture_output

    cell = (
        f"a lake -- --init {files / 'init.png'} --strength 0.5\n"
        f"a door -- --init {files / 'init.png'} --mask {files / 'mask.png'} --mask-blur 2\n"
        "a plain cat\n"
    )
    with capture_output():
        result = tiny_shell.run_cell_magic("sd", "--seed 4", cell)
    assert [i.strength for i in result.info] == [0.5, 1.0, None]
    assert [i.mask_blur for i in result.info] == [None, 2, None]
    assert [c.split(" · ")[2:] for c in result.captions()] == [["img2img 0.5"], ["inpaint 1"], []]


@pytest.mark.parametrize("options, message", [
    (dict(mask="MASK"), "mask needs an init image"),
    (dict(strength=0.5), "strength needs an init image"),
    (dict(init_image="INIT", mask_blur=3), "mask_blur needs a mask"),
    (dict(init_image="INIT", strength=0.05), "runs no denoising step"),
    (dict(init_image="INIT", strength=1.5), "strength must be from 0 to 1"),
    (dict(init_image="missing.png"), "missing.png"),
])
def test_workflow_mistakes_are_one_line_errors(session8, files, compiles, options, message):
    options = {k: (files / "init.png" if v == "INIT" else files / "mask.png" if v == "MASK" else v)
               for k, v in options.items()}
    with compiles, pytest.raises(SDMagicError, match=message) as err:
        session8.generate(["x"], seed=1, steps=STEPS, **options)
    assert "\n" not in str(err.value) and compiles.count == 0


def test_magic_errors_name_the_flags(tiny_shell, files):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="--strength needs an init image: give --init"):
        tiny_shell.run_line_magic("sd", "--strength 0.5 a cat")


def test_png_parameters_record_img2img_and_read_back(session8, files, tmp_path):
    result = session8.generate(["a lake"], seed=8, steps=STEPS, init_image=files / "init.png", strength=0.5,
                               save=tmp_path)
    params = read_parameters(result.saved[0])
    assert params["other"]["Denoising strength"] == "0.5"
    with pytest.raises(SDMagicError, match="made from an init image"):
        session8.generate_from_png(result.saved[0])
    again = session8.generate_from_png(result.saved[0], init_image=files / "init.png")
    assert np.array_equal(_pixels(again), _pixels(result))


def test_long_prompts_are_not_cut_and_compile_per_chunk_bucket(session8, compiles):
    tokenizer = session8.model.model.tokenizer
    words = "a cat"
    while len(tokenizer.encode(words + " a cat")) <= 150:  # up to 150 tokens, no commas: two chunks
        words += " a cat"
    assert len(tokenizer.encode(words)) > 140
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = session8.generate([words], seed=1, steps=STEPS)
    assert not result.warnings
    assert session8._weighted(words).chunk_count == 2
    assert any(k.chunks == 2 for k in session8.compiled_shapes)
    with compiles:  # another two-chunk prompt reuses the executable
        session8.generate([words.replace("cat", "dog", 1)], seed=2, steps=STEPS)
    assert compiles.count == 0
    longest = " ".join(["cat"] * 700)
    with pytest.warns(sdmagic.session.PromptTruncatedWarning, match="600 tokens"):
        session8.generate([longest], seed=1, steps=STEPS)


def test_emphasis_changes_the_image_and_weight_one_does_not(session8):
    plain = session8.generate(["a cat on a mat"], seed=9, steps=STEPS)
    same = session8.generate(["(a cat:1.0) on a mat"], seed=9, steps=STEPS)
    strong = session8.generate(["(a cat:1.6) on a mat"], seed=9, steps=STEPS)
    assert np.array_equal(_pixels(plain), _pixels(same))
    assert not np.array_equal(_pixels(plain), _pixels(strong))


def _write_kohya_lora(path, seed=0, rank=4):
    """A kohya-format LoRA on the tiny UNet's first attention and the text encoder's first layer."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for key, (fan_in, fan_out) in {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (64, 64),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (32, 64),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
    }.items():
        tensors[f"{key}.lora_down.weight"] = rng.normal(0, 0.5, (rank, fan_in)).astype(np.float32)
        tensors[f"{key}.lora_up.weight"] = rng.normal(0, 0.5, (fan_out, rank)).astype(np.float32)
        tensors[f"{key}.alpha"] = np.asarray(rank / 2, np.float32)
    save_file(tensors, str(path))
    return path


def test_lora_weight_changes_compile_nothing_and_zero_restores_the_base(tiny_dir, tmp_path, compiles):
    lora_file = _write_kohya_lora(tmp_path / "style.safetensors")
    session = sdmagic.setup("tiny", lora=[f"{lora_file}:0.8"], cache=False)
    try:
        base = sdmagic.setup("tiny", cache=False)
        plain = base.generate(["a cat"], seed=1, steps=STEPS)
        base.close()
        merged = session.generate(["a cat"], seed=1, steps=STEPS, save=tmp_path / "out")
        assert not np.array_equal(_pixels(merged), _pixels(plain))
        assert merged.info[0].loras[0][:2] == ("style", 0.8)
        params = read_parameters(merged.saved[0])
        assert params["other"]["Lora hashes"].startswith("style: ")
        with compiles:
            session.set_lora(lora_file, 0.0)
            restored = session.generate(["a cat"], seed=1, steps=STEPS)
            session.set_lora(lora_file, 0.8)
            again = session.generate(["a cat"], seed=1, steps=STEPS)
        assert compiles.count == 0
        assert np.array_equal(_pixels(restored), _pixels(plain))
        assert np.array_equal(_pixels(again), _pixels(merged))
        assert restored.info[0].loras == ()
    finally:
        session.close()


def test_lora_errors_leave_the_session_usable(session8, tmp_path):
    with pytest.raises(SDMagicError, match="a LoRA weight must be a number"):
        session8.set_lora(tmp_path / "x.safetensors", "heavy")
    with pytest.raises(SDMagicError) as err:
        session8.set_lora(tmp_path / "missing.safetensors", 1.0)
    assert "\n" not in str(err.value)
    assert session8.lora_record() == ()
    assert session8.generate(["still works"], seed=1, steps=STEPS).images


def test_an_inpainting_model_asks_for_init_and_mask_and_warms_up_its_shape(tmp_path, files):
    from sdmagic.tiny import write_random_model

    folder = write_random_model(tmp_path / "inpaint", "tiny-inpaint")
    session = sdmagic.setup(str(folder), cache=False)
    try:
        with pytest.raises(SDMagicError, match="is an inpainting model: give init_image="):
            session.generate(["a cat"], seed=1, steps=STEPS)
        with pytest.raises(SDMagicError, match="give mask="):
            session.generate(["a cat"], seed=1, steps=STEPS, init_image=files / "init.png")
        key, _, source = session.warmup(steps=STEPS)
        assert key.mode == "inpaint" and source == "compiled"
        result = session.generate(["a cat"], seed=1, steps=STEPS, init_image=files / "init.png", mask=files / "mask.png")
        init = np.asarray(Image.open(files / "init.png").convert("RGB"))
        keep = np.asarray(Image.open(files / "mask.png")) == 0
        assert np.array_equal(np.asarray(result.images[0])[keep], init[keep])
        assert session.compiled_shapes == [key]  # the warm-up's executable made the image
    finally:
        session.close()


def test_setup_again_with_other_lora_weights_does_not_reload(tiny_dir, tmp_path, monkeypatch, compiles):
    import sdmagic.session as session_module

    lora_file = _write_kohya_lora(tmp_path / "style.safetensors", seed=3)
    first = sdmagic.setup("tiny", lora=[(lora_file, 0.5)], cache=False)
    first.generate(["a cat"], seed=1, steps=STEPS)
    fresh = sdmagic.setup("tiny", lora=[(lora_file, 1.2)], cache=False)
    expected = _pixels(fresh.generate(["a cat"], seed=1, steps=STEPS))
    fresh.close()

    def no_reload(*args, **kwargs):
        raise AssertionError("the base model was read again")

    monkeypatch.setattr(session_module, "load_model", no_reload)
    with compiles:
        again = sdmagic.setup("tiny", lora=[f"{lora_file}:1.2"], cache=False, replacing=first)
        result = again.generate(["a cat"], seed=1, steps=STEPS)
    assert again is first and compiles.count == 0
    assert np.array_equal(_pixels(result), expected)
    assert len(again.history) == 2  # the same session: its history goes on
    monkeypatch.undo()
    # The same LoRAs again is a plain re-run of setup: that reloads (the files may have changed).
    reloaded = sdmagic.setup("tiny", lora=[f"{lora_file}:1.2"], cache=False, replacing=again)
    assert reloaded is not again
    reloaded.close()


def test_sdxl_takes_init_images_masks_and_long_weighted_prompts(files):
    session = sdmagic.setup("tiny-sdxl", cache=False)
    try:
        words = "a (red:1.3) fox " * 40  # past 75 tokens: two chunks or more, in both encoders
        result = session.generate([words, "a hill"], seed=2, steps=STEPS, init_image=files / "init.png",
                                  mask=files / "mask.png", strength=0.8)
        alone = session.generate(["a hill"], seed=3, steps=STEPS, init_image=files / "init.png",
                                 mask=files / "mask.png", strength=0.8)
        assert np.array_equal(_pixels(result, 1), _pixels(alone))
        init = np.asarray(Image.open(files / "init.png").convert("RGB"))
        keep = np.asarray(Image.open(files / "mask.png")) == 0
        assert np.array_equal(np.asarray(result.images[0])[keep], init[keep])
        assert session._weighted(words).chunk_count >= 2 and not result.warnings
    finally:
        session.close()
