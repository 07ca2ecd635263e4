"""Loading Stable Diffusion pipelines: the only module that imports diffusers and transformers.

diffusers removed its Flax pipeline in 0.40 and transformers its Flax CLIP in 5.0. Keeping every
import of them here means that owning the model code later is a change to this file alone.

Sources a user can name with `model=`:
- `"tiny"`: a built-in, deterministic, random miniature pipeline written to disk in diffusers' Flax
  layout and then loaded through exactly the same code path as a real model;
- a local folder in diffusers' Flax layout (`model_index.json`, `unet/`, `vae/`, ...);
- a Hugging Face Hub id such as `CompVis/stable-diffusion-v1-4`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .convert import detect_family, ldm_to_diffusers, pytorch_to_flax, read_safetensors
from .errors import ModelLoadError, SDMagicError
from .quiet import silence_upstream_noise
from .schedulers import LMSScheduler

# Importing diffusers creates its logging handlers; the noise filter goes on them straight after.
import diffusers  # noqa: E402,F401 - imported for its logging handlers, filtered below
import transformers  # noqa: E402,F401

# Some Flax modules log their deprecation while their classes are being defined, i.e. during
# the imports below: the library handlers must be filtered before them.
silence_upstream_noise()

from diffusers import (  # noqa: E402
    FlaxAutoencoderKL,
    FlaxDDIMScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxPNDMScheduler,
    FlaxStableDiffusionPipeline,
    FlaxUNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker_flax import (  # noqa: E402
    FlaxStableDiffusionSafetyChecker,
    FlaxStableDiffusionSafetyCheckerModule,
)
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    FlaxCLIPTextModel,
)

silence_upstream_noise()

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
TINY = "tiny"

SCHEDULERS = {
    "pndm": FlaxPNDMScheduler,
    "ddim": FlaxDDIMScheduler,
    "lms": LMSScheduler,  # upstream's Flax LMS cannot be traced; see schedulers.py
    "dpm": FlaxDPMSolverMultistepScheduler,  # DPM-Solver++ multistep
}
_SCHEDULER_NAMES = {cls.__name__: name for name, cls in SCHEDULERS.items()}
_SCHEDULER_NAMES["FlaxLMSDiscreteScheduler"] = "lms"

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

# Flax weight file names in diffusers' layout, per component library.
_FLAX_WEIGHTS = {"diffusers": "diffusion_flax_model.msgpack", "transformers": "flax_model.msgpack"}
_WEIGHTLESS = {"tokenizer", "scheduler", "feature_extractor"}



def resolve_dtype(name: str | None, backend: str) -> str:
    """The dtype name to load with: bfloat16 on accelerators, float32 on CPU, unless given."""
    if name is None:
        return "float32" if backend == "cpu" else "bfloat16"
    if name not in DTYPES:
        raise SDMagicError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return name


def check_scheduler_name(name: str | None) -> None:
    if name is not None and name not in SCHEDULERS:
        raise SDMagicError(
            f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)} (dpm = DPM-Solver++ multistep),"
            " or leave it out for the model's own"
        )


class SafetyCheckerModule(FlaxStableDiffusionSafetyCheckerModule):
    """diffusers' Flax safety checker with its cosine distance fixed for current JAX.

    Upstream calls `jnp.clip(..., a_min=...)`, which JAX removed, so the upstream module cannot run
    at all on jax 0.10. Same parameters, same thresholds, same arithmetic otherwise.
    """

    def __call__(self, clip_input):
        pooled_output = self.vision_model(clip_input)[1]
        image_embeds = self.visual_projection(pooled_output)
        special_cos_dist = _cosine_distance(image_embeds, self.special_care_embeds)
        cos_dist = _cosine_distance(image_embeds, self.concept_embeds)
        special_scores = jnp.round(special_cos_dist - self.special_care_embeds_weights[None, :], 3)
        is_special_care = jnp.any(special_scores > 0, axis=1, keepdims=True)
        # A lower threshold for every concept once any special-care concept is present.
        concept_scores = jnp.round(cos_dist - self.concept_embeds_weights[None, :] + is_special_care * 0.01, 3)
        return jnp.any(concept_scores > 0, axis=1)


class SafetyChecker(FlaxStableDiffusionSafetyChecker):
    """Loads the same files as diffusers' class, with the module that runs on current JAX."""

    module_class = SafetyCheckerModule


