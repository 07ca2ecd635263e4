"""Init images and masks for image-to-image and inpainting, read and fitted on the host.

Both are fitted to the cell's size as A1111's "Crop and resize" (its default resize mode) does:
scaled, keeping the aspect ratio, until the image COVERS width x height (Lanczos), then cropped
around the centre to exactly that size. Nothing is stretched and nothing is padded; the parts of
the longer side that do not fit are cut off equally on both ends. Mask and image are fitted the
same way, so a mask drawn on the init image (any size, same aspect) stays aligned with it.

Files are treated as hostile: only PNG, JPEG, WebP and BMP are opened (checked from the file's own
header, not its name), their pixel count is checked against `MAX_PIXELS` from the header before any
pixel is decoded, and every failure is a one-line SDMagicError that says what to do.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .errors import SDMagicError, example, option

# The formats an init image or mask may be (Pillow's names), and what the message calls them.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
# Larger images are refused before decoding: 64 megapixels (8192 x 8192) is far beyond any size
# Stable Diffusion takes, and decodes to 256 MB of RGBA, not the gigabytes a crafted header asks for.
MAX_PIXELS = 64 * 1024 * 1024
# Beyond this a mask blur only costs time (the session allows less).
MAX_BLUR = 1024
# A user's image over this many bytes is refused before it is read (a 64 Mpx BMP is 192 MB).
MAX_FILE_BYTES = 256 * 1024 * 1024


def init_image(source: Any, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: the init image as RGB, turned upright by its EXIF orientation,
    transparency flattened onto white (as A1111 does by default), scaled to cover width x height
    (Lanczos) and centre-cropped to it. `source`: a path (str or os.PathLike) or a PIL image."""
    image = _open(source, "init_image")
    try:
        image = ImageOps.exif_transpose(image)
        if _has_transparency(image):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        image = _cover(image.convert("RGB"), width, height)
        return np.asarray(image, dtype=np.uint8).copy()
    except SDMagicError:
        raise
    except Exception as err:  # noqa: BLE001 - a broken file can fail anywhere in decoding
        raise _unreadable(source, "init_image", err) from None


def mask_image(source: Any, width: int, height: int, blur: int = 0) -> np.ndarray:
    """float32 [height, width] in [0, 1], 1 = repaint, as A1111 reads an uploaded mask
    (create_binary_mask): its luminance ("L") made binary (over 128 is white: repaint; the rest
    black: keep); a mask with transparency is its alpha channel instead (painted = repaint), made
    binary the same way. Then turned upright by its EXIF orientation, fitted exactly as `init_image`
    fits the image (Lanczos softens the edges a little where it scales), and blurred by a Gaussian
    of radius `blur` pixels of the fitted mask (Pillow's GaussianBlur; A1111's "mask blur", which
    A1111 measures in the mask file's pixels; 0 = none)."""
    if isinstance(blur, bool) or not isinstance(blur, (int, np.integer)) or not 0 <= blur <= MAX_BLUR:
        raise SDMagicError(
            f"{option('mask_blur')} must be a whole number of pixels from 0 to {MAX_BLUR}, e.g. {example('mask_blur', 4)}"
        )
    image = _open(source, "mask")
    try:
        image = ImageOps.exif_transpose(image)
        if _has_transparency(image):
            image = image.convert("RGBA").getchannel("A")
        image = image.convert("L").point(lambda x: 255 if x > 128 else 0)
        image = _cover(image, width, height)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(int(blur)))
        return np.asarray(image, dtype=np.float32) / np.float32(255)
    except SDMagicError:
        raise
    except Exception as err:  # noqa: BLE001
        raise _unreadable(source, "mask", err) from None


def _has_transparency(image: Image.Image) -> bool:
    """Whether any pixel is less than opaque (A1111 checks the alpha channel's extrema)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").getchannel("A").getextrema() != (255, 255)
    return False


def _cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's "Crop and resize" (images.resize_image, mode 1), with its integer arithmetic: scale
    to cover, Lanczos, paste centred on a width x height canvas (which crops)."""
    ratio = width / height
    src_ratio = image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    # Never 0 for extreme aspect ratios, which Pillow refuses.
    resized = image.resize((max(src_w, 1), max(src_h, 1)), resample=Image.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return canvas


def _name(source: Any) -> str:
    from .text import printable

    return repr(printable(os.fspath(source), 80)) if isinstance(source, (str, os.PathLike)) else "the image"


def _unreadable(source: Any, keyword: str, err: Exception) -> SDMagicError:
    detail = str(err).splitlines()[0][:100] if str(err) else type(err).__name__
    return SDMagicError(
        f"cannot read {option(keyword)} {_name(source)} ({detail}): give a PNG, JPEG, WebP or BMP file"
    )


def _open(source: Any, keyword: str) -> Image.Image:
    """A lazily opened, checked image: a known format, a sane size. Nothing decoded yet for files."""
    if isinstance(source, Image.Image):
        pixels = source.width * source.height
        if pixels > MAX_PIXELS:
            raise SDMagicError(_too_large(source, keyword, source.width, source.height))
        if source.width < 1 or source.height < 1:
            raise SDMagicError(f"{option(keyword)} is empty (0 pixels): give a real image")
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise SDMagicError(
            f"{option(keyword)} must be a file path or a PIL image, not {type(source).__name__}:"
            f" e.g. {example(keyword, 'photo.png')}"
        )
    path = os.fspath(source)
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise SDMagicError(f"{option(keyword)} {_name(source)} {what}: give the path of a PNG, JPEG, WebP or BMP file")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise SDMagicError(
            f"{option(keyword)} {_name(source)} is {size / 2**20:.0f} MB, over sdmagic's {MAX_FILE_BYTES // 2**20} MB:"
            " give a smaller file (an image of at most a few megapixels is plenty)"
        )
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns (or raises) by its own limit; ours comes first and is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        raise SDMagicError(_too_large(source, keyword, None, None)) from None
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SDMagicError(
            f"{option(keyword)} {_name(source)} is not a PNG, JPEG, WebP or BMP image"
            f" ({type(err).__name__}): give one of those (convert it first)"
        ) from None
    try:
        if image.format not in FORMATS:  # pragma: no cover - Image.open(formats=) already refuses
            raise SDMagicError(f"{option(keyword)} {_name(source)} is {image.format}: give a PNG, JPEG, WebP or BMP file")
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise SDMagicError(_too_large(source, keyword, width, height))
        if width < 1 or height < 1:
            raise SDMagicError(f"{option(keyword)} {_name(source)} is empty (0 pixels): give a real image")
        try:
            image.load()  # decode now, inside the size check's bound, so that errors surface here
        except Exception as err:  # noqa: BLE001
            raise _unreadable(source, keyword, err) from None
    except SDMagicError:
        image.close()
        raise
    return image


def _too_large(source: Any, keyword: str, width: int | None, height: int | None) -> str:
    size = f" ({width}x{height})" if width else ""
    return (
        f"{option(keyword)} {_name(source)} is too large{size}: sdmagic reads images up to"
        f" {MAX_PIXELS // 2**20} megapixels; scale it down first"
    )
