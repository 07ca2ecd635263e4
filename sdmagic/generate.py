"""The compiled text-to-image function and the noise contract.

One executable per `ShapeKey`. Everything that changes from cell to cell (prompts, negative prompts,
seeds, guidance) is an array argument, so a new cell with the same shape reuses the executable.
The loop is diffusers' `StableDiffusionPipeline.__call__` over sdmagic's model interface and
samplers, so that images equal PyTorch diffusers' for the same weights and noise; it differs in
taking per-image seeds and guidance, and in drawing the noise, running the safety checker and
converting to uint8 on the device, so that only finished pixels cross to the host. The sampler's
tables (timesteps, sigmas, coefficients) depend only on its config and the step count, which the
`ShapeKey` fixes, so they are constants of the executable, not arguments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .devices import DevicePlan


@dataclass(frozen=True)
class ShapeKey:
    """What an executable is compiled for; nothing else forces a compile."""

    steps: int
    height: int
    width: int
    batch: int  # images per call: devices x per-device batch
    safety: bool
    scheduler: str
    dtype: str
    step_progress: bool = False  # reports each denoising step to the host (jax.debug.callback)

    def describe(self) -> str:
        checker = "" if self.safety else ", no safety checker"
        return f"{self.batch} x {self.width}x{self.height}, {self.steps} {self.scheduler} steps, {self.dtype}{checker}"


# The noise contract. Every random draw of an image comes from its own key K = PRNGKey(seed), so an
# image depends neither on its batch, chunk or device nor on the other images:
# - the initial latents are normal(K, (C, H/f, W/f)) (unchanged since sdmagic 0.1);
# - an ancestral sampler's noise at model evaluation n is normal(fold_in(fold_in(K, ANCESTRAL), n)).
# Later draws (img2img's posterior sample, its added noise) get streams of their own here.
ANCESTRAL = 1


def image_keys(seeds: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.PRNGKey)(seeds)


def initial_noise(seeds: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Image i's initial latents: normal(PRNGKey(seed_i), (C, H/f, W/f), float32)."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(image_keys(seeds))


def step_noise(keys: jax.Array, stream: int, n: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Each image's draw for model evaluation `n` of `stream`, from its own key."""
    return jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, stream), n), shape, jnp.float32)
    )(keys)


def _pair(unconditional: jax.Array, conditional: jax.Array) -> jax.Array:
    """[u0, c0, u1, c1, ...]: each image's two guidance rows side by side.

    diffusers concatenates [u0, u1, ..., c0, c1, ...]; on a batch split over devices that puts
    an image's two rows on different devices, and every step then pays for resharding collectives
    (all-to-all, collective-permute). Interleaved, each device keeps its own images' rows, as pmap
    would. Rows are independent through the UNet, so the images are the same.
    """
    return jnp.stack([unconditional, conditional], axis=1).reshape((-1,) + unconditional.shape[1:])


def _unpair(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    paired = rows.reshape((-1, 2) + rows.shape[1:])
    return paired[:, 0], paired[:, 1]


def build_generate(model: Any, key: ShapeKey, on_step: Callable | None = None) -> Callable:
    """The function compiled for `key`: (params, ids, neg_ids, seeds, guidance)
    -> (uint8 images [B, H, W, 3], nsfw flags [B]).

    `model` is a LoadedModel: its `model` (the StableDiffusion interface) and `sampler`. With
    `key.step_progress`, `on_step(step)` runs on the host after each denoising step (once per step,
    not per device); such an executable holds a Python callback and cannot be saved.
    """
    sd = model.model
    sampler = model.sampler
    spec = sd.spec
    f = spec.scale_factor
    latent_shape = (spec.latent_channels, key.height // f, key.width // f)
    steps = key.steps
    timesteps = jnp.asarray(sampler.timesteps(steps), jnp.float32)
    evaluations = int(timesteps.shape[0])
    extra = evaluations - steps
    # XLA:CPU has no half-precision matmul or convolution kernels: it converts bfloat16 weights to
    # float32, and would hoist those conversions out of the loop, keeping a float32 copy of the whole
    # UNet alive for the call (3.4 GB for SD 1.x). Tied to the latents, the weights stay loop-variant
    # there. Elsewhere loop-invariant work (the text's cross-attention keys and values, the merged
    # projection kernels) is left for XLA to hoist out of the loop.
    tie_weights = jax.default_backend() == "cpu" and key.dtype in ("bfloat16", "float16")

    def generate(params, prompt_ids, neg_prompt_ids, seeds, guidance):
        context = _pair(sd.encode_text(params, neg_prompt_ids), sd.encode_text(params, prompt_ids))
        guidance_scale = guidance.astype(jnp.float32)[:, None, None, None]
        keys = image_keys(seeds)
        latents = initial_noise(seeds, latent_shape) * sampler.init_noise_sigma(steps)

        def loop_body(i, carry):
            latents, state = carry
            params_now = params
            if tie_weights:
                params_now, latents = jax.lax.optimization_barrier((params, latents))
            model_input = sampler.scale_input(steps, i, latents)
            t = jnp.broadcast_to(timesteps[i], (2 * latents.shape[0],))
            noise_pred = sd.predict_noise(params_now, _pair(model_input, model_input), t, context)
            uncond, text = _unpair(noise_pred)
            noise_pred = uncond + guidance_scale * (text - uncond)
            latents, state = sampler.step(
                steps, i, state, latents, noise_pred, lambda: step_noise(keys, ANCESTRAL, i, latent_shape)
            )
            if key.step_progress and on_step is not None:
                # Reported per step the user asked for: PLMS's extra first evaluation is not a step.
                jax.lax.cond(i >= extra, lambda: jax.debug.callback(on_step, i - extra), lambda: None)
            return latents, state

        latents, _ = jax.lax.fori_loop(0, evaluations, loop_body, (latents, sampler.init_state(latents)))
        pixels = sd.decode(params, latents)
        if key.safety:
            return sd.check_safety(params, pixels)
        return pixels, jnp.zeros((pixels.shape[0],), dtype=bool)

    return generate


def argument_specs(model: Any, key: ShapeKey, plan: DevicePlan, params: Any) -> tuple:
    """What the executable for `key` is called with: placed params, batch-sharded specs."""
    batch = plan.batch_sharded
    ids_len = model.max_tokens

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch)

    return (
        params,
        spec((key.batch, ids_len), jnp.int32),
        spec((key.batch, ids_len), jnp.int32),
        spec((key.batch,), jnp.uint32),
        spec((key.batch,), jnp.float32),
    )


def compile_generate(model: Any, key: ShapeKey, plan: DevicePlan, arguments: tuple, on_step: Callable | None = None):
    """Ahead-of-time compile for `key` on `plan`; returns (executable, seconds spent compiling)."""
    batch = plan.batch_sharded
    start = time.perf_counter()
    jitted = jax.jit(
        build_generate(model, key, on_step),
        in_shardings=(plan.replicated, batch, batch, batch, batch),
        out_shardings=(batch, batch),
    )
    executable = jitted.lower(*arguments).compile()
    return executable, time.perf_counter() - start