def _cosine_distance(emb_1, emb_2, eps=1e-12):
    norm_1 = emb_1 / jnp.clip(jnp.linalg.norm(emb_1, axis=1), min=eps)[:, None]
    norm_2 = emb_2 / jnp.clip(jnp.linalg.norm(emb_2, axis=1), min=eps)[:, None]
    return norm_1 @ norm_2.T


@dataclass
class LoadedModel:
    """A pipeline's modules with host-side parameters, ready to be placed on devices."""

    name: str
    source: str  # the folder it was read from
    pipeline: Any  # FlaxStableDiffusionPipeline: modules, tokenizer, configs
    # Host arrays: unet, vae, text_encoder, (safety_checker); the scheduler state is kept apart.
    # A Session sets this to None once the parameters are on the devices.
    params: dict | None
    scheduler: Any
    scheduler_state: Any
    scheduler_name: str
    dtype: str
    load_seconds: float
    feature_extractor: Any = None

    @property
    def has_safety_checker(self) -> bool:
        return "safety_checker" in self.params

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipeline.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's factor times the UNet's downsampling.

        Flax's UNet upsamples by exactly 2 and concatenates skip connections, so a latent side that
        does not halve cleanly through every down block fails; unlike PyTorch there is no resize.
        """
        downsamples = len(self.pipeline.unet.config.block_out_channels) - 1
        return self.vae_scale_factor * 2**downsamples

    @property
    def default_size(self) -> int:
        return int(self.pipeline.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.pipeline.unet.config.in_channels)

    @property
    def max_tokens(self) -> int:
        return int(self.pipeline.tokenizer.model_max_length)



# ----------------------------------------------------------------------------------------------
# Resolving what the user named
# ----------------------------------------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else with path syntax is meant as a folder."""
    return (
        model.startswith((".", "/", "~"))
        or "\\" in model
        or model.count("/") > 1
        or os.path.isabs(model)
    )


def _model_index(folder: Path) -> dict:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"model folder {str(folder)!r} has no model_index.json: point --model at a diffusers-layout"
            " folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    try:
        return json.loads(index_file.read_text())
    except ValueError as err:
        raise ModelLoadError(f"model folder {str(folder)!r} has a broken model_index.json ({err})") from None


def check_model_folder(folder: Path, *, safety_checker: bool) -> None:
    """Fail early, in one line, when a local folder lacks a part diffusers would need."""
    index = _model_index(folder)
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if safety_checker:
        needed += [name for name in ("safety_checker", "feature_extractor") if (index.get(name) or [None])[0]]
    for part in needed:
        entry = index.get(part)
        if not entry or entry[0] is None:
            raise ModelLoadError(f"model folder {str(folder)!r} has no {part} in model_index.json")
        library = entry[0]
        part_dir = folder / part
        if not part_dir.is_dir():
            raise ModelLoadError(f"model folder {str(folder)!r} lacks {part}/: copy the whole pipeline folder")
        if part in _WEIGHTLESS:
            continue
        if _weights_format(part_dir, library) is None:
            present = sorted(p.name for p in part_dir.iterdir())
            raise ModelLoadError(
                f"model folder {str(folder)!r} has no weights in {part}/ (expected Flax msgpack or .safetensors,"
                f" found {', '.join(present) or 'nothing'})"
            )


PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_PT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model", "stable_diffusion": "model"}


def _weights_format(part_dir: Path, library: str) -> str | None:
    """'flax', 'safetensors' or 'pickle': what a component folder holds (Flax preferred), None if nothing."""
    if (part_dir / _FLAX_WEIGHTS.get(library if library in _FLAX_WEIGHTS else "transformers")).is_file():
        return "flax"
    if _pytorch_file(part_dir, library, ".safetensors"):
        return "safetensors"
    if any(p.suffix in PICKLE_SUFFIXES for p in part_dir.iterdir()):
        return "pickle"
    return None


