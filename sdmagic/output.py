"""Results that render themselves: PIL images, a captioned grid, HTML and PNG reprs."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION_CHARS = 40
# Tiny models draw 64-pixel images; captions need room, so grid cells are at least this wide.
MIN_CELL = 160


def shorten(text: str, limit: int = CAPTION_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def to_pil(pixels: np.ndarray) -> list[Image.Image]:
    """uint8 [N, H, W, 3] -> PIL images."""
    return [Image.fromarray(np.ascontiguousarray(p), mode="RGB") for p in pixels]


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


@dataclass
class GenerationResult:
    """The images of one generate call, in prompt order, with what made them."""

    images: list
    prompts: list[str]
    seeds: list[int]
    nsfw: list[bool]
    negative: str | None
    steps: int
    guidance: float
    height: int
    width: int
    model: str
    scheduler: str
    compile_seconds: float
    run_seconds: float
    calls: int
    seed_was_random: bool = False
    compiled_from: str = "compiled"  # where the executable came from: compiled, disk or memory
    batch: int = 0  # images per compiled call
    warnings: list[str] = field(default_factory=list)
    display_cols: int | None = None  # columns of the grid the notebook shows

    def captions(self) -> list[str]:
        out = []
        for prompt, seed, flagged in zip(self.prompts, self.seeds, self.nsfw):
            note = " · blacked out by the safety checker" if flagged else ""
            out.append(f"{shorten(prompt)} · seed {seed}{note}")
        return out

    def grid(self, cols: int | None = None, captions: bool = True) -> Image.Image:
        """All images in one PIL image, `cols` wide, each with its caption below when asked."""
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
            shown = image if scale == 1 else image.resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(shown, (x, y))
            if captions:
                prompt_part, _, rest = text.partition(" · ")
                draw.text((x, y + cell_h + 2), _fit(draw, prompt_part, font, cell_w), fill="black", font=font)
                draw.text((x, y + cell_h + 17), _fit(draw, rest, font, cell_w), fill="dimgray", font=font)
        return sheet

    @property
    def seconds_per_image(self) -> float:
        return self.run_seconds / max(1, len(self.images))

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        seeds = f"seed {self.seeds[0]}" if len(self.seeds) == 1 else f"seeds {self.seeds[0]}..{self.seeds[-1]}"
        random = " (random)" if self.seed_was_random else ""
        flagged = sum(self.nsfw)
        flagged_note = f", {flagged} blacked out by the safety checker" if flagged else ""
        return (
            f"<GenerationResult: {len(self.images)} image{'s' if len(self.images) != 1 else ''} {self.width}x{self.height}, {seeds}{random},"
            f" {self.steps} {self.scheduler} steps, guidance {self.guidance:g}, {self.model};"
            f" compile {self.compile_seconds:.2f} s, run {self.run_seconds:.2f} s{flagged_note}>"
        )

    def _repr_png_(self) -> bytes:
        return _png_bytes(self.grid(self.display_cols))

    def _repr_html_(self) -> str:
        cols = self.display_cols or default_cols(len(self.images))
        cols = min(cols, len(self.images))
        cell = max(self.width, MIN_CELL)
        figures = []
        for image, prompt, caption in zip(self.images, self.prompts, self.captions()):
            data = base64.b64encode(_png_bytes(image)).decode("ascii")
            figures.append(
                f'<figure style="margin:0;width:{cell}px">'
                f'<img src="data:image/png;base64,{data}" style="width:{cell}px;image-rendering:auto"'
                f' title="{html.escape(prompt)}"/>'
                f'<figcaption style="font-size:12px;overflow-wrap:anywhere">{html.escape(caption)}</figcaption>'
                "</figure>"
            )
        return (
            f'<div style="display:grid;grid-template-columns:repeat({cols},{cell}px);gap:6px">'
            + "".join(figures)
            + "</div>"
        )
