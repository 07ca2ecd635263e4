"""`sdmagic run PROMPTS --out DIR`: every image of a prompt file into a folder, on one host or many.

The same engine as the notebook (`sdmagic.setup`, `Session.make_requests`): the %sd_setup options
choose the model, the %%sd options the images, and the prompt file reads exactly as a %%sd cell.
The work is `sdmagic.batch_run.run_prompts`; this module parses, reads the file and reports.

Exit status: 0 done; 2 a mistake (one line on stderr saying what to do, no traceback);
130 interrupted (Ctrl-C) or 143 terminated (SIGTERM); 75 (several processes) another process
stopped or cannot be reached: run the same command again to go on. An error in one process of a
multi-process run stops the others at once (multihost.abandon).
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import SDMagicError, magic_style
from .text import printable

MAX_PROMPT_FILE_BYTES = 64 * 1024 * 1024  # some 300,000 prompts; beyond that it is not a prompt file

EPILOG = """\
prompt file:
  One prompt per line, read exactly as a %%sd cell: blank lines and lines starting with # are
  skipped, and a line may end with options of its own after ' -- ' (--seed, --n, --guidance,
  --negative, --steps, --height, --width, --init, --mask, --strength, --mask-blur), e.g.
      a red fox in the snow, watercolour
      a lighthouse at dusk -- --seed 7 --n 4 --guidance 5
  Image i of the file (prompt-major, --n per prompt) uses seed --seed + i, as in a cell, so the
  same file, seed and settings give the same pixels as the notebook.

output (DIR):
  NNNNN-SEED-slug.png     one PNG per image, numbered in file order, named and tagged with
                          A1111 parameters as %%sd --save writes them (%sd_from_png reads them)
  manifest.jsonl          one JSON line per image written: index, prompt, seed, settings, file,
                          sha256, bytes (manifest-I.jsonl for process I > 0 of a multi-host run)
  run.json                the settings of the last run in DIR

resuming:
  Run the same command again: images whose manifest line matches and whose file has the recorded
  size and sha256 are kept; missing, partial or altered files are made again. Each PNG appears
  complete under its name or not at all, so a run killed at any moment (Ctrl-C, SIGTERM, out of
  memory) loses only the images in flight. A setting that changes images (model, steps, size,
  prompts, ...) differing from the last run in DIR is refused unless --force.

many hosts:
  Run the same command on every host; --out must be a folder all of them share (NFS, GCS FUSE).
  All processes form one mesh over every device, run the same calls, and each writes the images
  its own devices made. Cloud TPU pod slices and SLURM need no flags (JAX finds its peers).

examples:
  sdmagic run prompts.txt --out images --model tiny --steps 25
  sdmagic run prompts.txt --out images --seed 100 --n 4 --height 768 --width 768 --dtype bfloat16
  cat prompts.txt | sdmagic run - --out images --scheduler dpm --steps 20 --quiet
  sdmagic run prompts.txt --out images --init photo.png --strength 0.6
  sdmagic run prompts.txt --out /shared/images --coordinator 10.0.0.1:8476 --num-processes 2 --process-id 0
  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \\
      --command "sdmagic run prompts.txt --out /shared/images --dtype bfloat16"