def _pytorch_file(part_dir: Path, library: str, suffix: str) -> Path | None:
    stems = [_PT_STEMS.get(library, "model"), "diffusion_pytorch_model", "model", "pytorch_model"]
    for stem in dict.fromkeys(stems):
        if (part_dir / f"{stem}{suffix}").is_file():
            return part_dir / f"{stem}{suffix}"
    return None


def refuse_pickle(path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{path.name} is a pickle file ({path.suffix}): loading a pickle can run any code inside it, so"
        " sdmagic does not. Use the model's .safetensors version (most models publish one) or convert"
        " this file to safetensors; if you trust it, --trust-pickle loads it through torch.load(weights_only=True),"
        " which refuses code"
    )


def _torch_load(path: Path) -> dict[str, np.ndarray]:
    """A pickle's tensors through torch's weights_only loader (only with --trust-pickle)."""
    try:
        import torch
    except ImportError:
        raise ModelLoadError(
            f"--trust-pickle reads {path.name} only through torch.load(weights_only=True), and torch is not"
            " installed: pip install torch (the CPU build is enough), or convert the file to safetensors"
        ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise ModelLoadError(f"torch's weights_only loader refused {path.name}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {
        k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def _hub_error(model: str, revision: str | None, err: Exception) -> ModelLoadError:
    """Translate huggingface_hub's exceptions into one line that says what to do."""
    from huggingface_hub import errors as hub_errors

    rev = f" (revision {revision!r})" if revision else ""
    if isinstance(err, hub_errors.GatedRepoError):
        return ModelLoadError(
            f"{model!r} is gated: accept its licence on its Hub page, then log in"
            " (`huggingface-cli login`, `notebook_login()` or HF_TOKEN) and run %sd_setup again"
        )
    if isinstance(err, hub_errors.RevisionNotFoundError):
        return ModelLoadError(f"{model!r} has no revision {revision!r} on the Hub: check --revision")
    if isinstance(err, hub_errors.RepositoryNotFoundError):
        return ModelLoadError(
            f"{model!r} was not found on the Hub{rev}: check the id, log in if it is private"
            " (`huggingface-cli login`), use a local folder, or --model tiny offline"
        )
    if isinstance(err, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled)) or _is_network_error(err):
        return ModelLoadError(
            f"could not reach the Hugging Face Hub for {model!r}{rev} and it is not in the local cache:"
            " connect to the internet, use a local folder, or --model tiny offline"
        )
    if isinstance(err, hub_errors.EntryNotFoundError):
        return ModelLoadError(f"{model!r}{rev} is missing a file sdmagic needs ({err}): try --revision flax")
    if isinstance(err, OSError):
        return ModelLoadError(f"could not load {model!r}{rev}: {str(err).splitlines()[0]}")
    raise err


def _is_network_error(err: Exception) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - huggingface_hub<1.0 depends on requests
        return False
    return isinstance(err, (requests.ConnectionError, requests.Timeout))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the Hub? Checked first so that a machine without network
    gets one clear error in seconds instead of huggingface_hub's retries (about half a minute)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _fetch_from_hub(model: str, revision: str | None) -> Path:
    """Download (or find in the cache) the Flax files of a Hub pipeline; returns the snapshot folder.

    Without network (or with HF_HUB_OFFLINE=1) only the local cache is used. Tokens come from
    huggingface_hub's usual places (HF_TOKEN, `huggingface-cli login`, `notebook_login()`).
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    local_only = not _hub_reachable()
    try:
        index_file = hf_hub_download(model, "model_index.json", revision=revision, local_files_only=local_only)
        index = json.loads(Path(index_file).read_text())
        folders = [k for k in index if not k.startswith("_")]
        allow = [f"{name}/*" for name in folders] + ["model_index.json"]
        # Flax weights first; PyTorch pickles are never fetched, let alone opened.
        ignore = ["*.bin", "*.safetensors", "*.ckpt", "*.pt", "*.pth", "*.onnx", "*.onnx_data", "*.xml", "*.pb"]
        folder = Path(
            snapshot_download(
                model, revision=revision, allow_patterns=allow, ignore_patterns=ignore, local_files_only=local_only
            )
        )
        # Most repos ship only PyTorch-layout safetensors: fetch those for the parts without Flax
        # weights (the plain, full-precision file; not the .fp16 / .non_ema variants).
        lacking = [
            name for name in folders
            if name not in _WEIGHTLESS and (index.get(name) or [None])[0]
            and (folder / name).is_dir() and _weights_format(folder / name, index[name][0]) is None
        ]
        if lacking:
            safetensors = [f"{name}/{stem}.safetensors" for name in lacking for stem in set(_PT_STEMS.values())]
            folder = Path(
                snapshot_download(model, revision=revision, allow_patterns=safetensors, local_files_only=local_only)
            )
        return folder
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one clear line
        raise _hub_error(model, revision, err) from None


def resolve_model_folder(model: str, revision: str | None, dtype: str) -> Path:
    """The local folder holding `model`: built (tiny), given (folder) or downloaded (Hub id)."""
    if not isinstance(model, str) or not model.strip():
        raise SDMagicError("--model needs a Hub id, a local folder or 'tiny'")
    if model == TINY:
        return ensure_tiny_model()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{model!r} is a file, not a model folder: give the pipeline's folder, or a .safetensors checkpoint"
            )
        return path
    if _looks_like_path(model):
        raise ModelLoadError(f"model folder {model!r} does not exist: check the path, or use --model tiny")
    if revision is None and model == DEFAULT_MODEL:
        # The original notebook's choice: the Flax weights live on these branches of SD 1.4.
        revision = "bf16" if dtype == "bfloat16" else "flax"
    return _fetch_from_hub(model, revision)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _make_scheduler(name: str | None, pipeline_scheduler: Any) -> tuple[Any, Any, str]:
    """The model's own scheduler or one of SCHEDULERS built from the model's scheduler config."""
    own = _SCHEDULER_NAMES.get(type(pipeline_scheduler).__name__, type(pipeline_scheduler).__name__)
    if name is None and own != "lms":
        return pipeline_scheduler, pipeline_scheduler.create_state(), own
    name = name or own
    if name == "lms":
        scheduler = LMSScheduler(dict(pipeline_scheduler.config))
        return scheduler, scheduler.create_state(), name
    cls = SCHEDULERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = {k: v for k, v in dict(pipeline_scheduler.config).items() if k in accepted}
    if name == "dpm":
        config.update(algorithm_type="dpmsolver++", solver_order=2)
    scheduler = cls.from_config(config)
    return scheduler, scheduler.create_state(), name


def _caster(dtype: Any):
    """A host-side cast of floating arrays to `dtype` (integer arrays pass through)."""
    target = np.dtype(dtype)

    def cast(x):
        x = np.asarray(x)
        return x.astype(target) if np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16 else x

    return cast


def _cast_floats(tree: Any, dtype: Any) -> Any:
    """Cast floating leaves of one component to `dtype` on the host."""
    return jax.tree_util.tree_map(_caster(dtype), tree)


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
    """Load a pipeline's modules and host parameters. Raises ModelLoadError with what to do.

    `model`: 'tiny', a Hub id, a diffusers-layout folder (Flax msgpack or PyTorch-layout
    .safetensors weights), or a single-file checkpoint (.safetensors, original SD layout) whose
    configs and tokenizer come from `config` (a diffusers-layout folder or Hub id; default: the
    SD 1.x or 2.x reference repo, picked from the checkpoint's keys). Pickles (.ckpt, .bin, .pt)
    are refused unless `trust_pickle`, and then read only by torch's weights_only loader.
    """
    check_scheduler_name(scheduler)
    if dtype not in DTYPES:
        raise SDMagicError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    start = time.perf_counter()
    silence_upstream_noise()  # upstream modules imported lazily since import time have loggers now
    single = _single_file(model)
    if single is not None:
        pipeline, weights, own = _load_single_file(single, config, dtype, revision, trust_pickle)
        return _loaded(model, str(single), pipeline, weights, scheduler or own, dtype, start)
    if config is not None:
        raise SDMagicError("--config is for single-file checkpoints; a model folder has its own configs")
    folder = resolve_model_folder(model, revision, dtype)
    check_model_folder(folder, safety_checker=safety_checker)
    index = _model_index(folder)
    formats = {
        part: _weights_format(folder / part, index[part][0])
        for part in ("unet", "vae", "text_encoder", "safety_checker")
        if (index.get(part) or [None])[0] and (folder / part).is_dir()
    }
    if not safety_checker:
        formats.pop("safety_checker", None)
    if any(f != "flax" for f in formats.values()):
        pipeline, weights, own = _load_pytorch_layout(folder, index, formats, dtype, trust_pickle)
        return _loaded(model, str(folder), pipeline, weights, scheduler or own, dtype, start)
    ships_checker = (index.get("safety_checker") or [None])[0] is not None
    try:
        # Upstream's safety checker class cannot even be built on current JAX: it is always skipped
        # here and read below through SafetyChecker, which loads the same files.
        pipeline, params = FlaxStableDiffusionPipeline.from_pretrained(
            str(folder), dtype=DTYPES[dtype], safety_checker=None
        )
        if safety_checker and ships_checker:
            checker, params["safety_checker"] = SafetyChecker.from_pretrained(
                str(folder / "safety_checker"), _do_init=False
            )
            pipeline.safety_checker = checker
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not read model folder {str(folder)!r}: {str(err).splitlines()[0]}") from None
    params.pop("scheduler", None)
    # One component at a time, dropping each original once cast: the peak extra host memory is
    # the largest component (the UNet), not a second copy of the whole pipeline.
    weights = {name: _cast_floats(params.pop(name), DTYPES[dtype]) for name in list(params)}
    return _loaded(model, str(folder), pipeline, weights, scheduler, dtype, start)


def _loaded(name, source, pipeline, weights, scheduler, dtype, start) -> LoadedModel:
    """The LoadedModel of a pipeline and its host weights, with `scheduler` (None: the model's own)."""
    sched, sched_state, sched_name = _make_scheduler(scheduler, pipeline.scheduler)
    return LoadedModel(
        name=name,
        source=source,
        pipeline=pipeline,
        params=weights,
        scheduler=sched,
        scheduler_state=sched_state,
        scheduler_name=sched_name,
        dtype=dtype,
        load_seconds=time.perf_counter() - start,
        feature_extractor=getattr(pipeline, "feature_extractor", None),
    )


# diffusers' scheduler classes (PyTorch or Flax names) -> the Flax scheduler to build from their config.
_SCHEDULER_CLASSES = {
    "PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpm",
}


def _base_scheduler(folder: Path) -> tuple[Any, str]:
    """The model's scheduler config as a Flax object, and the sdmagic scheduler it names.

    PyTorch-layout repos name PyTorch classes; one sdmagic does not have (e.g. Euler) becomes PNDM,
    the SD 1.x default, which `--scheduler` can change.
    """
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    name = _SCHEDULER_CLASSES.get(config.get("_class_name", "").removeprefix("Flax"), "pndm")
    cls = FlaxPNDMScheduler if name in ("pndm", "lms") else SCHEDULERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls.from_config({k: v for k, v in config.items() if k in accepted}), name


# PyTorch-config settings that change the network but that diffusers' Flax modules do not build:
# refuse them rather than build a different network that quietly draws wrong images.
_UNSUPPORTED = {
    "class_embed_type": None, "time_cond_proj_dim": None, "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_type": "positional",
    "encoder_hid_dim": None, "num_class_embeds": None,
}


def _flax_module(cls: Any, config: dict, dtype: Any, where: str) -> Any:
    """A diffusers Flax module from a PyTorch or Flax component config (only the keys it takes)."""
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) != default:
            raise ModelLoadError(
                f"{where} sets {key}={config[key]!r}, which diffusers' Flax {cls.__name__} does not"
                " support: this model cannot run in sdmagic"
            )
    accepted = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype"}
    return cls(**{k: v for k, v in config.items() if k in accepted}, dtype=dtype)


def _modules(folder: Path, dtype: Any, with_checker: bool) -> dict:
    """Flax modules built from a diffusers-layout folder's configs, without weights."""
    try:
        unet = _flax_module(FlaxUNet2DConditionModel, FlaxUNet2DConditionModel.load_config(str(folder / "unet")),
                            dtype, "unet/config.json")
        vae = _flax_module(FlaxAutoencoderKL, FlaxAutoencoderKL.load_config(str(folder / "vae")), dtype, "vae/config.json")
        text_encoder = FlaxCLIPTextModel(
            CLIPTextConfig.from_pretrained(str(folder / "text_encoder")), _do_init=False, dtype=dtype
        )
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        extractor_dir = folder / "feature_extractor"
        feature_extractor = CLIPImageProcessor.from_pretrained(str(extractor_dir)) if extractor_dir.is_dir() else None
        checker = None
        if with_checker:
            checker = SafetyChecker(CLIPConfig.from_pretrained(str(folder / "safety_checker")), _do_init=False)
        scheduler, scheduler_name = _base_scheduler(folder)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not read the configs in {str(folder)!r}: {str(err).splitlines()[0]}") from None
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "feature_extractor": feature_extractor, "safety_checker": checker, "scheduler": scheduler,
            "scheduler_name": scheduler_name}


def _shapes(module: Any) -> Any:
    """The parameter shapes of a Flax model, without initialising anything."""
    key = jax.random.PRNGKey(0)
    if hasattr(module, "input_shape"):  # transformers
        return jax.eval_shape(lambda k: module.init_weights(k, module.input_shape), key)
    return jax.eval_shape(module.init_weights, key)


def _read_pytorch(path: Path, trust_pickle: bool, cast) -> dict[str, np.ndarray]:
    if path.suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise refuse_pickle(path)
        return {k: cast(v) for k, v in _torch_load(path).items()}
    return read_safetensors(path, cast)


def _pipeline(modules: dict, dtype: Any) -> Any:
    return FlaxStableDiffusionPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=modules["tokenizer"],
        unet=modules["unet"], scheduler=modules["scheduler"], safety_checker=modules["safety_checker"],
        feature_extractor=modules["feature_extractor"], dtype=dtype,
    )


