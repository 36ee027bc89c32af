"""PNGs people look at: palette masks, overlays with a legend, confusion matrices, contact sheets."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from zeroseg.segment.metrics import IGNORE


# VOC's colour map: class i of every dataset here is drawn in VOC's colour i, so masks open in VOC tools.
def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (256 entries, 768 ints) for ``Image.putpalette``."""
    return list(_voc_palette())


@lru_cache(maxsize=1)
def _voc_palette() -> tuple[int, ...]:
    palette: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):  # interleave the bits of the index into the high bits of r, g, b
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return tuple(palette)


def save_mask(mask: np.ndarray, path: Path) -> None:
    """(H, W) uint8 class ids -> a palette PNG whose pixel values are the ids."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    img.save(path)


def colourise(mask: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 palette colours."""
    return np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)[mask]


def overlay(image: np.ndarray, mask: np.ndarray, names: dict[int, str], alpha: float = 0.55) -> Image.Image:
    """The image with its mask blended over it (background left clear) and, below, a legend of the
    class names present, each on its colour swatch."""
    colours = colourise(mask).astype(np.float32)
    painted = (mask != 0) & (mask != IGNORE)
    blend = image.astype(np.float32)
    blend[painted] = (1 - alpha) * blend[painted] + alpha * colours[painted]
    body = Image.fromarray(blend.round().astype(np.uint8))
    present = [int(c) for c in np.unique(mask) if c != IGNORE]
    return _with_legend(body, [(names.get(c, str(c)), tuple(colourise(np.array([c]))[0])) for c in present])


def _with_legend(body: Image.Image, items: list[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    font = ImageFont.load_default()
    w = max(body.width, 160)
    row, pad = 14, 4
    canvas = Image.new("RGB", (w, body.height + pad + row * len(items) + pad), "white")
    canvas.paste(body, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = body.height + pad
    for name, colour in items:
        draw.rectangle([pad, y + 2, pad + 10, y + 12], fill=colour, outline="black")
        draw.text((pad + 16, y + 1), name, fill="black", font=font)
        y += row
    return canvas


def side_by_side(panels: list[Image.Image], titles: list[str], gap: int = 6) -> Image.Image:
    """Panels in a row, each under its title."""
    top = 16
    h = max(p.height for p in panels) + top
    canvas = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), h), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for p, title in zip(panels, titles):
        draw.text((x + 4, 2), title, fill="black", font=ImageFont.load_default())
        canvas.paste(p, (x, top))
        x += p.width + gap
    return canvas


def save_confusion(counts: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (truth rows, prediction columns) as a PNG."""
    import matplotlib  # a third of a second to import: `segment` draws no matrix

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = counts.sum(1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    k = len(names)
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * k, 2 + 0.42 * k), dpi=100)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for t in range(k):
        for p in range(k):
            if frac[t, p] >= 0.01:
                ax.text(p, t, f"{frac[t, p]:.2f}"[1:] if frac[t, p] < 1 else "1", ha="center", va="center",
                        fontsize=6, color="white" if frac[t, p] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- contact sheet: tiles of views with a crop box or a segment outlined ------------------

TILE = 192  # pixels per image tile
CAPTION = 34  # pixels of text under each tile
COLUMNS = 6
OUTLINE = (0, 255, 255)  # cyan inside a black rim: visible on any object colour
RIM = (0, 0, 0)


def sheet_size(n_tiles: int) -> tuple[int, int]:
    """(width, height) of a contact sheet of n_tiles tiles."""
    cols = min(COLUMNS, n_tiles)
    rows = -(-n_tiles // COLUMNS)
    return cols * TILE, rows * (TILE + CAPTION)


def _tile(view: np.ndarray, box: Sequence[float] | None, mask: np.ndarray | None) -> Image.Image:
    """A TILE x TILE tile of a view with the crop box or the mask's outline drawn on it."""
    tile = Image.fromarray(view).resize((TILE, TILE), Image.BILINEAR)
    if mask is not None:
        m = Image.fromarray(mask.astype(np.uint8) * 255).resize((TILE, TILE), Image.NEAREST)
        m = np.pad(np.asarray(m) > 0, 3)  # outside the image counts as outside the mask
        inner = np.asarray(Image.fromarray(m).filter(ImageFilter.MinFilter(5)))[3:-3, 3:-3]  # eroded 2 px
        rim = np.asarray(Image.fromarray(m).filter(ImageFilter.MaxFilter(3)))[3:-3, 3:-3]  # dilated 1 px
        m = m[3:-3, 3:-3]
        px = np.asarray(tile).copy()
        px[~m] = px[~m] // 2  # dim the rest of the image: the segment stands out
        px[rim & ~inner] = RIM
        px[m & ~inner] = OUTLINE
        tile = Image.fromarray(px)
    if box is not None:
        x0, y0, x1, y1 = (round(v * TILE) for v in box)
        draw = ImageDraw.Draw(tile)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=RIM, width=4)
        draw.rectangle((x0 + 1, y0 + 1, x1 - 2, y1 - 2), outline=OUTLINE, width=2)
    return tile


def _text_tile(text: str, font) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE), (245, 245, 245))
    ImageDraw.Draw(tile).multiline_text((TILE // 2, TILE // 2), f'text:\n"{text}"', fill=(0, 0, 0),
                                        font=font, anchor="mm", align="center")
    return tile


def contact_sheet(
    out: str | Path,
    views: Sequence[np.ndarray],
    captions: Sequence[str],
    boxes: Sequence[Sequence[float] | None] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    text: str | None = None,
) -> Path:
    """A PNG of sheet_size(tiles) tiles, COLUMNS a row: first a tile of `text` when given (captioned
    "query"), then each view (S, S, 3) uint8 with its fractional box (x0, y0, x1, y1) or its
    (h, w) bool mask outlined and its caption (two lines at most) under it."""
    font = ImageFont.load_default(size=12)
    tiles, under = [], []
    if text is not None:
        tiles.append(_text_tile(text, font))
        under.append("query")
    for j, (view, caption) in enumerate(zip(views, captions)):
        tiles.append(_tile(view, boxes[j] if boxes else None, masks[j] if masks else None))
        under.append(caption)
    width, height = sheet_size(len(tiles))
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, caption) in enumerate(zip(tiles, under)):
        x, y = (i % COLUMNS) * TILE, (i // COLUMNS) * (TILE + CAPTION)
        sheet.paste(tile, (x, y))
        draw.multiline_text((x + 4, y + TILE + 3), caption, fill=(0, 0, 0), font=font, spacing=2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
