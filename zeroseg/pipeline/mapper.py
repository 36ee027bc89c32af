"""Decoded training views -> grid crops -> teacher embeddings: one chunk's arrays, no I/O."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from zeroseg.decode import Decoded
from zeroseg.geometry import cut_crops
from zeroseg.pipeline.teacher import Teacher
from zeroseg.stores.schema import Status


@dataclass
class ChunkArrays:
    features: np.ndarray  # (n, C, D) float16, zeros for failed images
    status: np.ndarray  # (n,) uint8 Status
    errors: list[str]  # (n,) "" for ok images
    sizes: np.ndarray  # (n, 2) int32 original height, width
    views: np.ndarray  # (n, S, S, 3) uint8, zeros for failed images
    waited_s: float = 0.0  # time spent waiting for the next decoded image
    seconds: float = 0.0  # the whole chunk, waiting included


def images_per_batch(batch: int, n_crops: int) -> int:
    return max(1, batch // n_crops)


def embed_chunk(
    teacher: Teacher,
    decoded: Iterable[Decoded],
    n_images: int,
    view_size: int,
    batch: int,
    boxes: np.ndarray,
    precision: str = "fp32",
) -> ChunkArrays:
    """The `n_images` decoded views of one chunk, each with its grid crops embedded `batch` crops
    at a time (whole images per batch, so a batch never spans chunks), the teacher at `precision`.
    Times how long it waited on `decoded` (the decoder running behind the teacher)."""
    start = time.perf_counter()
    n, c, s = n_images, len(boxes), view_size
    out = ChunkArrays(
        features=np.zeros((n, c, teacher.info.embed_dim), np.float16),
        status=np.full(n, Status.FAILED, np.uint8),
        errors=[""] * n,
        sizes=np.zeros((n, 2), np.int32),
        views=np.zeros((n, s, s, 3), np.uint8),
    )
    group: list[int] = []  # indices of ok images waiting for the teacher
    per_batch = images_per_batch(batch, c)
    waited = 0.0
    items = iter(decoded)
    for i in range(n):
        t = time.perf_counter()
        d = next(items)
        waited += time.perf_counter() - t
        out.sizes[i] = d.size
        if d.view is None:
            out.errors[i] = d.error
            continue
        out.views[i], out.status[i] = d.view, Status.OK
        group.append(i)
        if len(group) == per_batch:
            _embed_group(teacher, out, group, boxes, precision)
            group = []
    if group:
        _embed_group(teacher, out, group, boxes, precision)
    out.waited_s, out.seconds = waited, time.perf_counter() - start
    return out


def _embed_group(teacher: Teacher, out: ChunkArrays, rows: list[int], boxes: np.ndarray, precision: str) -> None:
    views = torch.from_numpy(out.views[rows])  # (G, S, S, 3) uint8: crops are cut where the teacher runs
    if teacher.device.type == "cuda":  # page-locked, so the copy overlaps the GPU's work
        views = views.pin_memory().to(teacher.device, non_blocking=True)
    crops = cut_crops(views, boxes, teacher.info.input_size)  # (G*C, 3, in, in), image-major
    emb = teacher.encode_images(crops, precision).cpu().numpy()  # (G*C, D)
    out.features[rows] = emb.reshape(len(rows), len(boxes), -1).astype(np.float16)
