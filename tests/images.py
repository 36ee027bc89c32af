"""Image files for the extraction tests: good ones and every kind of bad input the job must
survive (issue: "bad input is data, not a crash")."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_good(folder: Path, n: int, size: int = 40, seed: int = 0, prefix: str = "good") -> list[Path]:
    """n random RGB PNGs, a little wider than tall (so the center crop matters)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height but holds almost nothing: a decompression bomb as far as
    its header goes, cheap to make."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def write_bad_and_odd(folder: Path) -> dict[str, str]:
    """Every awkward input of the issue; returns file name -> expected outcome ("ok" or the
    failure kind written before the colon of images/error)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    expect = {}

    (folder / "zero.jpg").write_bytes(b"")
    expect["zero.jpg"] = "empty"
    Image.fromarray(rgb).save(folder / "full.jpg", quality=90)
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expect["full.jpg"] = "ok"
    expect["truncated.jpg"] = "corrupt"
    (folder / "text.jpg").write_text("this is not an image\n")
    expect["text.jpg"] = "not an image"

    rgba = np.dstack([rgb, np.full((40, 48), 255, np.uint8)])
    rgba[:, :24, 3] = 0  # left half fully transparent: must come out white
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    expect["rgba.png"] = "ok"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    expect["palette.png"] = "ok"
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    expect["gray.png"] = "ok"
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    expect["cmyk.jpg"] = "ok"
    Image.fromarray((rng.integers(0, 65536, (40, 48))).astype(np.uint16)).save(folder / "gray16.png")
    expect["gray16.png"] = "ok"
    Image.fromarray(rgb[:3, :3]).save(folder / "tiny.png")
    expect["tiny.png"] = "too small"
    png_header_only(folder / "bomb.png", 100_000, 100_000)  # over twice PIL's cap: PIL refuses
    expect["bomb.png"] = "too large"
    png_header_only(folder / "big.png", 10_000, 10_000)  # over the cap, under twice: we refuse
    expect["big.png"] = "too large"
    return expect


# ---- real-looking photographs: every way a camera, scanner or editor writes a picture ---------

# The transpose that exif_transpose applies for each EXIF orientation, and its inverse (what the
# camera stored so that the upright picture comes out).
EXIF_UNDO = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
             7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def upright_picture(height: int = 48, width: int = 64) -> np.ndarray:
    """(height, width, 3) uint8: 16-px blocks, each its own colour, so that any flip or turn of
    it is a clearly different picture; flat blocks survive JPEG well."""
    rows, cols = np.mgrid[0:height, 0:width] // 16
    block = rows * (width // 16) + cols
    rng = np.random.default_rng(7)
    palette = rng.permutation(np.linspace(20, 235, block.max() + 1)).astype(np.uint8)
    return np.stack([palette[block], palette[::-1][block], (palette[block] // 2 + 60)], axis=-1).astype(np.uint8)


def save_exif_jpeg(path: Path, upright: np.ndarray, orientation: int) -> None:
    """A JPEG as a phone writes it: the sensor's pixels plus the EXIF orientation tag that turns
    them upright."""
    stored = Image.fromarray(upright)
    if EXIF_UNDO[orientation] is not None:
        stored = stored.transpose(EXIF_UNDO[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, subsampling=0, exif=exif)


def write_photos(folder: Path) -> dict[str, np.ndarray]:
    """Photographs in every format and mode of the issue; file name -> the upright RGB picture
    a viewer shows for it (what its training view must be made of)."""
    folder.mkdir(parents=True, exist_ok=True)
    pic = upright_picture()
    other = 255 - pic  # a second animation frame, far from the first
    expect = {}
    for o in range(1, 9):
        save_exif_jpeg(folder / f"exif{o}.jpg", pic, o)
        expect[f"exif{o}.jpg"] = pic
    Image.fromarray(pic).save(folder / "progressive.jpg", quality=95, subsampling=0, progressive=True)
    expect["progressive.jpg"] = pic
    rgba = np.dstack([pic, np.full(pic.shape[:2], 255, np.uint8)])
    rgba[:, :32, 3] = 0  # left half transparent: a viewer shows white there, not the RGB beneath
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    expect["rgba.png"] = np.where(rgba[..., 3:] == 0, 255, pic).astype(np.uint8)
    Image.fromarray(pic).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expect["cmyk.jpg"] = pic
    grey = pic.mean(axis=-1).astype(np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16.png")  # mode I;16
    expect["grey16.png"] = np.repeat(grey[..., None], 3, axis=-1)
    big = Image.fromarray(pic).resize((4000, 3000), Image.NEAREST)  # a camera's 12 Mpx: draft decoding applies
    big.save(folder / "large.jpg", quality=90)
    expect["large.jpg"] = np.asarray(big.resize((64, 48), Image.BOX))
    Image.fromarray(pic).save(folder / "lossless.webp", lossless=True)
    expect["lossless.webp"] = pic
    Image.fromarray(pic).save(folder / "scan.tif")
    expect["scan.tif"] = pic
    frames = [Image.fromarray(pic), Image.fromarray(other)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expect["anim.gif"] = pic
    frames[0].save(folder / "anim.png", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expect["anim.png"] = pic
    return expect


def tiff_raising_type_error(path: Path) -> None:
    """A TIFF whose StripOffsets tag claims the RATIONAL type: Pillow then seeks to an IFDRational
    and raises TypeError while loading, an exception type no decoder rule lists (found by
    mutating bytes of a PIL-written TIFF)."""
    Image.fromarray(upright_picture()).save(path)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, entry + 2, 5)  # type LONG -> RATIONAL
    path.write_bytes(bytes(data))
