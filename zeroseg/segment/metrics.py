"""Semantic segmentation metrics: a confusion matrix accumulated over images, per-class IoU, mIoU.

Conventions (those of PASCAL VOC's evaluation):
- pixels whose ground truth is IGNORE (255) count for nothing;
- background (class 0) is a class like the others and is in the mean;
- a class absent from both the ground truth and the predictions of the whole evaluated set has
  no IoU (NaN) and is left out of the mean; a class absent from the ground truth but predicted
  somewhere has IoU 0 and counts (its false positives are real errors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = 255


@dataclass
class Confusion:
    """counts[t, p]: pixels of true class t predicted as p, over all images added so far."""

    n_classes: int

    def __post_init__(self) -> None:
        self.counts = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)

    def add(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """truth, pred: (H, W) integer class maps of one image (truth may hold IGNORE)."""
        if truth.shape != pred.shape:
            raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
        keep = truth != IGNORE
        t = truth[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        if t.size and (t.max() >= self.n_classes or p.max() >= self.n_classes or min(t.min(), p.min()) < 0):
            raise ValueError(f"class ids outside 0..{self.n_classes - 1} (ignore is {IGNORE})")
        self.counts += np.bincount(t * self.n_classes + p, minlength=self.n_classes**2).reshape(
            self.n_classes, self.n_classes
        )

    def iou(self) -> np.ndarray:
        """(K,) IoU per class; NaN for a class neither in the truth nor predicted."""
        tp = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(0) + self.counts.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else float("nan")
