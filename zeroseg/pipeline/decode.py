"""One image file -> its training view, or a one-line reason why not. Never raises for bad data:
a bad image is a row with status failed, not a crashed job.

Rules (each a choice the paper leaves open):
- Colour: every mode ends as 8-bit RGB. Transparency (RGBA, LA, palette with a transparent
  index) is composited on white, what a viewer shows; dropping alpha would expose whatever RGB
  sits under transparent pixels (often black). 16-bit images are scaled to 8 bits (PIL's own
  conversion clips them to white). CMYK goes through PIL's conversion. Animated images: the
  first frame. EXIF orientation is applied, so the view is upright as people see the photo.
- Size: the shorter side must be at least MIN_CELL_PIXELS x the finest grid (16 px for grids up
  to 4x4); a 3x3 px image blown up to 224 px would give 30 crops of the same blur.
- Decompression bombs: an image over `max_pixels` (PIL's default cap, ~89 Mpx) is refused from
  its header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zeroseg.pipeline.crops import training_view
from zeroseg.pipeline.sources import is_url

MIN_CELL_PIXELS = 4
EXIF_ORIENTATION = 0x0112
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


@dataclass
class Decoded:
    """A training view (S, S, 3) uint8 and the original (height, width); or view None and the
    reason. `size` is upright (after EXIF orientation), (0, 0) when the header could not be read."""

    view: np.ndarray | None
    size: tuple[int, int]
    error: str = ""


def min_side(grids) -> int:
    return MIN_CELL_PIXELS * max(grids)


def decode_image(path: str, view_size: int, grids, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Read and decode `path` into its training view; every failure is a Decoded with a reason."""
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        return Decoded(None, (0, 0), "missing: file not found (moved or deleted after listing?)")
    except (OSError, ValueError) as e:
        return Decoded(None, (0, 0), f"unreadable: {_one_line(e)}")
    if not data:
        return Decoded(None, (0, 0), "empty: zero-byte file")
    size = (0, 0)
    try:
        with warnings.catch_warnings():
            # We check the pixel count ourselves below, with a clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        w, h = image.size
        size = (h, w)
        if w * h > max_pixels:
            return Decoded(None, size, f"too large: {w}x{h} px over the {max_pixels} px cap (decompression bomb?)")
        if min(w, h) < min_side(grids):
            return Decoded(None, size, f"too small: {w}x{h} px, shorter side under {min_side(grids)} px")
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free, never below the view size.
        if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):
            size = (w, h)  # a quarter turn: the upright image is w tall
        image.draft("RGB", (view_size, view_size))
        image = to_rgb(ImageOps.exif_transpose(image))
        return Decoded(training_view(image, view_size), size)
    except Image.DecompressionBombError as e:
        return Decoded(None, size, f"too large: {_one_line(e)}")
    except UnidentifiedImageError:
        return Decoded(None, size, "not an image: unknown format")
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        # PIL reports truncated and corrupt data with these (SyntaxError from some plugins).
        return Decoded(None, size, f"corrupt: {_one_line(e)}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the rules)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _read_bytes(path: str) -> bytes:
    if is_url(path):
        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
