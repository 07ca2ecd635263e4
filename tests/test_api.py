"""The plain Python API on the tiny model: no IPython involved."""

import warnings

import jax
import numpy as np
import pytest

import sdmagic
from conftest import STEPS
from sdmagic import SDMagicError
from sdmagic.session import PromptTruncatedWarning


def pixels(result):
    return np.stack([np.asarray(image) for image in result.images])


def test_generate_returns_images_in_prompt_order_with_seeds(session8):
    result = session8.generate(["a red fox", "a cat"], seed=3, steps=STEPS, images_per_prompt=2)
    assert result.prompts == ["a red fox", "a red fox", "a cat", "a cat"]
    assert result.seeds == [3, 4, 5, 6]
    assert len(result.images) == 4 and result.images[0].size == (64, 64)
    assert result.nsfw == [False] * 4
    assert "4 images 64x64" in repr(result) and "seeds 3..6" in repr(result)
    grid = result.grid(cols=2)
    assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64
    assert result.grid(cols=4, captions=False).size == (4 * 64, 64)
    html = result._repr_html_()
    assert html.count("<figcaption") == 4 and "seed 6" in html
    assert result._repr_png_().startswith(b"\x89PNG")


def test_same_prompt_and_seed_give_same_image_in_any_position(session8):
    alone = pixels(session8.generate(["a red fox"], seed=40, steps=STEPS))[0]
    # 10 images: two calls of 8, the fox lands at position 9 (second chunk, second device).
    prompts = [f"filler {i}" for i in range(9)] + ["a red fox"]
    mixed = session8.generate(prompts, seed=31, steps=STEPS)
    assert mixed.seeds[9] == 40 and mixed.calls == 2
    np.testing.assert_array_equal(pixels(mixed)[9], alone)
    assert not np.array_equal(pixels(mixed)[8], alone)


def test_same_images_on_one_and_eight_devices(session8, session1):
    prompts = ["a red fox", "a cat knight", "a lighthouse"]
    a = pixels(session8.generate(prompts, seed=5, steps=STEPS, guidance=4.0))
    b = pixels(session1.generate(prompts, seed=5, steps=STEPS, guidance=4.0))
    assert session8.batch == 8 and session1.batch == 1
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_euler_a_noise_is_each_images_own(tiny_dir):
    """An ancestral sampler draws fresh noise every step: from the image's own key, so the image
    is the same on 1 device or 8 and in any position, and differs from another seed's."""
    from sdmagic.models import load_model, with_scheduler
    from sdmagic.session import Session
    from sdmagic.devices import find_devices

    model = with_scheduler(load_model("tiny", safety_checker=False), "euler-a")
    eight = Session(model, find_devices(8))
    one = Session(with_scheduler(load_model("tiny", safety_checker=False), "euler-a"), find_devices(1))
    try:
        prompts = [f"filler {i}" for i in range(5)] + ["a red fox"]
        mixed = pixels(eight.generate(prompts, seed=20, steps=STEPS))
        alone = pixels(one.generate(["a red fox"], seed=25, steps=STEPS))[0]
        assert np.abs(mixed[5].astype(int) - alone.astype(int)).max() <= 2
        assert not np.array_equal(mixed[4], mixed[5])
        # Not the deterministic Euler image of the same start: the per-step noise took part.
        euler = Session(with_scheduler(load_model("tiny", safety_checker=False), "euler"), find_devices(1))
        try:
            plain = pixels(euler.generate(["a red fox"], seed=25, steps=STEPS))[0]
        finally:
            euler.close()
        assert np.abs(plain.astype(int) - alone.astype(int)).max() > 10
    finally:
        eight.close()
        one.close()


def test_sizes_need_only_the_vae_factor(session8):
    """As in PyTorch, a latent side that does not halve cleanly through the UNet is fine (its
    upsamplers resize to the skip connection's side): tiny's 66 pixels are 33 latents, 17 after the
    downsampler."""
    result = session8.generate(["a red fox"], seed=3, steps=STEPS, height=66, width=70)
    assert result.images[0].size == (70, 66)
    assert np.asarray(result.images[0]).std() > 10


