"""The geometry of a training view (PAPER.md: center crop, no augmentation): the view itself,
the grid boxes and levels, the crops cut from it, and which student patches lie in each box. At the bottom of the house: every room imports it, it
imports nothing of zeroseg.

An image is decoded once into the training view (resize the shorter side, center crop); the grid
crops are cut from that tensor, so every crop box is exact in view pixels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def training_view(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic), center crop -> (size, size, 3) uint8 RGB."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def grid_boxes(grids: Sequence[int]) -> np.ndarray:
    """(C, 4) fractional x0, y0, x1, y1 of every cell of every g x g grid, grid by grid, row-major."""
    boxes = []
    for g in grids:
        for row in range(g):
            for col in range(g):
                boxes.append((col / g, row / g, (col + 1) / g, (row + 1) / g))
    return np.asarray(boxes, dtype=np.float32)


def box_pixels(boxes: np.ndarray, size: int) -> np.ndarray:
    """Fractional (C, 4) boxes -> integer pixel bounds in a size x size view; neighbouring cells
    share their edges, so the cells of a grid tile the view exactly."""
    return np.rint(boxes * size).astype(np.int64)


def cut_crops(views: torch.Tensor, boxes: np.ndarray, out_size: int) -> torch.Tensor:
    """views (B, S, S, 3) uint8 -> crops (B * C, 3, out, out) float in [0, 1], image-major
    (image 0's C crops, then image 1's ...), each resized with antialiasing."""
    b, s = views.shape[0], views.shape[1]
    # contiguous: the antialiased resize of a channels-first cell is ~30% faster than of a
    # channels-last one, and its results are the same bit for bit
    x = views.permute(0, 3, 1, 2).contiguous().float().div_(255)  # (B, 3, S, S)
    crops = []
    for x0, y0, x1, y1 in box_pixels(boxes, s):
        cell = x[:, :, y0:y1, x0:x1]
        crops.append(F.interpolate(cell, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False))
    return torch.stack(crops, dim=1).reshape(b * len(boxes), 3, out_size, out_size)


def grid_levels(grids) -> list[tuple[int, slice]]:
    """(g, slice of the crop axis) for each grid level."""
    out, start = [], 0
    for g in grids:
        out.append((g, slice(start, start + g * g)))
        start += g * g
    return out


def box_membership(boxes: np.ndarray, grid: int) -> torch.Tensor:
    """(C, 4) fractional boxes -> (C, grid*grid) float, 1 where the patch's centre is in the box."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    cy, cx = (c.reshape(-1) for c in torch.meshgrid(centres, centres, indexing="ij"))  # (N,) each
    b = torch.as_tensor(boxes, dtype=torch.float32)[:, :, None]  # (C, 4, 1)
    return ((cx >= b[:, 0]) & (cx < b[:, 2]) & (cy >= b[:, 1]) & (cy < b[:, 3])).float()
