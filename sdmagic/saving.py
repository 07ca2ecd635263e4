"""PNG files that remember how they were made, in AUTOMATIC1111's `parameters` format.

Each image is written as `NNNNN-SEED-slug.png` with a `parameters` text chunk:

    a red fox in the snow
    Negative prompt: blurry
    Steps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 3, Size: 512x512, Model: CompVis/stable-diffusion-v1-4, Version: sdmagic 0.3.0

which A1111's "PNG Info", ComfyUI's loaders and the usual readers understand, and which
`read_parameters` (and `%sd_from_png`) read back to make the same image again.

A1111's text cannot say every prompt unambiguously (a prompt line starting with "Negative prompt:",
leading or trailing blanks), so each image also carries an `sdmagic` chunk with the exact prompt and
negative as JSON; `read_parameters` prefers it while it still agrees with the `parameters` text.
The grid carries an `sdmagic` chunk too, saying it is a grid, so `%sd_from_png` can say so.

Every PNG read is possibly hostile: the text is parsed in linear time, its size is bounded, and the
pixels are never decoded.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, PngImagePlugin

from .schedulers import SAMPLERS
from .errors import SDMagicError, example, option
from .text import printable

# sdmagic's scheduler names and A1111's sampler names for the same methods.
SAMPLER_NAMES = SAMPLERS  # sdmagic name -> the label A1111 writes, e.g. "euler-a" -> "Euler a"
SCHEDULER_FOR_SAMPLER = {v.lower(): k for k, v in SAMPLER_NAMES.items()}
SLUG_CHARS = 48
# Real parameters are a few KB (a prompt is cut at 16K characters); anything larger is not one.
MAX_PARAMETERS_CHARS = 64 * 1024
SDMAGIC_CHUNK = "sdmagic"
# A1111's settings that sdmagic reads; every other key is kept apart under out["other"].
KNOWN_SETTINGS = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model")

# The scanner below only ever *matches at* a position (never searches), and each pattern fails in
# time linear in what it looked at, so a settings line of any shape costs time linear in its length.
# A1111's own findall pattern backtracks quadratically: a 64 KB line took 39 s.
_KEY = re.compile(r"\s*(\w[\w \-/]+):\s*")  # A1111's key syntax
_AFTER_QUOTED = re.compile(r"\s*(?:,|\Z)")
_COUNTER = re.compile(r"^(\d{5,})-")
# A save in progress: `.NNNNN.sdmagic-partial` is both the claim on counter NNNNN and the file the
# PNG is written into; it becomes `NNNNN-....png` in one step, or is removed.
_CLAIM = re.compile(r"^\.(\d{5,})\.sdmagic-partial$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JSON = json.JSONDecoder()


def _quote(value: Any) -> str:
    text = str(value)
    if "," in text or "\n" in text or ":" in text or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _number(value: float) -> str:
    """`7.5`, `7` as A1111 shows them, but every digit when fewer would not read back the same."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _prompt_block(prompt: str, negative: str | None) -> str:
    """The lines of a `parameters` text before its settings line."""
    return prompt + (f"\nNegative prompt: {negative}" if negative else "")


def parameters_text(info: Any, model: str, scheduler: str) -> str:
    """The A1111 `parameters` text of one image (`info`: an output.ImageInfo)."""
    from . import __version__

    settings = {
        "Steps": info.steps,
        "Sampler": SAMPLER_NAMES.get(scheduler, scheduler),
        "CFG scale": _number(info.guidance),
        "Seed": info.seed,
        "Size": f"{info.width}x{info.height}",
        "Model": model,
    }
    # A1111's names for its img2img/inpainting settings and the LoRAs in the weights.
    if getattr(info, "strength", None) is not None:
        settings["Denoising strength"] = _number(info.strength)
    if getattr(info, "mask_blur", None) is not None:
        settings["Mask blur"] = info.mask_blur
    settings.update(lora_settings(getattr(info, "loras", ())))
    settings["Version"] = f"sdmagic {__version__}"
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in settings.items())
    return f"{_prompt_block(info.prompt, info.negative)}\n{line}"


