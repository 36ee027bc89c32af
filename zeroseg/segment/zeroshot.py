"""Zero-shot segmentation: segment tokens (or crop embeddings) + class text embeddings -> labels.

PAPER.md: each segment token takes the class of highest cosine similarity; below the background
threshold it is background. The paper's thresholds (0.95 VOC, 0.05 Context, 0.35 COCO) belong to
real CLIP's similarity scale; the toy teacher's scale is its own, so the demo calibrates the
threshold on the *train* split (`calibrate_threshold`) and never looks at the held-out one.
The hard patch-to-group assignment, upsampled (nearest) to the image, is the mask.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import track

from zeroseg.errors import UserError
from zeroseg.geometry import cut_crops, grid_boxes
from zeroseg.segment.metrics import IGNORE, Confusion

PAPER_THRESHOLDS = {"voc": 0.95, "context": 0.05, "coco": 0.35}
BACKGROUND = 0


@dataclass
class Vocabulary:
    """Text embeddings of the classes to find, each mapped to a dataset class id."""

    names: list[str]
    embeddings: torch.Tensor  # (V, D) unit-norm
    class_ids: torch.Tensor  # (V,) long: the label each vocabulary entry paints

    @classmethod
    def build(cls, names: list[str], embeddings: np.ndarray, classes: list[str] | None = None) -> Vocabulary:
        """`classes` are the label names of a dataset (index = mask value); each vocabulary name
        must be one of them. Without `classes`, entry i paints label i + 1 (0 is background)."""
        if classes is None:
            ids = list(range(1, len(names) + 1))
        else:
            missing = [n for n in names if n not in classes]
            if missing:
                raise UserError(f"vocabulary names not among the dataset's classes: {', '.join(missing)}")
            ids = [classes.index(n) for n in names]
        emb = F.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=-1)
        return cls(list(names), emb, torch.tensor(ids, dtype=torch.long))

    def label_names(self) -> dict[int, str]:
        """label id -> name, background included."""
        return {BACKGROUND: "background", **{int(i): n for i, n in zip(self.class_ids, self.names)}}

    def sha256(self) -> str:
        """Of the names and embeddings: a threshold calibrated with them holds for them only."""
        h = hashlib.sha256("\0".join(self.names).encode())
        h.update(self.embeddings.numpy().astype("<f4").tobytes())
        return h.hexdigest()


def classify(embeddings: torch.Tensor, vocab: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """embeddings (..., D) -> (best label (...) long, its cosine similarity (...) float), before
    the background rule."""
    sims = F.normalize(embeddings.float(), dim=-1) @ vocab.embeddings.T  # (..., V)
    score, best = sims.max(-1)
    return vocab.class_ids[best], score


def apply_threshold(labels: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(scores >= threshold, labels, torch.full_like(labels, BACKGROUND))


def paint(assignment: torch.Tensor, token_labels: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """assignment (h, w) long in [0, K) and token_labels (K,) -> (H, W) uint8 label map: each
    patch takes its group's label, upsampled (nearest) to the image size."""
    grid = token_labels[assignment]  # (h, w)
    up = F.interpolate(grid[None, None].float(), size=size, mode="nearest")[0, 0]
    return up.to(torch.uint8).numpy()


def student_input(image: np.ndarray, size: int) -> np.ndarray:
    """The whole image squashed to size x size (bicubic), so every labelled pixel is predicted:
    (H, W, 3) uint8 -> (size, size, 3) uint8. Square images (the scenes) are only resized."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


# ---- the two predictors: the student, and the teacher alone on a grid ----------------------


@dataclass
class Raw:
    """A prediction before the background rule, so one forward pass serves every threshold."""

    labels: np.ndarray  # (H, W) uint8, the best class at each pixel
    scores: np.ndarray  # (H, W) float32, its cosine similarity

    def mask(self, threshold: float) -> np.ndarray:
        return np.where(self.scores >= threshold, self.labels, BACKGROUND).astype(np.uint8)


class StudentPredictor:
    """model.segment on the whole image; each patch gets its segment token's label and score."""

    name = "student"

    def __init__(self, model: torch.nn.Module, vocab: Vocabulary):
        self.model, self.vocab = model.eval(), vocab
        self.size = model.config.image_size

    @torch.inference_mode()
    def raw(self, images: list[np.ndarray]) -> list[Raw]:
        pixels = torch.from_numpy(np.stack([student_input(im, self.size) for im in images]))
        seg = self.model.segment(pixels)  # tokens (B, K, D), assignment (B, h, w)
        labels, scores = classify(seg.tokens, self.vocab)  # (B, K)
        out = []
        for im, a, lab, sc in zip(images, seg.assignment, labels, scores):
            hw = im.shape[:2]
            out.append(Raw(paint(a, lab, hw), _paint_float(a, sc, hw)))
        return out


