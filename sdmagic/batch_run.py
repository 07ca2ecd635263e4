"""The runner behind `sdmagic run`: every image of a prompt file into a folder, resumably, on one
process or many (JAX's multi-controller runtime: every process runs this same code).

    plan    all images with `Session.make_requests`, exactly as a %%sd cell (image i: seed S + i)
    decide  process 0 reads DIR/run.json and the manifests (sdmagic/manifest.py), refuses other
            settings unless forced, and lists the images still to make; every process gets that
            list from it (`multihost.agree`), so all of them run the same calls in the same order
    run     the calls of those images, one call in flight ahead of the host (as a cell runs)
    write   each process writes the PNGs of the rows its own devices hold (no pixels cross hosts),
            named and tagged as `--save` names them, then appends their manifest lines

Each PNG is written to a temporary name, fsynced and renamed over its final name, and only then
recorded: a kill at any moment leaves every final name complete or absent, and an image that was
not recorded is made again (under the same name) by the next run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from . import manifest
from .errors import SDMagicError
from .output import ImageInfo, to_pil
from .prompts import Prompt
from .saving import image_pnginfo, slug
from .text import printable

# Started calls ahead of the host, as Session.run_requests (see MAX_CALLS_IN_FLIGHT there).
MAX_CALLS_IN_FLIGHT = 1
LOG_EVERY_SECONDS = 10.0  # --quiet: a progress line at most this often
# How long a process other than 0 looks for the run.json process 0 just wrote before deciding that
# DIR is not a folder they share (a network file system may show a replaced file a little late).
SHARED_FOLDER_WAIT_SECONDS = 30.0
LOCK_FILE = ".sdmagic-run.lock"
_PARTIAL = re.compile(r"^\..+\.sdmagic-run-\d+\.partial$")
# The model-level settings: what every image of the run shares and its manifest line only names by digest.
SETUP_SETTINGS = ("model", "revision", "config", "dtype", "scheduler", "safety_checker", "loras")


@dataclass(frozen=True)
class PlannedImage:
    """One image of the prompt file: its place, its file name and the settings that make it."""

    index: int
    file: str
    record: dict  # the image's own settings, as its manifest line has them


@dataclass
class RunSummary:
    """What a run did. `made` counts images of every process; `written_here` this process's files."""

    out: Path
    images: int  # in the prompt file
    made: int
    skipped: int  # already in DIR, verified
    written_here: int
    seconds: float  # from the first executable to the last file, compile included
    compile_seconds: float
    devices: int
    processes: int

    @property
    def images_per_second(self) -> float:
        """Images made per second of running (compile seconds not counted)."""
        running = self.seconds - self.compile_seconds
        return self.made / running if self.made and running > 0 else 0.0

    def line(self) -> str:
        processes = f"{self.processes} process{'es' if self.processes != 1 else ''}"
        compile_note = f", compile {self.compile_seconds:.1f} s" if self.compile_seconds >= 0.05 else ""
        return (
            f"sdmagic run: {self.made} image{'s' if self.made != 1 else ''} made, {self.skipped} already there"
            f" | {self.seconds:.1f} s{compile_note} | {self.images_per_second:.2f} images/s"
            f" | {self.devices} device{'s' if self.devices != 1 else ''}, {processes} | {printable(str(self.out), 120)}"
        )


# ---------------------------------------------------------------------------- processes


def _multihost():
    try:
        from . import multihost
    except ImportError:  # a single-process install of sdmagic still runs
        return None
    return multihost


def _agree(value: list[int]) -> list[int]:
    """Process 0's value on every process."""
    if jax.process_count() == 1:
        return value
    multihost = _multihost()
    if multihost is None:
        raise SDMagicError("this is a multi-process run, but sdmagic.multihost is missing: reinstall sdmagic")
    return [int(x) for x in multihost.agree(value)]


def _local_rows(array: jax.Array) -> list[tuple[int, np.ndarray]]:
    """(row, host value) for each row of a batch-sharded array that this process's devices hold."""
    if jax.process_count() == 1:
        return list(enumerate(np.asarray(array)))
    return _multihost().local_rows(array)


# ---------------------------------------------------------------------------- planning


def _digest(value: Any, chars: int = 64) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:chars]


