"""K-LMS that runs inside a compiled loop.

diffusers' `FlaxLMSDiscreteScheduler` cannot be traced: its `step` grows an array with
`jnp.append`, branches on the traced timestep and integrates coefficients with SciPy, and it indexes
sigmas by timestep rather than by step. This version follows the PyTorch `LMSDiscreteScheduler`
(k-diffusion's K-LMS, order 4): sigmas and the multistep coefficients depend only on the config
and the (static) number of steps, so they are computed once on the host while tracing, and the
derivative history is a fixed-size ring, newest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import polynomial as P

ORDER = 4


@flax.struct.dataclass
class LMSState:
    init_noise_sigma: jnp.ndarray
    timesteps: jnp.ndarray = None
    sigmas: jnp.ndarray = None
    coefficients: jnp.ndarray = None  # [steps, ORDER]; zero where fewer derivatives exist yet
    derivatives: jnp.ndarray = None  # [ORDER, *sample shape], newest first
    step_index: jnp.ndarray = None


@dataclass
class _Output:
    prev_sample: jnp.ndarray
    state: LMSState

    def to_tuple(self):
        return self.prev_sample, self.state


def _betas(config) -> np.ndarray:
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float64)
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":
        return np.linspace(config["beta_start"], config["beta_end"], n, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
    raise ValueError(f"LMS: beta schedule {schedule!r} is not supported; use --scheduler pndm, ddim or dpm")


def _lms_coefficients(sigmas: np.ndarray, steps: int) -> np.ndarray:
    """Exact integrals of the Lagrange basis over each step (k-diffusion integrates numerically)."""
    out = np.zeros((steps, ORDER), np.float64)
    for i in range(steps):
        order = min(i + 1, ORDER)
        for j in range(order):
            basis = np.array([1.0])
            for k in range(order):
                if k != j:
                    basis = P.polymul(basis, np.array([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k]))
            antiderivative = P.polyint(basis)
            out[i, j] = P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative)
    return out


class LMSScheduler:
    """Same calling convention as diffusers' Flax schedulers, so the generate loop is unchanged."""

    def __init__(self, config: dict):
        self.config = dict(config)
        self.prediction_type = self.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"LMS: prediction type {self.prediction_type!r} is not supported")
        alphas_cumprod = np.cumprod(1.0 - _betas(self.config))
        self._train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5

    def create_state(self) -> LMSState:
        # With linspace spacing the first sigma is always the largest training sigma.
        return LMSState(init_noise_sigma=jnp.asarray(self._train_sigmas[-1], jnp.float32))

    def set_timesteps(self, state: LMSState, num_inference_steps: int, shape: tuple = ()) -> LMSState:
        n = int(self.config["num_train_timesteps"])
        timesteps = np.linspace(0, n - 1, num_inference_steps, dtype=np.float64)[::-1].copy()
        sigmas = np.interp(timesteps, np.arange(n), self._train_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]])
        return state.replace(
            timesteps=jnp.asarray(timesteps, jnp.float32),
            sigmas=jnp.asarray(sigmas, jnp.float32),
            coefficients=jnp.asarray(_lms_coefficients(sigmas, num_inference_steps), jnp.float32),
            derivatives=jnp.zeros((ORDER,) + tuple(shape), jnp.float32),
            step_index=jnp.zeros((), jnp.int32),
        )

    def scale_model_input(self, state: LMSState, sample, timestep=None):
        sigma = state.sigmas[state.step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, state: LMSState, model_output, timestep, sample) -> _Output:
        i = state.step_index
        sigma = state.sigmas[i]
        if self.prediction_type == "epsilon":
            predicted = sample - sigma * model_output
        else:
            predicted = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        derivative = (sample - predicted) / sigma
        derivatives = jnp.concatenate([derivative[None].astype(jnp.float32), state.derivatives[:-1]])
        coefficients = state.coefficients[i]
        update = jnp.tensordot(coefficients, derivatives, axes=1)
        prev = (sample + update).astype(sample.dtype)
        return _Output(prev, state.replace(derivatives=derivatives, step_index=i + 1))
