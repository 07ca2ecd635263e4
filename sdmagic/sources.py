"""Where a model comes from: the built-in tiny models, a local folder, a Hub id or a single file.

A folder's `model_index.json` is checked entry by entry against the (library, class) pairs of a
Stable Diffusion (1.x, 2.x or XL) pipeline before any loader sees the folder; nothing is ever
imported for an entry. Hub downloads fetch only those components' files, PyTorch-layout safetensors first, and
never a pickle.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .configs import SCHEDULER_CLASSES, read_json, shown
from .errors import ModelLoadError, SDMagicError, example, option
from .text import printable
from .weights import PICKLE_SUFFIXES, PT_STEMS, weights_format

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
TINY = "tiny"
TINY_SDXL = "tiny-sdxl"
# The built-in random models a user names (built on first use, no download): name -> architecture.
BUILT_IN = {TINY: "tiny", TINY_SDXL: "tiny-sdxl"}

# The (library, class) pairs a model_index.json entry may name, per component. Nothing is ever
# imported for them: they only say which of sdmagic's fixed loaders reads the component folder.
COMPONENTS = {
    "unet": {("diffusers", "UNet2DConditionModel"), ("diffusers", "FlaxUNet2DConditionModel")},
    "vae": {("diffusers", "AutoencoderKL"), ("diffusers", "FlaxAutoencoderKL")},
    "text_encoder": {("transformers", "CLIPTextModel"), ("transformers", "FlaxCLIPTextModel")},
    "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    # SDXL's second text encoder (OpenCLIP bigG with its projection) and its tokenizer.
    "text_encoder_2": {
        ("transformers", "CLIPTextModelWithProjection"), ("transformers", "FlaxCLIPTextModelWithProjection"),
    },
    "tokenizer_2": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    "scheduler": {("diffusers", name) for name in SCHEDULER_CLASSES},
    "safety_checker": {
        ("stable_diffusion", "StableDiffusionSafetyChecker"), ("stable_diffusion", "FlaxStableDiffusionSafetyChecker"),
    },
    "feature_extractor": {("transformers", "CLIPImageProcessor"), ("transformers", "CLIPFeatureExtractor")},
}
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
REQUIRED_XL = ("text_encoder_2", "tokenizer_2")  # besides REQUIRED, in an SDXL pipeline
WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2", "safety_checker")
WEIGHTLESS = {"tokenizer", "tokenizer_2", "scheduler", "feature_extractor"}
# Pipeline settings model_index.json may hold besides its components (JSON types allowed).
SETTINGS = {"requires_safety_checker": (bool,), "force_zeros_for_empty_prompt": (bool,),
            "add_watermarker": (bool, type(None))}


def looks_like_path(model: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else with path syntax is meant as a folder."""
    return (
        model.startswith((".", "/", "~"))
        or "\\" in model
        or model.count("/") > 1
        or os.path.isabs(model)
    )


