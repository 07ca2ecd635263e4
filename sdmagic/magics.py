"""The IPython layer: parse a magic's line, call the Session API, turn mistakes into UsageError.

Each magic is parse -> call -> return. Values are passed on as typed by the user and validated by
the API, so the notebook and a script get the same checks and the same messages.
"""

from __future__ import annotations

import shlex
from contextlib import contextmanager

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from .errors import SDMagicError
from .prompts import parse_prompts


@contextmanager
def _usage_errors():
    """SDMagicError -> UsageError: one line, no traceback, the session untouched."""
    try:
        yield
    except SDMagicError as err:
        raise UsageError(str(err)) from None


def _parse(magic, line: str):
    """Parse like a shell: IPython's own splitter keeps the quotes of `--negative 'a, b'`."""
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise UsageError(f"could not read the options ({err}): close every quote") from None
    try:
        return magic.parser.parse_args(words)
    except UsageError as err:
        name = magic.__name__
        raise UsageError(f"{err} (see %{name}? for the options)") from None


@magics_class
class SDMagics(Magics):
    """%sd_setup, %sd / %%sd and %sd_time over one `sdmagic.Session`."""

    # The default %%sd steps, which --warmup compiles for.
    default_steps = 50

    def __init__(self, shell=None):
        super().__init__(shell)
        self.session = None

    def _require_session(self):
        if self.session is None:
            raise UsageError("no model loaded: run %sd_setup first (e.g. %sd_setup --model tiny to try it offline)")
        return self.session

    @magic_arguments()
    @argument("--model", default=None, help="Hub id, local diffusers Flax folder, or 'tiny' (default: CompVis/stable-diffusion-v1-4)")
    @argument("--revision", default=None, help="Hub branch or commit (default for SD 1.4: 'bf16' in bfloat16, else 'flax')")
    @argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bfloat16 on TPU/GPU, float32 on CPU)")
    @argument("--scheduler", default=None, help="pndm | ddim | lms | dpm (DPM-Solver++ multistep); default: the model's own")
    @argument("--no-safety-checker", action="store_true", help="do not run the model's safety checker")
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
                replacing=self.session,
            )
        print(self.session.describe())
        if args.warmup:
            with _usage_errors():
                key, seconds, source = self.session.warmup(steps=self.default_steps)
            how = "loaded from the compile cache" if source == "disk" else source
            print(f"warm-up: {key.describe()} {how} in {seconds:.1f} s")

    @magic_arguments()
    @argument("--seed", default=None, help="seed of the first image; image i uses seed + i (default: random, shown)")
    @argument("--steps", default=None, help="denoising steps (default 50)")
    @argument("--guidance", default=7.5, help="classifier-free guidance scale (default 7.5)")
    @argument("--height", default=None, help="image height in pixels (default: the model's native size)")
    @argument("--width", default=None, help="image width in pixels (default: the model's native size)")
    @argument("--negative", default=None, help="negative prompt, quoted if it has spaces")
    @argument("--n", default=1, help="images per prompt (default 1)")
    @argument("--cols", default=None, help="grid columns (default: up to 4)")
    @argument("--per-device-batch", default=None, help="images per device per call, for this cell (default: %sd_setup's)")
    @argument("prompt", nargs="*", help="line form only: the prompt, e.g. %%sd --seed 3 a red fox")
    @line_cell_magic
    def sd(self, line, cell=None):
        """Generate images: one prompt per line of the cell (lines starting with # are comments).

        All prompts are spread over every device in calls of one compiled shape; the result is
        returned (so `_` holds it) and shows itself as a captioned grid.
        """
        args = _parse(self.sd, line)
        if cell is None:
            prompts = [" ".join(args.prompt)] if args.prompt else []
        elif args.prompt:
            raise UsageError(
                f"unexpected text on the %%sd line: {' '.join(args.prompt)!r}; put prompts in the cell, one per line"
            )
        else:
            prompts = parse_prompts(cell)
        if not prompts:
            raise UsageError("no prompts: write one prompt per line in the %%sd cell (or %sd a red fox)")
        session = self._require_session()
        with _usage_errors():
            result = session.generate(
                prompts,
                seed=args.seed,
                steps=self.default_steps if args.steps is None else args.steps,
                guidance=args.guidance,
                height=args.height,
                width=args.width,
                negative=args.negative,
                images_per_prompt=args.n,
                per_device_batch=args.per_device_batch,
            )
            if args.cols is not None:
                result.display_cols = _whole(args.cols, "--cols")
        if result.seed_was_random:
            print(f"random seed {result.seeds[0]} (repeat with --seed {result.seeds[0]})")
        return result

    @magic_arguments()
    @argument("--runs", default=None, help="re-run the last %%sd configuration N times and report median/min/max")
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


def _whole(value: str, option: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SDMagicError(f"{option} must be a whole number, got {value!r}") from None
    if number < 1:
        raise SDMagicError(f"{option} must be at least 1, got {number}")
    return number
