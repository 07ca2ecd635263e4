"""The compiled generate function (text-to-image, image-to-image, inpainting) and the noise contract.

One executable per `ShapeKey`. Everything that changes from cell to cell (prompts and their
emphasis, negative prompts, seeds, guidance, the init image, the mask, the strength) is an array
argument, so a new cell with the same shape reuses the executable. The loop is diffusers'
`StableDiffusionPipeline.__call__` (0.39) over sdmagic's model interface and samplers, so that
images equal PyTorch diffusers' for the same weights and noise; image-to-image is its
`StableDiffusionImg2ImgPipeline` and inpainting its `StableDiffusionInpaintPipeline`. sdmagic
differs in taking per-image seeds and guidance, and in drawing the noise, compositing inpainted
images, running the safety checker and converting to uint8 on the device, so that only finished
pixels cross to the host. The sampler's tables (timesteps, sigmas, coefficients) depend only on its
config and the step count, which the `ShapeKey` fixes, so they are constants of the executable;
where image-to-image starts is an argument (`start`).

Image-to-image (mode "img2img"), as diffusers' img2img pipeline:
- the init image (uint8, already fitted to the size on the host by `init_images.init_image`) is
  scaled to [-1, 1] and encoded by the VAE; its latents are a sample of the VAE's posterior,
  mean + std * normal(fold_in(K, INIT_POSTERIOR));
- strength S of N steps runs d = min(int(N * S), N) denoising steps (`schedulers.denoising_steps`):
  the loop starts at model evaluation `start = sampler.first_evaluation(N, S)` = (N - d) * order,
  diffusers' `t_start * scheduler.order` after `set_begin_index`, and the latents there are
  `sampler.add_noise(N, start, init_latents, normal(K))`, each sampler's own diffusers `add_noise`;
- strength 1.0 is therefore NOT text-to-image: diffusers adds noise of the first timestep's level to
  the init latents (sqrt(acp_t) x + sqrt(1 - acp_t) n for PLMS/DDIM; x + sigma_max n for Euler/LMS;
  alpha_t x + sigma_t n for DPM++), so some of the init image survives (a little: at SD's schedule
  and 50 PLMS steps sqrt(acp_981) ~ 0.07), and the latents are not scaled by init_noise_sigma.

Inpainting (mode "inpaint"), as diffusers' inpaint pipeline, with either kind of UNet:
- the mask (float32, 1 = repaint, after the host's blur) is binarized as diffusers'
  VaeImageProcessor does (>= 0.5 is 1), resized to the latents' size by nearest neighbour as
  torch's `interpolate` does (for an exact factor f: the top-left pixel of each f x f block), and
  the masked image is init * (mask < 0.5) (the region to repaint set to 0, mid grey);
- the initial latents are pure noise, normal(K) * init_noise_sigma, at strength 1.0 (`start` 0) and
  `add_noise(init_latents, normal(K))` at the first evaluation otherwise (as img2img);
- a 9-channel inpainting UNet (`sd.inpainting`) takes cat([scaled latents, latent mask, masked
  image latents]) with the masked image's latents a posterior sample of their own
  (normal(fold_in(K, MASKED_POSTERIOR))); an ordinary UNet's latents are blended after every step:
  latents = (1 - mask) * add_noise(init_latents, normal(K), next evaluation) + mask * latents
  (the init latents themselves after the last step);
- after decoding, pixels are composited on the device with the blurred mask m:
  round(init * (1 - m) + generated * m), so pixels where m is 0 keep the init image exactly
  (A1111's default); then the safety checker sees the composite.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .devices import DevicePlan

MODES = ("txt2img", "img2img", "inpaint")


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
    mode: str = "txt2img"  # "txt2img" | "img2img" | "inpaint"
    chunks: int = 1  # prompt chunks of max_tokens ids each (BOS + 75 + EOS/padding)

    def describe(self) -> str:
        checker = "" if self.safety else ", no safety checker"
        mode = "" if self.mode == "txt2img" else f" {self.mode}"
        chunks = "" if self.chunks == 1 else f", {self.chunks} prompt chunks"
        return (f"{self.batch} x {self.width}x{self.height}{mode}, {self.steps} {self.scheduler} steps,"
                f" {self.dtype}{chunks}{checker}")


# The noise contract. Every random draw of an image comes from its own key K = PRNGKey(seed), so an
# image depends neither on its batch, chunk or device nor on the other images:
# - the initial latents, and the noise image-to-image adds to the init image's latents (and
#   inpainting with an ordinary UNet to them at every step), are normal(K, (C, H/f, W/f))
#   (unchanged since sdmagic 0.1);
# - an ancestral sampler's noise at model evaluation n (absolute, whatever the run's start) is
#   normal(fold_in(fold_in(K, ANCESTRAL), n));
# - the VAE posterior sample of the init image's latents is mean + std * normal(fold_in(K, INIT_POSTERIOR));
# - that of the masked image's latents (9-channel inpainting) mean + std * normal(fold_in(K, MASKED_POSTERIOR)).
ANCESTRAL = 1
INIT_POSTERIOR = 2
MASKED_POSTERIOR = 3


def image_keys(seeds: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.PRNGKey)(seeds)


def initial_noise(seeds: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Image i's initial latents: normal(PRNGKey(seed_i), (C, H/f, W/f), float32)."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(image_keys(seeds))


def stream_noise(keys: jax.Array, stream: int, shape: tuple[int, ...]) -> jax.Array:
    """Each image's draw of `stream`: normal(fold_in(K, stream), shape)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, stream), shape, jnp.float32))(keys)


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