def test_new_prompts_seeds_guidance_and_negative_compile_nothing(session8, compiles):
    session8.generate(["warm up"], seed=1, steps=STEPS)
    shapes_before = len(session8.compiled_shapes)
    with compiles:
        for count, seed, guidance, negative in [(1, 7, 3.0, None), (8, 100, 9.5, "blurry"), (11, 2**31, 1.0, "dark")]:
            result = session8.generate([f"prompt {i}" for i in range(count)], seed=seed, steps=STEPS,
                                       guidance=guidance, negative=negative)
            assert len(result.images) == count and result.compile_seconds == 0
    assert compiles.count == 0
    assert len(session8.compiled_shapes) == shapes_before


def test_a_new_shape_compiles_once(session8, compiles):
    steps = 7  # a step count no other test compiles on the shared session, whatever the test order
    with compiles:
        first = session8.generate(["a"], seed=1, steps=steps)
        second = session8.generate(["b", "c"], seed=2, steps=steps)
    assert first.compile_seconds > 0 and second.compile_seconds == 0
    assert compiles.count == 1


def test_random_seed_is_drawn_and_reported(session8):
    result = session8.generate(["a red fox"], steps=STEPS)
    assert result.seed_was_random and 0 <= result.seeds[0] < 2**31
    assert "(random)" in repr(result)
    again = session8.generate(["a red fox"], seed=result.seeds[0], steps=STEPS)
    np.testing.assert_array_equal(pixels(again), pixels(result))


def test_long_prompt_warns_with_what_was_cut(session8):
    # Prompts are read in 75-token chunks up to 8 of them (600 tokens); only the rest is cut.
    prompt = "a very long prompt " * 50  # 750 tokens: the tiny tokenizer is about one token per character
    with pytest.warns(PromptTruncatedWarning, match=r"\d+ tokens cut: '"):
        result = session8.generate([prompt], seed=1, steps=STEPS)
    assert result.warnings and "600 tokens" in result.warnings[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session8.generate(["short"], seed=1, steps=STEPS)
        session8.generate(["a very long prompt " * 8], seed=1, steps=STEPS)  # 152 tokens: two chunks, whole


def test_timings_separate_compile_and_inference(session8):
    summary = session8.timings.summary()
    assert summary.images > 0 and summary.run_seconds > 0 and summary.compile_seconds > 0
    assert "images/s" in repr(summary)
    report = session8.time_runs(2)
    assert len(report.seconds) == 2 and report.compile_seconds == 0
    assert "median of 2 runs" in repr(report)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=["  "]), "no prompts"),
        (dict(seed=-1), "seed must be from 0"),
        (dict(seed="three"), "seed must be a whole number"),
        (dict(seed=1.5), "seed must be a whole number"),
        (dict(seed=2**32 - 1, prompts=["a", "b"]), "seed must be from 0 to 4294967294"),
        (dict(steps=0), "steps must be from 1"),
        (dict(guidance="strong"), "guidance must be a number"),
        (dict(guidance=float("nan")), "guidance must be a finite number"),
        (dict(height=0), "height must be from 1"),
        (dict(width=-64), "width must be from 1"),
        (dict(height=67), "height 67 is not a multiple of 2"),
        (dict(width=100_000), "width must be from 1 to 4096"),
        (dict(images_per_prompt=0), "images_per_prompt must be from 1"),
    ],
)
def test_bad_requests_raise_one_clear_line_and_change_nothing(session8, kwargs, message):
    runs = len(session8.timings.runs)
    args = dict(prompts=["a red fox"], steps=STEPS)
    args.update(kwargs)
    with pytest.raises(SDMagicError, match=message) as info:
        session8.generate(args.pop("prompts"), **args)
    assert "\n" not in str(info.value)
    assert len(session8.timings.runs) == runs


def test_keyboard_interrupt_leaves_the_session_ready(session8, monkeypatch):
    import sdmagic.session as session_module

    real = session_module.place_batch
    calls = {"n": 0}

    def interrupted(array, plan):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(array, plan)

    monkeypatch.setattr(session_module, "place_batch", interrupted)
    runs = len(session8.timings.runs)
    with pytest.raises(KeyboardInterrupt):
        session8.generate([f"p{i}" for i in range(12)], seed=1, steps=STEPS)
    monkeypatch.setattr(session_module, "place_batch", real)
    assert len(session8.timings.runs) == runs
    result = session8.generate(["after ctrl-c"], seed=1, steps=STEPS)
    assert len(result.images) == 1


