"""Loading a Stable Diffusion model (1.x, 2.x or XL) into sdmagic's own networks.

Sources a user can name with `model=` (see sources.py): `"tiny"` and `"tiny-sdxl"` (built in, no
download), a local folder in diffusers' layout, a Hub id, or a single original-layout checkpoint
file. An SDXL pipeline (a second text encoder in model_index.json, or an SDXL single file) becomes
a `StableDiffusionXL`, anything else a `StableDiffusion`: the same interface. Whatever the
source, the same steps follow: every config is read through checked getters (configs.py) and
turned into the networks' configs (`sdmagic/nets/`); parameter shapes follow from those configs
(no module is initialised and nothing is compiled to load); every weight file is checked against
those shapes before any tensor is read (weights.py); then tensors are read one at a time into the
target dtype. Nothing in a folder is ever imported or executed: diffusers and transformers are not
used at all.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from . import schedulers
from .configs import (
    MAX_DEFAULT_SIDE,
    MAX_VOCABULARY_BYTES,
    Config,
    check_clip_encoder,
    check_preprocessor_config,
    check_unet_config,
    check_vae_config,
    is_int,
    read_json,
    read_scheduler_config,
    read_text,
    shown,
)
from .convert import SafetensorsFile, detect_family, ldm_to_diffusers, plan_pytorch_to_flax, run_plan, sgm_to_diffusers
from .errors import ModelLoadError, SDMagicError, option
from .model import StableDiffusion
from .model_xl import TIME_IDS, StableDiffusionXL
from .nets import clip, safety, unet, vae
from .sources import (
    BUILT_IN,
    DEFAULT_MODEL,
    TINY,
    TINY_SDXL,
    WEIGHTED,
    check_model_folder,
    config_folder,
    is_xl_index,
    model_index,
    resolve_model_folder,
    ships,
    single_file,
)
from .text import printable
from .tokenizer import CLIPTokenizer, SpecialToken, parse_merges
from .weights import (
    PICKLE_SUFFIXES,
    caster,
    flax_file,
    msgpack_reader,
    pickle_reader,
    pytorch_file,
    refuse_pickle,
    safetensors_reader,
    shape_structs,
    torch_load,
    weights_format,
)

__all__ = ["DEFAULT_MODEL", "TINY", "TINY_SDXL", "DTYPES", "LoadedModel", "load_model", "resolve_dtype", "check_scheduler_name"]

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
SCHEDULERS = schedulers.SAMPLERS

# What the setup line says about the safety checker: it runs, the user turned it off, or the
# model has none.
CHECKER_ON, CHECKER_OFF, CHECKER_NONE = "on", "off", "none shipped"


def resolve_dtype(name: str | None, backend: str) -> str:
    """The dtype name to load with: bfloat16 on accelerators, float32 on CPU, unless given."""
    if name is None:
        return "float32" if backend == "cpu" else "bfloat16"
    if name not in DTYPES:
        raise SDMagicError(f"unknown dtype {printable(name)!r}: use one of {', '.join(DTYPES)}")
    return name


def check_scheduler_name(name: str | None) -> None:
    if name is not None and name not in SCHEDULERS:
        raise SDMagicError(
            f"unknown scheduler {printable(name)!r}: use one of {', '.join(SCHEDULERS)} (dpm = DPM++ 2M,"
            " euler-a = Euler a), or leave it out for the model's own"
        )


@dataclass
class LoadedModel:
    """A model's networks (behind the StableDiffusion interface) with host-side parameters."""

    name: str
    source: str  # the folder or file it was read from
    model: StableDiffusion | StableDiffusionXL
    # Host arrays: unet, vae, text_encoder, (text_encoder_2), (safety_checker). A Session sets this
    # to None once the parameters are on the devices.
    params: dict | None
    sampler: Any  # a schedulers.Sampler
    scheduler_config: dict  # the model's scheduler_config.json, which any other sampler is built from
    dtype: str
    load_seconds: float
    # CHECKER_ON, CHECKER_OFF (the model has one, the user turned it off) or CHECKER_NONE.
    safety_checker_state: str = CHECKER_NONE

    @property
    def scheduler_name(self) -> str:
        return self.sampler.name

    @property
    def has_safety_checker(self) -> bool:
        return self.safety_checker_state == CHECKER_ON

    @property
    def vae_scale_factor(self) -> int:
        return self.model.spec.scale_factor

    @property
    def size_multiple(self) -> int:
        return self.model.spec.size_multiple

    @property
    def default_size(self) -> int:
        return self.model.spec.default_size

    @property
    def latent_channels(self) -> int:
        return self.model.spec.latent_channels

    @property
    def max_tokens(self) -> int:
        return self.model.spec.max_tokens