def model_index(folder: Path) -> dict:
    """The folder's model_index.json, every entry checked. Raises ModelLoadError naming the entry."""
    index_file = folder / "model_index.json"
    if not index_file.exists():
        raise ModelLoadError(
            f"model folder {printable(str(folder))!r} has no model_index.json: point {option('model')} at a diffusers-layout"
            " folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    return check_model_index(read_json(index_file, f"{printable(str(folder))}/model_index.json"), "model_index.json")


def check_model_index(index: Any, where: str = "model_index.json") -> dict:
    """`index` if every component entry names a (library, class) pair sdmagic loads, or [null, null].

    Nothing is imported for an entry, ever: an unknown pair is refused here, before any loader
    could see the folder.
    """
    if not isinstance(index, dict):
        raise ModelLoadError(f"{where} is not a JSON object (it holds a {type(index).__name__}): not a diffusers pipeline")
    for name, entry in index.items():
        if not isinstance(name, str) or name.startswith("_"):
            continue  # _class_name, _diffusers_version, ...: descriptive only, never used
        if name in SETTINGS and isinstance(entry, SETTINGS[name]):
            continue
        pair = tuple(entry) if isinstance(entry, list) else None
        if pair == (None, None):
            continue  # a component the pipeline does not ship (e.g. no safety checker)
        if name in COMPONENTS and pair in COMPONENTS[name]:
            continue
        if name in COMPONENTS and isinstance(pair, tuple) and len(pair) == 2:
            problem = f"names {shown(list(pair))}, which is not a {name} class sdmagic loads"
        elif name in COMPONENTS:
            problem = "is not a [library, class] pair"
        else:
            problem = f"names {shown(entry)}, a component Stable Diffusion pipelines do not have"
        raise ModelLoadError(f"{where} entry {printable(name, 40)!r} {problem}: sdmagic refuses the folder")
    return index


def ships(index: dict, part: str) -> bool:
    entry = index.get(part)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def is_xl_index(index: dict) -> bool:
    """An SDXL pipeline: it ships a second text encoder (or tokenizer)."""
    return ships(index, "text_encoder_2") or ships(index, "tokenizer_2")


def check_model_folder(folder: Path, *, safety_checker: bool) -> dict:
    """Fail early, in one line, when a local folder lacks a part it needs; returns its checked index."""
    index = model_index(folder)
    label = printable(str(folder))
    needed = list(REQUIRED)
    if is_xl_index(index):
        if not ships(index, "text_encoder"):
            # SDXL's refiner conditions on the second encoder alone, and on an aesthetic score.
            raise ModelLoadError(
                f"model folder {label!r} is an SDXL refiner (text_encoder_2 without text_encoder): sdmagic draws"
                " with SDXL base models, not the refiner"
            )
        needed += REQUIRED_XL
    if safety_checker:
        needed += [name for name in ("safety_checker", "feature_extractor") if ships(index, name)]
    for part in needed:
        if not ships(index, part):
            raise ModelLoadError(f"model folder {label!r} has no {part} in model_index.json")
        library = index[part][0]
        part_dir = folder / part
        if not part_dir.is_dir():
            raise ModelLoadError(f"model folder {label!r} lacks {part}/: copy the whole pipeline folder")
        if part in WEIGHTLESS:
            continue
        if weights_format(part_dir, library) is None:
            present = sorted(printable(p.name, 40) for p in part_dir.iterdir())[:8]
            raise ModelLoadError(
                f"model folder {label!r} has no weights in {part}/ (expected Flax msgpack or .safetensors,"
                f" found {', '.join(present) or 'nothing'})"
            )
    return index


def _hub_error(model: str, revision: str | None, err: Exception) -> ModelLoadError:
    """Translate huggingface_hub's exceptions into one line that says what happened and what to do."""
    from huggingface_hub import errors as hub_errors

    name = printable(model)
    rev = f" (revision {printable(revision)!r})" if revision else ""
    offline = (
        f"connect to the internet, use a local folder, or {example('model', 'tiny')} offline"
    )
    # huggingface_hub reports a failed request for a file as "not in the local cache"
    # (LocalEntryNotFoundError) with the HTTP or connection error as its cause.
    cause = err
    if isinstance(err, hub_errors.LocalEntryNotFoundError) and isinstance(err.__cause__, Exception):
        cause = err.__cause__
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if isinstance(cause, hub_errors.GatedRepoError):
        return ModelLoadError(
            f"{name!r} is gated: accept its licence on its Hub page, then log in"
            " (`huggingface-cli login`, `notebook_login()` or HF_TOKEN) and run %sd_setup again"
        )
    if isinstance(cause, hub_errors.RevisionNotFoundError):
        return ModelLoadError(
            f"{name!r} has no revision {printable(revision)!r} on the Hub: check the branch, tag or commit name,"
            f" or leave {option('revision')} out for the repo's default branch"
        )
    # LocalEntryNotFoundError is an EntryNotFoundError too, but says nothing about the repo.
    if isinstance(cause, hub_errors.EntryNotFoundError) and not isinstance(cause, hub_errors.LocalEntryNotFoundError):
        if revision:
            hint = f"check {option('revision')}, or leave it out for the repo's default branch"
        else:
            hint = "is it a diffusers pipeline repo? For a single checkpoint file, download it and give its path"
        return ModelLoadError(f"{name!r}{rev} has no model_index.json or lacks a file sdmagic needs: {hint}")
    if isinstance(cause, hub_errors.RepositoryNotFoundError) or status == 404:
        return ModelLoadError(
            f"{name!r} was not found on the Hub{rev}: check the id, log in if it is private"
            f" (`huggingface-cli login`), use a local folder, or {example('model', 'tiny')} offline"
        )
    if status == 401:
        return ModelLoadError(
            f"the Hub refused {name!r} without a valid login (HTTP 401): log in (`huggingface-cli login`,"
            " `notebook_login()` or HF_TOKEN), or check the id"
        )
    if status == 403:
        return ModelLoadError(
            f"the Hub denied access to {name!r} (HTTP 403): your token may lack read access, or the repo's"
            " licence must be accepted on its Hub page first"
        )
    if status == 429:
        return ModelLoadError(f"the Hub is limiting requests (HTTP 429) for {name!r}: wait a minute and try again")
    if isinstance(status, int) and status >= 500:
        return ModelLoadError(
            f"the Hugging Face Hub failed (HTTP {status}) for {name!r}{rev}: it is having trouble; try again"
            " later, or use a local folder"
        )
    if isinstance(cause, hub_errors.HFValidationError):
        return ModelLoadError(f"{name!r} is neither an existing folder nor a valid Hub id: {printable(cause)}")
    if (
        isinstance(err, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled))
        or _is_network_error(cause)
    ):
        return ModelLoadError(
            f"could not reach the Hugging Face Hub for {name!r}{rev} and it is not in the local cache: {offline}"
        )
    if isinstance(cause, OSError):
        return ModelLoadError(f"could not load {name!r}{rev} from the Hub: {printable(cause)}")
    return ModelLoadError(f"could not load {name!r}{rev} from the Hub ({type(cause).__name__}: {printable(cause)})")