def test_safety_checker_blacks_out_flagged_images(tiny_dir):
    session = sdmagic.setup("tiny")
    try:
        assert session.safety_checker
        clean = session.generate(["a", "b"], seed=1, steps=STEPS)
        assert clean.nsfw == [False, False] and pixels(clean).max() > 0
        # Thresholds below any cosine similarity flag every image; values, not shapes: no recompile.
        checker = dict(session.params["safety_checker"])
        checker["concept_embeds_weights"] = jax.device_put(
            -2 * np.ones(17, np.float32), session.plan.replicated)
        session.params["safety_checker"] = checker
        flagged = session.generate(["a", "b"], seed=1, steps=STEPS)
        assert flagged.compile_seconds == 0
        assert flagged.nsfw == [True, True] and pixels(flagged).max() == 0
        assert all("blacked out by the safety checker" in c for c in flagged.captions())
        assert "2 blacked out" in repr(flagged)
    finally:
        session.close()


def test_no_safety_checker_and_other_schedulers(tiny_dir, session8):
    reference = pixels(session8.generate(["a red fox"], seed=9, steps=STEPS))[0]
    for name in ("dpm", "ddim", "lms"):
        session = sdmagic.setup("tiny", scheduler=name, safety_checker=False, devices=2)
        try:
            assert not session.safety_checker and session.model.scheduler_name == name
            image = pixels(session.generate(["a red fox"], seed=9, steps=STEPS))[0]
            assert image.std() > 5
            assert not np.array_equal(image, reference)  # a different sampler, a different picture
        finally:
            session.close()


def test_bfloat16_runs(tiny_dir):
    session = sdmagic.setup("tiny", dtype="bfloat16", devices=2, safety_checker=False)
    try:
        assert "bfloat16" in session.describe()
        leaf = jax.tree_util.tree_leaves(session.params["unet"])[0]
        assert leaf.dtype == jax.numpy.bfloat16
        result = session.generate(["a red fox"], seed=9, steps=STEPS)
        assert pixels(result).std() > 5
    finally:
        session.close()


def test_setup_again_replaces_and_frees_the_old_session(tiny_dir):
    old = sdmagic.setup("tiny", devices=1, safety_checker=False)
    leaf = jax.tree_util.tree_leaves(old.params)[0]
    with pytest.raises(SDMagicError, match="does not exist"):
        sdmagic.setup("./no/such/model", replacing=old)
    assert not leaf.is_deleted()  # a failed setup leaves the old one usable
    old.generate(["still here"], seed=1, steps=STEPS)
    new = sdmagic.setup("tiny", devices=1, safety_checker=False, replacing=old)
    assert leaf.is_deleted()
    with pytest.raises(SDMagicError, match="closed"):
        old.generate(["gone"], seed=1, steps=STEPS)
    new.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="float8"), "unknown dtype 'float8'"),
        (dict(scheduler="heun"), "unknown scheduler 'heun'"),
        (dict(model=""), "needs a Hub id"),
    ],
)
def test_bad_setup_arguments(kwargs, message):
    args = dict(model="tiny")
    args.update(kwargs)
    with pytest.raises(SDMagicError, match=message):
        sdmagic.setup(args.pop("model"), **args)


