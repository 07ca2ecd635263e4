"""The compiled text-to-image function and the noise contract.

One executable per `ShapeKey`. Everything that changes from cell to cell (prompts, negative prompts,
seeds, guidance) is an array argument, so a new cell with the same shape reuses the executable.
The denoising loop mirrors diffusers' `FlaxStableDiffusionPipeline._generate` operation for
operation, so that sdmagic's images equal diffusers' for the same parameters and noise; it differs
in taking per-image seeds and guidance, and in drawing the noise, running the safety checker and
converting to uint8 on the device, so that only finished pixels cross to the host.
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


def initial_noise(seeds: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """The noise contract: image i's latents are normal(PRNGKey(seed_i), (C, H/f, W/f), float32).

    Drawn per image from its own key, so an image does not depend on its batch, chunk or device.
    """
    return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32))(seeds)


def _clip_pixels(images: jax.Array, feature_extractor: Any) -> jax.Array:
    """CLIPImageProcessor's preprocessing on the device: resize, centre crop, rescale, normalise.

    Bicubic with antialiasing, like Pillow's; values are rounded to whole levels after the resize
    as Pillow does on uint8 images. Returns NHWC float32.
    """
    batch, height, width, _ = images.shape
    shortest = int(feature_extractor.size["shortest_edge"])
    crop_h = int(feature_extractor.crop_size["height"])
    crop_w = int(feature_extractor.crop_size["width"])
    short, long = min(height, width), max(height, width)
    resized_long = int(shortest * long / short)
    new_h, new_w = (shortest, resized_long) if height <= width else (resized_long, shortest)
    x = jax.image.resize(images.astype(jnp.float32), (batch, new_h, new_w, 3), "bicubic", antialias=True)
    x = jnp.clip(jnp.round(x), 0, 255)
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    x = x[:, top : top + crop_h, left : left + crop_w, :]
    x = x * float(feature_extractor.rescale_factor)
    mean = jnp.asarray(feature_extractor.image_mean, jnp.float32)
    std = jnp.asarray(feature_extractor.image_std, jnp.float32)
    return (x - mean) / std


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
    """The function compiled for `key`: (params, scheduler_state, ids, neg_ids, seeds, guidance)
    -> (uint8 images [B, H, W, 3], nsfw flags [B]).

    With `key.step_progress`, `on_step(step)` runs on the host after each denoising step (once
    per step, not per device); such an executable holds a Python callback and cannot be saved.
    """
    pipe = model.pipeline
    scheduler = model.scheduler
    f = model.vae_scale_factor
    latent_shape = (model.latent_channels, key.height // f, key.width // f)
    scaling_factor = pipe.vae.config.scaling_factor
    feature_extractor = model.feature_extractor

    def generate(params, scheduler_state, prompt_ids, neg_prompt_ids, seeds, guidance):
        prompt_embeds = pipe.text_encoder(prompt_ids, params=params["text_encoder"])[0]
        negative_prompt_embeds = pipe.text_encoder(neg_prompt_ids, params=params["text_encoder"])[0]
        context = _pair(negative_prompt_embeds, prompt_embeds)
        # float32 so the scheduler sees float32 model output, as in diffusers.
        guidance_scale = guidance.astype(jnp.float32)[:, None, None, None]
        latents = initial_noise(seeds, latent_shape)

        def loop_body(step, args):
            latents, state = args
            latents_input = _pair(latents, latents)
            t = jnp.array(state.timesteps, dtype=jnp.int32)[step]
            timestep = jnp.broadcast_to(t, latents_input.shape[0])
            latents_input = scheduler.scale_model_input(state, latents_input, t)
            noise_pred = pipe.unet.apply(
                {"params": params["unet"]},
                jnp.array(latents_input),
                jnp.array(timestep, dtype=jnp.int32),
                encoder_hidden_states=context,
            ).sample
            noise_pred_uncond, noise_prediction_text = _unpair(noise_pred)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
            latents, state = scheduler.step(state, noise_pred, t, latents).to_tuple()
            if key.step_progress and on_step is not None:
                jax.debug.callback(on_step, step)
            return latents, state

        state = scheduler.set_timesteps(scheduler_state, num_inference_steps=key.steps, shape=latents.shape)
        latents = latents * scheduler_state.init_noise_sigma
        latents, _ = jax.lax.fori_loop(0, key.steps, loop_body, (latents, state))

        latents = 1 / scaling_factor * latents
        image = pipe.vae.apply({"params": params["vae"]}, latents, method=pipe.vae.decode).sample
        image = (image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
        pixels = jnp.round(image.astype(jnp.float32) * 255).astype(jnp.uint8)

        if key.safety:
            clip_input = _clip_pixels(pixels, feature_extractor)
            nsfw = pipe.safety_checker.module.apply({"params": params["safety_checker"]}, clip_input)
            pixels = jnp.where(nsfw[:, None, None, None], jnp.zeros_like(pixels), pixels)
        else:
            nsfw = jnp.zeros((pixels.shape[0],), dtype=bool)
        return pixels, nsfw

    return generate


def argument_specs(model: Any, key: ShapeKey, plan: DevicePlan, params: Any, scheduler_state: Any) -> tuple:
    """What the executable for `key` is called with: placed params and state, batch-sharded specs."""
    batch = plan.batch_sharded
    ids_len = model.max_tokens

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch)

    return (
        params,
        scheduler_state,
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
        in_shardings=(plan.replicated, plan.replicated, batch, batch, batch, batch),
        out_shardings=(batch, batch),
    )
    executable = jitted.lower(*arguments).compile()
    return executable, time.perf_counter() - start