def _is_network_error(err: BaseException) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - huggingface_hub<1.0 depends on requests
        return False
    return isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


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


# huggingface_hub (0.x) retries a request that failed with a 5xx or a dropped connection five
# times with backoff, silently: 23 s before the error. One retry after half a second rides out a
# blip; anything longer is an outage the user should hear about at once.
HUB_RETRIES = 1


@contextmanager
def _fast_hub_failures():
    from huggingface_hub import file_download

    original = getattr(file_download, "http_backoff", None)
    if original is None:  # a huggingface_hub without this helper has its own policy
        yield
        return
    file_download.http_backoff = functools.partial(original, max_retries=HUB_RETRIES, base_wait_time=0.5, max_wait_time=0.5)
    try:
        yield
    finally:
        file_download.http_backoff = original


def _fetch_from_hub(model: str, revision: str | None) -> Path:
    """Download (or find in the cache) the files of a Hub pipeline sdmagic reads; returns the snapshot folder.

    Without network (or with HF_HUB_OFFLINE=1) only the local cache is used. Tokens come from
    huggingface_hub's usual places (HF_TOKEN, `huggingface-cli login`, `notebook_login()`).
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    local_only = not _hub_reachable()
    with _fast_hub_failures():
        try:
            index_file = Path(hf_hub_download(model, "model_index.json", revision=revision, local_files_only=local_only))
        except Exception as err:  # noqa: BLE001 - every Hub failure becomes one clear line
            raise _hub_error(model, revision, err) from None
        # Checked before anything else is fetched: only the known components' folders are.
        index = check_model_index(read_json(index_file, f"{printable(model)}: model_index.json"))
        folders = [name for name in COMPONENTS if ships(index, name)]
        weighted = [name for name in folders if name not in WEIGHTLESS]
        try:
            # Configs and tokenizer first: no weights of any kind.
            folder = Path(snapshot_download(
                model, revision=revision, allow_patterns=[f"{name}/*.json" for name in folders]
                + [f"{name}/*.txt" for name in folders] + ["model_index.json"], local_files_only=local_only,
            ))
            # Then the plain PyTorch-layout safetensors (sdmagic's native format; not the .fp16 /
            # .non_ema variants); Flax msgpack only for a part that has none. Pickles never.
            for patterns in (
                lambda name: [f"{name}/{stem}.safetensors" for stem in set(PT_STEMS.values())],
                lambda name: [f"{name}/*.msgpack"],
            ):
                lacking = [name for name in weighted if weights_format(folder / name, index[name][0]) is None]
                if not lacking:
                    break
                folder = Path(snapshot_download(
                    model, revision=revision, allow_patterns=[p for name in lacking for p in patterns(name)],
                    local_files_only=local_only,
                ))
        except Exception as err:  # noqa: BLE001
            raise _hub_error(model, revision, err) from None
        return folder


def resolve_model_folder(model: str, revision: str | None) -> Path:
    """The local folder holding `model`: built (tiny), given (folder) or downloaded (Hub id)."""
    if not isinstance(model, str) or not model.strip():
        raise SDMagicError(f"{option('model')} needs a Hub id, a local folder or 'tiny'")
    if revision is not None and not isinstance(revision, str):
        raise SDMagicError(f"{option('revision')} needs a branch, tag or commit name")
    if model in BUILT_IN:
        if revision is not None:
            raise SDMagicError(
                f"{option('revision')} is for Hub ids: the built-in {model!r} model has no revisions; leave it out"
            )
        from .tiny import ensure_tiny_model

        return ensure_tiny_model(arch=BUILT_IN[model])
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{printable(model)!r} is a file, not a model folder: give the pipeline's folder, or a .safetensors checkpoint"
            )
        if revision is not None:
            raise SDMagicError(
                f"{option('revision')} is for Hub ids: {printable(model)!r} is a local folder, which has no revisions;"
                " leave it out"
            )
        return path
    if looks_like_path(model):
        raise ModelLoadError(f"model folder {printable(model)!r} does not exist: check the path, or use {example('model', 'tiny')}")
    return _fetch_from_hub(model, revision)




def single_file(model: Any) -> Path | None:
    """The checkpoint file `model` names, if it names one (.safetensors or a pickle)."""
    if not isinstance(model, str):
        return None
    path = Path(model).expanduser()
    if path.suffix in (".safetensors",) + PICKLE_SUFFIXES:
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file {printable(model)!r} does not exist: check the path")
        return path
    return None




# The reference repos whose configs and tokenizer a bare checkpoint of each family uses.
_FAMILY_CONFIGS = {"sd1": "CompVis/stable-diffusion-v1-4", "sd2": "stabilityai/stable-diffusion-2-1",
                   "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def config_folder(config: str | None, family: str, revision: str | None) -> Path:
    name = config or _FAMILY_CONFIGS[family]
    if not isinstance(name, str) or not name.strip():
        raise SDMagicError(f"{option('config')} needs a diffusers-layout folder or a Hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        model_index(path)
        return path
    if looks_like_path(name):
        raise ModelLoadError(
            f"config folder {printable(name)!r} does not exist: give a diffusers-layout folder or a Hub id"
        )
    from huggingface_hub import snapshot_download

    with _fast_hub_failures():
        try:  # configs and tokenizer only: a few kB
            folder = Path(snapshot_download(name, revision=revision, allow_patterns=["*.json", "*.txt"],
                                            local_files_only=not _hub_reachable()))
        except Exception as err:  # noqa: BLE001
            raise _hub_error(name, revision, err) from None
    model_index(folder)
    return folder