class GridPredictor:
    """The teacher alone: cut the image into a g x g grid, embed each cell, label each cell by its
    crop embedding. What a user gets from CLIP without a student."""

    name = "grid"

    def __init__(self, teacher, vocab: Vocabulary, grid: int = 4):
        self.teacher, self.vocab, self.grid = teacher, vocab, grid

    @torch.inference_mode()
    def raw(self, images: list[np.ndarray]) -> list[Raw]:
        g, s = self.grid, self.teacher.info.input_size
        view = g * s  # cells cut at the teacher's own resolution
        views = torch.from_numpy(np.stack([student_input(im, view) for im in images]))
        crops = cut_crops(views, grid_boxes([g]), s)  # (B * g * g, 3, s, s)
        labels, scores = classify(self.teacher.encode_images(crops), self.vocab)
        labels, scores = labels.view(len(images), g, g), scores.view(len(images), g, g)
        cells = torch.arange(g * g).view(g, g)
        out = []
        for im, lab, sc in zip(images, labels, scores):
            hw = im.shape[:2]
            out.append(Raw(paint(cells, lab.flatten(), hw), _paint_float(cells, sc.flatten(), hw)))
        return out


def object_crop(image: np.ndarray, where: np.ndarray, size: int, margin: float = 1.2) -> torch.Tensor:
    """The square crop around the pixels `where` (its side `margin` times their box's longer
    side), resized to size: (H, W, 3) uint8 -> (3, size, size) float in [0, 1]."""
    ys, xs = np.nonzero(where)
    h, w = where.shape
    side = min(max(np.ptp(ys), np.ptp(xs)) + 1, max(h, w)) * margin
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    box = tuple(round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    crop = Image.fromarray(image).crop(box).resize((size, size), Image.BICUBIC)  # outside the image: black
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float().div(255)


class TruthSegmentsPredictor:
    """The ceiling of any student of this teacher: the true segments, each labelled by the
    teacher's embedding of a square crop around it. Every pixel of a class in the truth is one
    segment (instances of a class merge); background pixels stay background. It reads the truth,
    so it is a bound to compare with, never a method."""

    name = "ceiling"
    uses_truth = True

    def __init__(self, teacher, vocab: Vocabulary):
        self.teacher, self.vocab = teacher, vocab

    @torch.inference_mode()
    def raw(self, images: list[np.ndarray], truths: list[np.ndarray]) -> list[Raw]:
        s = self.teacher.info.input_size
        out = []
        for image, truth in zip(images, truths):
            ids = [c for c in np.unique(truth).tolist() if c not in (BACKGROUND, IGNORE)]
            labels = np.zeros(truth.shape, np.uint8)
            scores = np.full(truth.shape, -1.0, np.float32)
            if ids:
                crops = torch.stack([object_crop(image, truth == c, s) for c in ids])  # (n, 3, s, s)
                lab, sc = classify(self.teacher.encode_images(crops), self.vocab)
                for c, l, v in zip(ids, lab.tolist(), sc.tolist()):
                    labels[truth == c], scores[truth == c] = l, v
            out.append(Raw(labels, scores))
        return out


def _paint_float(assignment: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    grid = values[assignment][None, None].float()
    return F.interpolate(grid, size=size, mode="nearest")[0, 0].numpy()


def predict_dataset(predictor, dataset, batch: int = 16, progress: bool = True) -> Iterable[tuple[int, np.ndarray, Raw]]:
    """Yield (index, truth mask, raw prediction) over a LabelledDataset, in batches."""
    for start in track(range(0, len(dataset), batch), description=f"{predictor.name} on {dataset.name}", disable=not progress):
        items = [dataset.load(i) for i in range(start, min(start + batch, len(dataset)))]
        images, truths = [im for im, _ in items], [t for _, t in items]
        raws = predictor.raw(images, truths) if getattr(predictor, "uses_truth", False) else predictor.raw(images)
        for k, ((_, truth), raw) in enumerate(zip(items, raws)):
            yield start + k, truth, raw


def calibrate_threshold(
    predictor, dataset, n_classes: int, candidates: np.ndarray | None = None, progress: bool = True
) -> tuple[float, float]:
    """The background threshold that maximises mIoU on `dataset` (use a train split): returns
    (threshold, its mIoU). One forward pass; every candidate is scored on the same predictions."""
    raws = [(truth, raw) for _, truth, raw in predict_dataset(predictor, dataset, progress=progress)]
    if candidates is None:  # quantiles of the scores seen: the scale is the teacher's own
        scores = np.concatenate([raw.scores.ravel()[::97] for _, raw in raws])
        candidates = np.unique(np.quantile(scores, np.linspace(0.0, 0.95, 39)).round(4))
    best = (float(candidates[0]), -1.0)
    for t in candidates:
        conf = Confusion(n_classes)
        for truth, raw in raws:
            conf.add(truth, raw.mask(float(t)))
        if conf.miou() > best[1]:
            best = (float(t), conf.miou())
    return best

