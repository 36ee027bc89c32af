"""Synthetic scenes: the project's offline data, with exact per-pixel masks.

Each scene is a textured background ("grass", "sand", ...) with 1..4 coloured shapes on it
(class = colour x shape), a caption naming them, and a mask of class ids. Everything is drawn
with hard edges, so the mask is exact and never needs an ignore band; 255 stays reserved as
"ignore" in the palette for other datasets. The class names (SCENE_CLASSES) and the manifest
reader live in segment/datasets.py, where evaluation reads these folders.

Every image is a pure function of (seed, split, index): `generate_scenes` seeds image i with
``SeedSequence([seed, split_id, i])``, so image i is the same whatever n is, and the train and
heldout splits draw from different streams. All drawing is vectorised numpy (no per-pixel loops).
"""

from __future__ import annotations

import json
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import track

from zeroseg.errors import UserError
from zeroseg.outputs import claim_output_dir, write_atomic
from zeroseg.segment.datasets import SCENE_CLASSES
from zeroseg.segment.render import voc_palette

# Saturated, well separated hues, one for each colour the classes name. The backgrounds below are
# all muted (low saturation), so an object's colour is never confusable with the ground it stands on.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 190, 60),
    "blue": (35, 75, 220),
    "yellow": (240, 210, 30),
}

#: Background texture kinds, named in captions ("... on grass").
BACKGROUNDS: tuple[str, ...] = ("grass", "sand", "water", "stone", "wood")

SPLITS: dict[str, int] = {"train": 0, "heldout": 1}

# An object drawn but left with less than this fraction of its own area visible (occluded by
# later objects) is erased from the scene, so captions never name an object one cannot see.
_MIN_VISIBLE_FRACTION = 0.25


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The nominal RGB colour of an object class (1..len(SCENE_CLASSES)-1)."""
    if not 1 <= class_id < len(SCENE_CLASSES):
        raise ValueError(f"class id {class_id} is not an object class (1..{len(SCENE_CLASSES) - 1})")
    return COLOURS[SCENE_CLASSES[class_id].split(" ")[0]]


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8 class ids
    caption: str
    # One dict per visible object, in drawing order (back to front):
    # {"class": name, "class_id": int, "bbox": [x0, y0, x1, y1] (visible pixels, x1/y1
    # exclusive), "area": visible pixel count}
    objects: list[dict[str, Any]] = field(default_factory=list)
    background: str = ""


# ---------------------------------------------------------------------------------------------
# Backgrounds


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx) in pixels, shared read-only by every drawing call."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _value_noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random (cells_y+1, cells_x+1) lattice, smoothstep-interpolated."""
    lattice = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32)
    ty = np.linspace(0, cells_y, size, endpoint=False, dtype=np.float32)
    tx = np.linspace(0, cells_x, size, endpoint=False, dtype=np.float32)
    iy, ix = ty.astype(int), tx.astype(int)
    fy, fx = ty - iy, tx - ix
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep: no lattice creases
    # Separable: interpolate the lattice rows along x, then those rows along y.
    rows = lattice[:, ix] + (lattice[:, ix + 1] - lattice[:, ix]) * fx
    return rows[iy] + (rows[iy + 1] - rows[iy]) * fy[:, None]


def _fbm(rng: np.random.Generator, size: int, cells: tuple[int, ...]) -> np.ndarray:
    """Sum of noise octaves (coarse to fine, halving amplitude), rescaled to [0, 1]."""
    total = np.zeros((size, size), dtype=np.float32)
    amplitude = 1.0
    for n in cells:
        total += amplitude * _value_noise(rng, size, n, n)
        amplitude *= 0.5
    lo, hi = total.min(), total.max()
    return (total - lo) / max(hi - lo, 1e-9)


