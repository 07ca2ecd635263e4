"""Results that render themselves: PIL images, a captioned grid, HTML and PNG reprs."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import SDMagicError

CAPTION_CHARS = 40
TABLE_ROWS = 20  # rows of the plain-text table before "... and N more"
DISPLAY_WIDTH = 1600  # the PNG grid a notebook shows is downscaled to this; saved grids are full size
HTML_CELL = 320  # pixels per image in the HTML view
# Tiny models draw 64-pixel images; captions need room, so grid cells are at least this wide.
MIN_CELL = 160


def shorten(text: str, limit: int = CAPTION_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """uint8 [N, H, W, 3] -> PIL images."""
    return [Image.fromarray(np.ascontiguousarray(p), mode="RGB") for p in pixels]


def _seed_list(seeds: list[int]) -> str:
    """'3..10' for consecutive seeds (the usual cell), else the runs: '100..101, 7..8'."""
    runs, start = [], 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            runs.append(str(seeds[start]) if i - 1 == start else f"{seeds[start]}..{seeds[i - 1]}")
            start = i
    return ", ".join(runs[:4]) + (", ..." if len(runs) > 4 else "")


def default_cols(count: int) -> int:
    return max(1, min(count, 4))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Cut `text` with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


@dataclass(frozen=True)
class ImageInfo:
    """How one image was made: everything needed to make it again (with the result's model)."""

    prompt: str
    seed: int
    negative: str | None
    guidance: float
    steps: int
    width: int
    height: int
    nsfw: bool = False
    strength: float | None = None  # image-to-image and inpainting: the denoising strength
    mask_blur: int | None = None  # inpainting: the mask's blur radius in pixels
    init: str | None = None  # where the init image came from (a file name), for the record
    loras: tuple = ()  # (name, weight, short hash) of each LoRA merged into the weights


@dataclass
class GenerationResult:
    """The images of one generate call, in prompt order, with what made each of them."""

    images: list
    info: list[ImageInfo]
    model: str
    scheduler: str
    compile_seconds: float
    run_seconds: float
    calls: int
    seed_was_random: bool = False
    compiled_from: str = "compiled"  # where the (last) executable came from: compiled, disk or memory
    batch: int = 0  # images per compiled call
    warnings: list[str] = field(default_factory=list)
    display_cols: int | None = None  # columns of the grid the notebook shows
    number: int | None = None  # its place in the session's history (%sd_show N)
    saved: list = field(default_factory=list)  # image files written, in image order
    grid_file: object = None  # the grid's file, once saved

    # Per-image lists, and the values of the first image for cells that share them.
    @property
    def prompts(self) -> list[str]:
        return [i.prompt for i in self.info]

    @property
    def seeds(self) -> list[int]:
        return [i.seed for i in self.info]

    @property
    def nsfw(self) -> list[bool]:
        return [i.nsfw for i in self.info]

    @property
    def negative(self) -> str | None:
        return self.info[0].negative

    @property
    def guidance(self) -> float:
        return self.info[0].guidance

    @property
    def steps(self) -> int:
        return self.info[0].steps

    @property
    def width(self) -> int:
        return max(i.width for i in self.info)

    @property
    def height(self) -> int:
        return max(i.height for i in self.info)

    @property
    def images_in_memory(self) -> bool:
        return len(self.images) == len(self.info)

    def save(self, directory) -> list:
        """Write each image as a PNG with A1111-style `parameters`, and the grid; returns the image paths."""
        from .saving import save_result

        return save_result(self, directory)

    def captions(self) -> list[str]:
        out = []
        for info in self.info:
            note = " · blacked out by the safety checker" if info.nsfw else ""
            # Images made from a picture say how far from it they went.
            made = "" if info.strength is None else f" · {'inpaint' if info.mask_blur is not None else 'img2img'} {info.strength:g}"
            out.append(f"{shorten(info.prompt)} · seed {info.seed}{made}{note}")
        return out

    def grid(self, cols: int | None = None, captions: bool = True) -> Image.Image:
        """All images in one full-size PIL image, `cols` wide, each with its caption below when asked.

        Images of different sizes (per-line options) share cells of the largest size.
        """
        if not self.images_in_memory:
            raise SDMagicError(f"the images of run {self.number} were dropped from memory (history cap); {self._files_note()}")
        count = len(self.images)
        cols = default_cols(count) if cols is None else max(1, min(int(cols), count))
        rows = math.ceil(count / cols)
        cell_w = max(self.width, MIN_CELL) if captions else self.width
        scale = cell_w / self.width
        cell_h = round(self.height * scale)
        font = ImageFont.load_default(size=12)
        caption_h = 34 if captions else 0
        pad = 4 if captions else 0
        sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + caption_h + pad) + pad), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (image, text) in enumerate(zip(self.images, self.captions())):
            row, col = divmod(i, cols)
            x, y = pad + col * (cell_w + pad), pad + row * (cell_h + caption_h + pad)
            size = (round(image.width * scale), round(image.height * scale))
            shown = image if scale == 1 else image.resize(size, Image.NEAREST)
            sheet.paste(shown, (x + (cell_w - size[0]) // 2, y + (cell_h - size[1]) // 2))
            if captions:
                prompt_part, _, rest = text.partition(" · ")
                draw.text((x, y + cell_h + 2), _fit(draw, prompt_part, font, cell_w), fill="black", font=font)
                draw.text((x, y + cell_h + 17), _fit(draw, rest, font, cell_w), fill="dimgray", font=font)
        return sheet

    def display_grid(self, cols: int | None = None) -> Image.Image:
        """The grid as the notebook shows it: downscaled to at most DISPLAY_WIDTH pixels wide."""
        sheet = self.grid(cols)
        if sheet.width > DISPLAY_WIDTH:
            sheet = sheet.resize((DISPLAY_WIDTH, round(sheet.height * DISPLAY_WIDTH / sheet.width)), Image.LANCZOS)
        return sheet

    @property
    def seconds_per_image(self) -> float:
        return self.run_seconds / max(1, len(self.info))

    def __len__(self) -> int:
        return len(self.info)

    def _files_note(self) -> str:
        if not self.saved:
            return "they were not saved"
        folders = sorted({str(Path(p).parent) for p in self.saved})
        return f"their files are in {', '.join(folders)}"

    def __repr__(self) -> str:
        """A header and a table of prompts, seeds and files: what a terminal IPython shows."""
        n = len(self.info)
        seeds = f"seed {self.seeds[0]}" if n == 1 else f"seeds {_seed_list(self.seeds)}"
        random = " (random)" if self.seed_was_random else ""
        flagged = sum(self.nsfw)
        flagged_note = f", {flagged} blacked out by the safety checker" if flagged else ""
        number = f" #{self.number}" if self.number is not None else ""
        sizes = sorted({f"{i.width}x{i.height}" for i in self.info})
        guidances = sorted({i.guidance for i in self.info})
        lines = [
            f"<GenerationResult{number}: {n} image{'s' if n != 1 else ''} {'/'.join(sizes)}, {seeds}{random},"
            f" {'/'.join(str(s) for s in sorted({i.steps for i in self.info}))} {self.scheduler} steps,"
            f" guidance {'/'.join(f'{g:g}' for g in guidances)}, {self.model};"
            f" compile {self.compile_seconds:.2f} s, run {self.run_seconds:.2f} s{flagged_note}>"
        ]
        if not self.images_in_memory:
            lines.append(f"  images dropped from memory (history cap); {self._files_note()}")
        for index, info in enumerate(self.info[:TABLE_ROWS]):
            saved = f"  {self.saved[index]}" if index < len(self.saved) else ""
            lines.append(f"  {index:>3}  seed {info.seed:<10} {shorten(info.prompt, 48)}{saved}")
        if n > TABLE_ROWS:
            lines.append(f"  ... and {n - TABLE_ROWS} more")
        if self.grid_file:
            lines.append(f"  grid: {self.grid_file}")
        return "\n".join(lines)

    def _repr_png_(self) -> bytes | None:
        if not self.images_in_memory:
            return None
        return _png_bytes(self.display_grid(self.display_cols))

    def _repr_html_(self) -> str | None:
        if not self.images_in_memory:
            return None
        cols = self.display_cols or default_cols(len(self.images))
        cols = min(cols, len(self.images))
        # Shown downscaled (the browser scales; the PNG inside is full size, as saved).
        cell = min(max(self.width, MIN_CELL), HTML_CELL)
        figures = []
        for image, info, caption in zip(self.images, self.info, self.captions()):
            data = base64.b64encode(_png_bytes(image)).decode("ascii")
            figures.append(
                f'<figure style="margin:0;width:{cell}px">'
                f'<img src="data:image/png;base64,{data}" style="width:{cell}px;image-rendering:auto"'
                f' title="{html.escape(info.prompt)}"/>'
                f'<figcaption style="font-size:12px;overflow-wrap:anywhere" title="{html.escape(info.prompt)}">'
                f"{html.escape(caption)}</figcaption>"
                "</figure>"
            )
        return (
            f'<div style="display:grid;grid-template-columns:repeat({cols},{cell}px);gap:6px">'
            + "".join(figures)
            + "</div>"
        )