def lora_settings(loras: Sequence[tuple[str, float, str]]) -> dict[str, str]:
    """The LoRAs merged into the weights, (name, weight, short hash) each, as settings: A1111's
    `Lora hashes` (name: A1111's short hash, lora.py), and `Lora weights`, since sdmagic
    merges LoRAs at setup where A1111 writes `<lora:name:weight>` into the prompt."""
    if not loras:
        return {}
    # Names lose ':' and ',' as A1111's extra_networks_lora.py writes them, so the list reads back.
    names = [name.replace(":", "").replace(",", "") for name, _, _ in loras]
    return {
        "Lora hashes": ", ".join(f"{name}: {short_hash}" for name, (_, _, short_hash) in zip(names, loras)),
        "Lora weights": ", ".join(f"{name}: {_number(weight)}" for name, (_, weight, _) in zip(names, loras)),
    }


def _settings_items(line: str) -> list[tuple[str, str]]:
    """`Key: value, Key: "quoted, value", ...` -> [(key, value)]; a stretch that is not
    `Key: value` is skipped up to the next comma, as A1111's reader skips it."""
    items, pos, end = [], 0, len(line)
    while pos < end:
        key = _KEY.match(line, pos)
        if key is None:
            comma = line.find(",", pos)
            if comma < 0:
                break
            pos = comma + 1
            continue
        pos = key.end()
        value = None
        if line.startswith('"', pos):
            try:
                quoted, after = _JSON.raw_decode(line, pos)
            except ValueError:  # unterminated or not JSON: A1111 then reads it unquoted
                pass
            else:
                separator = _AFTER_QUOTED.match(line, after)
                if separator is not None:
                    value, pos = quoted, separator.end()
        if value is None:
            comma = line.find(",", pos)
            stop = end if comma < 0 else comma
            value, pos = line[pos:stop].strip(), stop + 1
        items.append((key.group(1).strip(), value))
    return items


def _too_long(text: str, where: str = "") -> SDMagicError:
    return SDMagicError(
        f"the parameters text{where} is {len(text) // 1024} KB, more than the {MAX_PARAMETERS_CHARS // 1024} KB"
        " any real parameters take: it was not made by sdmagic or AUTOMATIC1111"
    )


def _finite(text: str) -> tuple[float]:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(text)
    return (number,)


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def _whole(text: str) -> tuple[int]:
    return (int(text),)