# ----------------------------------------------------------------------------------------------
# Components from their checked configs
# ----------------------------------------------------------------------------------------------


def _component_config(folder: Path, label: str, part: str) -> Config:
    where = f"{label}/{part}/config.json"
    return Config(read_json(folder / part / "config.json", where), where)


def _text_config(folder: Path, label: str, part: str = "text_encoder") -> clip.TextConfig:
    c = _component_config(folder, label, part)
    data = c.data
    if data.get("model_type") == "clip" and isinstance(data.get("text_config"), dict):
        data = data["text_config"]  # a full CLIP config: its text half, as transformers reads it
    text = Config(data, c.where)
    check_clip_encoder(text, vision=False)
    return clip.TextConfig.from_dict(text.data)


def _checker_config(folder: Path, label: str) -> safety.SafetyConfig:
    config = _component_config(folder, label, "safety_checker")
    # As transformers' CLIPConfig: an older file's `vision_config_dict` (SD 1.x's checker) replaces
    # `vision_config` whole.
    key = "vision_config_dict" if config.get("vision_config_dict") is not None else "vision_config"
    check_clip_encoder(Config(config.get(key) or {}, f"{config.where} ({key})"), vision=True)
    config.int("projection_dim", 1, 8192, 512)
    return safety.SafetyConfig.from_dict(config.data)


def _special_token(value: Any, where: str, key: str) -> str | SpecialToken:
    """A tokenizer_config special token: a string, or an AddedToken's fields."""
    if isinstance(value, str) and 0 < len(value) <= 100:
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str) and 0 < len(value["content"]) <= 100:
        flags = {k: v for k, v in value.items() if k in ("single_word", "lstrip", "rstrip")}
        if all(isinstance(v, bool) for v in flags.values()):
            return SpecialToken(value["content"], **flags)
    raise ModelLoadError(f"{where}: {key}={shown(value)} is not usable: a special token must be a short string")


_SPECIAL_TOKENS = ("unk_token", "bos_token", "eos_token", "pad_token")


def _tokenizer(folder: Path, label: str, text: clip.TextConfig, name: str = "tokenizer",
               encoder: str = "text_encoder") -> CLIPTokenizer:
    """A CLIP tokenizer from its vocabulary, merges and the few settings SD uses; files are data only."""
    part = folder / name
    where = f"{label}/{name}/tokenizer_config.json"
    config_file = part / "tokenizer_config.json"
    settings = Config(read_json(config_file, where) if config_file.exists() else {}, where)
    settings.choice("tokenizer_class", ("CLIPTokenizer", "CLIPTokenizerFast"), "CLIPTokenizer")
    positions = text.max_position_embeddings
    # transformers' default for a missing value is 10**30; the text encoder's length is what SD means.
    max_length = settings.int("model_max_length", 1, positions, positions)
    errors = settings.choice("errors", ("replace", "strict", "ignore"), "replace")
    # Each special token with the file it came from, so that a complaint names the right one.
    tokens = {key: (settings.get(key), where) for key in _SPECIAL_TOKENS if settings.get(key) is not None}
    # As transformers does: without `added_tokens_decoder`, special_tokens_map.json has the last word.
    special_map = part / "special_tokens_map.json"
    if "added_tokens_decoder" not in settings.data and special_map.exists():
        map_where = f"{label}/{name}/special_tokens_map.json"
        mapped = Config(read_json(special_map, map_where), map_where)
        tokens.update({key: (mapped.get(key), map_where) for key in _SPECIAL_TOKENS if mapped.get(key) is not None})
    specials = {key: _special_token(value, source, key) for key, (value, source) in tokens.items()}
    vocab_where = f"{label}/{name}/vocab.json"
    vocab = read_json(part / "vocab.json", vocab_where, MAX_VOCABULARY_BYTES)
    # An id past the text encoder's embedding table would be clamped silently by the lookup.
    if not isinstance(vocab, dict) or not all(is_int(i) and 0 <= i < text.vocab_size for i in vocab.values()):
        raise ModelLoadError(
            f"{vocab_where} is not a CLIP vocabulary of token -> id below the text encoder's"
            f" vocab_size ({text.vocab_size})"
        )
    merges_text = read_text(part / "merges.txt", f"{label}/{name}/merges.txt", MAX_VOCABULARY_BYTES)
    tokenizer = CLIPTokenizer(vocab, parse_merges(merges_text), model_max_length=max_length, errors=errors, **specials)
    # A special token missing from vocab.json gets the next free id, as in transformers: it must
    # still fit the text encoder's embedding table.
    if len(tokenizer) > text.vocab_size:
        raise ModelLoadError(
            f"{label}/{name}/ has {len(tokenizer)} tokens but {encoder}/config.json has vocab_size="
            f"{text.vocab_size}: the tokenizer and text encoder do not belong together"
        )
    return tokenizer


