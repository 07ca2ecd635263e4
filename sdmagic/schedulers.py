"""Samplers for the denoising loop, in plain JAX, equal to diffusers' PyTorch schedulers (0.39).

Every sampler follows one PyTorch scheduler class step for step. What depends only on the scheduler
config and the number of steps (betas, alphas_cumprod, sigmas, timesteps, the LMS coefficients,
DPM-Solver's step sizes) is computed once on the host in float64 and baked into the compiled loop as
float32 tables; what depends on the latents is traced float32 JAX that reads those tables at the
model-evaluation index `i`, so a whole sampling run is one `jax.lax.fori_loop`:

    x = noise * sampler.init_noise_sigma(steps)
    state = sampler.init_state(x)
    def body(i, carry):
        x, state = carry
        t = jnp.asarray(sampler.timesteps(steps))[i]
        model_output = unet(sampler.scale_input(steps, i, x), t)
        return sampler.step(steps, i, state, x, model_output, noise=lambda: normal(i))
    x, _ = jax.lax.fori_loop(0, sampler.evaluations(steps), body, (x, state))

Image-to-image starts part way, as diffusers' img2img and inpaint pipelines do after
`set_begin_index` on sliced timesteps: `start = sampler.first_evaluation(steps, strength)`,
`x = sampler.add_noise(steps, start, x0, noise)`, and the same loop from `start` (which may be a traced
value). Tables stay indexed by the absolute evaluation; what diffusers counts from the first step it
runs (PLMS's counter, DPM-Solver's lower_order_nums, LMS's list of derivatives) is counted in the
state from `init_state`, never by testing `i == 0`.

The sampler's name fixes the algorithm, as A1111's label promises (DPM++ 2M is always second-order
midpoint DPM-Solver++, "Karras" always Karras sigmas, PNDM always PLMS); the model's scheduler
config gives the noise schedule: betas, prediction type, timestep spacing and offset, read with the
defaults of the PyTorch class the sampler follows, since each class reads its own keys and defaults
(an SD 1.x config has no `timestep_spacing`: PNDM and DDIM then space "leading", LMS, Euler and DPM
"linspace"). A setting that changes the math in a way not implemented here is a one-line ValueError.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from numpy.polynomial import polynomial as P

# sdmagic name -> the A1111 sampler label written into PNG parameters.
SAMPLERS = {
    "pndm": "PLMS",
    "ddim": "DDIM",
    "lms": "LMS",
    "lms-karras": "LMS Karras",
    "dpm": "DPM++ 2M",
    "dpm-karras": "DPM++ 2M Karras",
    "euler": "Euler",
    "euler-a": "Euler a",
}

_SAMPLER_OF_CLASS = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-a",
}

# The noise-schedule keys every followed class reads, with the PyTorch classes' common defaults.
_SCHEDULE_KEYS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "steps_offset": 0,
}
# Per sampler family, the other keys its PyTorch class reads, with that class's default.
_CLASS_KEYS = {
    "pndm": {"prediction_type": "epsilon", "timestep_spacing": "leading", "set_alpha_to_one": False},
    "ddim": {
        "prediction_type": "epsilon", "timestep_spacing": "leading", "set_alpha_to_one": True,
        "clip_sample": True, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False,
    },
    "lms": {"prediction_type": "epsilon", "timestep_spacing": "linspace"},
    "dpm": {
        "prediction_type": "epsilon", "timestep_spacing": "linspace", "rescale_betas_zero_snr": False,
        "lambda_min_clipped": -math.inf, "sigma_min": None, "sigma_max": None,
    },
    "euler": {
        "prediction_type": "epsilon", "timestep_spacing": "linspace", "rescale_betas_zero_snr": False,
        "interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero",
    },
    "euler-a": {"prediction_type": "epsilon", "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
}
# Only the "-karras" DPM sampler reads these (its Karras sigma range).
_KARRAS_ONLY = ("sigma_min", "sigma_max")
# The values each class accepts for its choice keys.
_CHOICES = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("leading", "linspace", "trailing"),
    "interpolation_type": ("linear", "log_linear"),
    "timestep_type": ("discrete", "continuous"),
    "final_sigmas_type": ("zero", "sigma_min"),
}
_PREDICTIONS = {
    "pndm": ("epsilon", "v_prediction"),
    "euler-a": ("epsilon", "v_prediction"),
}
_ALL_PREDICTIONS = ("epsilon", "v_prediction", "sample")
# Settings of the PyTorch classes that sdmagic does not implement: key -> the one value accepted.
_REFUSED = {
    "ddim": {"thresholding": False},
    "dpm": {"thresholding": False, "use_flow_sigmas": False, "variance_type": None},
}


def denoising_steps(steps: int, strength: float) -> int:
    """How many of `steps` denoising steps image-to-image runs at `strength`, as diffusers' img2img
    and inpaint pipelines count them (`get_timesteps`): min(int(steps * strength), steps), rounded
    down, so it may be 0 (diffusers then fails; the caller says what to do). Raises ValueError for a
    strength outside [0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)):
        raise ValueError(f"strength must be a number between 0 and 1, not {strength!r}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be between 0 and 1, not {strength!r}")
    return min(int(steps * float(strength)), steps)