# A1111 key, the fields it sets, how its text becomes their values, and what that text must be.
_NUMBERS = (
    ("Steps", ("steps",), _whole, "a whole number"),
    ("CFG scale", ("guidance",), _finite, "a number"),
    ("Seed", ("seed",), _whole, "a whole number"),
    ("Size", ("width", "height"), _size, "WIDTHxHEIGHT"),
)


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111 `parameters` text -> {'prompt', 'negative', 'steps', 'sampler', 'guidance', 'seed',
    'width', 'height', 'model', 'other'}.

    Only A1111's own keys (Steps, Sampler, CFG scale, Seed, Size, Model) set those fields; every
    other setting is kept, as written, in the dict under 'other' and never overrides them.
    """
    if len(text) > MAX_PARAMETERS_CHARS:
        raise _too_long(text)
    *lines, last = text.strip().split("\n")
    items = _settings_items(last)
    if len(items) < 3:  # A1111's rule: no settings line, it is all prompt
        lines.append(last)
        items, last = [], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if not in_negative and line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    settings: dict[str, str] = {}
    other: dict[str, str] = {}
    for key, value in items:
        if key in KNOWN_SETTINGS:
            if key in settings and settings[key] != value:
                raise SDMagicError(
                    f"the image's settings line gives {key} twice ({printable(settings[key], 30)!r} and"
                    f" {printable(value, 30)!r}): it was edited, so sdmagic cannot tell which made the image"
                )
            settings[key] = value
        else:
            other[key] = value
    out: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative": "\n".join(negative).strip() or None}
    for key, fields, convert, form in _NUMBERS:
        if key in settings:
            try:
                out.update(zip(fields, convert(settings[key])))
            except (ValueError, OverflowError):
                raise SDMagicError(
                    f"the image's settings line says {key}: {printable(settings[key], 40)!r}, which sdmagic cannot"
                    f" read as {form}: the file was edited or not made by sdmagic or AUTOMATIC1111"
                ) from None
    for key, field in (("Sampler", "sampler"), ("Model", "model")):
        if key in settings:
            # These are echoed in messages and commands to run (`%sd_setup --model NAME`); no real
            # name has control or format characters, and a terminal would obey them.
            if any(unicodedata.category(c) in ("Cc", "Cf") for c in settings[key]):
                raise SDMagicError(
                    f"the image's settings line gives a {key} name with control characters"
                    f" ({printable(settings[key], 40)!r}): it was not made by sdmagic or AUTOMATIC1111"
                )
            out[field] = settings[key]
    if other:
        out["other"] = other
    return out


def _sdmagic_chunk(text: Any) -> dict[str, Any]:
    """The `sdmagic` chunk as a dict ({} when absent or unreadable: it only ever refines)."""
    if not isinstance(text, str) or len(text) > MAX_PARAMETERS_CHARS:
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        return {}
    return data if isinstance(data, dict) else {}


def _exact_prompts(marker: dict[str, Any], parameters: str) -> tuple[str, str | None] | None:
    """The exact prompt and negative from the `sdmagic` chunk, if they are what `parameters` says;
    None if not (the `parameters` text was edited since, and it is what A1111 would read)."""
    prompt, negative = marker.get("prompt"), marker.get("negative")
    if marker.get("kind") != "image" or not isinstance(prompt, str) or not isinstance(negative, (str, type(None))):
        return None
    head, _, _ = parameters.rpartition("\n")
    return (prompt, negative) if head == _prompt_block(prompt, negative) else None


def _png_size(path: Path) -> tuple[int, int] | None:
    """Width and height from a PNG's header, without Pillow (None if it is not a PNG)."""
    with open(path, "rb") as file:
        head = file.read(24)
    if len(head) < 24 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _is_grid(path: Path, marker: dict[str, Any], has_parameters: bool) -> bool:
    # Grids saved before they were marked are known by their name alone.
    return marker.get("kind") == "grid" or (not has_parameters and "-grid-" in path.name)


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The settings a PNG was made with, from its `parameters` text (see `parse_parameters`), with
    the exact prompt and negative of an sdmagic PNG. Only the text chunks before the pixels are
    read; the pixels are never decoded. Raises SDMagicError (one line) for anything else."""
    path = Path(path).expanduser()
    shown = repr(printable(str(path), 120))
    try:
        if not path.is_file():
            what = "a folder" if path.is_dir() else "not a file" if path.exists() else None
            raise SDMagicError(f"no such file: {shown}" if what is None else f"{shown} is {what}: give a PNG file")
        size = _png_size(path)
        if size is None:
            raise SDMagicError(f"{shown} is not a PNG: only PNGs saved by sdmagic (--save) or AUTOMATIC1111 carry parameters")
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and size[0] * size[1] > limit:
            # Checked here rather than by Pillow so that no DecompressionBombWarning is shown.
            raise SDMagicError(
                f"{shown} claims to be {size[0]}x{size[1]} pixels, more than Pillow's limit of {limit}"
                " (a decompression bomb?): sdmagic does not read it"
            )
        with Image.open(path, formats=["PNG"]) as image:
            # `image.info` holds the text chunks before the pixels; `image.text` would decode them.
            chunks = dict(image.info)
    except SDMagicError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SDMagicError(f"{shown} is too large to be an image sdmagic made: {printable(err)}") from None
    except PermissionError:
        raise SDMagicError(f"could not read {shown}: permission denied") from None
    except ValueError as err:  # Pillow's limits on text chunks: "Decompressed data too large", ...
        raise SDMagicError(
            f"{shown} has a text chunk over Pillow's limits ({printable(err)}): it was not made by sdmagic or AUTOMATIC1111"
        ) from None
    except Exception as err:  # anything else Pillow meets in a truncated or malformed file
        reason = printable(err) or type(err).__name__
        raise SDMagicError(f"could not read {shown} as a PNG: {reason}") from None
    text = chunks.get("parameters")
    text = str(text) if isinstance(text, str) else None  # iTXt values are a str subclass
    marker = _sdmagic_chunk(chunks.get(SDMAGIC_CHUNK))
    if _is_grid(path, marker, bool(text)):
        raise SDMagicError(
            f"{shown} is the grid sdmagic saved of a whole run, which carries no parameters:"
            " pick one of the image files saved with it (NNNNN-SEED-slug.png)"
        )
    if not text:
        raise SDMagicError(
            f"{shown} has no 'parameters' text: only PNGs saved by sdmagic (--save) or AUTOMATIC1111 carry one"
        )
    if len(text) > MAX_PARAMETERS_CHARS:
        raise _too_long(text, f" of {shown}")
    params = parse_parameters(text)
    exact = _exact_prompts(marker, text)
    if exact is not None:
        params["prompt"], params["negative"] = exact
    return params


def scheduler_for(sampler: str) -> str | None:
    """sdmagic's scheduler name for an A1111 sampler name (None if sdmagic has no such sampler)."""
    return SCHEDULER_FOR_SAMPLER.get(sampler.strip().lower())