def _components(folder: Path, label: str, with_checker: bool) -> tuple[StableDiffusion | StableDiffusionXL, dict]:
    """The networks' configs and the tokenizer(s) from a diffusers-layout folder, without weights;
    also the raw UNet and VAE config dicts (single-file conversion renames keys with them)."""
    unet_config = _component_config(folder, label, "unet")
    check_unet_config(unet_config)
    vae_config = _component_config(folder, label, "vae")
    check_vae_config(vae_config)
    raw = {"unet": unet_config.data, "vae": vae_config.data}
    index = model_index(folder)
    if is_xl_index(index):
        return _components_xl(folder, label, index, unet_config.data, vae_config.data), raw
    text = _text_config(folder, label)
    checker = preprocess = None
    if with_checker:
        checker = _checker_config(folder, label)
        extractor = folder / "feature_extractor" / "preprocessor_config.json"
        where = f"{label}/feature_extractor/preprocessor_config.json"
        raw = read_json(extractor, where) if (folder / "feature_extractor").is_dir() else None
        if raw is not None:
            check_preprocessor_config(Config(raw, where))
        try:
            preprocess = safety.Preprocess.from_dict(raw)
        except (TypeError, ValueError, KeyError) as err:
            raise ModelLoadError(f"{where} is not usable: {printable(err, 120)}") from None
        side = checker.vision_config.image_size
        if (preprocess.crop_height, preprocess.crop_width) != (side, side):
            raise ModelLoadError(
                f"{label}/feature_extractor crops {preprocess.crop_height}x{preprocess.crop_width} but the safety"
                f" checker reads {side}x{side} images: the two do not belong together"
            )
    model = StableDiffusion(
        text=text, unet=unet.UNetConfig.from_dict(unet_config.data), vae=vae.VAEConfig.from_dict(vae_config.data),
        tokenizer=_tokenizer(folder, label, text), safety=checker, preprocess=preprocess,
    )
    _check_parts_fit(model, label)
    return model, raw


def _components_xl(folder: Path, label: str, index: dict, unet_config: dict, vae_config: dict) -> StableDiffusionXL:
    """SDXL's configs and both tokenizers (the index was checked: both encoders ship)."""
    text = _text_config(folder, label, "text_encoder")
    text_2 = _text_config(folder, label, "text_encoder_2")
    force_zeros = index.get("force_zeros_for_empty_prompt", True)  # the pipeline class's default
    model = StableDiffusionXL(
        text=text, text_2=text_2, unet=unet.UNetConfig.from_dict(unet_config), vae=vae.VAEConfig.from_dict(vae_config),
        tokenizer=_tokenizer(folder, label, text), tokenizer_2=_tokenizer(folder, label, text_2, "tokenizer_2",
                                                                         "text_encoder_2"),
        force_zeros_for_empty_prompt=force_zeros,
    )
    _check_parts_fit(model, label)
    return model