def _load_pytorch_layout(folder: Path, index: dict, formats: dict, dtype: str, trust_pickle: bool):
    """A diffusers folder whose weights are PyTorch-layout files: converted with numpy, no torch."""
    paths = {}
    for part, kind in formats.items():
        library = index[part][0]
        if kind == "flax":
            paths[part] = folder / part / _FLAX_WEIGHTS.get(library if library in _FLAX_WEIGHTS else "transformers")
        elif kind == "safetensors":
            paths[part] = _pytorch_file(folder / part, library, ".safetensors")
        else:
            paths[part] = next(p for p in sorted((folder / part).iterdir()) if p.suffix in PICKLE_SUFFIXES)
            if not trust_pickle:  # before anything else is read
                raise refuse_pickle(paths[part])
    modules = _modules(folder, DTYPES[dtype], with_checker="safety_checker" in formats)
    cast = _caster(DTYPES[dtype])
    weights = {}
    for part, path in paths.items():
        library = index[part][0]
        if formats[part] == "flax":
            from flax.serialization import msgpack_restore

            weights[part] = _cast_floats(msgpack_restore(path.read_bytes()), DTYPES[dtype])
            continue
        state = _read_pytorch(path, trust_pickle, cast)
        weights[part] = pytorch_to_flax(
            state, _shapes(modules[part]), diffusers_names=library == "diffusers", what=f"{part}/{path.name}",
            ignore=lambda key: key.endswith("position_ids"),
        )
    return _pipeline(modules, DTYPES[dtype]), weights, modules["scheduler_name"]


