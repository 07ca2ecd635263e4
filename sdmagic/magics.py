"""The IPython layer: parse a magic's line, call the Session API, turn mistakes into UsageError.

Each magic is parse -> call -> return. Values are passed on as typed by the user and validated by
the API, so the notebook and a script get the same checks and the same messages.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import replace

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Float, Integer, Unicode, observe

from .errors import SDMagicError, magic_style
from .prompts import Prompt, prompts_of_text, split_words


def _warning_on_one_line(message, category, filename, lineno, line=None):
    """A warning as `Category: message`: no file path and no echo of the line that warned (which
    was often a line of traitlets or IPython, not of the user's cell)."""
    return f"{category.__name__}: {message}\n"


@contextmanager
def _usage_errors():
    """SDMagicError -> UsageError: one line, no traceback, the session untouched. Within, messages
    name options as flags (`--seed 3`) and warnings print as one line."""
    # Only the format changes: whoever shows or records warnings (a notebook, pytest) still does.
    previous, warnings.formatwarning = warnings.formatwarning, _warning_on_one_line
    try:
        with magic_style():
            yield
    except SDMagicError as err:
        raise UsageError(str(err)) from None
    finally:
        warnings.formatwarning = previous


def _parse(magic, line: str):
    """Parse like a shell, except that a quote inside a word (`a cat's portrait`) is a letter.
    IPython's own splitter would keep the quotes of `--negative 'a, b'`."""
    try:
        words = split_words(line)
    except ValueError as err:
        raise UsageError(f"could not read the options ({err}): close every quote") from None
    try:
        return magic.parser.parse_args(words)
    except UsageError as err:
        name = magic.__name__
        raise UsageError(f"{err} (see %{name}? for the options)") from None


def _prompts_of_cell(cell: str) -> list[Prompt]:
    """The cell's prompts, each with the options written after its ' -- '."""
    try:
        return prompts_of_text(cell, "the cell")
    except SDMagicError as err:
        raise UsageError(str(err)) from None


def _or(value, default):
    return default if value is None else value


@magics_class
class SDMagics(Magics):
    """%sd_setup, %sd / %%sd, %sd_time, %sd_history, %sd_show and %sd_from_png over one `sdmagic.Session`.

    Every %%sd option has a default you can set with %config, e.g. `%config SDMagics.default_steps = 25`.
    """

    default_seed = Integer(None, allow_none=True, help="seed of a cell's first image (None: random)").tag(config=True)
    default_steps = Integer(50, help="denoising steps; also the shape %sd_setup --warmup compiles").tag(config=True)
    default_guidance = Float(7.5, help="classifier-free guidance scale").tag(config=True)
    default_height = Integer(None, allow_none=True, help="image height (None: the model's native size)").tag(config=True)
    default_width = Integer(None, allow_none=True, help="image width (None: the model's native size)").tag(config=True)
    default_negative = Unicode(None, allow_none=True, help="negative prompt").tag(config=True)
    default_n = Integer(1, help="images per prompt").tag(config=True)
    default_cols = Integer(None, allow_none=True, help="grid columns (None: up to 4)").tag(config=True)
    default_per_device_batch = Integer(None, allow_none=True, help="images per device per call (None: %sd_setup's)").tag(config=True)
    save_dir = Unicode(None, allow_none=True, help="folder every %%sd cell saves to (None: save only with --save)").tag(config=True)
    history_images = Integer(256, help="images the session's history keeps in memory; older runs' are dropped").tag(config=True)
    step_progress = Bool(False, help="a progress bar per denoising step (a host callback in the compiled loop;"
                         " about 1% slower, and such executables are not kept on disk)").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell, **kwargs)
        self.session = None

    @observe("history_images")
    def _history_cap_changed(self, change):
        if self.session is not None:
            self.session.history.max_images = change["new"]
            self.session.history.trim()

    @observe("step_progress")
    def _step_progress_changed(self, change):
        if self.session is not None:
            self.session.step_progress = change["new"]

    def _require_session(self):
        if self.session is None:
            raise UsageError("no model loaded: run %sd_setup first (e.g. %sd_setup --model tiny to try it offline)")
        return self.session

    @magic_arguments()
    @argument("--model", default=None, help="Hub id, diffusers-layout folder (Flax or .safetensors weights), single-file .safetensors checkpoint, or 'tiny' (default: CompVis/stable-diffusion-v1-4)")
    @argument("--config", default=None, help="for a single-file checkpoint: the diffusers folder or Hub id with its configs and tokenizer (default: SD 1.x or 2.x reference, from the keys)")
    @argument("--trust-pickle", action="store_true", help="allow .ckpt/.bin/.pt pickles, read only with torch.load(weights_only=True); they are refused otherwise")
    @argument("--revision", default=None, help="Hub branch or commit (default for SD 1.4: 'bf16' in bfloat16, else 'flax')")
    @argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bfloat16 on TPU/GPU, float32 on CPU)")
    @argument("--scheduler", default=None, help="pndm (PLMS) | ddim | lms | lms-karras | dpm (DPM++ 2M) | dpm-karras | euler | euler-a (Euler a); default: the model's own")
    @argument("--no-safety-checker", action="store_true", help="do not run the model's safety checker")
    @argument("--lora", action="append", default=None, metavar="FILE[:WEIGHT]", help="merge a LoRA file (kohya/A1111 or diffusers/PEFT .safetensors) into the weights, with WEIGHT (default 1); repeatable")
    @argument("--devices", default=None, help="use only the first N devices (default: all)")
    @argument("--per-device-batch", default=None, help="images per device per call (default: CPU 1, TPU 1-2, GPU by memory)")
    @argument("--cache-dir", default=None, help="where compiled code is kept across restarts (default: $SDMAGIC_CACHE_DIR or ~/.cache/sdmagic/compiled)")
    @argument("--no-cache", action="store_true", help="keep compiled code in memory only: a restart compiles again")
    @argument("--warmup", action="store_true", help="compile the default %%%%sd shape now, so the first cell runs at once")
    @line_magic
    def sd_setup(self, line):
        """Find the JAX devices, load a Stable Diffusion pipeline and place it on every device.

        Running it again replaces the loaded pipeline and frees its device memory; a mistake (an
        unknown option, a model that cannot be found) leaves the loaded one in place.
        """
        from .models import DEFAULT_MODEL
        from .session import setup

        args = _parse(self.sd_setup, line)
        with _usage_errors():
            devices = None if args.devices is None else _whole(args.devices, "--devices")
            if args.no_cache and args.cache_dir:
                raise SDMagicError("--cache-dir and --no-cache contradict each other: give one of them")
            self.session = setup(
                args.model or DEFAULT_MODEL,
                revision=args.revision,
                dtype=args.dtype,
                scheduler=args.scheduler,
                safety_checker=not args.no_safety_checker,
                devices=devices,
                per_device_batch=args.per_device_batch,
                cache=not args.no_cache,
                cache_dir=args.cache_dir,
                config=args.config,
                trust_pickle=args.trust_pickle,
                lora=args.lora,
                replacing=self.session,
            )
            self.session.history.max_images = self.history_images
            self.session.step_progress = self.step_progress
        print(self.session.describe())
        if args.warmup:
            with _usage_errors():
                key, seconds, source = self.session.warmup(
                    steps=self.default_steps,
                    height=self.default_height,
                    width=self.default_width,
                    per_device_batch=self.default_per_device_batch,
                )
            how = "loaded from the compile cache" if source == "disk" else source
            print(f"warm-up: {key.describe()} {how} in {seconds:.1f} s")

    @magic_arguments()
    @argument("--seed", default=None, help="seed of the first image; image i uses seed + i (default: random, shown)")
    @argument("--steps", default=None, help="denoising steps (default 50)")
    @argument("--guidance", default=None, help="classifier-free guidance scale (default 7.5)")
    @argument("--height", default=None, help="image height in pixels (default: the model's native size)")
    @argument("--width", default=None, help="image width in pixels (default: the model's native size)")
    @argument("--negative", default=None, help="negative prompt, quoted if it has spaces")
    @argument("--n", default=None, help="images per prompt (default 1)")
    @argument("--init", default=None, metavar="PATH", help="image-to-image from this picture (resized to cover the size, centre-cropped)")
    @argument("--strength", default=None, help="with --init: how much to change it, 0 < S <= 1 (default 0.75; 1.0 with --mask); runs int(steps * S) steps")
    @argument("--mask", default=None, metavar="PATH", help="with --init: inpaint where this mask is white; the rest keeps the init image")
    @argument("--mask-blur", default=None, help="with --mask: blur the mask's edge by N pixels (default 0)")
    @argument("--cols", default=None, help="grid columns (default: up to 4)")
    @argument("--per-device-batch", default=None, help="images per device per call, for this cell (default: %%sd_setup's)")
    @argument("--save", default=None, metavar="DIR", help="write each image (PNG with its parameters) and the grid to DIR")
    @argument("--no-save", action="store_true", help="do not save this cell even if SDMagics.save_dir is set")
    @argument("prompt", nargs="*", help="line form only: the prompt, e.g. %%sd --seed 3 a red fox")
    @line_cell_magic
    def sd(self, line, cell=None):
        """Generate images: one prompt per line of the cell (lines starting with # are comments).

        A line may end with options of its own after ' -- ', e.g.
        `a red fox in snow -- --seed 7 --n 2 --guidance 5` (also --negative, --steps, --height,
        --width, --init, --mask, --strength, --mask-blur); lines of other sizes or steps run in their
        own compiled calls. Prompts take A1111's emphasis, `(word:1.3)`, `(word)`, `[word]`, and
        may be longer than 75 tokens (read in 75-token chunks, up to 600 tokens).
        All prompts are spread over every device in calls of one compiled shape; the result is
        returned (so `_` holds it) and shows itself as a captioned grid. Defaults come from
        %config SDMagics.default_* (see the README).
        """
        args = _parse(self.sd, line)
        if cell is None:
            prompts = [Prompt(" ".join(args.prompt))] if args.prompt else []
        elif args.prompt:
            raise UsageError(
                f"unexpected text on the %%sd line: {' '.join(args.prompt)!r}; put prompts in the cell, one per line"
            )
        else:
            prompts = _prompts_of_cell(cell)
        if not prompts:
            raise UsageError("no prompts: write one prompt per line in the %%sd cell (or %sd a red fox)")
        if args.save and args.no_save:
            raise UsageError("--save and --no-save contradict each other: give one of them")
        session = self._require_session()
        with _usage_errors():
            result = session.generate(
                prompts,
                seed=_or(args.seed, self.default_seed),
                steps=_or(args.steps, self.default_steps),
                guidance=_or(args.guidance, self.default_guidance),
                height=_or(args.height, self.default_height),
                width=_or(args.width, self.default_width),
                negative=_or(args.negative, self.default_negative),
                images_per_prompt=_or(args.n, self.default_n),
                init_image=args.init,
                strength=args.strength,
                mask=args.mask,
                mask_blur=args.mask_blur,
                per_device_batch=_or(args.per_device_batch, self.default_per_device_batch),
                save=None if args.no_save else _or(args.save, self.save_dir),
                cols=_or(args.cols, self.default_cols),
            )
        if result.seed_was_random:
            print(f"random seed {result.seeds[0]} (repeat with --seed {result.seeds[0]})")
        return result

    @magic_arguments()
    @argument("file", nargs="?", default=None, help="a LoRA file (.safetensors, kohya/A1111 or diffusers/PEFT)")
    @argument("weight", nargs="?", default=None, help="its weight (default 1; 0 takes it out)")
    @argument("--trust-pickle", action="store_true", help="allow a pickled LoRA (.pt/.ckpt/.bin), read only with torch.load(weights_only=True)")
    @line_magic
    def sd_lora(self, line):
        """Merge a LoRA into the loaded model's weights, or change its weight (0 takes it out);
        without arguments, list the merged LoRAs. Only the layers it touches are recomputed from
        their values before any LoRA: the model is not read again and nothing compiles again."""
        args = _parse(self.sd_lora, line)
        session = self._require_session()
        if args.file is not None:
            with _usage_errors():
                session.set_lora(args.file, 1.0 if args.weight is None else args.weight, trust_pickle=args.trust_pickle)
        print(f"LoRA: {session.loras.describe()}")

    @magic_arguments()
    @argument("--runs", default=None, help="re-run the last %%%%sd configuration N times and report median/min/max")
    @argument("-o", dest="output", action="store_true", help="return the timing object")
    @line_magic
    def sd_time(self, line):
        """Compile seconds against inference seconds for the runs so far, or re-run and time with --runs."""
        args = _parse(self.sd_time, line)
        session = self._require_session()
        if args.runs is None and not session.timings.runs:
            raise UsageError("no %%sd runs yet: run a %%sd cell first")
        with _usage_errors():
            report = session.timings.summary() if args.runs is None else session.time_runs(args.runs)
        print(repr(report))
        return report if args.output else None

    @magic_arguments()
    @argument("-o", dest="output", action="store_true", help="return the history table object")
    @line_magic
    def sd_history(self, line):
        """List this session's runs: number, images, prompts, seeds, size, steps, timings, saved folder."""
        args = _parse(self.sd_history, line)
        table = self._require_session().history.table()
        print(repr(table))
        return table if args.output else None

    @magic_arguments()
    @argument("number", help="the run's number in %%sd_history")
    @argument("--cols", default=None, help="grid columns")
    @argument("--save", default=None, metavar="DIR", help="also write its images and grid to DIR")
    @line_magic
    def sd_show(self, line):
        """Show run N of %sd_history again (its grid), optionally saving it with --save DIR."""
        args = _parse(self.sd_show, line)
        session = self._require_session()
        with _usage_errors():
            result = session.history[_whole(args.number, "run number")]
            if not result.images_in_memory:
                raise SDMagicError(
                    f"run {result.number}'s images were dropped from memory to stay under"
                    f" SDMagics.history_images = {self.history_images}; {result._files_note()}"
                )
            if args.cols is not None:
                # A view of the run with other columns; the run in the history stays as it was.
                result = replace(result, display_cols=_whole(args.cols, "--cols"))
            if args.save is not None:
                result.save(args.save)
        return result

    @magic_arguments()
    @argument("file", help="a PNG saved by sdmagic (or AUTOMATIC1111) with its 'parameters'")
    @argument("--save", default=None, metavar="DIR", help="save the new image to DIR")
    @argument("--init", default=None, metavar="PATH", help="the init image, for an image made by image-to-image or inpainting")
    @argument("--mask", default=None, metavar="PATH", help="the mask, for an inpainted image")
    @line_magic
    def sd_from_png(self, line):
        """Make a saved image again from the settings in its PNG: same prompt, seed, steps, guidance, size."""
        args = _parse(self.sd_from_png, line)
        session = self._require_session()
        with _usage_errors():
            images = {k: v for k, v in (("init_image", args.init), ("mask", args.mask)) if v is not None}
            return session.generate_from_png(args.file, save=_or(args.save, self.save_dir), **images)


def _whole(value: str, option: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SDMagicError(f"{option} must be a whole number, got {value!r}") from None
    if number < 1:
        raise SDMagicError(f"{option} must be at least 1, got {number}")
    return number