"""


class _Usage(Exception):
    """A mistake on the command line (argparse's message)."""


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that files in progress are cleaned up."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Usage(message)


def _positive_whole(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdmagic", description="Stable Diffusion on JAX from the command line.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"sdmagic {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="make every image of a prompt file into a folder (resumable; one host or many)",
        description="Make every image of a prompt file into DIR: one PNG per image with its A1111 parameters,"
                    " a manifest, and resuming where a killed run stopped.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    run.add_argument("prompts", metavar="PROMPTS", help="the prompt file (UTF-8, one prompt per line), or - for stdin")
    run.add_argument("--out", required=True, metavar="DIR", help="the folder the images, manifest.jsonl and run.json go to (made if missing)")

    model = run.add_argument_group("model (as %sd_setup)")
    model.add_argument("--model", default=None, help="Hub id, diffusers-layout folder (Flax or .safetensors weights), single-file .safetensors checkpoint, or 'tiny' (default: CompVis/stable-diffusion-v1-4)")
    model.add_argument("--config", default=None, help="for a single-file checkpoint: the diffusers folder or Hub id with its configs and tokenizer (default: SD 1.x or 2.x reference, from the keys)")
    model.add_argument("--trust-pickle", action="store_true", help="allow .ckpt/.bin/.pt pickles, read only with torch.load(weights_only=True); they are refused otherwise")
    model.add_argument("--revision", default=None, help="Hub branch or commit (default for SD 1.4: 'bf16' in bfloat16, else 'flax')")
    model.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bfloat16 on TPU/GPU, float32 on CPU)")
    model.add_argument("--scheduler", default=None, help="pndm (PLMS) | ddim | lms | lms-karras | dpm (DPM++ 2M) | dpm-karras | euler | euler-a (Euler a); default: the model's own")
    model.add_argument("--no-safety-checker", action="store_true", help="do not run the model's safety checker")
    model.add_argument("--lora", action="append", default=None, metavar="FILE[:WEIGHT]", help="merge a LoRA file (kohya/A1111 or diffusers/PEFT .safetensors) into the weights, with WEIGHT (default 1); repeatable")
    model.add_argument("--devices", type=_positive_whole, default=None, metavar="N", help="use only the first N devices (default: all)")
    model.add_argument("--per-device-batch", type=_positive_whole, default=None, metavar="N", help="images per device per call (default: CPU 1, TPU 1-2, GPU by memory)")
    model.add_argument("--cache-dir", default=None, help="where compiled code is kept across runs (default: $SDMAGIC_CACHE_DIR or ~/.cache/sdmagic/compiled)")
    model.add_argument("--no-cache", action="store_true", help="keep compiled code in memory only: the next run compiles again")

    images = run.add_argument_group("images (as %%sd; a prompt line's own options after ' -- ' win)")
    images.add_argument("--seed", type=_whole, default=0, help="seed of the first image; image i uses seed + i (default 0: a run is never random, so that it can be resumed)")
    images.add_argument("--steps", type=_whole, default=50, help="denoising steps (default 50)")
    images.add_argument("--guidance", type=_number, default=7.5, help="classifier-free guidance scale (default 7.5)")
    images.add_argument("--height", type=_whole, default=None, help="image height in pixels (default: the model's native size)")
    images.add_argument("--width", type=_whole, default=None, help="image width in pixels (default: the model's native size)")
    images.add_argument("--negative", default=None, help="negative prompt, quoted if it has spaces")
    images.add_argument("--n", type=_whole, default=1, help="images per prompt (default 1)")
    images.add_argument("--init", default=None, metavar="PATH", help="image-to-image from this picture (resized to cover the size, centre-cropped)")
    images.add_argument("--strength", type=_number, default=None, help="with --init: how much to change it, 0 < S <= 1 (default 0.75; 1.0 with --mask); runs int(steps * S) steps")
    images.add_argument("--mask", default=None, metavar="PATH", help="with --init: inpaint where this mask is white; the rest keeps the init image")
    images.add_argument("--mask-blur", type=_whole, default=None, help="with --mask: blur the mask's edge by N pixels (default 0)")

    runs = run.add_argument_group("run")
    runs.add_argument("--force", action="store_true", help="run even if DIR holds images made with other settings (those that still match are kept)")
    runs.add_argument("--quiet", action="store_true", help="no progress bar: a plain log line every 10 s instead")

    hosts = run.add_argument_group("many hosts (jax.distributed; none needed on Cloud TPU pods and SLURM)")
    hosts.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address, the same on every process")
    hosts.add_argument("--num-processes", type=_positive_whole, default=None, metavar="N", help="how many processes take part (one per host, usually)")
    hosts.add_argument("--process-id", type=_whole, default=None, metavar="I", help="this process's number, 0 .. N-1 (process 0 decides what to make)")
    parser.run_parser = run  # for tests and tools that list the options
    return parser


def read_prompt_file(name: str) -> tuple[str, str]:
    """(text, how messages name it) of the prompt file, or of stdin for '-'. Bounded, UTF-8."""
    if name == "-":
        where = "stdin"
        if sys.stdin is None or not hasattr(sys.stdin, "buffer"):
            raise SDMagicError("PROMPTS is - but there is no stdin to read: give a prompt file")
        data = sys.stdin.buffer.read(MAX_PROMPT_FILE_BYTES + 1)
    else:
        path = Path(name).expanduser()
        where = printable(path.name or name, 60)
        shown = repr(printable(name, 120))
        if not path.exists():
            raise SDMagicError(f"no such prompt file: {shown}")
        if path.is_dir():
            raise SDMagicError(f"{shown} is a folder: give a text file with one prompt per line")
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_PROMPT_FILE_BYTES + 1)
        except OSError as err:
            raise SDMagicError(f"could not read the prompt file {shown}: {printable(err.strerror or err)}") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise SDMagicError(f"the prompt file ({where}) is over {MAX_PROMPT_FILE_BYTES // 2**20} MB: split it into several runs")
    if b"\0" in data:
        raise SDMagicError(f"the prompt file ({where}) is not text (it has NUL bytes): give a UTF-8 text file, one prompt per line")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SDMagicError(
            f"the prompt file ({where}) is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}): save it as UTF-8"
        ) from None
    return text, where