def _check_parts_fit(model: StableDiffusion | StableDiffusionXL, label: str) -> None:
    """The components must work together: what each one's config says about the others."""
    u, v, t = model.unet, model.vae, model.text
    xl = isinstance(model, StableDiffusionXL)
    # An inpainting UNet (SD 1.5/2 inpainting) also takes the mask and the masked image's latents.
    if u.out_channels != v.latent_channels or u.in_channels not in (v.latent_channels, 2 * v.latent_channels + 1):
        raise ModelLoadError(
            f"{label}: the UNet takes {u.in_channels} channels and gives {u.out_channels}, the VAE has"
            f" {v.latent_channels} latent channels: they do not belong together (the UNet must give the VAE's"
            " channels and take them, or twice them plus a mask for inpainting)"
        )
    if u.text_time and not xl:
        raise ModelLoadError(
            f"{label}: unet/config.json has addition_embed_type \"text_time\" (an SDXL UNet) but model_index.json"
            " names no text_encoder_2: an SDXL UNet needs both SDXL text encoders"
        )
    if xl and not u.text_time:
        raise ModelLoadError(
            f"{label}: an SDXL pipeline (text_encoder_2) whose unet/config.json lacks addition_embed_type"
            " \"text_time\": the UNet does not belong to it"
        )
    # SDXL's context is both encoders' hidden states side by side.
    width = t.hidden_size + model.text_2.hidden_size if xl else t.hidden_size
    context = set(u.cross_attention_dim) if isinstance(u.cross_attention_dim, tuple) else {u.cross_attention_dim}
    if context != {width}:
        widths = next(iter(context)) if len(context) == 1 else list(u.cross_attention_dim)
        encoders = (f"the text encoders' hidden_size is {t.hidden_size} + {model.text_2.hidden_size}" if xl
                    else f"the text encoder's hidden_size is {t.hidden_size}")
        raise ModelLoadError(
            f"{label}: unet/config.json has cross_attention_dim={shown(widths)} but {encoders}: they do not"
            " belong together"
        )
    if xl:
        added = TIME_IDS * u.addition_time_embed_dim + model.text_2.projection_dim
        if u.projection_class_embeddings_input_dim != added:
            raise ModelLoadError(
                f"{label}: unet/config.json has projection_class_embeddings_input_dim="
                f"{u.projection_class_embeddings_input_dim}, but {TIME_IDS} x addition_time_embed_dim"
                f" ({u.addition_time_embed_dim}) + text_encoder_2's projection_dim ({model.text_2.projection_dim})"
                f" is {added}: they do not belong together"
            )
        lengths = {model.tokenizer.model_max_length, model.tokenizer_2.model_max_length}
        if len(lengths) != 1:
            raise ModelLoadError(
                f"{label}: tokenizer/ and tokenizer_2/ have different model_max_length ({', '.join(map(str, sorted(lengths)))}):"
                " SDXL's two encoders read the same tokens"
            )
    spec = model.spec
    if spec.default_size > MAX_DEFAULT_SIDE:
        raise ModelLoadError(
            f"{label}/unet/config.json: sample_size={u.sample_size} makes a default image side of {spec.default_size}"
            f" pixels, more than {MAX_DEFAULT_SIDE}: not a usable model"
        )


def param_shapes(model: StableDiffusion | StableDiffusionXL) -> dict:
    """Every component's parameter shapes, from the configs alone."""
    if isinstance(model, StableDiffusionXL):
        return model.param_shapes()
    shapes = {
        "unet": unet.unet_shapes(model.unet),
        "vae": vae.vae_shapes(model.vae),
        "text_encoder": clip.text_shapes(model.text),
    }
    if model.safety is not None:
        shapes["safety_checker"] = safety.safety_shapes(model.safety)
    return shapes


def part_dtype(model: StableDiffusion | StableDiffusionXL, part: str, dtype: str) -> str:
    """The dtype a component's weights are kept in when the model is loaded in `dtype` (SDXL keeps
    its VAE in float32 under float16: `StableDiffusionXL.weight_dtype`)."""
    choose = getattr(model, "weight_dtype", None)
    return choose(part, dtype) if choose is not None else dtype


