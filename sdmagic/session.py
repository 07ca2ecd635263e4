"""`Session`: devices, a loaded pipeline on them, compiled executables and the timing log.

The engine behind the magics; it works the same from a script. No module globals: two sessions in
one process (say, one on 1 device and one on 8) do not share anything but JAX itself.
"""

from __future__ import annotations

import math
import os
import secrets
import shlex
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from . import generate as gen
from .compile_cache import ExecutableStore, configure_jax_cache, default_cache_dir, executable_key
from .devices import DevicePlan, default_per_device_batch, find_devices, place_batch, place_replicated
from .errors import SDMagicError, example, in_magic, option
from .models import LoadedModel, load_model, resolve_dtype
from .output import GenerationResult, ImageInfo, to_pil
from .prompts import Prompt
from .saving import save_folder
from .schedulers import denoising_steps
from .history import History
from .merged_loras import LoraSet, lora_set, parse_lora
from .text import printable
from .timing import RunRecord, TimingLog, TimingReport

MAX_SEED = 2**32 - 1  # PRNGKey takes a 32-bit seed
MAX_SIDE = 4096  # pixels; beyond this a single image no longer fits any accelerator's memory
MAX_STEPS = 1000  # the schedulers' training timesteps
MAX_IMAGES_PER_PROMPT = 256
MAX_PER_DEVICE_BATCH = 64
# Beyond this guidance no longer steers: float32 arithmetic overflows into black images (1e308 is
# inf), and already at 100 the pictures are saturated noise. A1111's slider stops at 30.
MAX_GUIDANCE = 100.0
MAX_COLS = 64
# Calls started on the devices ahead of the host. One: the next call starts as soon as the last
# one's pixels are fetched (before they become PIL images), so a device idles only for the copy.
# More would not be faster, and would make Ctrl-C wait: on the CPU backend starting a second call
# blocks, uninterruptibly, until the first is done, and the next cell waits for every call left.
MAX_CALLS_IN_FLIGHT = 1
# Image-to-image keeps this much of the init image's noise level unless told otherwise (A1111's
# default denoising strength); inpainting repaints the masked region from pure noise by default
# (diffusers' default, and what inpainting checkpoints are trained for).
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0}
MAX_MASK_BLUR = 256


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder reads; the warning says what was cut."""


class SaveFailedWarning(UserWarning):
    """Images could not be written; they are still in the result and the session's history."""


class CompiledCodeWarning(UserWarning):
    """A saved executable could not run; it was deleted and compiled again."""


@contextmanager
def device_memory_errors(key: gen.ShapeKey, doing: str):
    """XLA's RESOURCE_EXHAUSTED (out of device memory) -> one line with the shape and what to try."""
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        raise SDMagicError(
            f"out of device memory {doing} {key.describe()}: try a smaller {option('height')} and"
            f" {option('width')}, {example('per_device_batch', 1)}, or {example('dtype', 'bfloat16')} at setup"
        ) from None


@dataclass(frozen=True)
class _Call:
    """One compiled call: images `first` .. `first + count` of `request`, with their host inputs."""

    request: "GenerationRequest"
    key: gen.ShapeKey
    first: int
    count: int
    inputs: dict  # name -> host array, as generate's executable takes them


@dataclass(frozen=True)
class GenerationRequest:
    """Validated images of one compiled shape: one entry per image, in cell order.

    `positions` are the images' indices in the whole cell, which may span several requests when
    its lines ask for different sizes or steps.
    """

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    negatives: tuple[str | None, ...]
    guidances: tuple[float, ...]
    steps: int
    height: int
    width: int
    seed_was_random: bool
    positions: tuple[int, ...] = ()
    mode: str = "txt2img"  # "img2img" (an init image) or "inpaint" (an init image and a mask)
    chunks: int = 1  # 75-token prompt chunks every image's prompt and negative are padded to
    start: int = 0  # the first model evaluation (image-to-image starts part way)
    strengths: tuple[float | None, ...] = ()
    inits: tuple = ()  # uint8 [H, W, 3] per image (the init image, fitted to the size), or None
    masks: tuple = ()  # float32 [H, W] per image (1 = repaint, blurred), or None
    mask_blurs: tuple[int | None, ...] = ()
    init_names: tuple[str | None, ...] = ()


def _as_int(keyword: str, value: Any, minimum: int, maximum: int, hint: str) -> int:
    """`value` as a whole number within bounds; errors name the option as the user wrote it
    (`seed` in Python, `--seed` in a magic) and end with `hint`."""
    name = option(keyword)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        try:
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            raise SDMagicError(f"{name} must be a whole number, got {printable(repr(value))}: {hint}") from None
    value = int(value)
    if not minimum <= value <= maximum:
        raise SDMagicError(f"{name} must be from {minimum} to {maximum}, got {value}: {hint}")
    return value


def _as_float(keyword: str, value: Any, minimum: float, maximum: float, hint: str) -> float:
    name = option(keyword)
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise SDMagicError(f"{name} must be a number, got {printable(repr(value))}: {hint}") from None
    if not math.isfinite(number):
        raise SDMagicError(f"{name} must be a finite number, got {printable(repr(value))}: {hint}")
    if not minimum <= number <= maximum:
        raise SDMagicError(f"{name} must be from {minimum:g} to {maximum:g}, got {number:g}: {hint}")
    return number