def _array_digests():
    """A function: host array (or None) -> a short digest of its bytes, each distinct array hashed once
    (the requests hold one array per init image and size, however many images use it)."""
    seen: dict[int, tuple[Any, str]] = {}

    def digest(array):
        if array is None:
            return None
        if id(array) not in seen:
            data = np.ascontiguousarray(array)
            text = hashlib.sha256(f"{data.dtype}{data.shape}".encode() + data.tobytes()).hexdigest()[:16]
            seen[id(array)] = (array, text)  # the array is kept, so its id is not reused
        return seen[id(array)][1]

    return digest


def image_file_name(index: int, seed: int, prompt: str) -> str:
    """The PNG name of image `index` (from 0): `--save`'s `NNNNN-SEED-slug.png`, numbered from 1
    in prompt-file order, so that a re-run finds it under the same name."""
    return f"{index + 1:05d}-{seed}-{slug(prompt)}.png"


def plan_images(requests: Sequence[Any]) -> list[PlannedImage]:
    """Every image of the requests, in prompt-file order."""
    digest = _array_digests()
    planned: dict[int, PlannedImage] = {}
    for request in requests:
        for i in range(len(request.prompts)):
            index = request.positions[i] if request.positions else i

            def each(values, default=None):
                return values[i] if values else default

            record = {
                "prompt": request.prompts[i],
                "negative": request.negatives[i],
                "seed": int(request.seeds[i]),
                "steps": int(request.steps),
                "guidance": float(request.guidances[i]),
                "width": int(request.width),
                "height": int(request.height),
                "strength": each(request.strengths),
                "mask_blur": each(request.mask_blurs),
                "init": each(request.init_names),
                "init_sha256": digest(each(request.inits)),
                "mask_sha256": digest(each(request.masks)),
            }
            planned[index] = PlannedImage(index, image_file_name(index, record["seed"], record["prompt"]), record)
    return [planned[i] for i in sorted(planned)]


def _prompt_record(prompt: Prompt) -> dict:
    return {f.name: getattr(prompt, f.name) for f in fields(prompt)}


def run_settings(session, prompts: Sequence[Prompt], planned: Sequence[PlannedImage], options: Mapping[str, Any],
                 setup_settings: Mapping[str, Any] | None = None) -> dict:
    """The settings of a run that change its images, as run.json keeps them: the model-level ones,
    the command's image options, and digests of the prompts and of the init images' content."""
    model = session.model
    settings = {
        "model": model.name,
        "revision": None,
        "config": None,
        "dtype": model.dtype,
        "scheduler": model.scheduler_name,
        "safety_checker": session.safety_checker,
        "loras": [list(lora) for lora in session.lora_record()],
    }
    settings.update({k: v for k, v in (setup_settings or {}).items() if k in settings})
    sizes = {"height": model.default_size, "width": model.default_size}
    for key, value in options.items():
        settings[key] = sizes[key] if key in sizes and value is None else value
    lines = [_prompt_record(p) for p in prompts]
    settings["prompts"] = f"{len(lines)} prompt line{'s' if len(lines) != 1 else ''}, sha256 {_digest(lines, 16)}"
    pictures = sorted({d for p in planned for d in (p.record["init_sha256"], p.record["mask_sha256"]) if d})
    settings["init_images"] = f"{len(pictures)} init/mask image{'s' if len(pictures) != 1 else ''}, sha256 {_digest(pictures, 16)}" if pictures else None
    return json.loads(json.dumps(settings, default=str))  # as it reads back from run.json


def _subset(request, keep: Sequence[int]):
    """The request with only its images `keep` (indices into it), each keeping its place in the run."""
    count = len(request.prompts)
    changes = {}
    for f in fields(request):
        value = getattr(request, f.name)
        if isinstance(value, tuple) and len(value) == count and f.name != "positions":
            changes[f.name] = tuple(value[i] for i in keep)
    positions = request.positions or tuple(range(count))
    changes["positions"] = tuple(positions[i] for i in keep)
    return replace(request, **changes)


# ---------------------------------------------------------------------------- the folder