def make_sampler(name: str, config: dict) -> Any:
    """A sampler built from the model's scheduler config; a combination it refuses is one line."""
    try:
        return schedulers.make_sampler(name, config)
    except ValueError as err:
        raise ModelLoadError(f"the {name} scheduler cannot use this model's scheduler config: {printable(err, 160)}") from None


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _load_folder(folder: Path, label: str, dtype: str, safety_checker: bool, trust_pickle: bool):
    """A diffusers-layout folder (PyTorch-layout safetensors, Flax msgpack, or trusted pickles)."""
    index = check_model_folder(folder, safety_checker=safety_checker)
    ships_checker = ships(index, "safety_checker")
    with_checker = safety_checker and ships_checker
    parts = [p for p in WEIGHTED if ships(index, p) and (p != "safety_checker" or with_checker)]
    files = {}
    for part in parts:
        library = index[part][0]
        kind = weights_format(folder / part, library)
        if kind == "flax":
            files[part] = (kind, flax_file(folder / part, library))
        elif kind == "safetensors":
            files[part] = (kind, pytorch_file(folder / part, library, ".safetensors"))
        else:
            path = next(p for p in sorted((folder / part).iterdir()) if p.suffix in PICKLE_SUFFIXES)
            if not trust_pickle:  # before anything else is read
                raise refuse_pickle(path)
            files[part] = (kind, path)
    model, _ = _components(folder, label, with_checker)
    all_shapes = param_shapes(model)
    with ExitStack() as stack:
        readers = {}
        # Every component's file is checked (header, or size) before any tensor of any is read.
        for part, (kind, path) in files.items():
            library = index[part][0]
            what = f"{label}/{part}/{printable(path.name)}"
            shapes = shape_structs(all_shapes[part])
            dt = DTYPES[part_dtype(model, part, dtype)]
            if kind == "flax":
                readers[part] = msgpack_reader(path, shapes, what, dt)
            elif kind == "safetensors":
                readers[part] = safetensors_reader(stack, path, shapes, part, library, what, dt)
            else:
                readers[part] = pickle_reader(path, shapes, library, what, dt)
        weights = {}
        for part in list(readers):
            weights[part] = readers.pop(part)()
    state = CHECKER_ON if with_checker else (CHECKER_OFF if ships_checker else CHECKER_NONE)
    scheduler_config, class_name = read_scheduler_config(folder, label, index)
    return model, weights, scheduler_config, class_name, state


