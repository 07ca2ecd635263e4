"""PNG files that remember how they were made, in AUTOMATIC1111's `parameters` format.

Each image is written as `NNNNN-SEED-slug.png` with a `parameters` text chunk:

    a red fox in the snow
    Negative prompt: blurry
    Steps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 3, Size: 512x512, Model: CompVis/stable-diffusion-v1-4, Version: sdmagic 0.1.0

which A1111's "PNG Info", ComfyUI's loaders and the usual readers understand, and which
`read_parameters` (and `%sd_from_png`) read back to make the same image again.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import SDMagicError

# sdmagic's scheduler names and A1111's sampler names for the same methods.
SAMPLER_NAMES = {"pndm": "PLMS", "ddim": "DDIM", "lms": "LMS", "dpm": "DPM++ 2M"}
SCHEDULER_FOR_SAMPLER = {v.lower(): k for k, v in SAMPLER_NAMES.items()}
SLUG_CHARS = 48
# A1111's pattern for one `Key: value` of the settings line (values with , : or newlines are quoted).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_COUNTER = re.compile(r"^(\d{5,})-")


def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def parameters_text(info: Any, model: str, scheduler: str) -> str:
    """The A1111 `parameters` text of one image (`info`: an output.ImageInfo)."""
    from . import __version__

    settings = {
        "Steps": info.steps,
        "Sampler": SAMPLER_NAMES.get(scheduler, scheduler),
        "CFG scale": f"{info.guidance:g}",
        "Seed": info.seed,
        "Size": f"{info.width}x{info.height}",
        "Model": model,
        "Version": f"sdmagic {__version__}",
    }
    negative = f"\nNegative prompt: {info.negative}" if info.negative else ""
    return f"{info.prompt}{negative}\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in settings.items())


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111 `parameters` text -> {'prompt', 'negative', 'steps', 'sampler', 'guidance', 'seed',
    'width', 'height', 'model', ...}; unknown settings are kept under their own names."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no settings line: it is all prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    settings: dict[str, str] = {}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        settings[key.strip()] = value
    out: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative": "\n".join(negative).strip() or None}
    try:
        if "Steps" in settings:
            out["steps"] = int(settings.pop("Steps"))
        if "CFG scale" in settings:
            out["guidance"] = float(settings.pop("CFG scale"))
        if "Seed" in settings:
            out["seed"] = int(settings.pop("Seed"))
        if "Size" in settings:
            width, height = settings.pop("Size").lower().split("x")
            out["width"], out["height"] = int(width), int(height)
    except ValueError as err:
        raise SDMagicError(f"could not read the image's settings line {last!r}: {err}") from None
    if "Sampler" in settings:
        out["sampler"] = settings.pop("Sampler")
    if "Model" in settings:
        out["model"] = settings.pop("Model")
    out.update(settings)
    return out


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The settings a PNG was made with, from its `parameters` text (see `parse_parameters`)."""
    path = Path(path).expanduser()
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get("parameters") or image.info.get("parameters")
    except FileNotFoundError:
        raise SDMagicError(f"no such file: {str(path)!r}") from None
    except OSError as err:
        raise SDMagicError(f"could not read {str(path)!r} as an image: {err}") from None
    if not text:
        raise SDMagicError(
            f"{str(path)!r} has no 'parameters' text: only PNGs saved by sdmagic (--save) or AUTOMATIC1111 carry one"
        )
    return parse_parameters(text)


def scheduler_for(sampler: str) -> str | None:
    """sdmagic's scheduler name for an A1111 sampler name (None if sdmagic has no such sampler)."""
    return SCHEDULER_FOR_SAMPLER.get(sampler.strip().lower())


def slug(prompt: str, limit: int = SLUG_CHARS) -> str:
    """A short file-name-safe form of a prompt: ASCII letters, digits, '-' and '_' only.

    No path separators, no dots (so no '..'), never empty, at most `limit` characters.
    """
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_-")
    return text[:limit].rstrip("_-") or "image"


def _next_counter(directory: Path) -> int:
    numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _COUNTER.match(p.name))]
    return max(numbers, default=0) + 1


def _write_new(directory: Path, name_for, image: Image.Image, pnginfo, counter: int) -> tuple[Path, int]:
    """Write `image` under the first free counter from `counter`; never replaces a file."""
    root = directory.resolve()
    while True:
        path = directory / name_for(counter)
        if path.resolve().parent != root:  # cannot happen with slugs; a last guard all the same
            raise SDMagicError(f"refusing to write {path}: it is outside {directory}")
        try:
            with open(path, "xb") as file:
                image.save(file, format="PNG", pnginfo=pnginfo)
            return path, counter + 1
        except FileExistsError:
            counter += 1


def save_result(result: Any, directory: str | Path) -> list[Path]:
    """Write each image of `result` (PNG + parameters) and its full-size grid into `directory`.

    Records the paths on the result (`saved`, `grid_file`) and returns the image paths. Raises
    SDMagicError with what to do if the folder cannot be written; the result is left as it was.
    """
    if not result.images_in_memory:
        raise SDMagicError(f"the images of run {result.number} are no longer in memory: nothing to save")
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        counter = _next_counter(directory)
        saved = []
        for image, info in zip(result.images, result.info):
            pnginfo = PngImagePlugin.PngInfo()
            pnginfo.add_text("parameters", parameters_text(info, result.model, result.scheduler))
            name_slug = slug(info.prompt)
            path, counter = _write_new(
                directory, lambda c: f"{c:05d}-{info.seed}-{name_slug}.png", image, pnginfo, counter
            )
            saved.append(path)
        grid_slug = slug(result.info[0].prompt)
        grid_file, _ = _write_new(
            directory, lambda c: f"{c:05d}-grid-{grid_slug}.png", result.grid(result.display_cols), None, counter
        )
    except OSError as err:
        reason = err.strerror or str(err)
        raise SDMagicError(
            f"could not save to {str(directory)!r}: {reason}; the images are still in memory"
            f" (result.save(folder), or %sd_show {result.number} then --save elsewhere)"
        ) from None
    result.saved = saved
    result.grid_file = grid_file
    return saved