def _render_background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A muted procedural texture of the given kind, (size, size, 3) float in 0..255."""
    yy, xx = (g / size for g in _grid(size))
    if kind == "grass":
        # Vertical blades: fine across x, coarse along y, over a blotchy base.
        blades = _value_noise(rng, size, 3, size // 3)
        t = 0.55 * blades + 0.45 * _fbm(rng, size, (4, 8))
        base, contrast = np.array([80.0, 105.0, 55.0]), 0.55
    elif kind == "sand":
        # Soft dunes plus per-pixel grain.
        dunes = 0.5 + 0.5 * np.sin(2 * np.pi * (3 * yy + 0.8 * _fbm(rng, size, (3, 6))))
        t = 0.45 * dunes + 0.55 * rng.random((size, size), dtype=np.float32)
        base, contrast = np.array([188.0, 172.0, 140.0]), 0.25
    elif kind == "water":
        # Wobbly horizontal ripples.
        phase = 2 * np.pi * (rng.uniform(6, 12) * yy + 1.5 * _fbm(rng, size, (3, 6)))
        t = 0.7 * (0.5 + 0.5 * np.sin(phase)) + 0.3 * _fbm(rng, size, (8, 16))
        base, contrast = np.array([70.0, 100.0, 112.0]), 0.45
    elif kind == "stone":
        # Blotches with fine speckle.
        t = 0.8 * _fbm(rng, size, (4, 8, 16, 32)) + 0.2 * rng.random((size, size), dtype=np.float32)
        base, contrast = np.array([125.0, 122.0, 118.0]), 0.6
    elif kind == "wood":
        # Grain: stripes across one axis, bent by noise.
        along = xx if rng.random() < 0.5 else yy
        phase = 2 * np.pi * (rng.uniform(8, 16) * along + 1.2 * _fbm(rng, size, (2, 4)))
        t = 0.75 * (0.5 + 0.5 * np.sin(phase)) + 0.25 * rng.random((size, size), dtype=np.float32)
        base, contrast = np.array([120.0, 85.0, 55.0]), 0.5
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {', '.join(BACKGROUNDS)}")
    # A per-scene tint, small enough to stay muted.
    base = (base + rng.uniform(-10, 10, 3)).astype(np.float32)
    return base * (1.0 + contrast * (t[..., None] - 0.5))


# ---------------------------------------------------------------------------------------------
# Objects


@dataclass
class _Shape:
    class_id: int
    cover: np.ndarray  # (H, W) bool, the full shape before occlusion


def _shape_cover(
    shape: str, cx: float, cy: float, s: float, angle: float, size: int
) -> np.ndarray:
    """Boolean coverage of a shape of nominal size s (pixels) centred at (cx, cy), rotated."""
    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= (s / 2) ** 2
    if shape == "square":
        cos, sin = np.cos(angle), np.sin(angle)
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        return (np.abs(u) <= s / 2) & (np.abs(v) <= s / 2)
    if shape == "triangle":
        # Equilateral, circumradius 0.7 s (side ~1.2 s, area ~0.64 s^2, between the circle's
        # and the square's): inside = on the same side of all three edges.
        r = 0.7 * s
        a = angle + 2 * np.pi * np.arange(3) / 3
        vx, vy = cx + r * np.cos(a), cy + r * np.sin(a)
        sides = []
        for k in range(3):
            ex, ey = vx[(k + 1) % 3] - vx[k], vy[(k + 1) % 3] - vy[k]
            sides.append(ex * (yy - vy[k]) - ey * (xx - vx[k]))
        d = np.stack(sides)
        return np.all(d >= 0, axis=0) | np.all(d <= 0, axis=0)
    raise ValueError(f"unknown shape {shape!r}")


def _circumradius(shape: str, s: float) -> float:
    return {"circle": 0.5, "square": 0.5 * np.sqrt(2), "triangle": 0.7}[shape] * s


def _random_shape(
    rng: np.random.Generator, class_id: int, size: int, s: float, centre_jitter: float = 1.0
) -> _Shape:
    """Place a shape of nominal size s wholly inside the frame (centre_jitter < 1 keeps it
    nearer the middle)."""
    shape = SCENE_CLASSES[class_id].split(" ")[1]
    r = _circumradius(shape, s)
    half = size / 2
    room = max(half - r, 0.0) * centre_jitter
    cx, cy = half + rng.uniform(-room, room, 2)
    angle = rng.uniform(0, 2 * np.pi)
    return _Shape(class_id, _shape_cover(shape, cx, cy, s, angle, size))


def _paint(rng: np.random.Generator, canvas: np.ndarray, shape: _Shape) -> None:
    """Paint a shape's class colour with a gentle linear shading and a little noise, so it is
    not trivially flat but stays clearly its class colour."""
    ys, xs = np.nonzero(shape.cover)  # only the covered pixels: cheaper than the whole frame
    # A light gradient across the object itself (about +-12% edge to edge, mean 1), so the
    # object's mean colour stays its class colour wherever it stands; then a little noise.
    theta = rng.uniform(0, 2 * np.pi)
    u = np.cos(theta) * (xs - xs.mean()) + np.sin(theta) * (ys - ys.mean())
    light = 1.0 + 0.12 * u / max(np.abs(u).max(), 1.0)
    light += rng.normal(0.0, 0.03, light.shape)
    colour = np.asarray(class_colour(shape.class_id), dtype=float)
    canvas[ys, xs] = colour * light[:, None]


# ---------------------------------------------------------------------------------------------
# Scenes


def _caption(names: list[str], background: str) -> str:
    items = [f"a {n}" for n in names]  # all colour names start with a consonant
    if len(items) == 1:
        listed = items[0]
    else:
        listed = ", ".join(items[:-1]) + " and " + items[-1]
    return f"{listed} on {background}"


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, size: int) -> Scene:
    """One scene: a background, 1..4 objects of distinct classes (15%..50% of the side), later
    objects occluding earlier ones; objects left mostly hidden are removed altogether."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    canvas = _render_background(rng, background, size)
    n = int(rng.integers(1, 5))
    class_ids = rng.choice(np.arange(1, len(SCENE_CLASSES)), size=n, replace=False)
    shapes = [
        _random_shape(rng, int(c), size, rng.uniform(0.15, 0.5) * size) for c in class_ids
    ]

    # Which shape owns each pixel (the last one drawn there), then drop the mostly hidden ones.
    # Dropping a shape only uncovers shapes behind it, so one pass is enough.
    owner = np.full((size, size), -1)
    for k, sh in enumerate(shapes):
        owner[sh.cover] = k
    keep = [
        sh
        for k, sh in enumerate(shapes)
        if (owner == k).sum() >= _MIN_VISIBLE_FRACTION * max(int(sh.cover.sum()), 1)
    ]

    mask = np.zeros((size, size), dtype=np.uint8)
    objects: list[dict[str, Any]] = []
    for sh in keep:
        _paint(rng, canvas, sh)
        mask[sh.cover] = sh.class_id
    for sh in keep:
        visible = mask == sh.class_id  # classes are distinct within a scene
        ys, xs = np.nonzero(visible)
        objects.append(
            {
                "class": SCENE_CLASSES[sh.class_id],
                "class_id": sh.class_id,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "area": int(visible.sum()),
            }
        )
    caption = _caption([o["class"] for o in objects], background)
    return Scene(_to_uint8(canvas), mask, caption, objects, background)