def _out_folder(out: str | os.PathLike) -> Path:
    if not str(out).strip():
        raise SDMagicError("--out needs a folder name, got an empty one: e.g. --out images")
    path = Path(out).expanduser()
    shown = repr(printable(str(path), 120))
    if path.exists() and not path.is_dir():
        raise SDMagicError(f"--out {shown} is a file: give a folder (it is made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SDMagicError(f"could not make the folder {shown}: {printable(err.strerror or err)}") from None
    return path


class _Lock:
    """An exclusive lock on DIR for the run's process 0, so two commands never write one folder."""

    def __init__(self, directory: Path):
        self.file = None
        try:
            import fcntl
        except ImportError:  # Windows: no lock; two runs on one folder are the user's to avoid
            return
        try:
            self.file = open(directory / LOCK_FILE, "a")
        except OSError:
            return
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            self.file = None
            raise SDMagicError(
                f"another sdmagic run is writing to {printable(str(directory), 120)!r}: wait for it to end, or give another --out"
            ) from None
        except OSError:  # a file system without locks
            pass

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the lock
            self.file = None


def _remove_partials(directory: Path) -> None:
    """Temporary files of killed runs (never a final name: those are replaced whole)."""
    for name in os.listdir(directory):
        if _PARTIAL.match(name):
            try:
                (directory / name).unlink()
            except OSError:
                pass


def _done(directory: Path, planned: Sequence[PlannedImage], setup_digest: str, images: int) -> set[int]:
    """Indices whose manifest line matches the planned image and whose file is intact."""
    entries = manifest.merged(directory, images)
    candidates = []
    for image in planned:
        entry = entries.get(image.index)
        if (entry is not None and entry.get("file") == image.file and entry.get("setup") == setup_digest
                and all(entry.get(k) == v for k, v in image.record.items())):
            candidates.append((image.index, entry))
    if not candidates:
        return set()
    # Hashing reads every file again; threads overlap the reads (hashlib releases the GIL).
    with ThreadPoolExecutor(max_workers=min(8, len(candidates))) as pool:
        ok = list(pool.map(lambda item: manifest.file_matches(directory, item[1]), candidates))
    return {index for (index, _), good in zip(candidates, ok) if good}


def _decide(out: Path, planned: Sequence[PlannedImage], settings: dict, setup_digest: str, force: bool,
            info: Mapping[str, Any]) -> tuple[int, int, list[int]]:
    """Process 0: (run number, token, indices still to make). Refuses other settings unless `force`.
    run.json is written, with the next run number and a new token, unless the run has nothing to
    make with the settings already there (a re-run of a finished folder writes nothing)."""
    old = manifest.read_run(out)
    if old is not None and not force:
        changed = manifest.differences(old["settings"], settings)
        if changed:
            shown = "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
            raise SDMagicError(
                f"{printable(str(out), 80)!r} holds images made with other settings ({shown}): give another --out,"
                " or --force to make this command's images there (those that still match are kept)"
            )
    _remove_partials(out)
    done = _done(out, planned, setup_digest, len(planned))
    todo = [image.index for image in planned if image.index not in done]
    runs = max(old["runs"] if old is not None else 0, manifest.latest_run(out))
    token = old.get("token") if old is not None else None
    if todo or old is None or old["settings"] != settings:
        runs, token = runs + 1, secrets.randbits(62)
        manifest.write_run(out, {"format": manifest.FORMAT, "runs": runs, "token": token, "images": len(planned),
                                 "settings": settings, **info})
    if not isinstance(token, int) or isinstance(token, bool):
        token = 0
    return runs, token, todo


def _check_shared(out: Path, token: int) -> None:
    """A process other than 0: DIR must be the folder process 0 wrote run.json into (one shared
    folder), else resuming could not see this process's images."""
    deadline = time.monotonic() + SHARED_FOLDER_WAIT_SECONDS
    while True:
        try:
            current = manifest.read_run(out)
        except SDMagicError:
            current = None
        if current is not None and current.get("token") == token:
            return
        if time.monotonic() > deadline:
            raise SDMagicError(
                f"{printable(str(out), 80)!r} on process {jax.process_index()} is not the folder process 0 writes to:"
                " give --out a folder every host shares (NFS, GCS FUSE, ...) at the same path"
            )
        time.sleep(0.5)


# ---------------------------------------------------------------------------- running


def _write_png(directory: Path, name: str, pixels: np.ndarray, info: ImageInfo, model: str, scheduler: str) -> tuple[str, int]:
    """Write one image as `--save` does (same pixels, same chunks), atomically: a temporary file,
    fsynced, renamed over `name`. Returns the file's sha256 and size."""
    buffer = io.BytesIO()
    to_pil(pixels[None])[0].save(buffer, format="PNG", pnginfo=image_pnginfo(info, model, scheduler))
    data = buffer.getvalue()
    final = directory / name
    temp = directory / f".{name}.sdmagic-run-{jax.process_index()}.partial"
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    return hashlib.sha256(data).hexdigest(), len(data)


class _Progress:
    """A tqdm bar (images/s and ETA) on process 0, or with `quiet` a plain line every
    LOG_EVERY_SECONDS; nothing on other processes."""

    def __init__(self, total: int, show: bool, quiet: bool, log: Callable[[str], None]):
        self.total, self.done, self.quiet, self.log = total, 0, quiet, log
        self.bar = None
        self.start = self.last = time.perf_counter()
        if show and not quiet and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="image", desc="sdmagic run", file=sys.stderr, dynamic_ncols=True)
        self.show = show

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.show and self.quiet:
            now = time.perf_counter()
            if now - self.last >= LOG_EVERY_SECONDS and self.done < self.total:
                self.last = now
                rate = self.done / (now - self.start)
                eta = (self.total - self.done) / rate if rate else float("nan")
                self.log(f"sdmagic run: {self.done}/{self.total} images, {rate:.2f} images/s, ETA {eta:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fetch(call, outputs) -> tuple[dict, dict]:
    """Wait for a started call (polling, so that Ctrl-C acts at once) and take this process's rows."""
    from .session import device_memory_errors

    while not all(x.is_ready() for x in outputs):
        time.sleep(0.005)
    pixels, nsfw = outputs
    with device_memory_errors(call.key, "running"):
        return dict(_local_rows(pixels)), dict(_local_rows(nsfw))


def _run_calls(session, out: Path, requests, planned: Sequence[PlannedImage], todo: Sequence[int], run: int,
               setup_digest: str, make_progress: Callable[[], _Progress], log: Callable[[str], None]) -> tuple[int, float]:
    """Make the images `todo`; returns (files this process wrote, compile seconds). The progress
    bar is made once the executables are there, so that it measures images, not compiling."""
    wanted = set(todo)
    parts = []
    for request in requests:
        positions = request.positions or tuple(range(len(request.prompts)))
        keep = [i for i, position in enumerate(positions) if position in wanted]
        if keep:
            parts.append(_subset(request, keep))
    keys = [session.shape_key(r) for r in parts]
    compile_seconds = 0.0
    for key in dict.fromkeys(keys):
        _, seconds, source = session.executable(key)
        compile_seconds += seconds
        if source != "memory":
            how = "loaded from the compile cache" if source == "disk" else "compiled"
            log(f"sdmagic run: {key.describe()} {how} in {seconds:.1f} s")
    messages: list[str] = []
    calls = [call for r, k in zip(parts, keys) for call in session.plan_calls(r, k, messages)]
    model, scheduler, loras = session.model.name, session.model.scheduler_name, session.lora_record()
    by_index = {image.index: image for image in planned}
    written = 0

    def collect(call, rows) -> None:
        nonlocal written
        pixels, flags = rows
        request = call.request
        for j in sorted(pixels):
            if j >= call.count:  # padding
                continue
            image = by_index[request.positions[call.first + j]]
            r = image.record
            info = ImageInfo(prompt=r["prompt"], seed=r["seed"], negative=r["negative"], guidance=r["guidance"],
                             steps=r["steps"], width=r["width"], height=r["height"], nsfw=bool(flags[j]),
                             strength=r["strength"], mask_blur=r["mask_blur"], init=r["init"], loras=loras)
            try:
                sha, size = _write_png(out, image.file, pixels[j], info, model, scheduler)
                writer.append({"index": image.index, "file": image.file, "sha256": sha, "bytes": size, "run": run,
                               "setup": setup_digest, **r, "nsfw": bool(flags[j])})
            except OSError as err:
                raise SDMagicError(
                    f"could not write {printable(image.file, 80)!r} in {printable(str(out), 80)!r}:"
                    f" {printable(err.strerror or err)}; run the same command again to go on from there"
                ) from None
            written += 1
        progress.update(call.count)

    def checked(call):
        """The first call of an executable loaded from disk: run alone and waited for; one that
        does not run is replaced by a fresh compile (as a cell does)."""
        nonlocal compile_seconds
        rows, seconds = session.run_checked(call, _fetch)
        compile_seconds += seconds
        return rows

    writer = manifest.ManifestWriter(out, jax.process_index())
    in_flight: deque = deque()
    progress = make_progress()
    try:
        for call in calls:
            if session.needs_check(call.key):
                while in_flight:
                    done_call, outputs = in_flight.popleft()
                    collect(done_call, _fetch(done_call, outputs))
                collect(call, checked(call))
                continue
            fetched = []
            while len(in_flight) >= MAX_CALLS_IN_FLIGHT:
                done_call, outputs = in_flight.popleft()
                fetched.append((done_call, _fetch(done_call, outputs)))
            in_flight.append((call, session.start_call(call)))
            for done_call, rows in fetched:  # written while the devices run the next call
                collect(done_call, rows)
        while in_flight:
            done_call, outputs = in_flight.popleft()
            collect(done_call, _fetch(done_call, outputs))
    finally:
        progress.close()
        writer.close()
    return written, compile_seconds


def run_prompts(
    session,
    prompts: Sequence[Prompt | str],
    out: str | os.PathLike,
    *,
    seed: int = 0,
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
    setup_settings: Mapping[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> RunSummary:
    """Make every image of `prompts` (options as `Session.generate`; image i: seed `seed + i`) into
    the folder `out`, skipping those a previous run there already made (recorded in its manifest,
    file intact). Every process of a multi-process run calls this with the same arguments.

    Settings that change images (model, steps, size, prompts, ...) must be those of the last run in
    `out`, else SDMagicError names the ones that differ; `force` makes this command's images there
    anyway (images that still match are kept). `setup_settings`: `revision` and `config` as given
    to `setup` (the session does not know them). `progress`: a bar on process 0, or with `quiet`
    a log line every LOG_EVERY_SECONDS; `log` takes the lines (default: stderr, process 0 only).
    """
    first = jax.process_index() == 0
    say = (log or (lambda line: print(line, file=sys.stderr, flush=True))) if first else (lambda line: None)
    if seed is None:
        raise SDMagicError("sdmagic run needs a fixed seed (a random one could not be resumed): e.g. --seed 0")
    out = _out_folder(out)
    items = [p if isinstance(p, Prompt) else Prompt(str(p)) for p in prompts]
    options = {"seed": seed, "steps": steps, "guidance": guidance, "height": height, "width": width, "negative": negative,
               "n": images_per_prompt, "init": init_image, "strength": strength, "mask": mask, "mask_blur": mask_blur}
    requests = session.make_requests(items, seed=seed, steps=steps, guidance=guidance, height=height, width=width,
                                     negative=negative, images_per_prompt=images_per_prompt, init_image=init_image,
                                     strength=strength, mask=mask, mask_blur=mask_blur)
    planned = plan_images(requests)
    settings = run_settings(session, items, planned, options, setup_settings)
    setup_digest = _digest({k: settings[k] for k in SETUP_SETTINGS}, 16)
    processes = jax.process_count()
    info = {"processes": processes, "devices": session.plan.count, "per_device_batch": session.per_device_batch}
    lock = None
    try:
        if first:
            try:
                lock = _Lock(out)
                runs, token, todo = _decide(out, planned, settings, setup_digest, force, info)
                value = [runs, token, *todo]
            except BaseException:
                if processes > 1:
                    _agree([-1, 0])  # the others stop too, instead of waiting for this process
                raise
        else:
            value = [0, 0]
        value = _agree(value)
        if value[0] < 0:
            raise SDMagicError("process 0 stopped the run before it began (its message says why)")
        runs, token, todo = value[0], value[1], value[2:]
        if not first and todo:
            _check_shared(out, token)
        skipped = len(planned) - len(todo)
        if todo:
            say(f"sdmagic run: {len(todo)} of {len(planned)} images to make, {skipped} already in {printable(str(out), 80)}")
        start = time.perf_counter()
        written, compile_seconds = (
            _run_calls(session, out, requests, planned, todo, runs, setup_digest,
                       lambda: _Progress(len(todo), first and progress, quiet, say), say)
            if todo else (0, 0.0))
        if processes > 1:
            # Every process reports what it wrote: a peer that died or failed becomes the watchdog's
            # one-line error here, not a summary that counts images nobody wrote.
            _multihost().gather(written)
        return RunSummary(out=out, images=len(planned), made=len(todo), skipped=skipped, written_here=written,
                          seconds=time.perf_counter() - start, compile_seconds=compile_seconds,
                          devices=session.plan.count, processes=processes)
    finally:
        if lock is not None:
            lock.release()
