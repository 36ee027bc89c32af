"""Labelled datasets for evaluation: the synthetic scenes' split folders and VOC-style folders.

A dataset is a list of (image path, mask path) pairs plus its class names (index = mask value,
0 = background, 255 = ignore). Masks are palette PNGs whose pixel values are the class ids.

- Synthetic: a folder written by `zeroseg scenes` (or its manifest.jsonl).
- VOC-style: a folder with JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/<split>.txt
  (PASCAL VOC 2012's own layout, so `eval` runs on the real thing where a user has it). Without
  ImageSets, every mask in SegmentationClass/ with an image beside it is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zeroseg.decode import open_image
from zeroseg.errors import UserError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

#: The synthetic scenes' classes (zeroseg.experiments.scenes draws them); the index is the mask
#: value: 0 is background, then colour x shape.
SCENE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SCENE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SCENE_CLASSES: tuple[str, ...] = ("background",) + tuple(f"{c} {s}" for c in SCENE_COLOURS for s in SCENE_SHAPES)


@dataclass
class LabelledDataset:
    name: str
    classes: list[str]
    images: list[Path]
    masks: list[Path]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image i: (H, W, 3) uint8 RGB, upright (decoded as the extractor decodes), and its (H, W)
        uint8 class-id mask (a label map, read as stored)."""
        image = np.asarray(open_image(str(self.images[i])))
        try:
            mask = Image.open(self.masks[i])
        except OSError as e:
            raise UserError(f"cannot read the mask {self.masks[i]}: {e}")
        if mask.mode not in ("P", "L"):
            raise UserError(f"{self.masks[i]} is a {mask.mode} image, not a class-id (palette or grey) mask")
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise UserError(f"{self.masks[i]} is {mask.shape}, its image {image.shape[:2]}")
        return image, mask

    def subset(self, n: int | None) -> LabelledDataset:
        if n is None:
            return self
        return LabelledDataset(self.name, self.classes, self.images[:n], self.masks[:n])


def load_dataset(path: str | Path, split: str = "val") -> LabelledDataset:
    """A synthetic scenes folder/manifest or a VOC-style folder, whichever `path` is."""
    path = Path(path)
    if path.name == "manifest.jsonl" or (path / "manifest.jsonl").is_file():
        return synthetic_dataset(path)
    if (path / "SegmentationClass").is_dir():
        return voc_dataset(path, split)
    raise UserError(
        f"{path} is neither a scenes folder (manifest.jsonl) nor a VOC-style folder (SegmentationClass/)"
    )


def read_scenes_manifest(path: Path | str) -> list[dict[str, Any]]:
    """Read a scenes manifest.jsonl; "image" and "mask" come back as absolute path strings."""
    path = Path(path)
    root = path.resolve().parent
    records = []
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            for key in ("image", "mask"):
                if key in rec:
                    rec[key] = str((root / rec[key]).resolve())
            records.append(rec)
    return records


def synthetic_dataset(path: Path) -> LabelledDataset:
    manifest = path if path.name == "manifest.jsonl" else path / "manifest.jsonl"
    records = read_scenes_manifest(manifest)
    if not records:
        raise UserError(f"{manifest} lists no images")
    splits = sorted({r["split"] for r in records})
    return LabelledDataset(
        name=f"scenes:{'+'.join(splits)}",
        classes=list(SCENE_CLASSES),
        images=[Path(r["image"]) for r in records],
        masks=[Path(r["mask"]) for r in records],
    )


def voc_dataset(root: Path, split: str = "val") -> LabelledDataset:
    masks_dir, images_dir = root / "SegmentationClass", root / "JPEGImages"
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if listing.is_file():
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    elif (root / "ImageSets" / "Segmentation").is_dir():
        have = sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt"))
        raise UserError(f"{root}: no split {split!r} in ImageSets/Segmentation (has: {', '.join(have) or 'none'})")
    else:
        ids = sorted(p.stem for p in masks_dir.glob("*.png"))
    images, masks = [], []
    for stem in ids:
        mask = masks_dir / f"{stem}.png"
        image = next((images_dir / f"{stem}{ext}" for ext in (".jpg", ".jpeg", ".png") if (images_dir / f"{stem}{ext}").is_file()), None)
        if image is None or not mask.is_file():
            raise UserError(f"{root}: {stem} lacks its image in JPEGImages/ or its mask in SegmentationClass/")
        images.append(image)
        masks.append(mask)
    if not images:
        raise UserError(f"{root}: no labelled images")
    return LabelledDataset(name=f"voc:{split}", classes=list(VOC_CLASSES), images=images, masks=masks)