def sampler_name_for(class_name: str, config: dict) -> str:
    """The sdmagic sampler for a diffusers scheduler class (PyTorch or Flax name) and its config.

    Classes without an sdmagic sampler (DDPM, Heun, UniPC, ...) get "pndm", SD 1.x's own.
    """
    name = _SAMPLER_OF_CLASS.get(str(class_name).removeprefix("Flax"), "pndm")
    if name in ("lms", "dpm") and config.get("use_karras_sigmas"):
        name += "-karras"
    return name


def make_sampler(name: str, config: dict) -> Sampler:
    """The sampler `name` on the noise schedule of `config` (a diffusers scheduler_config.json dict).

    Raises ValueError (one line) for an unknown name or a setting this sampler does not implement.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    family = name.removesuffix("-karras")
    label = SAMPLERS[name]
    keys = {**_SCHEDULE_KEYS, **_CLASS_KEYS[family]}
    if not name.endswith("-karras"):
        keys = {k: v for k, v in keys.items() if k not in _KARRAS_ONLY}
    settings = {}
    for key, default in keys.items():
        value = config.get(key)
        # A null reads as the class default (diffusers itself would pass the null on and fail).
        settings[key] = default if value is None else _setting(label, key, value, default)
    for key, accepted in _REFUSED.get(family, {}).items():
        if config.get(key, accepted) not in (accepted, None):
            raise ValueError(f"{label} does not implement {key}={config[key]!r}")
    predictions = _PREDICTIONS.get(family, _ALL_PREDICTIONS)
    if family == "euler" and settings["prediction_type"] == "original_sample":
        settings["prediction_type"] = "sample"  # EulerDiscreteScheduler's other name for it
    if settings["prediction_type"] not in predictions:
        raise ValueError(
            f"{label} does not support prediction_type {settings['prediction_type']!r} (use {', '.join(predictions)})"
        )
    n = settings["num_train_timesteps"]
    if n < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, not {n}")
    if settings["trained_betas"] is not None and len(settings["trained_betas"]) != n:
        raise ValueError(f"trained_betas has {len(settings['trained_betas'])} values, not num_train_timesteps={n}")
    cls = _FAMILIES[family]
    return cls(name=name, settings=tuple(sorted(settings.items())))


def _setting(label: str, key: str, value: Any, default: Any) -> Any:
    """`value` in the type of `default` (hashable), or a one-line ValueError."""
    try:
        if key in _CHOICES:
            if value not in _CHOICES[key]:
                raise ValueError
            return value
        if key == "trained_betas":
            return tuple(float(b) for b in value)
        if key == "prediction_type":
            return str(value)
        if isinstance(default, bool):
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, bool) or int(value) != value:
                raise ValueError
            return int(value)
        if isinstance(default, float) or default is None:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return value
    except (TypeError, ValueError):
        allowed = f" (use {', '.join(_CHOICES[key])})" if key in _CHOICES else ""
        raise ValueError(f"{label}: {key}={str(value)[:60]!r} is not supported{allowed}") from None


# ----------------------------------------------------------------------------------------------
# The noise schedule on the host (float64)
# ----------------------------------------------------------------------------------------------


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' betas_for_alpha_bar (the "squaredcos_cap_v2" schedule)."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last alphas_cumprod is exactly 0 (Lin et al. 2023, "Common Diffusion Noise Schedules ...")."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def _alphas_cumprod(s: dict, *, terminal_floor: bool) -> np.ndarray:
    """alphas_cumprod over the training timesteps. With a zero terminal SNR, the sigma-based
    classes (`terminal_floor`) set the last one to 2**-24, as diffusers does, to keep sigmas finite."""
    n = s["num_train_timesteps"]
    if s["trained_betas"] is not None:
        betas = np.asarray(s["trained_betas"], np.float64)
    elif s["beta_schedule"] == "linear":
        betas = np.linspace(s["beta_start"], s["beta_end"], n, dtype=np.float64)
    elif s["beta_schedule"] == "scaled_linear":
        betas = np.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
    else:
        betas = _cosine_betas(n)
    zero_snr = s.get("rescale_betas_zero_snr", False)
    if zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    if zero_snr and terminal_floor:
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod


def _training_sigmas(s: dict) -> np.ndarray:
    alphas_cumprod = _alphas_cumprod(s, terminal_floor=True)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def _spaced_timesteps(s: dict, steps: int, *, round_linspace: bool) -> np.ndarray:
    """The `steps` timesteps, highest first, as DDIM/LMS/Euler space them (float64 values)."""
    n, spacing = s["num_train_timesteps"], s["timestep_spacing"]
    if spacing == "linspace":
        # LMS and Euler keep linspace's fractions, in float32 as they compute them.
        t = np.linspace(0, n - 1, steps)
        t = t.round() if round_linspace else t.astype(np.float32).astype(np.float64)
        return t[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (n // steps)).round()[::-1] + s["steps_offset"]
    return np.round(np.arange(n, 0, -n / steps)) - 1


def _karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: sigmas evenly spaced in sigma**(1/rho), highest first."""
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_training_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of `sigmas`, interpolating log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    distances = log_sigma - log_training_sigmas[:, None]
    low = np.cumsum(distances >= 0, axis=0).argmax(axis=0).clip(max=len(log_training_sigmas) - 2)
    low_log, high_log = log_training_sigmas[low], log_training_sigmas[low + 1]
    w = np.clip((low_log - log_sigma) / (low_log - high_log), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _lms_coefficients(sigmas: np.ndarray, steps: int, order: int) -> np.ndarray:
    """Exact integrals of the Lagrange basis over each step, newest derivative first
    (diffusers and k-diffusion integrate the same polynomials numerically)."""
    out = np.zeros((steps, order), np.float64)
    for i in range(steps):
        used = min(i + 1, order)
        for j in range(used):
            basis = np.array([1.0])
            for k in range(used):
                if k != j:
                    basis = P.polymul(basis, np.array([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k]))
            antiderivative = P.polyint(basis)
            out[i, j] = P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative)
    return out