def _single_file(model: Any) -> Path | None:
    """The checkpoint file `model` names, if it names one (.safetensors or a pickle)."""
    if not isinstance(model, str):
        return None
    path = Path(model).expanduser()
    if path.suffix in (".safetensors",) + PICKLE_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {model!r} does not exist: check the path")
        return path
    return None


# The reference repos whose configs and tokenizer a bare checkpoint of each family uses.
_FAMILY_CONFIGS = {"sd1": "CompVis/stable-diffusion-v1-4", "sd2": "stabilityai/stable-diffusion-2-1"}


def _config_folder(config: str | None, family: str, revision: str | None) -> Path:
    name = config or _FAMILY_CONFIGS[family]
    path = Path(name).expanduser()
    if path.is_dir():
        _model_index(path)
        return path
    if _looks_like_path(name):
        raise ModelLoadError(f"config folder {name!r} does not exist: give a diffusers-layout folder or a Hub id")
    from huggingface_hub import snapshot_download

    try:  # configs and tokenizer only: a few kB
        return Path(snapshot_download(name, revision=revision, allow_patterns=["*.json", "*.txt"],
                                      local_files_only=not _hub_reachable()))
    except Exception as err:  # noqa: BLE001
        raise _hub_error(name, revision, err) from None


def _load_single_file(path: Path, config: str | None, dtype: str, revision: str | None, trust_pickle: bool):
    """An original-layout checkpoint: architecture from its keys, configs from `config`."""
    cast = _caster(DTYPES[dtype])
    checkpoint = _read_pytorch(path, trust_pickle, cast)
    family = detect_family(checkpoint)
    folder = _config_folder(config, family, revision)
    modules = _modules(folder, DTYPES[dtype], with_checker=False)
    unet_config, vae_config = dict(modules["unet"].config), dict(modules["vae"].config)
    # What the weights themselves say wins over the reference config (e.g. a 9-channel inpainting UNet).
    conv_in = checkpoint.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != unet_config["in_channels"]:
        unet_config["in_channels"] = int(conv_in.shape[1])
        modules["unet"] = _flax_module(FlaxUNet2DConditionModel, unet_config, DTYPES[dtype], path.name)
    text_layers = modules["text_encoder"].config.num_hidden_layers
    unet_pt, vae_pt, text_pt = ldm_to_diffusers(checkpoint, unet_config, vae_config, family, text_layers)
    weights = {}
    for part, state in (("unet", unet_pt), ("vae", vae_pt), ("text_encoder", text_pt)):
        weights[part] = pytorch_to_flax(
            state, _shapes(modules[part]), diffusers_names=part != "text_encoder", what=f"{path.name} ({part})",
            ignore=lambda key: key.endswith("position_ids"),
        )
    return _pipeline(modules, DTYPES[dtype]), weights, modules["scheduler_name"]


