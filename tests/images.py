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