def _check_timestep(label: str, steps: int, timestep: int, n: int) -> None:
    """PNDM and DDIM index alphas_cumprod by timestep (diffusers fails there with an IndexError)."""
    if timestep >= n:
        raise ValueError(
            f"{label} cannot take {steps} steps on this schedule: it would reach timestep {int(timestep)},"
            f" beyond the last training timestep {n - 1} (steps_offset too large?)"
        )


def _max_input_sigma(s: dict, sigmas: np.ndarray) -> float:
    """init_noise_sigma of the sigma-based classes: "leading" spacing adds the unit variance back."""
    largest = float(sigmas.max())
    return largest if s["timestep_spacing"] in ("linspace", "trailing") else (largest**2 + 1) ** 0.5


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What a sampler needs for `steps` steps, known before tracing."""

    timesteps: np.ndarray  # float32 [evaluations]: the UNet's timestep at each evaluation
    init_noise_sigma: float
    table: dict = field(default_factory=dict)  # name -> float32 [evaluations, ...]: per-step constants


@dataclass(frozen=True)
class Sampler:
    """A sampler on one noise schedule; equal and hashable by name and the settings it reads.

    `steps` is a Python int everywhere; `i` may be traced (int32).
    """

    name: str
    settings: tuple  # sorted (config key, value) pairs: every setting that changes the math

    @property
    def label(self) -> str:
        return SAMPLERS[self.name]

    def cache_key(self) -> tuple:
        """JSON-able, and different whenever the math differs (trained betas as a digest)."""

        def jsonable(key, value):
            if key == "trained_betas" and value is not None:
                return hashlib.sha256(repr(value).encode()).hexdigest()[:16]
            if isinstance(value, float) and not math.isfinite(value):
                return repr(value)
            return value

        return (self.name, tuple((key, jsonable(key, value)) for key, value in self.settings))

    def evaluations(self, steps: int) -> int:
        """Model evaluations a run of `steps` steps makes."""
        return len(self._plan(steps).timesteps)

    def timesteps(self, steps: int) -> np.ndarray:
        """float32 [evaluations]: the timestep the UNet is given at each evaluation."""
        return self._plan(steps).timesteps.copy()

    def init_noise_sigma(self, steps: int) -> float:
        """The standard deviation of the initial latents: x_T = standard normal * this."""
        return self._plan(steps).init_noise_sigma

    # diffusers' `scheduler.order` (model evaluations per step in its slicing arithmetic): 1 for
    # every class followed here, PLMS included (its extra evaluation is outside that arithmetic).
    order = 1

    def first_evaluation(self, steps: int, strength: float) -> int:
        """The model evaluation image-to-image starts at: diffusers' `t_start * scheduler.order`
        (0 at strength 1). Host-side; raises ValueError for a strength outside [0, 1]."""
        self._plan(steps)  # checks steps
        return (steps - denoising_steps(steps, strength)) * self.order

    def add_noise(self, steps: int, i, x0, noise):
        """`x0` noised to the level of evaluation `i` (traced or not), as this sampler's diffusers
        class's `add_noise` does after `set_begin_index`: the latents that evaluation `i` expects."""
        raise NotImplementedError

    def init_state(self, latents) -> dict:
        """The state carried between steps: fixed-shape arrays, a run's start (at any evaluation)."""
        return {}

    def scale_input(self, steps: int, i, x):
        """The latents as the UNet is given them at evaluation `i`."""
        return x

    def step(self, steps: int, i, state: dict, x, model_output, noise: Callable):
        """(latents after evaluation `i`, next state). `noise()` gives a standard normal like `x`;
        only ancestral samplers call it."""
        raise NotImplementedError

    @property
    def _settings(self) -> dict:
        return dict(self.settings)

    @functools.lru_cache(maxsize=64)
    def _plan(self, steps: int) -> _Plan:
        n = self._settings["num_train_timesteps"]
        if isinstance(steps, bool) or int(steps) != steps or not 1 <= steps <= n:
            raise ValueError(f"{self.label}: steps must be between 1 and {n}, not {steps!r}")
        plan = self._make_plan(int(steps))
        tables = {k: np.asarray(v, np.float32) for k, v in plan.table.items()}
        return _Plan(np.asarray(plan.timesteps, np.float32), float(plan.init_noise_sigma), tables)

    def _make_plan(self, steps: int) -> _Plan:
        raise NotImplementedError

    def _at(self, steps: int, i) -> dict:
        """The per-step constants of evaluation `i` (traced or not), as float32 JAX values."""
        return {k: jnp.asarray(v)[i] for k, v in self._plan(steps).table.items()}