def _one_line_warnings(message, category, filename, lineno, line=None):
    return f"{category.__name__}: {message}\n"


def _on_sigterm(signum, frame):
    raise _Terminated()


def _initialize(args) -> None:
    """jax.distributed before any other use of JAX (sdmagic.multihost; no flags: JAX's own detection)."""
    try:
        from . import multihost
    except ImportError:
        if args.coordinator or args.num_processes or args.process_id is not None:
            raise SDMagicError("--coordinator, --num-processes and --process-id need sdmagic.multihost, which is missing") from None
        return
    multihost.initialize(args.coordinator, args.num_processes, args.process_id, label="sdmagic run")


def _run(args) -> int:
    if args.no_cache and args.cache_dir:
        raise SDMagicError("--cache-dir and --no-cache contradict each other: give one of them")
    from .prompts import prompts_of_text

    text, where = read_prompt_file(args.prompts)
    prompts = prompts_of_text(text, where)
    if not prompts:
        raise SDMagicError(f"no prompts in {where}: write one prompt per line (lines starting with # are comments)")
    if not args.out.strip():
        raise SDMagicError("--out needs a folder name, got an empty one: e.g. --out images")
    if Path(args.out).expanduser().is_file():  # before the model loads, which may take minutes
        raise SDMagicError(f"--out {printable(args.out, 120)!r} is a file: give a folder (it is made if missing)")
    _initialize(args)

    import jax

    from .batch_run import run_prompts
    from .models import DEFAULT_MODEL
    from .session import setup

    first = jax.process_index() == 0
    session = setup(
        args.model or DEFAULT_MODEL, revision=args.revision, dtype=args.dtype, scheduler=args.scheduler,
        safety_checker=not args.no_safety_checker, devices=args.devices, per_device_batch=args.per_device_batch,
        cache=not args.no_cache, cache_dir=args.cache_dir, config=args.config, trust_pickle=args.trust_pickle,
        lora=args.lora,
    )
    try:
        if first:
            print(session.describe(), file=sys.stderr, flush=True)
        summary = run_prompts(
            session, prompts, args.out, seed=args.seed, steps=args.steps, guidance=args.guidance,
            height=args.height, width=args.width, negative=args.negative, images_per_prompt=args.n,
            init_image=args.init, strength=args.strength, mask=args.mask, mask_blur=args.mask_blur,
            setup_settings={"revision": args.revision, "config": args.config}, force=args.force,
            progress=True, quiet=args.quiet,
        )
    finally:
        session.close()
    if first:
        print(summary.line(), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `sdmagic` command; returns its exit status (see the module docstring)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except _Usage as err:
        command = "sdmagic run" if argv[:1] == ["run"] else "sdmagic"
        print(f"{command}: error: {printable(err, 300)} (see {command} --help)", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warnings
    previous_term = None
    try:
        previous_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: SIGTERM keeps its default
        pass
    try:
        with magic_style():  # messages name options as flags: --seed 3, not seed=3
            return _run(args)
    except SDMagicError as err:
        print(f"sdmagic run: error: {' '.join(str(err).split())}", file=sys.stderr)
        return _abandon(2)
    except KeyboardInterrupt:
        print("sdmagic run: interrupted; run the same command again to go on (finished images are kept)", file=sys.stderr)
        return _abandon(130)
    except _Terminated:
        print("sdmagic run: terminated; run the same command again to go on (finished images are kept)", file=sys.stderr)
        return _abandon(143)
    finally:
        warnings.formatwarning = previous_format
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _abandon(status: int) -> int:
    """`status`, after telling the other processes of a multi-process run that this one ends, so
    they stop at once with one line instead of running on alone (multihost.abandon does not return
    then). A single process just returns it."""
    multihost = sys.modules.get("sdmagic.multihost")
    if multihost is not None:
        multihost.abandon(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
