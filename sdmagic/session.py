"""`Session`: devices, a loaded pipeline on them, compiled executables and the timing log.

The engine behind the magics; it works the same from a script. No module globals: two sessions in
one process (say, one on 1 device and one on 8) do not share anything but JAX itself.
"""

from __future__ import annotations

import math
import os
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from . import generate as gen
from .compile_cache import ExecutableStore, configure_jax_cache, default_cache_dir, executable_key
from .devices import DevicePlan, default_per_device_batch, find_devices, place_batch, place_replicated
from .errors import SDMagicError
from .models import LoadedModel, load_model, resolve_dtype
from .output import GenerationResult, to_pil
from .timing import RunRecord, TimingLog, TimingReport

MAX_SEED = 2**32 - 1  # PRNGKey takes a 32-bit seed
MAX_SIDE = 4096  # pixels; beyond this a single image no longer fits any accelerator's memory
MAX_STEPS = 1000  # the schedulers' training timesteps
MAX_IMAGES_PER_PROMPT = 256
MAX_PER_DEVICE_BATCH = 64


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder reads; the warning says what was cut."""


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: one entry per image, prompt-major, with its seed."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    negative: str | None
    steps: int
    guidance: float
    height: int
    width: int
    seed_was_random: bool


def _as_int(name: str, value: Any, minimum: int, maximum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        try:
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            raise SDMagicError(f"{name} must be a whole number, got {value!r}: {hint}") from None
    value = int(value)
    if not minimum <= value <= maximum:
        raise SDMagicError(f"{name} must be from {minimum} to {maximum}, got {value}: {hint}")
    return value


def _as_float(name: str, value: Any, hint: str) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise SDMagicError(f"{name} must be a number, got {value!r}: {hint}") from None
    if not math.isfinite(number):
        raise SDMagicError(f"{name} must be a finite number, got {value!r}: {hint}")
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
    ):
        self.model = model
        self.plan = plan
        self.per_device_batch = self._per_device_batch(per_device_batch, default_per_device_batch(plan))
        self.executable_store = executable_store or ExecutableStore(None)
        self.timings = TimingLog()
        self._executables: dict[gen.ShapeKey, Any] = {}
        self._token_cache: dict[str, tuple[np.ndarray, str | None]] = {}
        self._last_call: tuple[GenerationRequest, int] | None = None  # and its per-device batch
        start = time.perf_counter()
        self.params = place_replicated(model.params, plan)
        self.scheduler_state = place_replicated(model.scheduler_state, plan)
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
        return _as_int("per-device batch", value, 1, MAX_PER_DEVICE_BATCH, f"e.g. --per-device-batch {default}")

    @property
    def safety_checker(self) -> bool:
        return "safety_checker" in self.params

    @property
    def compiled_shapes(self) -> list[gen.ShapeKey]:
        return list(self._executables)

    def describe(self) -> str:
        # A replicated array reports its logical size: the bytes each device holds.
        param_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(self.params)) / 1e6
        checker = "safety checker on" if self.safety_checker else "safety checker off"
        per_call = f"{self.per_device_batch} image{'s' if self.per_device_batch != 1 else ''} per device per call"
        return (
            f"sdmagic: {self.plan.describe()}, {per_call} | model {self.model.name} ({self.model.scheduler_name},"
            f" {self.model.dtype}, {param_mb:.0f} MB per device) | {checker} |"
            f" loaded in {self.model.load_seconds + self.place_seconds:.1f} s"
        )

    def __repr__(self) -> str:
        return f"<Session {self.describe()}>"

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free the parameters and executables on the devices. The session cannot generate after."""
        if self._closed:
            return
        for leaf in jax.tree_util.tree_leaves((self.params, self.scheduler_state)):
            if isinstance(leaf, jax.Array):
                leaf.delete()
        self._executables.clear()
        self._closed = True

    # ------------------------------------------------------------------ requests

    def make_request(
        self,
        prompts: Sequence[str] | str,
        *,
        seed: int | None = None,
        steps: int = 50,
        guidance: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative: str | None = None,
        images_per_prompt: int = 1,
    ) -> GenerationRequest:
        """Validate everything before any device work, so a mistake costs nothing."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
        if not prompts:
            raise SDMagicError("no prompts: give at least one prompt (one per line in a %%sd cell)")
        steps = _as_int("steps", steps, 1, MAX_STEPS, "e.g. --steps 50 (or 25 with --scheduler dpm)")
        guidance = _as_float("guidance", guidance, "e.g. --guidance 7.5")
        n = _as_int("images per prompt", images_per_prompt, 1, MAX_IMAGES_PER_PROMPT, "e.g. --n 2")
        multiple = self.model.size_multiple
        sizes = []
        for name, value in (("height", height), ("width", width)):
            if value is None:
                value = self.model.default_size
            value = _as_int(name, value, 1, MAX_SIDE, f"use a multiple of {multiple}, e.g. {self.model.default_size}")
            if value % multiple:
                lower = max(multiple, value - value % multiple)
                raise SDMagicError(
                    f"{name} {value} is not a multiple of {multiple}, which this model needs:"
                    f" try {lower} or {lower + multiple}"
                )
            sizes.append(value)
        if negative is not None and not isinstance(negative, str):
            raise SDMagicError(f"negative prompt must be text, got {type(negative).__name__}")
        count = len(prompts) * n
        seed_was_random = seed is None
        if seed is None:
            seed = secrets.randbelow(2**31)
        seed = _as_int("seed", seed, 0, MAX_SEED - count + 1, "use a non-negative integer, e.g. --seed 3")
        return GenerationRequest(
            prompts=tuple(p for p in prompts for _ in range(n)),
            seeds=tuple(range(seed, seed + count)),
            negative=negative.strip() if negative and negative.strip() else None,
            steps=steps,
            guidance=guidance,
            height=sizes[0],
            width=sizes[1],
            seed_was_random=seed_was_random,
        )

    def _tokens(self, prompt: str) -> tuple[np.ndarray, str | None]:
        """Token ids padded to the encoder's length, and the text cut off (None if nothing was)."""
        if prompt not in self._token_cache:
            tokenizer = self.model.pipeline.tokenizer
            limit = self.model.max_tokens
            ids = tokenizer(prompt, padding="max_length", max_length=limit, truncation=False).input_ids
            cut = None
            if len(ids) > limit:
                # The last kept position holds the end token, as the truncating tokenizer does.
                cut = tokenizer.decode(ids[limit - 1 : -1]).strip()
                ids = ids[: limit - 1] + [ids[-1]]
            if len(self._token_cache) > 4096:
                self._token_cache.clear()
            self._token_cache[prompt] = (np.asarray(ids, dtype=np.int32), cut)
        return self._token_cache[prompt]

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
        )

    def executable(self, key: gen.ShapeKey) -> tuple[Any, float, str]:
        """The executable for `key`, the seconds it cost now, and where it came from:
        "memory" (this session had it; 0 s), "disk" (saved by an earlier session) or "compiled"."""
        if self._closed:
            raise SDMagicError("this session was closed (a newer %sd_setup replaced it): use the new one")
        if key in self._executables:
            return self._executables[key], 0.0, "memory"
        start = time.perf_counter()
        arguments = gen.argument_specs(self.model, key, self.plan, self.params, self.scheduler_state)
        digest = executable_key(self.model, key, self.plan, arguments) if self.executable_store.enabled else ""
        executable = self.executable_store.load(digest, self.plan)
        if executable is not None:
            source = "disk"
        else:
            executable, _ = gen.compile_generate(self.model, key, self.plan, arguments)
            self.executable_store.store(digest, executable)
            source = "compiled"
        self._executables[key] = executable
        return executable, time.perf_counter() - start, source

    def warmup(
        self,
        *,
        steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        per_device_batch: int | None = None,
    ) -> tuple[gen.ShapeKey, float, str]:
        """Compile (or load) the executable for a shape now, so the first cell of it runs at once."""
        request = self.make_request(["warm-up"], seed=0, steps=steps, height=height, width=width)
        key = self.shape_key(request, per_device_batch)
        _, seconds, source = self.executable(key)
        return key, seconds, source

    def run(
        self, request: GenerationRequest, *, per_device_batch: int | None = None, progress: bool | None = None
    ) -> GenerationResult:
        """Generate the images of a validated request, in calls of one fixed shape.

        `progress`: a bar across calls (tqdm.auto: a widget in Jupyter, text in a terminal);
        by default shown when the request needs more than one call.
        """
        key = self.shape_key(request, per_device_batch)
        messages = []
        ids, cuts = zip(*(self._tokens(p) for p in request.prompts))
        for index, (prompt, cut) in enumerate(zip(request.prompts, cuts)):
            if cut and (index == 0 or request.prompts[index - 1] != prompt):
                message = (
                    f"prompt {shorten_for_warning(prompt)!r} is longer than the text encoder's"
                    f" {self.model.max_tokens} tokens; this part was cut: {cut!r}"
                )
                messages.append(message)
                warnings.warn(message, PromptTruncatedWarning, stacklevel=3)
        neg_ids, neg_cut = self._tokens(request.negative or "")
        if neg_cut:
            messages.append(f"the negative prompt was cut after {self.model.max_tokens} tokens: {neg_cut!r} dropped")
            warnings.warn(messages[-1], PromptTruncatedWarning, stacklevel=3)

        executable, compile_seconds, compiled_from = self.executable(key)
        start = time.perf_counter()
        count = len(request.prompts)
        calls = math.ceil(count / key.batch)
        pad = calls * key.batch - count
        # Padding repeats the first image's inputs; its outputs are dropped before anyone sees them.
        all_ids = np.stack(list(ids) + [ids[0]] * pad)
        all_seeds = np.asarray(list(request.seeds) + [request.seeds[0]] * pad, dtype=np.uint32)
        neg = np.broadcast_to(neg_ids, (key.batch, neg_ids.shape[0]))
        guidance = np.full((key.batch,), request.guidance, dtype=np.float32)
        neg_dev = place_batch(neg, self.plan)
        guidance_dev = place_batch(guidance, self.plan)
        # Dispatch every call before fetching any result, so the devices never wait on the host.
        pending = []
        for c in range(calls):
            part = slice(c * key.batch, (c + 1) * key.batch)
            pending.append(
                executable(
                    self.params,
                    self.scheduler_state,
                    place_batch(all_ids[part], self.plan),
                    neg_dev,
                    place_batch(all_seeds[part], self.plan),
                    guidance_dev,
                )
            )
        show_bar = calls > 1 if progress is None else bool(progress)
        fetched = []
        with tqdm(total=count, unit="image", desc="sdmagic", disable=not show_bar, leave=False) as bar:
            for c, (p, f) in enumerate(pending):
                fetched.append((np.asarray(p), np.asarray(f)))
                bar.update(min(key.batch, count - c * key.batch))
        pixels = np.concatenate([p for p, _ in fetched])[:count]
        nsfw = np.concatenate([f for _, f in fetched])[:count]
        run_seconds = time.perf_counter() - start
        self.timings.add(RunRecord(count, compile_seconds, run_seconds, key.describe()))
        self._last_call = (request, key.batch // self.plan.count)
        return GenerationResult(
            images=to_pil(pixels),
            prompts=list(request.prompts),
            seeds=list(request.seeds),
            nsfw=[bool(x) for x in nsfw],
            negative=request.negative,
            steps=request.steps,
            guidance=request.guidance,
            height=request.height,
            width=request.width,
            model=self.model.name,
            scheduler=self.model.scheduler_name,
            compile_seconds=compile_seconds,
            run_seconds=run_seconds,
            calls=calls,
            compiled_from=compiled_from,
            batch=key.batch,
            seed_was_random=request.seed_was_random,
            warnings=messages,
        )

    def generate(
        self,
        prompts: Sequence[str] | str,
        *,
        seed: int | None = None,
        steps: int = 50,
        guidance: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        negative: str | None = None,
        images_per_prompt: int = 1,
        per_device_batch: int | None = None,
        progress: bool | None = None,
    ) -> GenerationResult:
        """Images for `prompts` (prompt-major, `images_per_prompt` each); image i uses seed `seed + i`.

        Without a seed a random one is drawn and reported in the result. Height and width default
        to the model's native size and must be multiples of what the model needs.
        `per_device_batch` overrides the session's images per device per call (a new shape: one
        compile); the same seed gives the same images whatever the batch.
        """
        request = self.make_request(
            prompts,
            seed=seed,
            steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            negative=negative,
            images_per_prompt=images_per_prompt,
        )
        # Checked before any device work, like everything in make_request.
        per_device = self._per_device_batch(per_device_batch, self.per_device_batch)
        return self.run(request, per_device_batch=per_device, progress=progress)

    def time_runs(self, runs: int = 3) -> TimingReport:
        """Re-run the last request `runs` times (same seeds) and report steady-state seconds."""
        runs = _as_int("runs", runs, 1, 1000, "e.g. --runs 5")
        if self._last_call is None:
            raise SDMagicError("nothing to time yet: run a %%sd cell (or session.generate) first")
        request, per_device = self._last_call
        seconds, compiled = [], 0.0
        for _ in range(runs):
            result = self.run(request, per_device_batch=per_device, progress=False)
            seconds.append(result.run_seconds)
            compiled += result.compile_seconds
        return TimingReport(seconds, len(request.prompts), compiled, self.shape_key(request, per_device).describe())


def shorten_for_warning(prompt: str) -> str:
    return prompt if len(prompt) <= 50 else prompt[:47] + "..."


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
    replacing: Session | None = None,
) -> Session:
    """Find the devices, load `model` and place its parameters on every device.

    `per_device_batch`: images per device per call (default: what suits the backend, see
    `devices.default_per_device_batch`). `cache`: keep compiled code on disk, in `cache_dir`
    (default `$SDMAGIC_CACHE_DIR` or ~/.cache/sdmagic/compiled), so a restarted kernel does not
    compile again; `cache=False` keeps it in memory only.
    `replacing` is a session to free once the new model has loaded on the host: a mistake in the
    arguments (or a model that cannot be found) leaves it untouched and usable.
    """
    plan = find_devices(devices)
    dtype = resolve_dtype(dtype, plan.backend)
    Session._per_device_batch(per_device_batch, 1)  # a mistake costs nothing: checked before loading
    directory = None
    if cache:
        directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        if directory.exists() and not directory.is_dir():
            raise SDMagicError(f"cache directory {str(directory)!r} is a file: give a folder, or --no-cache")
    loaded = load_model(model, revision=revision, dtype=dtype, scheduler=scheduler, safety_checker=safety_checker)
    configure_jax_cache(directory)
    if replacing is not None:
        replacing.close()
    return Session(loaded, plan, per_device_batch=per_device_batch, executable_store=ExecutableStore(directory))