def _float32(x):
    return jnp.asarray(x, jnp.float32)


def _push(history, newest):
    """A fixed-size history, newest first."""
    return jnp.concatenate([newest[None], history[:-1]])


def _x0_from_sigma(prediction_type: str, x, model_output, sigma):
    """The clean latents predicted at noise level `sigma` (variance-exploding x = x0 + sigma * eps)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    return model_output


# PLMS's Adams-Bashforth weights by the number of stored model outputs, newest first.
_PLMS_WEIGHTS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


class PLMS(Sampler):
    """PNDMScheduler with skip_prk_steps: PLMS, linear multistep started by a Heun-like step.

    There is one more evaluation than steps: the second timestep repeats. The first evaluation of a
    run steps from its x with its own output; the second, at the next timestep, redoes that step from
    the same x with the average of both outputs (and does not store its own); later evaluations use
    the Adams-Bashforth combination of up to 4 stored outputs. Every step moves
    num_train_timesteps // steps, as diffusers. Always PLMS, whatever the config's skip_prk_steps
    says (PNDM's Runge-Kutta start is not implemented).

    "First" and "second" count from the run's start (diffusers' `counter`, reset by set_timesteps):
    an image-to-image run that starts at evaluation s treats evaluation s + 1 as the corrector of
    the step from s, stepping from t_(s+1) + ratio to t_(s+1) as diffusers does on its sliced
    timesteps, even where that is not where evaluation s stepped to.
    """

    def _make_plan(self, steps):
        s = self._settings
        ratio = s["num_train_timesteps"] // steps
        rising = _spaced_timesteps(s, steps, round_linspace=True)[::-1].astype(np.int64)
        timesteps = np.concatenate([rising[:-1], rising[-2:-1], rising[-1:]])[::-1]
        alphas_cumprod = _alphas_cumprod(s, terminal_floor=False)
        n = len(alphas_cumprod)
        final = 1.0 if s["set_alpha_to_one"] else alphas_cumprod[0]

        def row(current, previous):
            a = alphas_cumprod[current]
            a_prev = alphas_cumprod[previous] if previous >= 0 else final
            # PNDM paper eq. 9, the step from t to t_prev given the noise prediction.
            denominator = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
            return dict(sqrt_alpha=a**0.5, sqrt_one_minus_alpha=(1 - a) ** 0.5, sample_coeff=(a_prev / a) ** 0.5,
                        eps_coeff=(a_prev - a) / denominator)

        rows = []
        for k, t in enumerate(timesteps):
            _check_timestep(self.label, steps, t, n)
            if k == 1:
                _check_timestep(self.label, steps, t + ratio, n)
            plain = row(t, t - ratio)
            # The corrector's step, used when this evaluation is the second of a run; never for k = 0.
            corrector = row(min(t + ratio, n - 1), t) if k > 0 else plain
            rows.append({**plain, **{"corrector_" + key: value for key, value in corrector.items()}})
        table = {key: np.array([r[key] for r in rows]) for key in rows[0]}
        # add_noise (DDPM's forward process at each evaluation's timestep), in float32 as diffusers.
        table.update(_ddpm_noise_table(alphas_cumprod, timesteps))
        return _Plan(timesteps, 1.0, table)

    def init_state(self, latents):
        x = _float32(latents)
        return {"outputs": jnp.zeros((4,) + x.shape, jnp.float32), "first_sample": jnp.zeros_like(x),
                "count": jnp.zeros((), jnp.int32)}

    def add_noise(self, steps, i, x0, noise):
        return _ddpm_add_noise(self._at(steps, i), x0, noise)

    def step(self, steps, i, state, x, model_output, noise):
        c = self._at(steps, i)
        x, model_output = _float32(x), _float32(model_output)
        k = state["count"]  # evaluations of this run before this one
        second = k == 1
        row = {key: jnp.where(second, c["corrector_" + key], c[key])
               for key in ("sqrt_alpha", "sqrt_one_minus_alpha", "sample_coeff", "eps_coeff")}
        weights = jnp.asarray(_PLMS_RUN_WEIGHTS)[jnp.minimum(k, 4)]
        new_weight = jnp.where(second, jnp.float32(0.5), jnp.float32(0.0))
        outputs = jnp.where(second, state["outputs"], _push(state["outputs"], model_output))
        sample = jnp.where(second, state["first_sample"], x)
        eps = new_weight * model_output + jnp.tensordot(weights, outputs, axes=1)
        if self._settings["prediction_type"] == "v_prediction":
            eps = row["sqrt_alpha"] * eps + row["sqrt_one_minus_alpha"] * sample
        x_next = row["sample_coeff"] * sample - row["eps_coeff"] * eps
        return x_next, {"outputs": outputs, "first_sample": jnp.where(k == 0, x, state["first_sample"]),
                        "count": k + 1}


# The stored outputs' weights by the evaluation's place in its run (0, 1, 2, 3, 4 or later),
# newest first: the plain first step, the corrector's average (half of the stored first output;
# the other half is the new output's), then Adams-Bashforth of 2, 3 and 4 outputs.
_PLMS_RUN_WEIGHTS = np.array([
    [1.0, 0, 0, 0], [0.5, 0, 0, 0], _PLMS_WEIGHTS[2] + [0, 0], _PLMS_WEIGHTS[3] + [0], _PLMS_WEIGHTS[4],
], np.float32)


def _ddpm_noise_table(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> dict:
    """sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]) per evaluation, from float32
    alphas_cumprod as DDPM-style add_noise (PNDM, DDIM) computes them."""
    a = alphas_cumprod.astype(np.float32)[np.asarray(timesteps, np.int64)]
    return dict(noise_alpha=np.sqrt(a), noise_sigma=np.sqrt(np.float32(1) - a))


def _ddpm_add_noise(c: dict, x0, noise):
    return c["noise_alpha"] * _float32(x0) + c["noise_sigma"] * _float32(noise)


class DDIM(Sampler):
    """DDIMScheduler with eta 0: deterministic, from x_t to x_{t - num_train_timesteps // steps}."""

    def _make_plan(self, steps):
        s = self._settings
        timesteps = _spaced_timesteps(s, steps, round_linspace=True).astype(np.int64)
        alphas_cumprod = _alphas_cumprod(s, terminal_floor=False)
        _check_timestep(self.label, steps, timesteps.max(), len(alphas_cumprod))
        final = 1.0 if s["set_alpha_to_one"] else alphas_cumprod[0]
        previous = timesteps - s["num_train_timesteps"] // steps
        a = alphas_cumprod[timesteps]
        a_prev = np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)], final)
        table = dict(sqrt_alpha=a**0.5, sqrt_beta=(1 - a) ** 0.5, sqrt_alpha_prev=a_prev**0.5,
                     sqrt_beta_prev=(1 - a_prev) ** 0.5, **_ddpm_noise_table(alphas_cumprod, timesteps))
        return _Plan(timesteps, 1.0, table)

    def add_noise(self, steps, i, x0, noise):
        return _ddpm_add_noise(self._at(steps, i), x0, noise)

    def step(self, steps, i, state, x, model_output, noise):
        c = self._at(steps, i)
        s = self._settings
        x, m = _float32(x), _float32(model_output)
        if s["prediction_type"] == "epsilon":
            x0, eps = (x - c["sqrt_beta"] * m) / c["sqrt_alpha"], m
        elif s["prediction_type"] == "sample":
            x0 = m
            eps = (x - c["sqrt_alpha"] * x0) / c["sqrt_beta"]
        else:
            x0, eps = c["sqrt_alpha"] * x - c["sqrt_beta"] * m, c["sqrt_alpha"] * m + c["sqrt_beta"] * x
        if s["clip_sample"]:
            x0 = jnp.clip(x0, -s["clip_sample_range"], s["clip_sample_range"])
        return c["sqrt_alpha_prev"] * x0 + c["sqrt_beta_prev"] * eps, state