def test_model_folder_errors(tmp_path, tiny_dir):
    import shutil

    with pytest.raises(SDMagicError, match="does not exist"):
        sdmagic.setup(str(tmp_path / "missing"))
    with pytest.raises(SDMagicError, match="no model_index.json"):
        sdmagic.setup(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(SDMagicError, match="lacks vae/"):
        sdmagic.setup(str(broken))
    (broken / "vae").mkdir()
    (broken / "vae" / "config.json").write_text("{}")
    with pytest.raises(SDMagicError, match="no weights in vae/"):
        sdmagic.setup(str(broken))
    (broken / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SDMagicError, match="diffusion_pytorch_model.bin is a pickle file .* can run any code"):
        sdmagic.setup(str(broken))


def test_a_copied_model_folder_loads_like_tiny(tmp_path, tiny_dir, session8):
    import shutil

    folder = tmp_path / "my-model"
    shutil.copytree(tiny_dir, folder)
    session = sdmagic.setup(str(folder), devices=8)
    try:
        a = pixels(session.generate(["a red fox"], seed=2, steps=STEPS))
        b = pixels(session8.generate(["a red fox"], seed=2, steps=STEPS))
        np.testing.assert_array_equal(a, b)
    finally:
        session.close()


def test_unknown_hub_id_offline_fails_fast_with_what_to_do(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(SDMagicError, match="could not reach the Hugging Face Hub .* model='tiny' offline"):
        sdmagic.setup("nobody/no-such-model")
    assert time.perf_counter() - start < 10


def test_lms_coefficients_integrate_the_lagrange_basis():
    from sdmagic.schedulers import LMS, _lms_coefficients

    sigmas = np.array([14.6, 7.0, 3.1, 1.2, 0.4, 0.0])
    coefficients = _lms_coefficients(sigmas, 5, LMS.lms_order)
    assert coefficients.shape == (5, 4)
    # The basis sums to 1, so each row integrates to the step's length; step 0 is plain Euler.
    np.testing.assert_allclose(coefficients.sum(axis=1), np.diff(sigmas), rtol=1e-12)
    np.testing.assert_allclose(coefficients[0], [sigmas[1] - sigmas[0], 0, 0, 0])
    assert np.count_nonzero(coefficients[2]) == 3 and np.count_nonzero(coefficients[4]) == 4


def test_no_network_fails_fast_with_what_to_do(monkeypatch, tmp_path):
    import time

    import huggingface_hub.constants as constants

    # A closed local port stands in for a machine without network: the probe fails at once.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(SDMagicError, match="could not reach the Hugging Face Hub"):
        sdmagic.setup("CompVis/stable-diffusion-v1-4", dtype="float32")
    assert time.perf_counter() - start < 10


def test_hub_id_loads_from_a_cached_snapshot_offline(monkeypatch, tmp_path, tiny_dir, session8):
    import shutil

    import huggingface_hub.constants as constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-sd"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    session = sdmagic.setup("someone/tiny-sd", devices=8)
    try:
        assert session.model.name == "someone/tiny-sd"
        a = pixels(session.generate(["a red fox"], seed=2, steps=STEPS))
        np.testing.assert_array_equal(a, pixels(session8.generate(["a red fox"], seed=2, steps=STEPS)))
    finally:
        session.close()


@pytest.mark.parametrize(
    "error, message",
    [
        ("GatedRepoError", "is gated: accept its licence .* log in"),
        ("RepositoryNotFoundError", "was not found on the Hub.*log in if it is private.*model='tiny'"),
        ("RevisionNotFoundError", "has no revision 'nope'"),
        ("LocalEntryNotFoundError", "could not reach the Hugging Face Hub"),
    ],
)
def test_hub_failures_say_what_to_do(monkeypatch, error, message):
    import huggingface_hub
    from huggingface_hub import errors

    from sdmagic import sources

    def fail(*args, **kwargs):
        cls = getattr(errors, error)
        raise cls("upstream text") if error == "LocalEntryNotFoundError" else cls("upstream text", response=None)

    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(SDMagicError, match=message) as info:
        sdmagic.setup("someone/some-model", revision="nope")
    assert "\n" not in str(info.value)


def test_random_models_for_the_bench_build_in_memory(tiny_dir):
    """bench/speed.py --full builds SD 1.x this way; the tiny architecture checks the same code."""
    from sdmagic.devices import find_devices
    from sdmagic.models import random_model, with_scheduler
    from sdmagic.session import Session

    model = random_model("tiny", dtype="bfloat16")
    assert model.source == "memory" and model.scheduler_name == "pndm"
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(model.params)} == {"bfloat16"}
    dpm = with_scheduler(model, "dpm")
    assert dpm.scheduler_name == "dpm" and dpm.params is model.params
    session = Session(dpm, find_devices(2))
    result = session.generate(["a fox"], seed=1, steps=STEPS)
    assert pixels(result).std() > 5
    session.close()
