"""The one image decoder: a file or URL -> the upright 8-bit RGB picture a viewer shows, or a
one-line reason why not. At the bottom of the house (imports only errors and geometry).

Two faces, one set of rules:
- `decode_image` makes a training view and never raises: a bad image is a row with status
  failed and its reason ("kind: detail"), not a crashed job. ANY exception while reading or
  decoding one image becomes such a reason, whatever its type (a Pillow plugin can raise
  TypeError or IndexError on a crafted file).
- `open_image` gives the full-size picture (a user's photo for `segment`, an eval image) and
  raises a UserError with the reason.

Rules (each a choice the paper leaves open):
- Colour: every mode ends as 8-bit RGB. Transparency (RGBA, LA, palette with a transparent
  index) is composited on white, what a viewer shows; dropping alpha would expose whatever RGB
  sits under transparent pixels (often black). 16-bit images are scaled to 8 bits (PIL's own
  conversion clips them to white). CMYK goes through PIL's conversion. Animated images: the
  first frame. EXIF orientation is applied, so the picture is upright as people see the photo.
- Size: for a training view the shorter side must be at least MIN_CELL_PIXELS x the finest grid
  (16 px for grids up to 4x4); a 3x3 px image blown up to 224 px would give 30 crops of the
  same blur. JPEG decodes at 1/2, 1/4 or 1/8 scale for free, never below the view size.
- Memory: the file is opened, not read; PIL reads the header from it, and an image over
  `max_pixels` (PIL's default cap, ~89 Mpx) is refused from that header, before any pixel is
  decoded, as is a file that is no image at all. A 2 GB file named .jpg is never loaded.
- A member of a tar shard (WebDataset) is named by its member key `SHARD#MEMBER@OFFSET+SIZE`
  (`member_key`): the shard's path or URL, the member's name, and where its bytes lie in the
  shard. It is read with one ranged read of the member's tar header and data (the header must
  still be that member's: a shard rewritten since it was listed is refused, not misread); a
  member over MAX_MEMBER_BYTES is refused unread.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import warnings
from dataclasses import dataclass
from typing import IO, Sequence

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from zeroseg.errors import UserError
from zeroseg.geometry import training_view

MIN_CELL_PIXELS = 4
EXIF_ORIENTATION = 0x0112
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
MAX_MEMBER_BYTES = 1 << 30  # a tar member is read whole: a bigger one is no photograph
TAR_BLOCK = 512
MEMBER_KEY = re.compile(r"^(?P<shard>.+)#(?P<member>[^#]+)@(?P<offset>\d+)\+(?P<size>\d+)$")


def is_url(path: str) -> bool:
    return "://" in path


def member_key(shard: str, member: str, offset: int, size: int) -> str:
    """The key of a tar member whose data starts at byte `offset` of `shard` (see the docstring)."""
    return f"{shard}#{member}@{offset}+{size}"


@dataclass
class Decoded:
    """A training view (S, S, 3) uint8 and the original (height, width); or view None and the
    reason. `size` is upright (after EXIF orientation), (0, 0) when the header could not be read."""

    view: np.ndarray | None
    size: tuple[int, int]
    error: str = ""


class Refused(Exception):
    """Why one image gives no picture: `reason` is "kind: detail", one line; `size` the upright
    (height, width) when the header was read."""

    def __init__(self, reason: str, size: tuple[int, int] = (0, 0)):
        super().__init__(reason)
        self.reason, self.size = reason, size


def min_side(grids: Sequence[int]) -> int:
    return MIN_CELL_PIXELS * max(grids)


def decode_image(path: str, view_size: int, grids: Sequence[int], max_pixels: int = MAX_PIXELS) -> Decoded:
    """`path`'s training view; every failure, of any exception type, is a Decoded with a reason."""
    try:
        image, size = read_upright(path, max_pixels, min_side(grids), draft=view_size)
        return Decoded(training_view(image, view_size), size)
    except Refused as e:
        return Decoded(None, e.size, e.reason)
    except Exception as e:  # read_upright turns every decoding error into Refused; this is the last net
        return Decoded(None, (0, 0), f"corrupt: {_one_line(e)}")