# ----------------------------------------------------------------------------------------------
# The built-in tiny model
# ----------------------------------------------------------------------------------------------

TINY_VERSION = "1"


def _tiny_cache_root() -> Path:
    root = os.environ.get("SDMAGIC_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sdmagic"
    )
    return Path(root)


def ensure_tiny_model(root: Path | None = None) -> Path:
    """The tiny model's folder, written on first use (a few seconds, no network)."""
    target = (root or _tiny_cache_root()) / f"tiny-v{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a concurrent or interrupted build never leaves a
    # half-written model that later loads would trust.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_tiny_model(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every character is a token. Offline, exact."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


# Architectures of the random pipelines sdmagic builds itself (no download): `tiny` for tests and
# demos, `sd1` (Stable Diffusion 1.x's full size, 860M-parameter UNet) for benchmarks.
RANDOM_ARCHITECTURES = {
    "tiny": {
        # The shapes of diffusers' own Flax tests: a 2-level UNet on 32x32 latents, 2-level VAE.
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        ),
        "vae": dict(
            block_out_channels=(32, 64), sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        ),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
    },
    # SD 2.x's shape in miniature: linear attention projections, head size instead of head count,
    # an OpenCLIP-style (gelu) text encoder, v-prediction.
    "tiny-sd2": {
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=24,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), use_linear_projection=True,
        ),
        "vae": dict(
            block_out_channels=(32, 64), sample_size=48,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        ),
        "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
        "scheduler": dict(prediction_type="v_prediction"),
    },
    "sd1": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        "text": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            vocab_size=49408, hidden_act="quick_gelu",
        ),
    },
}