def slug(prompt: str, limit: int = SLUG_CHARS) -> str:
    """A short file-name-safe form of a prompt: letters and digits of any script (NFC), '-' and '_'.

    Everything else (path separators, dots, `<>:"|?*`, spaces, control and format characters)
    becomes '_', so the name is safe on Linux, macOS and Windows; never empty, at most `limit`
    characters, never starting with a dot.
    """
    text = unicodedata.normalize("NFC", prompt)
    # Marks (M*) belong to letters in many scripts (Devanagari, Thai, ...); keep them with them.
    kept = "".join(c if c in "-_" or unicodedata.category(c)[0] in "LNM" else "_" for c in text)
    text = re.sub(r"_{2,}", "_", kept).strip("_-")
    return text[:limit].rstrip("_-") or "image"


def _counters(directory: Path) -> list[tuple[int, bool]]:
    """(counter, is a claim) for every numbered file and save in progress in `directory`."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if match := _COUNTER.match(entry.name):
                found.append((int(match.group(1)), False))
            elif match := _CLAIM.match(entry.name):
                found.append((int(match.group(1)), True))
    return found


def _next_counter(directory: Path) -> int:
    return max((number for number, _ in _counters(directory)), default=0) + 1


def _finished_with(directory: Path, counter: int) -> bool:
    return any(number == counter and not claim for number, claim in _counters(directory))


def _publish(claim: Path, final: Path) -> bool:
    """Give the finished `claim` its final name; False if that name is taken (never replaces)."""
    try:
        os.link(claim, final)  # fails if `final` exists, unlike rename
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
    # A filesystem without hard links (FAT, some network shares): only a non-sdmagic writer could
    # take this exact name meanwhile, since every sdmagic writer needs the claim on its counter.
    if final.exists():
        return False
    os.rename(claim, final)
    return True


def _write_new(directory: Path, name_for, image: Image.Image, pnginfo, counter: int) -> tuple[Path, int]:
    """Write `image` as `name_for(counter)` under the first counter from `counter` that no other
    file has, and return its path and the next counter to try. Never replaces a file.

    Safe when several threads or processes save into one folder: a counter is claimed by creating
    `.NNNNN.sdmagic-partial` exclusively (O_EXCL), the PNG is written into that claim, and the claim
    becomes the final file in one step (link, or rename) before it disappears; so at every moment a
    taken counter has its claim or its final file. No lock file (fcntl is neither on Windows nor
    reliable on network shares) and nothing left behind: the claim is removed on any failure,
    Ctrl-C included, so an interrupted save leaves no half-written PNG.
    """
    root = directory.resolve()
    while True:
        final = directory / name_for(counter)
        if final.resolve().parent != root:  # cannot happen with slugs; a last guard all the same
            raise SDMagicError(f"refusing to write {printable(final, 120)}: it is outside {printable(directory, 120)}")
        claim = directory / f".{counter:05d}.sdmagic-partial"
        try:
            file = open(claim, "xb")
        except FileExistsError:  # another save holds this counter
            counter += 1
            continue
        try:
            with file:
                # Between our look at the folder and the claim, another save may have finished this counter.
                taken = _finished_with(directory, counter)
                if not taken:
                    image.save(file, format="PNG", pnginfo=pnginfo)
                    file.flush()
                    os.fsync(file.fileno())  # the bytes are on disk before the name says the file is done
            if not taken and _publish(claim, final):
                return final, counter + 1
        finally:
            claim.unlink(missing_ok=True)
        counter += 1


def image_pnginfo(info: Any, model: str, scheduler: str) -> PngImagePlugin.PngInfo:
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text("parameters", parameters_text(info, model, scheduler))
    exact = {"kind": "image", "prompt": info.prompt, "negative": info.negative}
    pnginfo.add_text(SDMAGIC_CHUNK, json.dumps(exact))  # ASCII JSON: a plain tEXt chunk
    return pnginfo


def _grid_pnginfo(count: int) -> PngImagePlugin.PngInfo:
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text(SDMAGIC_CHUNK, json.dumps({"kind": "grid", "images": count}))
    return pnginfo


def save_folder(directory: str | Path) -> Path:
    """The folder a save writes to; an empty name (which would mean the current folder) is refused."""
    if not str(directory).strip():
        raise SDMagicError(f"{option('save')} needs a folder name, got an empty one: e.g. {example('save', 'outputs')}")
    return Path(directory).expanduser()


def save_result(result: Any, directory: str | Path) -> list[Path]:
    """Write each image of `result` (PNG + parameters) and its full-size grid into `directory`.

    Records the paths on the result (`saved`, `grid_file`) and returns the image paths. Raises
    SDMagicError with what to do if the folder cannot be written; the result is left as it was.
    Each file appears complete under its final name or not at all.
    """
    if not result.images_in_memory:
        raise SDMagicError(f"the images of run {result.number} are no longer in memory: nothing to save")
    directory = save_folder(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        counter = _next_counter(directory)
        saved = []
        for image, info in zip(result.images, result.info):
            name = f"{info.seed}-{slug(info.prompt)}"
            pnginfo = image_pnginfo(info, result.model, result.scheduler)
            path, counter = _write_new(directory, lambda c: f"{c:05d}-{name}.png", image, pnginfo, counter)
            saved.append(path)
        grid_slug = slug(result.info[0].prompt)
        grid_file, _ = _write_new(
            directory,
            lambda c: f"{c:05d}-grid-{grid_slug}.png",
            result.grid(result.display_cols),
            _grid_pnginfo(len(result.images)),
            counter,
        )
    except OSError as err:
        reason = err.strerror or str(err)
        raise SDMagicError(
            f"could not save to {printable(str(directory), 120)!r}: {printable(reason)}; the images are still in memory"
            f" (result.save(folder), or %sd_show {result.number} then --save elsewhere)"
        ) from None
    result.saved = saved
    result.grid_file = grid_file
    return saved
