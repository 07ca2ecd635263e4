"""The one boundary between sdmagic and a Stable Diffusion model.

Session, generate and the compile cache see a model only through `StableDiffusion`: tokenize,
encode text, predict noise, decode, encode, check safety, and a `ModelSpec` of the numbers they plan
with. Behind it are sdmagic's own networks (`sdmagic/nets/`), configured from the model folder's
checked configs; parameters are a plain dict of pytrees ({"unet", "vae", "text_encoder",
"safety_checker"}) passed in by the caller, so placement, sharding and the compile cache stay
outside. A new model family (SDXL, ...) is another class with the same methods.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .nets import clip, safety, unet, vae
from .prompt_weights import emphasize
from .tokenizer import CLIPTokenizer


@dataclass(frozen=True)
class ModelSpec:
    """What planning needs to know about a model, nothing more."""

    latent_channels: int
    scale_factor: int  # pixels per latent pixel (the VAE's downsampling)
    size_multiple: int  # height and width must be multiples of this
    default_size: int  # the side the model was trained at
    max_tokens: int  # the text encoder's context length, BOS and EOS included
    digest: str  # changes with anything in the configs that changes the compiled code


def _as_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _as_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _as_json(v) for k, v in value.items()}
    return value


class LatentDecoding:
    """What every family shares: the KL VAE between pixels and the UNet's latent space, and the
    UNet's input channels. Needs `vae` and `unet` configs on the class it is mixed into."""

    def decode(self, params: dict, latents: jax.Array) -> jax.Array:
        """Finished pixels: uint8 [B, H, W, 3] from NCHW latents in the UNet's (scaled) space."""
        dtype = _dtype(params["vae"])
        image = vae.decode(params["vae"], self.vae, (latents / self.vae.scaling_factor).astype(dtype))
        image = (image.astype(jnp.float32) / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
        return jnp.round(image * 255).astype(jnp.uint8)

    def encode(self, params: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The latent distribution of NCHW images in [-1, 1]: (mean, std), in the UNet's (scaled) space."""
        dtype = _dtype(params["vae"])
        mean, logvar = vae.encode(params["vae"], self.vae, images.astype(dtype))
        std = jnp.exp(0.5 * logvar.astype(jnp.float32))
        return mean.astype(jnp.float32) * self.vae.scaling_factor, std * self.vae.scaling_factor

    @property
    def inpainting(self) -> bool:
        """An inpainting UNet: it also takes the mask and the masked image's latents (9 channels)."""
        return self.unet.in_channels == 2 * self.vae.latent_channels + 1


@dataclass(frozen=True)
class StableDiffusion(LatentDecoding):
    """SD 1.x / 2.x: a CLIP text encoder, a conditional UNet, a KL VAE and optionally CLIP's safety checker."""

    text: clip.TextConfig
    unet: unet.UNetConfig
    vae: vae.VAEConfig
    tokenizer: CLIPTokenizer = field(compare=False, repr=False)
    safety: safety.SafetyConfig | None = None
    preprocess: safety.Preprocess | None = None

    @functools.cached_property
    def spec(self) -> ModelSpec:
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        # Any whole latent side works: the UNet's upsamplers resize to the skip connection's side,
        # as PyTorch's do, so sizes are multiples of the VAE's factor alone (8 for SD), not of 64.
        return ModelSpec(
            latent_channels=self.vae.latent_channels,  # an inpainting UNet takes 9 channels, not 4
            scale_factor=factor,
            size_multiple=factor,
            default_size=self.unet.sample_size * factor,
            max_tokens=self.tokenizer.model_max_length,
            digest=self.digest(),
        )

    def digest(self) -> str:
        parts = {
            "family": type(self).__name__,
            "text": _as_json(self.text), "unet": _as_json(self.unet), "vae": _as_json(self.vae),
            "safety": _as_json(self.safety), "preprocess": _as_json(self.preprocess),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    # -- host side ---------------------------------------------------------------------------

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        """One tokenizer per text encoder, in the order of `encode_prompt`'s ids."""
        return (self.tokenizer,)

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """int32 [len(prompts), max_tokens]: BOS, tokens (cut to fit), EOS, padding."""
        return self.tokenizer.input_ids(prompts, self.tokenizer.model_max_length)

    # -- traced (inside the compiled generate) -------------------------------------------------

    def encode_text(self, params: dict, ids: jax.Array) -> jax.Array:
        """The UNet's context [B, tokens, width]: the text encoder's normed last hidden state."""
        return clip.encode_text(params["text_encoder"], self.text, ids).last_hidden_state

    def encode_prompt(self, params: dict, ids: jax.Array, weights: jax.Array, empty: jax.Array,
                      height: int, width: int) -> dict:
        """The UNet's conditioning for prompts of C chunks: ids int32 [B, 1, C*L], A1111 emphasis
        weights [B, C*L] -> {"context": [B, C*L, width]}. Each chunk is encoded on its own (BOS and
        EOS of its own), as A1111 does, then weighted and concatenated. `empty`, `height` and
        `width` are for families that need them (SDXL); SD 1.x/2.x conditions on the text alone."""
        batch, _, tokens = ids.shape
        length = self.spec.max_tokens
        chunks = tokens // length
        hidden = self.encode_text(params, ids[:, 0].reshape(batch * chunks, length))
        return {"context": emphasize(hidden.reshape(batch, chunks, length, -1), weights)}

    def predict_noise(self, params: dict, latents: jax.Array, timesteps: jax.Array, cond: dict) -> jax.Array:
        """The UNet's output for NCHW latents (float32 in, float32 out; computed in the weights' dtype).
        `cond` is what `encode_prompt` gave; an inpainting UNet's latents carry the mask and the
        masked image's latents as channels of their own."""
        dtype = _dtype(params["unet"])
        out = unet.apply_unet(params["unet"], self.unet, latents.astype(dtype), timesteps.astype(jnp.float32),
                              cond["context"].astype(dtype))
        return out.astype(jnp.float32)

    def check_safety(self, params: dict, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(pixels with flagged images blacked out, flags [B]); without a checker nothing is flagged."""
        if self.safety is None or "safety_checker" not in params:
            return pixels, jnp.zeros((pixels.shape[0],), dtype=bool)
        clip_input = safety.clip_pixels(pixels, self.preprocess)
        flags = safety.check(params["safety_checker"], self.safety, clip_input.astype(_dtype(params["safety_checker"])))
        return jnp.where(flags[:, None, None, None], jnp.zeros_like(pixels), pixels), flags

    def without_safety(self) -> "StableDiffusion":
        return dataclasses.replace(self, safety=None, preprocess=None)


def _dtype(tree: Any) -> Any:
    """The compute dtype of a component: its floating weights' dtype."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.float32