def _sd_scheduler(**overrides) -> Any:
    """Stable Diffusion's scheduler: PNDM (PLMS), scaled-linear betas (SD 2.x adds v-prediction)."""
    return FlaxPNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **overrides,
    )


def _random_pipeline(arch: str, seed: int, tokenizer_dir: Path, dtype: Any = jnp.float32):
    """Modules of architecture `arch` with random float32 parameters: (pipeline, params, text_config)."""
    spec = RANDOM_ARCHITECTURES[arch]
    # Four keys, the fourth for the tiny safety checker: the tiny model's bytes stay as they were.
    k_unet, k_vae, k_text, _ = jax.random.split(jax.random.PRNGKey(seed), 4)
    tokenizer = _tiny_tokenizer(tokenizer_dir)
    unet = FlaxUNet2DConditionModel(in_channels=4, out_channels=4, dtype=dtype, **spec["unet"])
    vae = FlaxAutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, dtype=dtype, **spec["vae"])
    text_config = CLIPTextConfig(
        **{"vocab_size": len(tokenizer), **spec["text"]},
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = FlaxCLIPTextModel(text_config, seed=int(jax.random.randint(k_text, (), 0, 2**30)), dtype=dtype)
    feature_extractor = CLIPImageProcessor(
        crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}, do_convert_rgb=True
    )
    pipeline = FlaxStableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_sd_scheduler(**spec.get("scheduler", {})),
        safety_checker=None, feature_extractor=feature_extractor, dtype=dtype,
    )
    params = {"unet": unet.init_weights(k_unet), "vae": vae.init_weights(k_vae), "text_encoder": text_encoder.params}
    return pipeline, params, text_config


