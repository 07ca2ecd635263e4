"""SDXL behind the same boundary as SD 1.x/2.x (`sdmagic.model.StableDiffusion`): the same methods.

Stable Diffusion XL (base 1.0) conditions its UNet on two text encoders at once, CLIP ViT-L
(`text_encoder`) and OpenCLIP bigG (`text_encoder_2`, a CLIPTextModelWithProjection): the context
is both encoders' penultimate hidden states side by side (768 + 1280 = 2048 wide), and the UNet's
timestep embedding also receives the second encoder's projected pooled output and six
micro-conditioning numbers (original size, crop corner, target size: `time_ids`), as diffusers'
`StableDiffusionXLPipeline` computes them. Parameters: {"unet", "vae", "text_encoder",
"text_encoder_2"}; there is no safety checker.

The VAE: SDXL's overflows in float16 (its config says `force_upcast`), so a float16 model keeps
its VAE in float32, as diffusers' pipeline upcasts it (the loader reads it so: `weight_dtype`). A
VAE whose config clears `force_upcast` (the "fp16-fix" VAE) runs in float16. bfloat16 has
float32's exponent range, so the VAE runs in bfloat16 there, as diffusers does with bfloat16.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from .model import LatentDecoding, ModelSpec, _as_json, _dtype
from .nets import clip, unet, vae
from .tokenizer import CLIPTokenizer

# How many numbers `time_ids` holds per image: (original height, width, crop top, left, target
# height, width), each embedded in `addition_time_embed_dim` sinusoids by the UNet.
TIME_IDS = 6


@dataclass(frozen=True)
class StableDiffusionXL(LatentDecoding):
    """SDXL base: two CLIP text encoders (the second with a projection), a text-time UNet, a KL VAE."""

    text: clip.TextConfig
    text_2: clip.TextConfig
    unet: unet.UNetConfig
    vae: vae.VAEConfig
    tokenizer: CLIPTokenizer = field(compare=False, repr=False)
    tokenizer_2: CLIPTokenizer = field(compare=False, repr=False)
    # model_index.json's setting (SDXL base: true): a negative prompt that was not given is zeros,
    # context and pooled embedding, rather than the encoding of "".
    force_zeros_for_empty_prompt: bool = True

    # No safety checker ships with SDXL; these keep the StableDiffusion interface.
    safety = None
    preprocess = None

    @functools.cached_property
    def spec(self) -> ModelSpec:
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        return ModelSpec(
            latent_channels=self.vae.latent_channels,
            scale_factor=factor,
            size_multiple=factor,
            default_size=self.unet.sample_size * factor,  # 128 * 8 = 1024 for SDXL base
            max_tokens=self.tokenizer.model_max_length,
            digest=self.digest(),
        )

    def digest(self) -> str:
        parts = {
            "family": type(self).__name__,
            "text": _as_json(self.text), "text_2": _as_json(self.text_2), "unet": _as_json(self.unet),
            "vae": _as_json(self.vae), "force_zeros": self.force_zeros_for_empty_prompt,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    # -- host side ---------------------------------------------------------------------------

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, CLIPTokenizer]:
        """One tokenizer per text encoder, in the order of `encode_prompt`'s ids. They share
        SDXL's vocabulary but not the padding (the second pads with "!", id 0)."""
        return (self.tokenizer, self.tokenizer_2)

    def weight_dtype(self, part: str, dtype: str) -> str:
        """The dtype a component's weights are loaded in for a model loaded in `dtype`: the VAE
        stays float32 under float16 when its config asks for `force_upcast` (diffusers' SDXL
        pipelines upcast it so: SDXL's VAE overflows in float16)."""
        if part == "vae" and dtype == "float16" and self.vae.force_upcast:
            return "float32"
        return dtype

    def param_shapes(self) -> dict:
        """Every component's parameter shapes, from the configs alone."""
        return {
            "unet": unet.unet_shapes(self.unet),
            "vae": vae.vae_shapes(self.vae),
            "text_encoder": clip.text_shapes(self.text),
            "text_encoder_2": clip.text_shapes(self.text_2, projection=True),
        }

    # -- traced (inside the compiled generate) -------------------------------------------------

    def encode_prompt(self, params: dict, ids: jax.Array, weights: jax.Array, empty: jax.Array,
                      height: int, width: int) -> dict:
        """The UNet's conditioning for prompts of C chunks of L tokens.

        ids int32 [B, 2, C*L] (tokenizer's, tokenizer_2's), A1111 emphasis weights [B, C*L], `empty`
        bool [B] (the prompt was not given), the image's size -> {"context": [B, C*L, D1 + D2]
        (both encoders' penultimate hidden states, each chunk encoded on its own and weighted per
        encoder, as A1111 does), "text_embeds": [B, P] (the second encoder's projected pooled
        output of the first chunk), "time_ids": [B, 6] ((height, width, 0, 0, height, width):
        diffusers' default micro-conditioning)}, all float32. With `force_zeros_for_empty_prompt`
        an empty row's context and text_embeds are zeros, as diffusers does for a negative prompt
        that was not given."""
        from .prompt_weights import emphasize

        batch, _, tokens = ids.shape
        length = self.spec.max_tokens
        chunks = tokens // length
        first = clip.encode_text(params["text_encoder"], self.text, ids[:, 0].reshape(batch * chunks, length))
        second = clip.encode_text(params["text_encoder_2"], self.text_2, ids[:, 1].reshape(batch * chunks, length))

        def weighted(hidden: jax.Array) -> jax.Array:
            # A1111 weights each embedder's output on its own (mean restored per encoder).
            return emphasize(hidden.astype(jnp.float32).reshape(batch, chunks, length, -1), weights)

        context = jnp.concatenate([weighted(first.penultimate), weighted(second.penultimate)], axis=-1)
        pooled = second.pooled.reshape(batch, chunks, -1)[:, 0]
        text_embeds = clip.project(params["text_encoder_2"], pooled).astype(jnp.float32)
        if self.force_zeros_for_empty_prompt:
            keep = ~jnp.asarray(empty, bool)
            context = jnp.where(keep[:, None, None], context, 0.0)
            text_embeds = jnp.where(keep[:, None], text_embeds, 0.0)
        size = jnp.asarray([height, width, 0, 0, height, width], jnp.float32)
        return {"context": context, "text_embeds": text_embeds, "time_ids": jnp.broadcast_to(size, (batch, TIME_IDS))}

    def predict_noise(self, params: dict, latents: jax.Array, timesteps: jax.Array, cond: dict) -> jax.Array:
        """The UNet's output for NCHW latents (float32 in, float32 out; computed in the weights' dtype)."""
        dtype = _dtype(params["unet"])
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        out = unet.apply_unet(params["unet"], self.unet, latents.astype(dtype), timesteps.astype(jnp.float32),
                              cond["context"].astype(dtype), added_cond=added)
        return out.astype(jnp.float32)

    def check_safety(self, params: dict, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """SDXL ships no safety checker: the pixels as they are, nothing flagged."""
        return pixels, jnp.zeros((pixels.shape[0],), dtype=bool)

    def without_safety(self) -> "StableDiffusionXL":
        return self


def is_xl(model: Any) -> bool:
    """Whether `model` (a StableDiffusion or StableDiffusionXL) is SDXL."""
    return isinstance(model, StableDiffusionXL)