def _load_single_file(path: Path, config: str | None, dtype: str, revision: str | None, trust_pickle: bool):
    """An original-layout checkpoint: architecture from its keys, configs from `config`.

    A .safetensors file is renamed and checked against the architecture from its header alone;
    tensors are read only once every part fits.
    """
    name = printable(path.name)
    with ExitStack() as stack:
        if path.suffix in PICKLE_SUFFIXES:
            if not trust_pickle:
                raise refuse_pickle(path)
            state, read = torch_load(path), None
        else:
            source = stack.enter_context(SafetensorsFile(path))
            state, read = dict(source.refs), source.read
        family = detect_family(state)
        folder = config_folder(config, family, revision)
        label = printable(config or str(folder))
        model, raw = _components(folder, label, with_checker=False)
        if (family == "sdxl") != isinstance(model, StableDiffusionXL):
            kinds = ("an SDXL", "an SD 1.x/2.x") if family == "sdxl" else ("an SD 1.x/2.x", "an SDXL")
            raise ModelLoadError(
                f"{name} is {kinds[0]} checkpoint but {label} is {kinds[1]} pipeline: give {option('config')} a"
                f" pipeline of the checkpoint's kind"
            )
        conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
        if conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] != model.unet.in_channels:
            raise ModelLoadError(
                f"{name}'s UNet takes {conv_in.shape[1]} input channels, not {model.unet.in_channels}: an"
                " inpainting or other special checkpoint, which cannot draw from text alone in sdmagic"
            )
        if family == "sdxl":
            converted = sgm_to_diffusers(state, raw["unet"], raw["vae"])
        else:
            converted = dict(zip(("unet", "vae", "text_encoder"), ldm_to_diffusers(
                state, raw["unet"], raw["vae"], family, model.text.num_hidden_layers)))
        all_shapes = param_shapes(model)
        plans = {}
        for part, part_state in converted.items():
            plans[part] = plan_pytorch_to_flax(
                part_state, shape_structs(all_shapes[part]), diffusers_names=part in ("unet", "vae"),
                what=f"{name} ({part})", ignore=lambda key: key.endswith("position_ids"),
            )
            part_state.clear()
        state.clear()
        weights = {part: run_plan(plans.pop(part), read, caster(DTYPES[part_dtype(model, part, dtype)]))
                   for part in list(plans)}
        scheduler_config, class_name = read_scheduler_config(folder, label, None)
    return model, weights, scheduler_config, class_name


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    scheduler: str | None = None,
    safety_checker: bool = True,
    config: str | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load a model's networks and host parameters. Raises ModelLoadError with what to do.

    `model`: 'tiny' or 'tiny-sdxl' (built in), a Hub id, a diffusers-layout folder (PyTorch-layout
    .safetensors or Flax msgpack weights; SD 1.x, 2.x or XL), or a single-file checkpoint
    (.safetensors, original SD layout or SDXL's) whose configs and tokenizers come from `config` (a
    diffusers-layout folder or Hub id; default: the SD 1.x, 2.x or XL base reference repo, picked
    from the checkpoint's keys). An SDXL model loaded in float16 keeps its VAE in float32
    (`StableDiffusionXL.weight_dtype`). Pickles (.ckpt, .bin, .pt) are refused
    unless `trust_pickle`, and then read only by torch's weights_only loader.

    Whatever a folder or file holds, a failure is one SDMagicError line; it is raised from here,
    after the loading frames are gone, so no partly read weights stay alive in its traceback.
    """
    check_scheduler_name(scheduler)
    if dtype not in DTYPES:
        raise SDMagicError(f"unknown dtype {printable(dtype)!r}: use one of {', '.join(DTYPES)}")
    try:
        return _load(model, revision, dtype, scheduler, safety_checker, config, trust_pickle)
    except SDMagicError as err:
        failure = (type(err), str(err))
    except Exception as err:  # noqa: BLE001
        # Something in the files no check above foresaw: still one line (with the exception's type,
        # to report), and the session lives on.
        failure = (ModelLoadError, f"could not load {printable(model)!r}: {type(err).__name__}: {printable(err)}")
    raise failure[0](failure[1])


def _load(model, revision, dtype, scheduler, safety_checker, config, trust_pickle) -> LoadedModel:
    start = time.perf_counter()
    single = single_file(model)
    if single is not None:
        sd, weights, scheduler_config, class_name = _load_single_file(single, config, dtype, revision, trust_pickle)
        return loaded(model, str(single), sd, weights, scheduler_config, class_name, scheduler, dtype, start)
    if config is not None:
        raise SDMagicError(f"{option('config')} is for single-file checkpoints; a model folder has its own configs")
    folder = resolve_model_folder(model, revision)
    label = printable(model) if model not in BUILT_IN else model
    sd, weights, scheduler_config, class_name, checker = _load_folder(folder, label, dtype, safety_checker, trust_pickle)
    return loaded(model, str(folder), sd, weights, scheduler_config, class_name, scheduler, dtype, start, checker)


def loaded(name, source, sd, weights, scheduler_config, class_name, scheduler, dtype, start,
           checker_state=None) -> LoadedModel:
    """The LoadedModel of networks and host weights, with `scheduler` (None: the one the model's
    scheduler config names)."""
    sampler = make_sampler(scheduler or schedulers.sampler_name_for(class_name, scheduler_config), scheduler_config)
    if checker_state is None:
        checker_state = CHECKER_ON if "safety_checker" in weights else CHECKER_NONE
    if checker_state != CHECKER_ON:
        sd = sd.without_safety()
    return LoadedModel(
        name=name, source=source, model=sd, params=weights, sampler=sampler, scheduler_config=scheduler_config,
        dtype=dtype, load_seconds=time.perf_counter() - start, safety_checker_state=checker_state,
    )


def with_scheduler(model: LoadedModel, scheduler: str) -> LoadedModel:
    """The same networks and host parameters with another sampler (built from the model's config)."""
    check_scheduler_name(scheduler)
    return replace(model, sampler=make_sampler(scheduler, model.scheduler_config))


# ----------------------------------------------------------------------------------------------
# The built-in tiny and random models live in tiny.py, which builds on this module; their names
# stay importable from here (imported on first use, so that neither module needs the other first).
# ----------------------------------------------------------------------------------------------

_TINY_NAMES = (
    "TINY_VERSION", "TINY_SDXL_VERSION", "RANDOM_ARCHITECTURES", "ensure_tiny_model", "random_model", "write_random_model",
    "write_tiny_model",
)


def __getattr__(name: str) -> Any:
    if name in _TINY_NAMES:
        from . import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
