"""A small feature store made in-process, for the trainer's tests and benchmarks: random blocky
images, real features from the given teacher on the same grid crops the extractor cuts. Real
stores come from `zeroseg extract` (the Ray job); this needs no Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from zeroseg.geometry import cut_crops
from zeroseg.pipeline.teacher import Teacher
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status, StoreConfig


def blocky_views(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8: a few flat-coloured rectangles on a coloured ground, so that
    crops differ from each other and a student has something to group."""
    views = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        views[i] = rng.integers(0, 256, size=3)
        for _ in range(3):
            x0, y0 = rng.integers(0, size - size // 4, size=2)
            w, h = rng.integers(size // 4, size // 2 + 1, size=2)
            views[i, y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, size=3)
    return views


def synthetic_store(
    url: str, teacher: Teacher, n_images: int, grids: Sequence[int] = (1, 2, 3, 4), view_size: int = 32,
    chunk_images: int = 8, pixels: bool = True, image_dir: Path | None = None, failed: Sequence[int] = (),
    seed: int = 0, batch: int = 256,
) -> FeatureStore:
    """A complete store of n_images. Without `pixels`, the views are saved as PNGs in image_dir and
    the store holds their paths (the trainer then decodes them). Images in `failed` are marked
    failed, with zero features, as the extractor marks an undecodable image."""
    config = StoreConfig(teacher=teacher.info, grids=tuple(grids), view_size=view_size, chunk_images=chunk_images, pixels=pixels)
    views = blocky_views(np.random.default_rng(seed), n_images, view_size)
    if pixels:
        paths = [f"synthetic/{i:06d}.png" for i in range(n_images)]
    else:
        image_dir.mkdir(parents=True, exist_ok=True)
        paths = [str(image_dir / f"{i:06d}.png") for i in range(n_images)]
        for view, path in zip(views, paths):
            Image.fromarray(view).save(path)
    store = FeatureStore.create(url, config, paths, extract={"synthetic": True, "seed": seed})
    boxes = store.boxes
    for chunk in range(store.n_chunks):
        sl = store.chunk_slice(chunk)
        v = torch.from_numpy(views[sl])
        crops = cut_crops(v, boxes, teacher.info.input_size)  # (n*C, 3, s, s)
        feats = teacher.embed_batches(crops, batch).reshape(len(v), len(boxes), -1)
        status = np.array([Status.FAILED if i in failed else Status.OK for i in range(sl.start, sl.stop)])
        feats[status == Status.FAILED] = 0
        errors = ["synthetic failure" if s == Status.FAILED else "" for s in status]
        store.write_chunk(chunk, feats, status, errors, np.full((len(v), 2), view_size), views[sl] if pixels else None)
    return store