def open_image(path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The full-size upright RGB picture at `path`; a UserError naming the file and the reason."""
    try:
        return read_upright(path, max_pixels)[0]
    except Refused as e:
        raise UserError(f"cannot read image {path}: {e.reason}")


def read_upright(
    path: str, max_pixels: int, shortest: int = 1, draft: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """The rules of the module docstring: (upright 8-bit RGB image, its upright (height, width)).
    An image whose shorter side is under `shortest` px is refused; with `draft`, a JPEG may
    decode at a reduced scale whose shorter side stays >= draft. Raises Refused, and only
    Refused, for anything wrong with the file."""
    try:
        file = _open(path)
    except Refused:
        raise
    except FileNotFoundError:
        raise Refused("missing: file not found (moved or deleted after listing?)")
    except Exception as e:  # permissions, a folder, a URL that does not answer...
        raise Refused(f"unreadable: {_one_line(e)}")
    with file:
        try:
            empty = not file.read(1)
            file.seek(0)
        except Exception as e:
            raise Refused(f"unreadable: {_one_line(e)}")
        if empty:
            raise Refused("empty: zero-byte file")
        size = (0, 0)
        try:
            with warnings.catch_warnings():
                # We check the pixel count ourselves below, with a clearer message.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(file)  # reads the header only
            w, h = image.size
            size = (h, w)
            if w * h > max_pixels:
                raise Refused(f"too large: {w}x{h} px over the {max_pixels} px cap (decompression bomb?)", size)
            if min(w, h) < shortest:
                raise Refused(f"too small: {w}x{h} px, shorter side under {shortest} px", size)
            if image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):
                size = (w, h)  # a quarter turn: the upright image is w tall
            if draft:
                image.draft("RGB", (draft, draft))
            return to_rgb(ImageOps.exif_transpose(image)), size  # decoded here, while the file is open
        except Refused:
            raise
        except Image.DecompressionBombError as e:
            raise Refused(f"too large: {_one_line(e)}", size)
        except UnidentifiedImageError:
            raise Refused("not an image: unknown format", size)
        except Exception as e:
            # Truncated or corrupt data: PIL says so with OSError, SyntaxError, EOFError, and some
            # plugins with whatever their parsing trips on (TypeError, IndexError, struct.error...).
            raise Refused(f"corrupt: {_one_line(e)}", size)


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


def content_hash(path: str) -> str:
    """blake2b-128 (hex) of the bytes at `path` (a tar member's data for a member key): two rows
    with equal hashes hold the same image. "" when the bytes cannot be read."""
    try:
        h = hashlib.blake2b(digest_size=16)
        with _open(path) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except (Refused, OSError, ValueError):
        return ""


def _open(path: str) -> IO[bytes]:
    """A seekable binary file object: PIL reads what it needs from it, nothing more."""
    member = MEMBER_KEY.match(path)
    if member:
        return _read_member(member["shard"], member["member"], int(member["offset"]), int(member["size"]))
    return fsspec.open(path, "rb").open() if is_url(path) else open(path, "rb")


def _read_member(shard: str, member: str, offset: int, size: int) -> IO[bytes]:
    """A tar member's bytes, from one ranged read of its header block and data."""
    if size > MAX_MEMBER_BYTES:
        raise Refused(f"too large: member of {size} bytes over the {MAX_MEMBER_BYTES} byte cap")
    if offset < TAR_BLOCK:
        raise Refused(f"unreadable: no tar header before byte {offset} of {shard}")
    with (fsspec.open(shard, "rb").open() if is_url(shard) else open(shard, "rb")) as f:
        f.seek(offset - TAR_BLOCK)
        data = f.read(TAR_BLOCK + size)
    if len(data) < TAR_BLOCK + size:
        raise Refused(f"truncated: the shard ends {TAR_BLOCK + size - len(data)} bytes into member {member}")
    try:
        header = tarfile.TarInfo.frombuf(data[:TAR_BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        header = None
    named = len(member.encode()) > 100 or (header is not None and header.name == member)  # longer: pax/GNU names
    if header is None or header.size != size or not named:
        raise Refused(f"unreadable: {shard} changed since it was listed (no header of {member} at byte {offset})")
    return io.BytesIO(data[TAR_BLOCK:])


def _one_line(e: BaseException) -> str:
    """The exception as one line; its type named when it is no I/O error (a bug in a decoder,
    worth telling apart)."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    return text[0] if isinstance(e, (OSError, ValueError, SyntaxError, EOFError)) else f"{type(e).__name__}: {text[0]}"