def render_object(
    rng: np.random.Generator, class_id: int, size: int, background: str | None = None
) -> np.ndarray:
    """A single object of class_id (55%..85% of the side, as far as it fits, near the centre) on a random (or the
    named) background: the toy teacher's "a photo of a red circle." images. class_id 0 gives the
    bare background. Returns (size, size, 3) uint8."""
    if not 0 <= class_id < len(SCENE_CLASSES):
        raise ValueError(f"class id {class_id} out of range 0..{len(SCENE_CLASSES) - 1}")
    kind = background if background is not None else BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    canvas = _render_background(rng, kind, size)
    if class_id:
        shape = SCENE_CLASSES[class_id].split(" ")[1]
        # Large, but kept inside the frame: a clipped corner would blur the shape cue.
        s = min(rng.uniform(0.55, 0.85) * size, 0.48 * size / _circumradius(shape, 1.0))
        _paint(rng, canvas, _random_shape(rng, class_id, size, s, centre_jitter=0.5))
    return _to_uint8(canvas)


# ---------------------------------------------------------------------------------------------
# Datasets on disk


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for image `index` of `split`: independent of how many images are made."""
    _check_split(split)
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))


def _save_mask(mask: np.ndarray, path: Path) -> None:
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    img.putpalette(voc_palette())
    img.save(path, compress_level=1)


def generate_scenes(
    out: Path,
    n: int,
    split: str = "train",
    seed: int = 0,
    size: int = 224,
    progress: bool = True,
) -> Path:
    """Write n scenes of `split` into out/images, out/masks (VOC palette PNGs) and
    out/manifest.jsonl; return the manifest path. One split per folder: a scenes folder of
    zeroseg's is regenerated, any other non-empty folder refused (outputs.claim_output_dir)."""
    _check_split(split)
    if n < 0 or size < 16:
        raise UserError(f"need n >= 0 and size >= 16, got n={n}, size={size}")
    out = Path(out)
    claim_output_dir(out, "scenes")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for i in track(range(n), description=f"scenes ({split})", disable=not progress):
        scene = render_scene(scene_rng(seed, split, i), size)
        image_rel, mask_rel = f"images/{split}_{i:06d}.png", f"masks/{split}_{i:06d}.png"
        # Level 1: noisy textures barely compress further, and level 6 is 4x slower.
        Image.fromarray(scene.image).save(out / image_rel, compress_level=1)
        _save_mask(scene.mask, out / mask_rel)
        record = {
            "image": image_rel,
            "mask": mask_rel,
            "caption": scene.caption,
            "objects": scene.objects,
            "background": scene.background,
            "split": split,
            "index": i,
        }
        lines.append(json.dumps(record))
    # Manifest last, and atomically: a folder with a manifest has all the files it names.
    return write_atomic(out / "manifest.jsonl", "".join(line + "\n" for line in lines))

