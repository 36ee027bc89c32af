"""`zeroseg segment` and `zeroseg eval`: a student checkpoint + a cached vocabulary -> masks, mIoU.

The vocabulary comes from the feature store (text/<vocab>), so no teacher is loaded, except by
the grid baseline, which is the teacher alone. A checkpoint trained on one teacher's features is
refused with a vocabulary embedded by another: the two would live in different spaces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zeroseg.decode import open_image
from zeroseg.errors import UserError
from zeroseg.segment import render
from zeroseg.segment.datasets import LabelledDataset, load_dataset
from zeroseg.segment.metrics import Confusion
from zeroseg.segment.zeroshot import (
    PAPER_THRESHOLDS,
    GridPredictor,
    StudentPredictor,
    TruthSegmentsPredictor,
    Vocabulary,
    calibrate_threshold,
    predict_dataset,
)
from zeroseg.stores.features import FeatureStore, StoreError

DEFAULT_THRESHOLD = PAPER_THRESHOLDS["voc"]


def load_vocabulary(store_url: str, vocab: str, classes: list[str] | None = None) -> tuple[FeatureStore, Vocabulary]:
    store = FeatureStore.open(store_url)
    names, emb = store.read_text(vocab)  # refuses text of another teacher than the store's
    return store, Vocabulary.build(names, emb, classes)


def load_checked_student(checkpoint: str | Path, store: FeatureStore):
    """The student, refused unless it was trained on features of the store's teacher."""
    from zeroseg.trainer.checkpoint import load_student

    model, _, meta = load_student(Path(checkpoint))
    trained_on = meta.get("store", {}).get("teacher", {})
    have = store.config.teacher
    if trained_on.get("sha256") != have.sha256:
        raise StoreError(
            f"{checkpoint} was trained on features of {trained_on.get('arch')}/{trained_on.get('pretrained')} "
            f"({str(trained_on.get('sha256'))[:12]}), the vocabulary in {store.url} is from "
            f"{have.arch}/{have.pretrained} ({have.sha256[:12]})"
        )
    return model


def store_teacher(store: FeatureStore):
    """The store's own teacher, rebuilt from its attributes (for the grid baseline)."""
    from zeroseg.pipeline.teacher import load_teacher

    info = store.config.teacher
    if info.pretrained.startswith("random:"):
        return load_teacher(info.arch, "random", seed=int(info.pretrained.split(":", 1)[1]))
    teacher = load_teacher(info.arch, info.pretrained)
    if teacher.info.sha256 != info.sha256:
        raise StoreError(f"{info.arch} weights {info.pretrained} no longer hash to the store's {info.sha256[:12]}")
    return teacher


# ---- segment ---------------------------------------------------------------------------------


def segment_images(
    checkpoint: str | Path, images: list[Path], store_url: str, vocab: str, threshold: float, out: Path
) -> list[tuple[Path, Path]]:
    """Write <stem>_mask.png (palette, pixel = label: 0 background, i = vocabulary entry i-1) and
    <stem>_overlay.png (with a legend) for each image; return the (mask, overlay) paths."""
    store, vocabulary = load_vocabulary(store_url, vocab)
    predictor = StudentPredictor(load_checked_student(checkpoint, store), vocabulary)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        image = np.asarray(open_image(str(path)))  # upright, as the user sees it; UserError if unreadable
        mask = predictor.raw([image])[0].mask(threshold)
        mask_path, overlay_path = out / f"{path.stem}_mask.png", out / f"{path.stem}_overlay.png"
        render.save_mask(mask, mask_path)
        render.overlay(image, mask, vocabulary.label_names()).save(overlay_path)
        written.append((mask_path, overlay_path))
    return written


# ---- eval ------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    method: str
    dataset: str
    classes: list[str]
    threshold: float
    confusion: Confusion

    def to_dict(self) -> dict:
        iou = self.confusion.iou()
        return {
            "method": self.method,
            "dataset": self.dataset,
            "bg_threshold": self.threshold,
            "n_pixels": int(self.confusion.counts.sum()),
            "miou": _num(self.confusion.miou()),
            "pixel_accuracy": _num(self.confusion.pixel_accuracy()),
            "iou": {name: _num(v) for name, v in zip(self.classes, iou)},
        }


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)


def evaluate(predictor, dataset: LabelledDataset, threshold: float, progress: bool = True) -> EvalResult:
    conf = Confusion(len(dataset.classes))
    for _, truth, raw in predict_dataset(predictor, dataset, progress=progress):
        conf.add(truth, raw.mask(threshold))
    return EvalResult(predictor.name, dataset.name, dataset.classes, threshold, conf)


def make_predictor(method: str, checkpoint: str | Path | None, store: FeatureStore, vocabulary: Vocabulary):
    if method == "student":
        return StudentPredictor(load_checked_student(checkpoint, store), vocabulary)
    if method == "grid":
        return GridPredictor(store_teacher(store), vocabulary)
    if method == "ceiling":
        return TruthSegmentsPredictor(store_teacher(store), vocabulary)
    raise UserError(f"unknown method {method!r}: student | grid | ceiling")


def run_eval(
    checkpoint: str | Path | None,
    dataset_path: str | Path,
    store_url: str,
    vocab: str,
    out: Path,
    threshold: float | None = None,
    calibrate_on: str | Path | None = None,
    method: str = "student",
    split: str = "val",
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate one method on a labelled dataset; write out/eval_<method>.json and
    out/confusion_<method>.png; return the JSON dict. The background threshold is `threshold`,
    or calibrated on `calibrate_on` (a train split), or the paper's VOC value."""
    dataset = load_dataset(dataset_path, split).subset(limit)
    store, vocabulary = load_vocabulary(store_url, vocab, dataset.classes)
    predictor = make_predictor(method, checkpoint, store, vocabulary)
    calibration = None
    if threshold is None and calibrate_on is not None:
        train = load_dataset(calibrate_on, "train").subset(limit)
        if train.classes != dataset.classes:
            raise UserError(f"{calibrate_on} has other classes than {dataset_path}")
        threshold, train_miou = calibrate_threshold(predictor, train, len(train.classes), progress=progress)
        calibration = {"dataset": str(calibrate_on), "n_images": len(train), "miou": round(train_miou, 4)}
    if threshold is None:
        threshold = DEFAULT_THRESHOLD
    result = evaluate(predictor, dataset, threshold, progress=progress)
    report = {
        **result.to_dict(),
        "n_images": len(dataset),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "store": store_url,
        "vocab": vocab,
        "calibration": calibration,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval_{method}.json").write_text(json.dumps(report, indent=2) + "\n")
    render.save_confusion(
        result.confusion.counts, dataset.classes, out / f"confusion_{method}.png",
        f"{method} on {dataset.name}: mIoU {report['miou']}",
    )
    return report