def random_model(arch: str = "sd1", *, dtype: str = "float32", scheduler: str | None = None, seed: int = 0) -> LoadedModel:
    """A randomly initialised pipeline of a real architecture, in memory: for benchmarks, no download.

    No safety checker; the parameters are host arrays in `dtype`, as `load_model` gives them.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipeline, params, _ = _random_pipeline(arch, seed, Path(tokenizer_dir), DTYPES[dtype])
    weights = {name: _cast_floats(params.pop(name), DTYPES[dtype]) for name in list(params)}
    return _loaded(f"random {arch}", "memory", pipeline, weights, scheduler, dtype, start)


def with_scheduler(model: LoadedModel, scheduler: str) -> LoadedModel:
    """The same modules and host parameters with another scheduler (built from the model's config)."""
    check_scheduler_name(scheduler)
    sched, state, name = _make_scheduler(scheduler, model.pipeline.scheduler)
    return replace(model, scheduler=sched, scheduler_state=state, scheduler_name=name)


def write_random_model(folder: Path, arch: str, *, seed: int = 0) -> Path:
    """Write a random pipeline of `arch` (no safety checker) in diffusers' Flax layout, as tests need."""
    folder = Path(folder)
    tokenizer_dir = folder / ".tokenizer-src"
    pipeline, params, _ = _random_pipeline(arch, seed, tokenizer_dir)
    pipeline.save_pretrained(str(folder), params=params)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    return folder


def write_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """Write a miniature, randomly initialised SD 1.x-shaped pipeline in diffusers' Flax layout.

    The shapes follow diffusers' own Flax tests: a 2-level UNet (32/64 channels) on 32x32 latents,
    a 2-level VAE (so 64x64 images), a 2-layer CLIP text encoder and a tiny CLIP safety checker
    whose concept thresholds are set so that it flags nothing by default.
    """
    folder = Path(folder)
    k_safety = jax.random.split(jax.random.PRNGKey(seed), 4)[3]
    tokenizer_dir = folder / ".tokenizer-src"
    pipeline, params, text_config = _random_pipeline("tiny", seed, tokenizer_dir)
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=32, projection_dim=32,
    )
    safety_config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=32
    )
    safety_checker = SafetyChecker(safety_config, seed=int(jax.random.randint(k_safety, (), 0, 2**30)))
    safety_params = dict(jax.tree_util.tree_map(np.asarray, safety_checker.params))
    # Cosine similarity never exceeds 1, so thresholds of 2 flag nothing; tests lower them to check
    # that flagged images are blacked out.
    safety_params["concept_embeds_weights"] = np.full((17,), 2.0, np.float32)
    safety_params["special_care_embeds_weights"] = np.full((3,), 2.0, np.float32)
    pipeline.save_pretrained(str(folder), params=params)
    # The checker is saved apart and listed under diffusers' class name, as in real SD repos, so
    # that any diffusers-layout reader sees the usual model_index.json.
    safety_checker.save_pretrained(str(folder / "safety_checker"), params=safety_params)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["safety_checker"] = ["stable_diffusion", "FlaxStableDiffusionSafetyChecker"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True))
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    return folder