class Session:
    """A pipeline placed on devices, ready to turn prompts into images.

    Create one with `sdmagic.setup(...)`; call `generate` as often as you like. Executables are
    compiled once per `ShapeKey` and kept for the session's life, and in `executable_store` (if
    given) for later sessions, so a restarted kernel loads them instead of compiling.
    """

    def __init__(
        self,
        model: LoadedModel,
        plan: DevicePlan,
        *,
        per_device_batch: int | None = None,
        executable_store: ExecutableStore | None = None,
        history: History | None = None,
        timings: TimingLog | None = None,
        loras: LoraSet | None = None,
    ):
        """`history` and `timings`: carried over from an earlier session (a new %sd_setup keeps
        them); each record names the model and scheduler that made it."""
        self.model = model
        self.plan = plan
        self.per_device_batch = self._per_device_batch(per_device_batch, default_per_device_batch(plan))
        self.executable_store = executable_store or ExecutableStore(None)
        self.timings = timings if timings is not None else TimingLog()
        self._executables: dict[gen.ShapeKey, Any] = {}
        self._unverified: set[gen.ShapeKey] = set()  # loaded from disk, not yet seen to run
        self._token_cache: dict[str, tuple[np.ndarray, str | None]] = {}
        self._last_call: tuple[list[GenerationRequest], int] | None = None  # and its per-device batch
        self.history = history if history is not None else History()
        # A bar per denoising step (a jax.debug.callback in the loop): about 1% slower on the CPU
        # bench (bench/progress.py) and not kept on disk, so it is opt-in.
        self.step_progress = False
        self.steps_reported = 0
        self._step_bar = None
        # The LoRAs merged into `model.params`, with the touched weights' values before merging, so
        # that a LoRA's weight changes without reading the base model again.
        self.loras = loras if loras is not None else LoraSet()
        self.setup_options: tuple | None = None  # what `setup` loaded it with
        start = time.perf_counter()
        self.params = place_replicated(model.params, plan)
        jax.block_until_ready(self.params)
        self.place_seconds = time.perf_counter() - start
        # The host copy is no longer needed: the devices hold the parameters now.
        model.params = None
        self._closed = False

    # ------------------------------------------------------------------ description

    @property
    def batch(self) -> int:
        """Images per compiled call: every device gets `per_device_batch` of them."""
        return self.plan.count * self.per_device_batch

    @staticmethod
    def _per_device_batch(value: Any, default: int) -> int:
        if value is None:
            return default
        return _as_int("per_device_batch", value, 1, MAX_PER_DEVICE_BATCH, f"e.g. {example('per_device_batch', default)}")

    @property
    def safety_checker(self) -> bool:
        return "safety_checker" in self.params

    @property
    def compiled_shapes(self) -> list[gen.ShapeKey]:
        return list(self._executables)

    def describe(self) -> str:
        # A replicated array reports its logical size: the bytes each device holds.
        param_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(self.params)) / 1e6
        # "none shipped" (the model has no checker) reads differently from "off" (you turned it off).
        checker = f"safety checker: {self.model.safety_checker_state}"
        per_call = f"{self.per_device_batch} image{'s' if self.per_device_batch != 1 else ''} per device per call"
        return (
            f"sdmagic: {self.plan.describe()}, {per_call} | model {printable(self.model.name, 160)} ({self.model.scheduler_name},"
            f" {self.model.dtype}, {param_mb:.0f} MB per device) | {checker} |"
            f"{' LoRA ' + self.loras.describe() + ' |' if self.loras.loras else ''}"
            f" loaded in {self.model.load_seconds + self.place_seconds:.1f} s"
        )

    def __repr__(self) -> str:
        return f"<Session {self.describe()}>"

    # ------------------------------------------------------------------ LoRA

    @property
    def lora_specs(self) -> list[tuple[str, float]]:
        """(path, weight) of each merged LoRA, as `setup`'s `lora=` takes them."""
        return [(m.path, m.weight) for m in self.loras.loras]

    def lora_record(self) -> tuple:
        """(name, weight, short hash) of each LoRA in the weights, as images record them."""
        return self.loras.record()

    def set_lora(self, path: str | os.PathLike, weight: float = 1.0, *, trust_pickle: bool = False) -> None:
        """Merge the LoRA file at `path` with `weight` into the weights on the devices, or change its
        weight if it is merged already (0 takes it out). Only the layers LoRAs touch are recomputed,
        from their values before any LoRA (kept on the host), and sent to the devices: the base model
        is not read again and nothing is compiled again."""
        if self._closed:
            raise SDMagicError("this session was closed (a newer %sd_setup replaced it): use the new one")
        updated = self.loras.with_lora(path, weight, self.params, self.model.model, trust_pickle=trust_pickle)
        self._use_loras(updated)

    def set_loras(self, loras: Sequence[Any], *, trust_pickle: bool = False) -> None:
        """Make `loras` (as `setup`'s `lora=`) the merged set, in place of the ones merged now; as
        `set_lora`, from the kept base values, without reading the model again or compiling."""
        updated = lora_set(loras, self.params, self.model.model, trust_pickle=trust_pickle,
                           start=LoraSet((), self.loras.base))
        self._use_loras(updated)

    def _use_loras(self, updated: LoraSet) -> None:
        placed = place_replicated(updated.merged_leaves(), self.plan)
        self.params = updated.with_leaves(self.params, placed)
        self.loras = updated

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free the parameters and executables on the devices. The session cannot generate after."""
        if self._closed:
            return
        for leaf in jax.tree_util.tree_leaves(self.params):
            if isinstance(leaf, jax.Array):
                leaf.delete()
        self._executables.clear()
        self._closed = True

    # ------------------------------------------------------------------ requests

    def _size(self, name: str, value: Any) -> int:
        multiple = self.model.size_multiple
        if value is None:
            value = self.model.default_size
        value = _as_int(name, value, 1, MAX_SIDE, f"use a multiple of {multiple}, e.g. {example(name, self.model.default_size)}")
        if value % multiple:
            lower = max(multiple, value - value % multiple)
            raise SDMagicError(
                f"{option(name)} {value} is not a multiple of {multiple}, which this model needs:"
                f" try {lower} or {lower + multiple}"
            )
        return value

    def make_requests(
        self,
        prompts: Sequence[str | Prompt] | str | Prompt,
        *,
        seed: int | None = None,
        steps: int = 50,
        guidance: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative: str | None = None,
        images_per_prompt: int = 1,
        init_image: Any = None,
        mask: Any = None,
        strength: float | None = None,
        mask_blur: int | None = None,
    ) -> list[GenerationRequest]:
        """Validate everything before any device work, so a mistake costs nothing: options, init
        images and masks (read and fitted to the size here), prompt lengths.

        A `Prompt` may override any option for its own images; images are grouped into one request
        per compiled shape (steps, size, mode, prompt chunks) and first denoising step, keeping their
        place in the cell.
        """
        if isinstance(prompts, (str, Prompt)):
            prompts = [prompts]
        items = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts if isinstance(p, (str, Prompt))]
        items = [replace(p, text=p.text.strip()) for p in items if p.text and p.text.strip()]
        if not items:
            raise SDMagicError("no prompts: give at least one prompt (one per line in a %%sd cell)")
        images: dict = {}  # one read per init image or mask and size, however many prompts use it
        chosen = []
        for number, item in enumerate(items, start=1):
            # Mistakes name the prompt when the cell has several, or the prompt has options of its own.
            named = len(items) > 1 or item != Prompt(item.text)
            where = f"prompt {number} ({printable(item.text, 50)!r}): " if named else ""
            try:
                options = self._image_options(item, steps, guidance, height, width, negative, images_per_prompt)
                options.update(self._workflow_options(item, options, init_image, mask, strength, mask_blur, images))
                if item.seed is not None:
                    hint = f"use a non-negative integer, e.g. {example('seed', 3)}"
                    options["seed"] = _as_int("seed", item.seed, 0, MAX_SEED - options["n"] + 1, hint)
            except SDMagicError as err:
                raise SDMagicError(where + str(err)) from None
            chosen.append((item, options))
        count = sum(options["n"] for _, options in chosen)
        seed_was_random = seed is None
        if seed is None:
            seed = secrets.randbelow(2**31)
        # Image i of the cell uses seed + i, so the whole cell's range must fit in 32 bits.
        seed = _as_int("seed", seed, 0, MAX_SEED - count + 1, f"use a non-negative integer, e.g. {example('seed', 3)}")
        fields = ("prompts", "seeds", "negatives", "guidances", "positions", "strengths", "inits", "masks",
                  "mask_blurs", "init_names")
        groups: dict[tuple, dict[str, list]] = {}
        index = 0
        for item, options in chosen:
            n = options["n"]
            first = options.get("seed", seed + index)
            chunks = max(self._weighted(item.text).chunk_count, self._weighted(options["negative"] or "").chunk_count)
            group_key = (options["steps"], options["height"], options["width"], options["mode"], chunks, options["start"])
            group = groups.setdefault(group_key, {name: [] for name in fields})
            for j in range(n):
                group["prompts"].append(item.text)
                group["seeds"].append(first + j)
                group["negatives"].append(options["negative"])
                group["guidances"].append(options["guidance"])
                group["positions"].append(index + j)
                for name, option_name in (("strengths", "strength"), ("inits", "init"), ("masks", "mask"),
                                          ("mask_blurs", "mask_blur"), ("init_names", "init_name")):
                    group[name].append(options[option_name])
            index += n
        return [
            GenerationRequest(
                steps=key[0], height=key[1], width=key[2], mode=key[3], chunks=key[4], start=key[5],
                seed_was_random=seed_was_random, **{name: tuple(values) for name, values in g.items()},
            )
            for key, g in groups.items()
        ]

    def _image_options(self, item: Prompt, steps, guidance, height, width, negative, images_per_prompt) -> dict:
        """One prompt's options: its own where given, else the call's; all validated."""

        def pick(own, default):
            return default if own is None else own

        chosen_negative = pick(item.negative, negative)
        if chosen_negative is not None and not isinstance(chosen_negative, str):
            raise SDMagicError(f"{option('negative')} must be text, got {type(chosen_negative).__name__}")
        steps_hint = f"e.g. {example('steps', 50)} (or 25 with {example('scheduler', 'dpm')})"
        chosen_steps = _as_int("steps", pick(item.steps, steps), 1, MAX_STEPS, steps_hint)
        try:  # a sampler's own limit (e.g. PLMS with steps_offset 1 stops at 999 steps)
            self.model.sampler.evaluations(chosen_steps)
        except ValueError as err:
            raise SDMagicError(f"{option('steps')}={chosen_steps} does not suit the {self.model.scheduler_name}"
                               f" scheduler ({printable(err, 120)}): {steps_hint}") from None
        return {
            "steps": chosen_steps,
            "guidance": _as_float("guidance", pick(item.guidance, guidance), -MAX_GUIDANCE, MAX_GUIDANCE,
                                  f"e.g. {example('guidance', 7.5)}"),
            "n": _as_int("images_per_prompt", pick(item.n, images_per_prompt), 1, MAX_IMAGES_PER_PROMPT,
                         f"e.g. {example('images_per_prompt', 2)}"),
            "height": self._size("height", pick(item.height, height)),
            "width": self._size("width", pick(item.width, width)),
            "negative": chosen_negative.strip() if chosen_negative and chosen_negative.strip() else None,
        }

    def _workflow_options(self, item: Prompt, options: dict, init_image, mask, strength, mask_blur, images: dict) -> dict:
        """Image-to-image and inpainting: the mode, the init image and mask read and fitted to the
        image's size, the strength and the first denoising step it gives. Checked like the rest."""
        from . import init_images

        def pick(own, default):
            return default if own is None else own

        init, mask, strength, blur = (pick(item.init, init_image), pick(item.mask, mask),
                                      pick(item.strength, strength), pick(item.mask_blur, mask_blur))
        if init is None:
            for name, value in (("mask", mask), ("strength", strength), ("mask_blur", blur)):
                if value is not None:
                    raise SDMagicError(f"{option(name)} needs an init image: give {example('init_image', 'photo.png')}")
            if self.model.model.inpainting:
                raise SDMagicError(
                    f"{printable(self.model.name, 80)} is an inpainting model: give {example('init_image', 'photo.png')}"
                    f" and {example('mask', 'mask.png')} (white = repaint)"
                )
            return {"mode": "txt2img", "start": 0, "strength": None, "init": None, "mask": None,
                    "mask_blur": None, "init_name": None}
        mode = "img2img" if mask is None else "inpaint"
        if mask is None and blur is not None:
            raise SDMagicError(f"{option('mask_blur')} needs a mask: give {example('mask', 'mask.png')} (white = repaint)")
        if mode == "img2img" and self.model.model.inpainting:
            raise SDMagicError(
                f"{printable(self.model.name, 80)} is an inpainting model: give {example('mask', 'mask.png')} too"
                " (white = repaint; an all-white mask repaints everything)"
            )
        strength = _as_float("strength", DEFAULT_STRENGTH[mode] if strength is None else strength, 0.0, 1.0,
                             f"e.g. {example('strength', 0.6)} (more changes the init image more)")
        steps = options["steps"]
        if denoising_steps(steps, strength) < 1:
            raise SDMagicError(
                f"{option('strength')} {strength:g} of {steps} steps runs no denoising step: use at least"
                f" {math.ceil(1 / steps * 1000) / 1000:g}, or more {option('steps')}"
            )
        blur = None if mask is None else _as_int("mask_blur", 0 if blur is None else blur, 0, MAX_MASK_BLUR,
                                                   f"e.g. {example('mask_blur', 4)}")
        size = (options["width"], options["height"])
        init_key = ("init", _source_key(init), size)
        if init_key not in images:
            images[init_key] = init_images.init_image(init, *size)
        fitted_mask = None
        if mask is not None:
            mask_key = ("mask", _source_key(mask), size, blur)
            if mask_key not in images:
                images[mask_key] = init_images.mask_image(mask, *size, blur)
            fitted_mask = images[mask_key]
        return {"mode": mode, "start": self.model.sampler.first_evaluation(steps, strength), "strength": strength, "init": images[init_key],
                "mask": fitted_mask, "mask_blur": blur, "init_name": _source_name(init)}

    def make_request(self, prompts, **options) -> GenerationRequest:
        """`make_requests` for prompts that share one shape (the usual case)."""
        requests = self.make_requests(prompts, **options)
        if len(requests) != 1:
            raise SDMagicError("these prompts ask for several shapes: use make_requests")
        return requests[0]

    def _weighted(self, prompt: str):
        """The prompt as A1111 reads it: weighted tokens in 75-token chunks (prompt_weights), cached.
        Beyond prompt_weights.MAX_CHUNKS chunks the rest is cut, and `.cut` says what."""
        from . import prompt_weights

        if prompt not in self._token_cache:
            if len(self._token_cache) > 4096:
                self._token_cache.clear()
            tokenizer = self.model.model.tokenizers[0]
            self._token_cache[prompt] = prompt_weights.tokenize_weighted(prompt, tokenizer)
        return self._token_cache[prompt]

    def _arrays(self, prompt: str, chunks: int) -> tuple[np.ndarray, np.ndarray]:
        """ids int32 [E, chunks * L] (one row per tokenizer) and weights float32 [chunks * L]."""
        from . import prompt_weights

        return prompt_weights.to_arrays(self._weighted(prompt), self.model.model.tokenizers, chunks)

    # ------------------------------------------------------------------ compiling and running

    def shape_key(self, request: GenerationRequest, per_device_batch: int | None = None) -> gen.ShapeKey:
        per_device = self._per_device_batch(per_device_batch, self.per_device_batch)
        return gen.ShapeKey(
            steps=request.steps,
            height=request.height,
            width=request.width,
            batch=self.plan.count * per_device,
            safety=self.safety_checker,
            scheduler=self.model.scheduler_name,
            dtype=self.model.dtype,
            step_progress=self.step_progress,
            mode=request.mode,
            chunks=request.chunks,
        )

    def executable(self, key: gen.ShapeKey) -> tuple[Any, float, str]:
        """The executable for `key`, the seconds it cost now, and where it came from:
        "memory" (this session had it; 0 s), "disk" (saved by an earlier session) or "compiled"."""
        if self._closed:
            raise SDMagicError("this session was closed (a newer %sd_setup replaced it): use the new one")
        if key in self._executables:
            return self._executables[key], 0.0, "memory"
        start = time.perf_counter()
        store, digest = self._store_for(key)
        executable = store.load(digest, self.plan)
        if executable is not None:
            source = "disk"
            # A file can hold an executable that loads but does not run: its first call is checked.
            self._unverified.add(key)
        else:
            executable = self._compile(key, store, digest)
            source = "compiled"
        self._executables[key] = executable
        return executable, time.perf_counter() - start, source

    def _store_for(self, key: gen.ShapeKey) -> tuple[ExecutableStore, str]:
        # An executable with a host callback cannot be serialised: step progress stays in memory.
        store = self.executable_store if not key.step_progress else ExecutableStore(None)
        if not store.enabled:
            return store, ""
        arguments = gen.argument_specs(self.model, key, self.plan, self.params)
        return store, executable_key(self.model, key, self.plan, arguments)

    def _compile(self, key: gen.ShapeKey, store: ExecutableStore, digest: str) -> Any:
        arguments = gen.argument_specs(self.model, key, self.plan, self.params)

        def compile_now():
            with device_memory_errors(key, "compiling"):
                executable, _ = gen.compile_generate(self.model, key, self.plan, arguments, on_step=self._on_step)
            return executable

        return store.compile_and_store(digest, compile_now) if store.enabled else compile_now()

    def _replace_broken(self, key: gen.ShapeKey, err: Exception) -> tuple[Any, float]:
        """A loaded executable failed when called: delete its file, compile it again (and say so once)."""
        store, digest = self._store_for(key)
        store.discard(digest)
        warnings.warn(
            f"the compiled code saved for {key.describe()} did not run ({printable(str(err).splitlines()[0] if str(err) else type(err).__name__, 120)});"
            " deleted it and compiled again",
            CompiledCodeWarning,
            stacklevel=4,
        )
        start = time.perf_counter()
        self._executables[key] = self._compile(key, store, digest)
        self._unverified.discard(key)
        return self._executables[key], time.perf_counter() - start

    def warmup(
        self,
        *,
        steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        per_device_batch: int | None = None,
    ) -> tuple[gen.ShapeKey, float, str]:
        """Compile (or load) the executable for a shape now, so the first cell of it runs at once.
        Its seconds go into the timing log (a warm-up record), as `%sd_time` reports them. An
        inpainting model warms up its inpainting shape (it makes nothing else)."""
        images = {}
        if self.model.model.inpainting:
            from PIL import Image

            size = (self._size("width", width), self._size("height", height))
            images = {"init_image": Image.new("RGB", size, "gray"), "mask": Image.new("L", size, 255)}
        request = self.make_request(["warm-up"], seed=0, steps=steps, height=height, width=width, **images)
        key = self.shape_key(request, per_device_batch)
        _, seconds, source = self.executable(key)
        self.timings.add(RunRecord(0, seconds, 0.0, key.describe(), model=self.model.name,
                                   scheduler=self.model.scheduler_name, kind="warm-up"))
        return key, seconds, source

    def _check_tokens(self, request: GenerationRequest, messages: list[str]) -> dict[str, np.ndarray]:
        """Every image's prompt and negative prompt as ids and emphasis weights of the request's chunk
        count; warns once per prompt that was cut (longer than the largest chunk bucket)."""
        max_tokens = self._max_prompt_tokens()
        for index, prompt in enumerate(request.prompts):
            cut = self._weighted(prompt).cut
            if cut and (index == 0 or request.prompts[index - 1] != prompt):
                messages.append(f"prompt {printable(prompt, 50)!r} is longer than the {max_tokens} tokens sdmagic reads: {cut}")
                warnings.warn(messages[-1], PromptTruncatedWarning, stacklevel=5)
        for negative in dict.fromkeys(request.negatives):
            cut = self._weighted(negative or "").cut
            if cut:
                messages.append(
                    f"negative prompt {printable(negative, 50)!r} is longer than the {max_tokens} tokens sdmagic reads: {cut}"
                )
                warnings.warn(messages[-1], PromptTruncatedWarning, stacklevel=5)
        ids, weights = zip(*(self._arrays(p, request.chunks) for p in request.prompts))
        neg_ids, neg_weights = zip(*(self._arrays(n or "", request.chunks) for n in request.negatives))
        return {
            "ids": np.stack(ids), "weights": np.stack(weights),
            "neg_ids": np.stack(neg_ids), "neg_weights": np.stack(neg_weights),
            "neg_empty": np.asarray([n is None for n in request.negatives], dtype=bool),
        }

    def _max_prompt_tokens(self) -> int:
        from .prompt_weights import MAX_CHUNKS, CHUNK_TOKENS

        return MAX_CHUNKS * CHUNK_TOKENS

    def _plan_calls(self, request: GenerationRequest, key: gen.ShapeKey, messages: list[str]) -> list["_Call"]:
        """The calls that make `request`'s images: host inputs of one compiled shape each."""
        inputs = self._check_tokens(request, messages)
        inputs["seeds"] = np.asarray(request.seeds, dtype=np.uint32)
        inputs["guidance"] = np.asarray(request.guidances, dtype=np.float32)
        if request.mode != "txt2img":
            inputs["init"] = np.stack(request.inits)
        if request.mode == "inpaint":
            inputs["mask"] = np.stack(request.masks)
        count = len(request.prompts)
        calls = math.ceil(count / key.batch)
        # Padding repeats the first image's inputs; its outputs are dropped before anyone sees them.
        order = np.concatenate([np.arange(count), np.zeros(calls * key.batch - count, dtype=int)])
        inputs = {name: x[order] for name, x in inputs.items()}
        out = []
        for c in range(calls):
            part = slice(c * key.batch, (c + 1) * key.batch)
            first = c * key.batch
            call_inputs = {name: x[part] for name, x in inputs.items()}
            if request.mode != "txt2img":
                call_inputs["start"] = np.asarray(request.start, dtype=np.int32)
            out.append(_Call(request, key, first, min(key.batch, count - first), call_inputs))
        return out

    def plan_calls(self, request: GenerationRequest, key: gen.ShapeKey, messages: list[str]) -> list["_Call"]:
        """The compiled calls that make `request`'s images (public for runners such as `sdmagic run`,
        which start them with `start_call` and read the rows their own devices hold)."""
        return self._plan_calls(request, key, messages)

    def start_call(self, call: "_Call") -> tuple:
        """Start one planned call (its executable got first with `executable(call.key)`); returns
        its (pixels, nsfw) global arrays, not yet computed. In a multi-process run every process
        starts the same calls."""
        return self._start(call)

    def _start(self, call: "_Call") -> tuple:
        """Start one call on the devices; returns its (pixels, nsfw) arrays, not yet computed."""
        inputs = {name: place_replicated(x, self.plan) if x.ndim == 0 else place_batch(x, self.plan)
                  for name, x in call.inputs.items()}
        with device_memory_errors(call.key, "running"):
            return self._executables[call.key](self.params, inputs)

    def _finish(self, call: "_Call", outputs: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a started call and fetch its results. The wait polls, so that Ctrl-C takes
        effect at once instead of when the devices finish (a blocking fetch holds off signals)."""
        while not all(x.is_ready() for x in outputs):
            time.sleep(0.005)
        with device_memory_errors(call.key, "running"):
            return tuple(np.asarray(x) for x in outputs)

    def needs_check(self, key: gen.ShapeKey) -> bool:
        """Whether `key`'s executable came from disk and has not been seen to run yet."""
        return key in self._unverified

    def run_checked(self, call: "_Call", fetch: Callable | None = None) -> tuple[Any, float]:
        """Run the first call of an executable loaded from disk and wait for it; if it fails, replace
        the executable by a fresh compile and run again. Returns the results and compile seconds.
        `fetch(call, outputs)` waits for and reads the outputs (default: the whole batch, as a cell
        does; a multi-process runner reads only its own rows)."""
        fetch = fetch or self._finish
        try:
            results = fetch(call, self._start(call))
        except SDMagicError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever a broken file does, a fresh compile fixes it
            _, seconds = self._replace_broken(call.key, err)
            return fetch(call, self._start(call)), seconds
        # Seen to run. (A Ctrl-C during the check leaves it unchecked, for the next cell to check.)
        self._unverified.discard(call.key)
        return results, 0.0

    def _on_step(self, step) -> None:
        """Called from inside the compiled loop after each denoising step."""
        self.steps_reported += 1
        bar = self._step_bar
        if bar is not None:
            bar.update(1)

    def run_requests(
        self,
        requests: Sequence[GenerationRequest],
        *,
        per_device_batch: int | None = None,
        progress: bool | None = None,
        cols: int | None = None,
    ) -> GenerationResult:
        """Generate validated requests (one per shape) as one result, images in cell order.

        Executables are got first (compile seconds stay apart from run seconds). Then the calls run
        with at most MAX_CALLS_IN_FLIGHT started ahead of the host: the devices never wait on the
        host, and Ctrl-C leaves at most that much abandoned work for the next cell to wait behind.
        `progress`: a bar across calls (tqdm.auto: a widget in Jupyter, text in a terminal), shown
        from the start, by default when there is more than one call. `cols`: the grid's columns.
        """
        if jax.process_count() > 1:
            raise SDMagicError(
                "generate gathers every image to this process, which a run of several processes cannot:"
                " use `sdmagic run PROMPTS --out DIR`, where each process writes its own images"
            )
        keys = [self.shape_key(r, per_device_batch) for r in requests]
        compile_seconds, compiled_from = 0.0, "memory"
        for key in keys:
            _, seconds, source = self.executable(key)
            compile_seconds += seconds
            if source != "memory":
                compiled_from = source
        messages: list[str] = []
        start = time.perf_counter()
        calls = [call for r, k in zip(requests, keys) for call in self._plan_calls(r, k, messages)]
        total = sum(len(r.prompts) for r in requests)
        images: list = [None] * total
        info: list = [None] * total
        step_bar = None
        if self.step_progress:
            # The loop reports steps as the devices make them: one bar across every call's steps.
            # Image-to-image runs only the steps its strength leaves (the loop reports only those).
            step_bar = tqdm(total=sum(c.key.steps - c.request.start for c in calls), unit="step", desc="sdmagic",
                            disable=progress is False, leave=False)
            self._step_bar = step_bar
        bar = tqdm(total=total, unit="image", desc="sdmagic", leave=False,
                   disable=self.step_progress or not (len(calls) > 1 if progress is None else progress))
        in_flight: deque = deque()

        def collect(call, results):
            pixels, nsfw = results
            request = call.request
            for j, image in enumerate(to_pil(pixels[: call.count])):
                i = call.first + j
                position = request.positions[i] if request.positions else i
                images[position] = image
                info[position] = ImageInfo(
                    prompt=request.prompts[i], seed=request.seeds[i], negative=request.negatives[i],
                    guidance=request.guidances[i], steps=request.steps, width=request.width,
                    height=request.height, nsfw=bool(nsfw[j]),
                    strength=request.strengths[i] if request.strengths else None,
                    mask_blur=request.mask_blurs[i] if request.mask_blurs else None,
                    init=request.init_names[i] if request.init_names else None,
                    loras=self.lora_record(),
                )
            bar.update(call.count)

        try:
            for call in calls:
                if self.needs_check(call.key):
                    while in_flight:
                        collect(*self._finish_first(in_flight))
                    results, seconds = self.run_checked(call)
                    compile_seconds += seconds
                    collect(call, results)
                    continue
                fetched = []
                while len(in_flight) >= MAX_CALLS_IN_FLIGHT:
                    fetched.append(self._finish_first(in_flight))
                in_flight.append((call, self._start(call)))
                for done in fetched:  # turned into images while the devices run the next call
                    collect(*done)
            while in_flight:
                collect(*self._finish_first(in_flight))
        finally:
            bar.close()
            if step_bar is not None:
                # Every result is fetched (or the run was stopped): later callbacks find no bar.
                self._step_bar = None
                step_bar.refresh()  # its last state shows even if the last steps came within tqdm's interval
                step_bar.close()
        run_seconds = time.perf_counter() - start
        shapes = "; ".join(k.describe() for k in keys)
        self.timings.add(RunRecord(total, compile_seconds, run_seconds, shapes, model=self.model.name,
                                   scheduler=self.model.scheduler_name))
        self._last_call = (list(requests), keys[0].batch // self.plan.count)
        return GenerationResult(
            images=images,
            info=info,
            model=self.model.name,
            scheduler=self.model.scheduler_name,
            compile_seconds=compile_seconds,
            run_seconds=run_seconds,
            calls=len(calls),
            compiled_from=compiled_from,
            batch=keys[0].batch,
            seed_was_random=requests[0].seed_was_random,
            warnings=messages,
            display_cols=cols,
        )

    def _finish_first(self, in_flight: deque) -> tuple["_Call", tuple[np.ndarray, np.ndarray]]:
        call, outputs = in_flight.popleft()
        return call, self._finish(call, outputs)

    def generate(
        self,
        prompts: Sequence[str | Prompt] | str | Prompt,
        *,
        seed: int | None = None,
        steps: int = 50,
        guidance: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative: str | None = None,
        images_per_prompt: int = 1,
        init_image: Any = None,
        strength: float | None = None,
        mask: Any = None,
        mask_blur: int | None = None,
        per_device_batch: int | None = None,
        progress: bool | None = None,
        save: str | os.PathLike | None = None,
        cols: int | None = None,
    ) -> GenerationResult:
        """Images for `prompts` (prompt-major, `images_per_prompt` each); image i uses seed `seed + i`.

        Without a seed a random one is drawn and reported in the result. Height and width default
        to the model's native size and must be multiples of what the model needs. A `Prompt` item
        carries options of its own (seed, n, guidance, negative, steps, height, width).
        `per_device_batch` overrides the session's images per device per call (a new shape: one
        compile); the same seed gives the same images whatever the batch.
        `save`: a folder to write the images (PNG with A1111-style parameters) and the grid to; if
        that fails, a SaveFailedWarning says why and the images stay in the result and history.
        `cols`: the grid's columns, as shown and as saved (default: up to 4).
        `init_image` (a path or PIL image): image-to-image. It is resized to cover the image size and
        centre-cropped, encoded by the VAE, noised to the level `strength` selects (0 < strength <= 1,
        default 0.75) and denoised for int(steps * strength) steps, as diffusers' img2img does.
        `mask` (a path or PIL image, white = repaint) with `init_image`: inpainting (default strength
        1.0), with the model's own inpainting UNet or, for an ordinary model, by blending the kept
        region back in at every step; pixels outside the mask stay the init image's. `mask_blur`:
        the mask's Gaussian blur radius in pixels (A1111's mask blur; default 0).
        The result is added to `history`.
        """
        requests = self.make_requests(
            prompts,
            seed=seed,
            steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            negative=negative,
            images_per_prompt=images_per_prompt,
            init_image=init_image,
            mask=mask,
            strength=strength,
            mask_blur=mask_blur,
        )
        # Checked before any device work, like everything in make_requests.
        per_device = self._per_device_batch(per_device_batch, self.per_device_batch)
        if cols is not None:
            cols = _as_int("cols", cols, 1, MAX_COLS, f"e.g. {example('cols', 4)}")
        if save is not None:
            save_folder(save)
        result = self.run_requests(requests, per_device_batch=per_device, progress=progress, cols=cols)
        self.history.add(result)
        if save is not None:
            try:
                result.save(save)
            except SDMagicError as err:
                warnings.warn(str(err), SaveFailedWarning, stacklevel=2)
        return result

    def generate_from_png(self, path: str | os.PathLike, **options) -> GenerationResult:
        """Make the image a PNG's `parameters` describe again: same prompt, seed, steps, guidance,
        size and negative prompt. The session must have the image's model and sampler loaded;
        `options` go on to `generate` (e.g. `save=`)."""
        from .saving import lora_settings, read_parameters, scheduler_for

        params = read_parameters(path)
        name = printable(Path(path).name, 60)
        model = params.get("model")
        if model is not None and model != self.model.name:
            raise SDMagicError(
                f"{name} was made with model {printable(model)!r} but {printable(self.model.name)!r} is loaded:"
                f" {_load_hint(model)} first"
            )
        sampler = params.get("sampler")
        if sampler is not None:
            wanted = scheduler_for(sampler)
            if wanted is None:
                raise SDMagicError(f"{name} was made with sampler {printable(sampler)!r}, which sdmagic does not have")
            if wanted != self.model.scheduler_name:
                raise SDMagicError(
                    f"{name} was made with {printable(sampler)} but {self.model.scheduler_name} is loaded:"
                    f" {_load_hint(self.model.name, wanted)} first"
                )
        if "seed" not in params:
            raise SDMagicError(f"{name} does not say its seed, so its image cannot be made again")
        other = params.get("other", {})
        if "Denoising strength" in other and "init_image" not in options:
            raise SDMagicError(
                f"{name} was made from an init image, which a PNG does not hold: give it with"
                f" {example('init_image', 'photo.png')} (and its mask, if it was inpainted)"
            )
        if "Denoising strength" in other and "strength" not in options:
            options["strength"] = _as_float("strength", other["Denoising strength"], 0.0, 1.0, "its Denoising strength")
        if "Mask blur" in other and "mask_blur" not in options:
            options["mask_blur"] = _as_int("mask_blur", other["Mask blur"], 0, MAX_MASK_BLUR, "its Mask blur")
        loaded_loras = lora_settings(self.lora_record())
        for setting in ("Lora hashes", "Lora weights"):
            if other.get(setting) != loaded_loras.get(setting) and (setting in other or setting == "Lora hashes"):
                made = printable(other.get(setting) or "none", 120)
                now = printable(loaded_loras.get(setting) or "none", 120)
                raise SDMagicError(
                    f"{name} was made with LoRAs {made!r} ({setting}), but {now!r} are loaded:"
                    f" {_lora_hint()} first"
                )
        settings = {k: params[k] for k in ("seed", "steps", "guidance", "height", "width") if k in params}
        return self.generate([params["prompt"]], negative=params.get("negative"), **settings, **options)

    def time_runs(self, runs: int = 3) -> TimingReport:
        """Re-run the last request `runs` times (same seeds) and report steady-state seconds."""
        runs = _as_int("runs", runs, 1, 1000, f"e.g. {example('runs', 5)}")
        if self._last_call is None:
            raise SDMagicError("nothing to time yet: run a %%sd cell (or session.generate) first")
        requests, per_device = self._last_call
        seconds, compiled = [], 0.0
        for _ in range(runs):
            result = self.run_requests(requests, per_device_batch=per_device, progress=False)
            seconds.append(result.run_seconds)
            compiled += result.compile_seconds
        shapes = "; ".join(self.shape_key(r, per_device).describe() for r in requests)
        return TimingReport(seconds, sum(len(r.prompts) for r in requests), compiled, shapes)


def _lora_hint() -> str:
    return "set them with %sd_lora FILE WEIGHT" if in_magic() else "set them with session.set_lora(path, weight)"


def _source_key(source: Any) -> Any:
    """What identifies an init image or mask within one call: a path by its text, an image by itself."""
    return ("path", os.fspath(source)) if isinstance(source, (str, os.PathLike)) else ("object", id(source))


def _source_name(source: Any) -> str:
    """An init image as the record names it: a file's name, else "image"."""
    return printable(Path(os.fspath(source)).name, 80) if isinstance(source, (str, os.PathLike)) else "image"


def _load_hint(model: str, scheduler: str | None = None) -> str:
    """How to load `model` (with `scheduler`), said the way the user works: a magic or a call."""
    shown = printable(model, 120)
    if in_magic():
        quoted = shlex.quote(shown)
        return f"run %sd_setup --model {quoted}" + (f" --scheduler {scheduler}" if scheduler else "")
    return f"load it with sdmagic.setup({shown!r}" + (f", scheduler={scheduler!r}" if scheduler else "") + ")"


def setup(
    model: str = "CompVis/stable-diffusion-v1-4",
    *,
    revision: str | None = None,
    dtype: str | None = None,
    scheduler: str | None = None,
    safety_checker: bool = True,
    devices: Sequence[Any] | int | None = None,
    per_device_batch: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    config: str | None = None,
    trust_pickle: bool = False,
    lora: Sequence[Any] | str | None = None,
    replacing: Session | None = None,
) -> Session:
    """Find the devices, load `model` and place its parameters on every device.

    `per_device_batch`: images per device per call (default: what suits the backend, see
    `devices.default_per_device_batch`). `cache`: keep compiled code on disk, in `cache_dir`
    (default `$SDMAGIC_CACHE_DIR` or ~/.cache/sdmagic/compiled), so a restarted kernel does not
    compile again; `cache=False` keeps it in memory only. `config`: for a single-file checkpoint,
    the diffusers-layout folder or Hub id its configs and tokenizer come from. `trust_pickle`:
    allow .ckpt/.bin/.pt files, read only through torch.load(weights_only=True). `lora`: LoRA files
    merged into the weights at load, each a path, "path:weight" or (path, weight) (kohya/A1111 or
    diffusers/PEFT safetensors); `Session.set_lora` changes them later without reloading.
    `replacing` is a session to free once the new model has loaded on the host: a mistake in the
    arguments (or a model that cannot be found) leaves it untouched and usable. The new session
    keeps its history and timings.
    """
    plan = find_devices(devices)
    dtype = resolve_dtype(dtype, plan.backend)
    Session._per_device_batch(per_device_batch, 1)  # a mistake costs nothing: checked before loading
    directory = None
    if cache:
        directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        if directory.exists() and not directory.is_dir():
            raise SDMagicError(
                f"cache directory {printable(str(directory))!r} is a file: give a folder, or {example('cache', False)}"
            )
    single = isinstance(lora, tuple) and len(lora) == 2 and isinstance(lora[1], (int, float)) and not isinstance(lora[1], bool)
    if isinstance(lora, (str, os.PathLike)) or single:
        lora = [lora]
    lora = [parse_lora(spec) for spec in lora or ()]  # checked before loading
    # Everything that decides the loaded weights but the LoRAs: equal to the session being replaced
    # means only LoRA weights change, and the base model is not read again.
    options = (model, revision, dtype, scheduler, safety_checker, config, trust_pickle,
               tuple(d.id for d in plan.devices), per_device_batch, directory)
    if replacing is not None and not replacing._closed and replacing.setup_options == options and lora != replacing.lora_specs:
        replacing.set_loras(lora, trust_pickle=trust_pickle)
        return replacing
    loaded = load_model(
        model, revision=revision, dtype=dtype, scheduler=scheduler, safety_checker=safety_checker,
        config=config, trust_pickle=trust_pickle,
    )
    loras = lora_set(lora, loaded.params, loaded.model, trust_pickle=trust_pickle)
    if loras.loras:
        loaded.params = loras.with_leaves(loaded.params, loras.merged_leaves())
    configure_jax_cache(directory)
    history = timings = None
    if replacing is not None:
        history, timings = replacing.history, replacing.timings
        replacing.close()
    session = Session(loaded, plan, per_device_batch=per_device_batch, executable_store=ExecutableStore(directory),
                      history=history, timings=timings, loras=loras)
    session.setup_options = options
    return session
