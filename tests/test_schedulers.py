"""sdmagic.schedulers against diffusers' PyTorch schedulers: the same timesteps and initial sigma,
and the same latents after whole sampling runs with a deterministic stand-in for the UNet."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from sdmagic import schedulers

# diffusers' schedulers call np.array on tensors in a way numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SD1 = {  # runwayml/stable-diffusion-v1-5's scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
SD2 = {  # stabilityai/stable-diffusion-2-1's: v-prediction
    **SD1, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
}
CONFIGS = {"sd1": SD1, "sd2-v": SD2}

DPM_2M = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
              euler_at_final=False, final_sigmas_type="zero")
# sdmagic name -> (the diffusers class it follows, the config overrides its name stands for).
REFERENCE = {
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "ddim": (DDIMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
    "lms-karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    "dpm": (DPMSolverMultistepScheduler, {**DPM_2M, "use_karras_sigmas": False}),
    "dpm-karras": (DPMSolverMultistepScheduler, {**DPM_2M, "use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
}
SHAPE = (2, 4, 3, 5)
# Latents agree to this fraction of their largest value after a whole run.
RELATIVE_TOLERANCE = 2e-5
# diffusers computes sigmas from float32 alphas_cumprod, where 1 - alphas_cumprod near t = 0 keeps
# few digits: a single step from t = 0 starts at sigma 0.0100013 there, 0.0100005 exactly (and here).
ONE_STEP_TOLERANCE = 1e-4


def _fake_model(xp, x, t, phase):
    """A deterministic UNet stand-in that depends on both the latents and the timestep."""
    return 0.1 * x + 0.5 * xp.sin(t / 100.0 + phase)


def _inputs(evaluations: int):
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((evaluations,) + SHAPE).astype(np.float32)
    phase = np.linspace(0, 6, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    return x_T, noises, phase


def _torch_run(name, config, steps, monkeypatch):
    """(the diffusers scheduler after set_timesteps, final latents) of a pipeline-style loop."""
    cls, overrides = REFERENCE[name]
    scheduler = cls.from_config({**config, **overrides})
    scheduler.set_timesteps(steps)
    x_T, noises, phase = _inputs(len(scheduler.timesteps))
    draws = iter(torch.from_numpy(n) for n in noises)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: next(draws))
    phase = torch.from_numpy(phase)
    x = torch.from_numpy(x_T) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = _fake_model(torch, scheduler.scale_model_input(x, t), t.to(torch.float32), phase)
        x = scheduler.step(model_output, t, x).prev_sample
    return scheduler, x.numpy()


def _jax_run(sampler, steps, *, compiled=True):
    """Final latents of the same loop: one jitted fori_loop, or step by step on the host."""
    x_T, noises, phase = _inputs(sampler.evaluations(steps))
    timesteps = sampler.timesteps(steps)

    def body(i, carry):
        x, state = carry
        t = jnp.asarray(timesteps)[i]
        model_output = _fake_model(jnp, sampler.scale_input(steps, i, x), t, phase)
        return sampler.step(steps, i, state, x, model_output, lambda: jnp.asarray(noises)[i])

    def run(x_T):
        x = x_T * sampler.init_noise_sigma(steps)
        carry = (x, sampler.init_state(x))
        if compiled:
            return jax.lax.fori_loop(0, sampler.evaluations(steps), body, carry)[0]
        for i in range(sampler.evaluations(steps)):
            carry = body(jnp.int32(i), carry)
        return carry[0]

    return np.asarray(jax.jit(run)(x_T) if compiled else run(jnp.asarray(x_T)))


def _relative_error(ours, reference):
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _check_against_reference(name, config, steps, monkeypatch, *, compiled, tolerance=RELATIVE_TOLERANCE):
    if steps == 1:
        tolerance = max(tolerance, ONE_STEP_TOLERANCE)
    sampler = schedulers.make_sampler(name, config)
    reference, expected = _torch_run(name, config, steps, monkeypatch)
    reference_timesteps = reference.timesteps.numpy()
    assert sampler.evaluations(steps) == len(reference_timesteps)
    if reference_timesteps.dtype.kind == "i":
        np.testing.assert_array_equal(sampler.timesteps(steps), reference_timesteps)
    else:
        # LMS Karras interpolates timesteps in log sigma, which diffusers computes from float32
        # alphas_cumprod: at low t its log sigmas are off by ~1e-4 and its timesteps by up to ~0.04.
        np.testing.assert_allclose(sampler.timesteps(steps), reference_timesteps, rtol=1e-6, atol=0.05)
    assert sampler.init_noise_sigma(steps) == pytest.approx(float(reference.init_noise_sigma), rel=tolerance)
    latents = _jax_run(sampler, steps, compiled=compiled)
    assert latents.dtype == np.float32 and np.all(np.isfinite(latents))
    assert _relative_error(latents, expected) < tolerance, _relative_error(latents, expected)


# 20 steps as one jitted fori_loop (the samplers trace); 7 step by step, which is quicker than compiling.
@pytest.mark.parametrize("steps, compiled", [(7, False), (20, True)], ids=["7-steps", "20-steps-jit"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", schedulers.SAMPLERS)
def test_whole_runs_match_diffusers(name, config, steps, compiled, monkeypatch):
    _check_against_reference(name, CONFIGS[config], steps, monkeypatch, compiled=compiled)


# Settings beyond SD 1.x/2.x's, on SD 1.x's config (names None: every sampler). "class defaults" is
# an empty config, each class's own defaults, also with a single step.
VARIANTS = [
    ("class defaults", {}, None),
    ("trailing", {"timestep_spacing": "trailing"}, None),
    ("linspace", {"timestep_spacing": "linspace"}, ["pndm", "ddim"]),
    ("leading", {"timestep_spacing": "leading", "steps_offset": 1},
     ["lms", "lms-karras", "dpm", "dpm-karras", "euler", "euler-a"]),
    # Not dpm-karras: there diffusers truncates the cosine schedule's fractional Karras timesteps to
    # integers, repeats the first one, and its step-index lookup then starts at index 1 and fails.
    ("cosine betas", {"beta_schedule": "squaredcos_cap_v2"},
     ["pndm", "ddim", "lms", "lms-karras", "dpm", "euler", "euler-a"]),
    ("linear betas", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, None),
    ("trained betas", {"trained_betas": list(np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)}, None),
    ("sample prediction", {"prediction_type": "sample"},
     ["ddim", "lms", "lms-karras", "dpm", "dpm-karras", "euler"]),
    ("zero terminal SNR", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                           "timestep_spacing": "trailing"},
     ["ddim", "dpm", "dpm-karras", "euler", "euler-a"]),
    ("alpha to one", {"set_alpha_to_one": True}, ["pndm", "ddim"]),
    ("clipped x0", {"clip_sample": True, "clip_sample_range": 0.5}, ["ddim"]),
    ("final sigma_min", {"final_sigmas_type": "sigma_min"}, ["euler"]),
    ("log-linear sigmas", {"interpolation_type": "log_linear"}, ["euler"]),
    ("continuous timesteps", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, ["euler"]),
    ("clipped lambda", {"lambda_min_clipped": -3.0}, ["dpm", "dpm-karras"]),
    ("karras range", {"sigma_min": 0.1, "sigma_max": 10.0}, ["dpm-karras"]),
]


# With zero terminal SNR the first sigma is 4096 (alphas_cumprod 2**-24): float32 latents in the
# thousands keep only ~1e-3 absolute precision, and the two implementations round differently there.
ZERO_SNR_TOLERANCE = 1e-4


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_other_settings_match_diffusers(variant, monkeypatch):
    label, overrides, names = variant
    base = {} if not overrides else SD1
    tolerance = ZERO_SNR_TOLERANCE if label == "zero terminal SNR" else RELATIVE_TOLERANCE
    for name in names or schedulers.SAMPLERS:
        for steps in (1, 8) if not overrides else (8,):
            _check_against_reference(
                name, {**base, **overrides}, steps, monkeypatch, compiled=False, tolerance=tolerance
            )


def test_plms_repeats_the_second_timestep():
    sampler = schedulers.make_sampler("pndm", SD1)
    assert sampler.evaluations(20) == 21
    assert list(sampler.timesteps(4)) == [751, 501, 501, 251, 1]
    assert schedulers.make_sampler("euler", SD1).evaluations(20) == 20


def test_sampler_name_for():
    karras = {"use_karras_sigmas": True}
    assert schedulers.sampler_name_for("PNDMScheduler", SD1) == "pndm"
    assert schedulers.sampler_name_for("FlaxDDIMScheduler", SD2) == "ddim"
    assert schedulers.sampler_name_for("LMSDiscreteScheduler", {}) == "lms"
    assert schedulers.sampler_name_for("LMSDiscreteScheduler", karras) == "lms-karras"
    assert schedulers.sampler_name_for("FlaxDPMSolverMultistepScheduler", {}) == "dpm"
    assert schedulers.sampler_name_for("DPMSolverMultistepScheduler", karras) == "dpm-karras"
    assert schedulers.sampler_name_for("EulerDiscreteScheduler", karras) == "euler"
    assert schedulers.sampler_name_for("EulerAncestralDiscreteScheduler", {}) == "euler-a"
    for other in ("DDPMScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler", "FlaxKarrasVeScheduler"):
        assert schedulers.sampler_name_for(other, karras) == "pndm"
    assert set(schedulers.SAMPLERS.values()) >= {"PLMS", "DDIM", "DPM++ 2M Karras", "Euler a"}


@pytest.mark.parametrize(
    "name, config, words",
    [
        ("heun", SD1, "unknown sampler"),
        ("ddim", {**SD1, "thresholding": True}, "thresholding"),
        ("dpm", {**SD1, "use_flow_sigmas": True}, "use_flow_sigmas"),
        ("dpm", {**SD1, "variance_type": "learned_range"}, "variance_type"),
        ("pndm", {**SD1, "prediction_type": "sample"}, "prediction_type"),
        ("euler-a", {**SD1, "prediction_type": "sample"}, "prediction_type"),
        ("euler", {**SD1, "prediction_type": "flow_prediction"}, "prediction_type"),
        ("lms", {**SD1, "beta_schedule": "sqrt"}, "beta_schedule"),
        ("ddim", {**SD1, "timestep_spacing": "uniform"}, "timestep_spacing"),
        ("euler", {**SD1, "interpolation_type": "cubic"}, "interpolation_type"),
        ("dpm", {**SD1, "beta_start": "small"}, "beta_start"),
        ("lms", {**SD1, "trained_betas": [0.1, 0.2]}, "trained_betas"),
    ],
)
def test_unsupported_settings_are_one_line_value_errors(name, config, words):
    with pytest.raises(ValueError, match=words) as error:
        schedulers.make_sampler(name, config)
    assert "\n" not in str(error.value)


def test_steps_out_of_range_are_value_errors():
    sampler = schedulers.make_sampler("euler", SD1)
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="steps"):
            sampler.timesteps(steps)
    # With steps_offset 1, 1000 "leading" steps would index timestep 1000 (an IndexError in diffusers).
    for name in ("pndm", "ddim"):
        with pytest.raises(ValueError, match="timestep 1000") as error:
            schedulers.make_sampler(name, SD1).evaluations(1000)
        assert "\n" not in str(error.value)
    assert schedulers.make_sampler("ddim", SD1).evaluations(999) == 999


def test_samplers_are_keys_of_their_math():
    ddim = schedulers.make_sampler("ddim", SD1)
    # A key the DDIM class does not read, or a null read as its default, changes nothing.
    assert ddim == schedulers.make_sampler("ddim", {**SD1, "skip_prk_steps": False, "use_karras_sigmas": True})
    assert hash(ddim) == hash(schedulers.make_sampler("ddim", {**SD1, "timestep_spacing": None}))
    assert ddim.cache_key() != schedulers.make_sampler("ddim", SD2).cache_key()
    # The defaults are each class's: DDIM clips x0 and sets alpha to one unless told not to.
    assert dict(schedulers.make_sampler("ddim", {}).settings)["clip_sample"] is True
    assert dict(schedulers.make_sampler("ddim", {}).settings)["set_alpha_to_one"] is True
    assert dict(schedulers.make_sampler("pndm", {}).settings)["set_alpha_to_one"] is False
    assert schedulers.make_sampler("lms", SD1).cache_key() != schedulers.make_sampler("lms-karras", SD1).cache_key()
    trained = schedulers.make_sampler("euler", {**SD1, "trained_betas": [0.01] * 1000})
    other = schedulers.make_sampler("euler", {**SD1, "trained_betas": [0.02] * 1000})
    assert trained.cache_key() != other.cache_key()
    clipped = schedulers.make_sampler("dpm", {**SD1, "lambda_min_clipped": float("-inf")})
    for sampler in (ddim, trained, clipped):
        assert json.loads(json.dumps(sampler.cache_key())) == json.loads(json.dumps(sampler.cache_key()))
        assert len(json.dumps(sampler.cache_key())) < 1000
    assert {ddim.label, trained.label, clipped.label} == {"DDIM", "Euler", "DPM++ 2M"}


# ----------------------------------------------------------------------------------------------
# Partial runs (image-to-image and inpainting): diffusers' get_timesteps + set_begin_index
# ----------------------------------------------------------------------------------------------

# A mask for the inpainting blend (1 = keep the sampler's latents, 0 = the noised original).
_BLEND = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3 != 0).astype(np.float32)


def _torch_partial_run(name, config, steps, strength, monkeypatch, *, blend):
    """diffusers' img2img loop (inpaint's when `blend`): noised x0 at the first timestep run, then
    the sliced timesteps; with `blend` the 4-channel inpainting blend after every step."""
    cls, overrides = REFERENCE[name]
    scheduler = cls.from_config({**config, **overrides})
    scheduler.set_timesteps(steps)
    x0, noises, phase = _inputs(len(scheduler.timesteps))
    noise = torch.from_numpy(noises[-1])
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    # Euler a's draws: the absolute evaluation's noise, as sdmagic's contract gives it.
    draws = iter(torch.from_numpy(n) for n in noises[t_start * scheduler.order:])
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: next(draws))
    phase = torch.from_numpy(phase)
    original = torch.from_numpy(x0)
    x = scheduler.add_noise(original, noise, timesteps[:1])
    mask = torch.from_numpy(_BLEND)
    for i, t in enumerate(timesteps):
        model_output = _fake_model(torch, scheduler.scale_model_input(x, t), t.to(torch.float32), phase)
        x = scheduler.step(model_output, t, x).prev_sample
        if blend:
            proper = original
            if i < len(timesteps) - 1:
                proper = scheduler.add_noise(original, noise, torch.tensor([timesteps[i + 1]]))
            x = (1 - mask) * proper + mask * x
    return len(timesteps), x.numpy()


def _jax_partial_run(sampler, steps, start, *, blend, compiled):
    """The same from evaluation `start` (traced when compiled)."""
    x0, noises, phase = _inputs(sampler.evaluations(steps))
    timesteps = sampler.timesteps(steps)
    evaluations = sampler.evaluations(steps)
    noise = jnp.asarray(noises[-1])

    def body(i, carry):
        x, state = carry
        t = jnp.asarray(timesteps)[i]
        model_output = _fake_model(jnp, sampler.scale_input(steps, i, x), t, phase)
        x, state = sampler.step(steps, i, state, x, model_output, lambda: jnp.asarray(noises)[i])
        if blend:
            proper = jnp.where(i < evaluations - 1,
                               sampler.add_noise(steps, jnp.minimum(i + 1, evaluations - 1), x0, noise), x0)
            x = (1 - _BLEND) * proper + _BLEND * x
        return x, state

    def run(x0, start):
        x = sampler.add_noise(steps, start, x0, noise)
        carry = (x, sampler.init_state(x))
        if compiled:
            return jax.lax.fori_loop(start, evaluations, body, carry)[0]
        for i in range(int(start), evaluations):
            carry = body(jnp.int32(i), carry)
        return carry[0]

    start = jnp.int32(start)
    return np.asarray(jax.jit(run)(x0, start) if compiled else run(jnp.asarray(x0), start))


STRENGTHS = (0.3, 0.5, 0.75, 1.0)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", schedulers.SAMPLERS)
def test_partial_runs_match_diffusers(name, config, monkeypatch):
    """Every sampler started at every strength's evaluation, as img2img and as inpainting (the
    blend noises the original to each later evaluation's level), equals diffusers' sliced run."""
    sampler = schedulers.make_sampler(name, CONFIGS[config])
    steps = 7
    for strength in STRENGTHS:
        start = sampler.first_evaluation(steps, strength)
        for blend in (False, True):
            count, expected = _torch_partial_run(name, CONFIGS[config], steps, strength, monkeypatch, blend=blend)
            assert sampler.evaluations(steps) - start == count
            latents = _jax_partial_run(sampler, steps, start, blend=blend, compiled=False)
            assert _relative_error(latents, expected) < RELATIVE_TOLERANCE, (strength, blend)


@pytest.mark.parametrize("name", ["pndm", "dpm-karras", "euler-a"])
def test_partial_runs_trace_their_start(name, monkeypatch):
    """One jitted loop whose start is an argument gives every strength's run."""
    sampler = schedulers.make_sampler(name, SD1)
    steps = 7
    for strength in (0.5, 1.0):
        _, expected = _torch_partial_run(name, SD1, steps, strength, monkeypatch, blend=True)
        latents = _jax_partial_run(sampler, steps, sampler.first_evaluation(steps, strength), blend=True, compiled=True)
        assert _relative_error(latents, expected) < RELATIVE_TOLERANCE, strength


def test_plms_restarts_its_counter_part_way():
    """diffusers' PNDM on sliced timesteps treats the run's second evaluation as the corrector of
    its first step, whatever timestep it is at: at 4 steps and strength 0.5, [501, 251, 1]."""
    sampler = schedulers.make_sampler("pndm", SD1)
    assert sampler.first_evaluation(4, 0.5) == 2
    assert list(sampler.timesteps(4)[2:]) == [501, 251, 1]


def test_denoising_steps_round_down_as_diffusers():
    assert schedulers.denoising_steps(50, 0.75) == 37
    assert schedulers.denoising_steps(4, 0.5) == 2
    assert schedulers.denoising_steps(3, 0.3) == 0  # no step: the caller must refuse it
    assert schedulers.denoising_steps(10, 1.0) == 10
    sampler = schedulers.make_sampler("euler", SD1)
    assert sampler.first_evaluation(10, 1.0) == 0 and sampler.first_evaluation(10, 0.25) == 8
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="strength"):
            schedulers.denoising_steps(10, bad)