def model_images(pixels: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32 NCHW in [-1, 1], as diffusers' VaeImageProcessor (x / 255 * 2 - 1)."""
    return (pixels.astype(jnp.float32) / 255.0 * 2.0 - 1.0).transpose(0, 3, 1, 2)


def latent_mask(mask: jax.Array, factor: int) -> jax.Array:
    """[B, H, W] pixel mask -> [B, 1, H/f, W/f] binary latent mask: binarized at 0.5, then torch's
    nearest `interpolate` to the latents' size (source pixel floor(j * f): each block's top-left)."""
    binary = (mask >= 0.5).astype(jnp.float32)
    return binary[:, None, ::factor, ::factor]


def mask_pixels(mask: jax.Array) -> jax.Array:
    """[B, H, W] mask -> [B, 1, H, W] binary (>= 0.5), as diffusers binarizes the mask it applies to
    the masked image (init * (mask < 0.5))."""
    return (mask >= 0.5).astype(jnp.float32)[:, None]


def composite(init: jax.Array, generated: jax.Array, mask: jax.Array) -> jax.Array:
    """round(init * (1 - m) + generated * m) in uint8: where m is 0 the init pixel exactly."""
    m = mask.astype(jnp.float32)[..., None]
    out = init.astype(jnp.float32) * (1 - m) + generated.astype(jnp.float32) * m
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def _posterior_sample(sd: Any, params: Any, images: jax.Array, keys: jax.Array, stream: int) -> jax.Array:
    """A sample of the VAE's posterior for NCHW images in [-1, 1], in the UNet's (scaled) space."""
    mean, std = sd.encode(params, images)
    return mean + std * stream_noise(keys, stream, mean.shape[1:])


def build_generate(model: Any, key: ShapeKey, on_step: Callable | None = None) -> Callable:
    """The function compiled for `key`: (params, inputs) -> (uint8 images [B, H, W, 3], nsfw flags [B]).

    `inputs` is the dict `argument_specs` describes: "ids", "weights", "neg_ids", "neg_weights",
    "neg_empty", "seeds", "guidance"; image-to-image adds "init" and "start", inpainting "mask" too.
    `model` is a LoadedModel: its `model` (the StableDiffusion interface) and `sampler`. With
    `key.step_progress`, `on_step(step)` runs on the host after each denoising step that runs
    (0, 1, ..., counted from the run's start; once per step, not per device); such an executable
    holds a Python callback and cannot be saved.
    """
    if key.mode not in MODES:
        raise ValueError(f"unknown mode {key.mode!r}: use one of {', '.join(MODES)}")
    sd = model.model
    sampler = model.sampler
    spec = sd.spec
    f = spec.scale_factor
    nine_channels = bool(getattr(sd, "inpainting", False))
    if nine_channels and key.mode != "inpaint":
        raise ValueError("an inpainting UNet needs an init image and a mask (mode 'inpaint')")
    latent_shape = (spec.latent_channels, key.height // f, key.width // f)
    steps = key.steps
    timesteps = jnp.asarray(sampler.timesteps(steps), jnp.float32)
    evaluations = int(timesteps.shape[0])
    # PLMS's extra evaluation (the first of a run) is not a step the user asked for.
    extra = evaluations - steps
    init_sigma = sampler.init_noise_sigma(steps)
    blend = key.mode == "inpaint" and not nine_channels
    # XLA:CPU has no half-precision matmul or convolution kernels: it converts bfloat16 weights to
    # float32, and would hoist those conversions out of the loop, keeping a float32 copy of the whole
    # UNet alive for the call (3.4 GB for SD 1.x). Tied to the latents, the weights stay loop-variant
    # there. Elsewhere loop-invariant work (the text's cross-attention keys and values, the merged
    # projection kernels) is left for XLA to hoist out of the loop.
    tie_weights = jax.default_backend() == "cpu" and key.dtype in ("bfloat16", "float16")

    def generate(params, inputs):
        neg_cond = sd.encode_prompt(params, inputs["neg_ids"], inputs["neg_weights"], inputs["neg_empty"],
                                    key.height, key.width)
        cond = sd.encode_prompt(params, inputs["ids"], inputs["weights"], jnp.zeros_like(inputs["neg_empty"]),
                                key.height, key.width)
        cond = jax.tree_util.tree_map(_pair, neg_cond, cond)
        guidance_scale = inputs["guidance"].astype(jnp.float32)[:, None, None, None]
        seeds = inputs["seeds"]
        keys = image_keys(seeds)
        noise = initial_noise(seeds, latent_shape)
        unet_extra = None  # the 9-channel UNet's mask and masked image latents
        init_latents = mask = None
        if key.mode == "txt2img":
            start = 0
            latents = noise * init_sigma
        else:
            start = inputs["start"]
            image = model_images(inputs["init"])
            if key.mode == "img2img":
                init_latents = _posterior_sample(sd, params, image, keys, INIT_POSTERIOR)
                latents = sampler.add_noise(steps, start, init_latents, noise)
            else:
                mask = latent_mask(inputs["mask"], f)
                if nine_channels:
                    masked = image * (1.0 - mask_pixels(inputs["mask"]))
                    masked_latents = _posterior_sample(sd, params, masked, keys, MASKED_POSTERIOR)
                    unet_extra = jnp.concatenate([mask, masked_latents], axis=1)
                    # At strength 1 the init image's latents are not needed: skip its VAE encode.
                    latents = jax.lax.cond(
                        start == 0,
                        lambda: noise * init_sigma,
                        lambda: sampler.add_noise(
                            steps, start, _posterior_sample(sd, params, image, keys, INIT_POSTERIOR), noise),
                    )
                else:
                    init_latents = _posterior_sample(sd, params, image, keys, INIT_POSTERIOR)
                    latents = jnp.where(start == 0, noise * init_sigma,
                                        sampler.add_noise(steps, start, init_latents, noise))

        def loop_body(i, carry):
            latents, state = carry
            params_now = params
            if tie_weights:
                params_now, latents = jax.lax.optimization_barrier((params, latents))
            model_input = sampler.scale_input(steps, i, latents)
            if unet_extra is not None:
                model_input = jnp.concatenate([model_input, unet_extra], axis=1)
            t = jnp.broadcast_to(timesteps[i], (2 * latents.shape[0],))
            noise_pred = sd.predict_noise(params_now, _pair(model_input, model_input), t, cond)
            uncond, text = _unpair(noise_pred)
            noise_pred = uncond + guidance_scale * (text - uncond)
            latents, state = sampler.step(
                steps, i, state, latents, noise_pred, lambda: step_noise(keys, ANCESTRAL, i, latent_shape)
            )
            if blend:
                # diffusers: the init latents noised to the next evaluation's level (themselves after
                # the last), kept outside the mask.
                following = jnp.minimum(i + 1, evaluations - 1)
                proper = jnp.where(i < evaluations - 1, sampler.add_noise(steps, following, init_latents, noise),
                                   init_latents)
                latents = (1 - mask) * proper + mask * latents
            if key.step_progress and on_step is not None:
                # Reported per step the user asked for and that runs: from the run's start, without
                # PLMS's extra first evaluation.
                jax.lax.cond(i >= start + extra, lambda: jax.debug.callback(on_step, i - start - extra), lambda: None)
            return latents, state

        latents, _ = jax.lax.fori_loop(start, evaluations, loop_body, (latents, sampler.init_state(latents)))
        pixels = sd.decode(params, latents)
        if key.mode == "inpaint":
            pixels = composite(inputs["init"], pixels, inputs["mask"])
        if key.safety:
            return sd.check_safety(params, pixels)
        return pixels, jnp.zeros((pixels.shape[0],), dtype=bool)

    return generate


def argument_specs(model: Any, key: ShapeKey, plan: DevicePlan, params: Any) -> tuple:
    """What the executable for `key` is called with: (placed params, {name: ShapeDtypeStruct}),
    batch arrays sharded over the plan's devices, "start" replicated."""
    sd = model.model
    batch = plan.batch_sharded
    encoders = len(sd.tokenizers)
    tokens = key.chunks * sd.spec.max_tokens
    b = key.batch

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch)

    inputs = {
        "ids": spec((b, encoders, tokens), jnp.int32),
        "weights": spec((b, tokens), jnp.float32),
        "neg_ids": spec((b, encoders, tokens), jnp.int32),
        "neg_weights": spec((b, tokens), jnp.float32),
        "neg_empty": spec((b,), jnp.bool_),
        "seeds": spec((b,), jnp.uint32),
        "guidance": spec((b,), jnp.float32),
    }
    if key.mode != "txt2img":
        inputs["init"] = spec((b, key.height, key.width, 3), jnp.uint8)
        inputs["start"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=plan.replicated)
    if key.mode == "inpaint":
        inputs["mask"] = spec((b, key.height, key.width), jnp.float32)
    return params, inputs


def compile_generate(model: Any, key: ShapeKey, plan: DevicePlan, arguments: tuple, on_step: Callable | None = None):
    """Ahead-of-time compile for `key` on `plan`; returns (executable, seconds spent compiling)."""
    start = time.perf_counter()
    _, inputs = arguments
    jitted = jax.jit(
        build_generate(model, key, on_step),
        in_shardings=(plan.replicated, {name: spec.sharding for name, spec in inputs.items()}),
        out_shardings=(plan.batch_sharded, plan.batch_sharded),
    )
    executable = jitted.lower(*arguments).compile()
    return executable, time.perf_counter() - start