def _sigma_add_noise(c: dict, x0, noise):
    """add_noise of the sigma-based classes (LMS, Euler, Euler a): x0 + noise * sigma."""
    return _float32(x0) + _float32(noise) * c["sigma"]


def _discrete_sigmas(s: dict, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, their sigmas) as LMS, Euler and Euler a space them, before Karras or a final sigma."""
    timesteps = _spaced_timesteps(s, steps, round_linspace=False)
    training = _training_sigmas(s)
    sigmas = np.interp(timesteps, np.arange(len(training)), training)
    return timesteps, sigmas


class LMS(Sampler):
    """LMSDiscreteScheduler (k-diffusion's K-LMS, order 4), optionally on Karras sigmas.

    The coefficients' order grows with the absolute evaluation (diffusers' min(step_index + 1, 4)),
    the derivatives with the run's own steps.
    """

    lms_order = 4

    def _make_plan(self, steps):
        s = self._settings
        timesteps, sigmas = _discrete_sigmas(s, steps)
        if self.name == "lms-karras":
            sigmas = _karras_sigmas(sigmas[-1], sigmas[0], steps)
            timesteps = _sigma_to_t(sigmas, np.log(_training_sigmas(s)))
        sigmas = np.concatenate([sigmas, [0.0]])
        table = dict(sigma=sigmas[:-1], input_divisor=(sigmas[:-1] ** 2 + 1) ** 0.5,
                     coefficients=_lms_coefficients(sigmas, len(timesteps), self.lms_order))
        return _Plan(timesteps, _max_input_sigma(s, sigmas), table)

    def init_state(self, latents):
        # Zeros stand for derivatives this run has not computed: a run that starts at evaluation s
        # combines only its own, as diffusers' zip over its (then shorter) list of derivatives.
        x = _float32(latents)
        return {"derivatives": jnp.zeros((self.lms_order,) + x.shape, jnp.float32)}

    def add_noise(self, steps, i, x0, noise):
        return _sigma_add_noise(self._at(steps, i), x0, noise)

    def scale_input(self, steps, i, x):
        return _float32(x) / self._at(steps, i)["input_divisor"]

    def step(self, steps, i, state, x, model_output, noise):
        c = self._at(steps, i)
        x = _float32(x)
        x0 = _x0_from_sigma(self._settings["prediction_type"], x, _float32(model_output), c["sigma"])
        derivatives = _push(state["derivatives"], (x - x0) / c["sigma"])
        return x + jnp.tensordot(c["coefficients"], derivatives, axes=1), {"derivatives": derivatives}


class Euler(Sampler):
    """EulerDiscreteScheduler (k-diffusion's Euler; no churn)."""

    def _make_plan(self, steps):
        s = self._settings
        timesteps, sigmas = _discrete_sigmas(s, steps)
        if s["interpolation_type"] == "log_linear":
            # As diffusers: steps + 1 sigmas from the largest to the smallest training sigma, so the
            # last step ends at the smallest one whatever final_sigmas_type says.
            training = _training_sigmas(s)
            sigmas = np.exp(np.linspace(np.log(training[-1]), np.log(training[0]), steps + 1))
        if s["final_sigmas_type"] == "zero":
            last = 0.0
        else:
            alphas_cumprod = _alphas_cumprod(s, terminal_floor=True)
            last = ((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5
        sigmas = np.concatenate([sigmas, [last]])
        if s["timestep_type"] == "continuous" and s["prediction_type"] == "v_prediction":
            timesteps = 0.25 * np.log(sigmas[:-1].astype(np.float32).astype(np.float64))
        count = len(timesteps)
        table = dict(sigma=sigmas[:count], dt=sigmas[1:count + 1] - sigmas[:count],
                     input_divisor=(sigmas[:count] ** 2 + 1) ** 0.5)
        return _Plan(timesteps, _max_input_sigma(s, sigmas), table)

    def scale_input(self, steps, i, x):
        return _float32(x) / self._at(steps, i)["input_divisor"]

    def add_noise(self, steps, i, x0, noise):
        return _sigma_add_noise(self._at(steps, i), x0, noise)

    def _euler(self, steps, i, x, model_output):
        """The Euler step over the table's dt, and the table row."""
        c = self._at(steps, i)
        x = _float32(x)
        x0 = _x0_from_sigma(self._settings["prediction_type"], x, _float32(model_output), c["sigma"])
        derivative = (x - x0) / c["sigma"]
        return x + derivative * c["dt"], c

    def step(self, steps, i, state, x, model_output, noise):
        return self._euler(steps, i, x, model_output)[0], state


class EulerAncestral(Euler):
    """EulerAncestralDiscreteScheduler (k-diffusion's Euler a, eta 1): an Euler step down to
    sigma_down, then fresh noise of sigma_up, with sigma_down**2 + sigma_up**2 = sigma_next**2."""

    def _make_plan(self, steps):
        s = self._settings
        timesteps, sigmas = _discrete_sigmas(s, steps)
        sigmas = np.concatenate([sigmas, [0.0]])
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        table = dict(sigma=sigma, dt=sigma_down - sigma, sigma_up=sigma_up, input_divisor=(sigma**2 + 1) ** 0.5)
        return _Plan(timesteps, _max_input_sigma(s, sigmas), table)

    def step(self, steps, i, state, x, model_output, noise):
        x, c = self._euler(steps, i, x, model_output)  # down to sigma_down (the table's dt)
        return x + _float32(noise()) * c["sigma_up"], state


class DPMSolver2M(Sampler):
    """DPMSolverMultistepScheduler as DPM++ 2M: algorithm "dpmsolver++", solver_order 2, "midpoint",
    lower_order_final, final_sigmas_type "zero"; optionally on Karras sigmas.

    In log-SNR time lambda = -log(sigma), each step is exact for a data prediction that is constant
    (first order: the first step and the last, which lands on sigma 0) or linear in lambda through
    the previous step's prediction (second order, every other step).
    """

    def _make_plan(self, steps):
        s = self._settings
        n = s["num_train_timesteps"]
        alphas_cumprod = _alphas_cumprod(s, terminal_floor=True)
        training = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
        log_snr = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(1 - alphas_cumprod))
        last = n - int(np.searchsorted(log_snr[::-1], s["lambda_min_clipped"]))
        spacing = s["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ratio = last // (steps + 1)
            timesteps = (np.arange(steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + s["steps_offset"]
        else:
            timesteps = np.arange(last, 0, -n / steps).round().astype(np.int64) - 1
        if self.name == "dpm-karras":
            sigma_min = s["sigma_min"] if s["sigma_min"] is not None else training[0]
            sigma_max = s["sigma_max"] if s["sigma_max"] is not None else training[-1]
            sigmas = _karras_sigmas(sigma_min, sigma_max, steps)
            fractional = _sigma_to_t(sigmas, np.log(training))
            rounded = fractional if s["beta_schedule"] == "squaredcos_cap_v2" else fractional.round()
            timesteps = rounded.astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(n), training)
        sigmas = np.concatenate([sigmas, [0.0]])

        count = len(timesteps)
        alpha = 1 / (sigmas**2 + 1) ** 0.5  # the VP alpha_t and sigma_t of each VE sigma
        sigma_vp = sigmas * alpha
        with np.errstate(divide="ignore"):
            log_snr = -np.log(sigmas)  # log(alpha_t / sigma_t); +inf at the final sigma 0
        rows = []
        for i in range(count):
            h = log_snr[i + 1] - log_snr[i]
            if sigmas[i + 1] == 0:  # the limit h -> inf: the step lands on the predicted x0
                sample_ratio, x0_coeff = 0.0, 1.0
            else:
                sample_ratio, x0_coeff = sigma_vp[i + 1] / sigma_vp[i], -alpha[i + 1] * np.expm1(-h)
            second_order = 0 < i < count - 1
            # D1 = (x0 - previous x0) / r0 with r0 = h_previous / h; midpoint weighs it by 1/2.
            d1_coeff = 0.5 * x0_coeff * h / (log_snr[i] - log_snr[i - 1]) if second_order else 0.0
            rows.append(dict(alpha=alpha[i], sigma_vp=sigma_vp[i], sample_ratio=sample_ratio,
                             x0_coeff=x0_coeff, d1_coeff=d1_coeff))
        table = {key: np.array([row[key] for row in rows]) for key in rows[0]}
        return _Plan(timesteps, 1.0, table)

    def init_state(self, latents):
        # `count` is diffusers' lower_order_nums: a run's first step is first order wherever it starts.
        return {"previous_x0": jnp.zeros_like(_float32(latents)), "count": jnp.zeros((), jnp.int32)}

    def add_noise(self, steps, i, x0, noise):
        c = self._at(steps, i)
        return c["alpha"] * _float32(x0) + c["sigma_vp"] * _float32(noise)

    def step(self, steps, i, state, x, model_output, noise):
        c = self._at(steps, i)
        x, m = _float32(x), _float32(model_output)
        prediction_type = self._settings["prediction_type"]
        if prediction_type == "epsilon":
            x0 = (x - c["sigma_vp"] * m) / c["alpha"]
        elif prediction_type == "v_prediction":
            x0 = c["alpha"] * x - c["sigma_vp"] * m
        else:
            x0 = m
        d1_coeff = jnp.where(state["count"] > 0, c["d1_coeff"], jnp.float32(0.0))
        x_next = c["sample_ratio"] * x + c["x0_coeff"] * x0 + d1_coeff * (x0 - state["previous_x0"])
        return x_next, {"previous_x0": x0, "count": state["count"] + 1}


_FAMILIES = {"pndm": PLMS, "ddim": DDIM, "lms": LMS, "dpm": DPMSolver2M, "euler": Euler, "euler-a": EulerAncestral}
