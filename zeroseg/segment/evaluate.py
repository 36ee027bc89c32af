"""`zeroseg segment` and `zeroseg eval`: a student checkpoint + a cached vocabulary -> masks, mIoU.

The vocabulary comes from the feature store (text/<vocab>), so no teacher is loaded, except by
the teacher's own methods: the grid and dense baselines (the teacher alone) and the ceiling. A checkpoint trained on one teacher's features is
refused with a vocabulary embedded by another: the two would live in different spaces.

The background threshold belongs to the student and the vocabulary (the similarity scale is the
teacher's own), so a run remembers the one it was calibrated with: `eval --calibrate-on TRAIN`
and the demo write RUN/calibration.json, and `eval` and `segment` of that run use it unless a
threshold is given. Every result names its threshold's source.
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
from zeroseg.stores.features import FeatureStore
from zeroseg.trainer.checkpoint import find_checkpoint, load_student_for, read_state, student_teacher_key, write_json

DEFAULT_THRESHOLD = PAPER_THRESHOLDS["voc"]
CALIBRATION_FILE = "calibration.json"  # in a run dir, beside its checkpoints


# ---- the background threshold and where it came from -----------------------------------------


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str  # in words, e.g. "given by --bg-threshold"

    def __str__(self) -> str:
        return f"bg threshold {self.value:g} ({self.source})"


def _run_checkpoint(checkpoint: str | Path) -> tuple[Path, dict]:
    """(the run dir, {"step", "sha256"} of the checkpoint that `checkpoint` names)."""
    ckpt = find_checkpoint(checkpoint)
    state = read_state(ckpt)
    return ckpt.parent, {"step": state["step"], "sha256": state["sha256"]}


def save_calibration(
    checkpoint: str | Path, threshold: float, train_miou: float, dataset: str | Path, n_images: int,
    store: FeatureStore, vocab: str, vocabulary: Vocabulary,
) -> Path:
    """Remember in the run the threshold calibrated for this checkpoint and vocabulary (atomic)."""
    run_dir, weights = _run_checkpoint(checkpoint)
    path = run_dir / CALIBRATION_FILE
    write_json(path, {
        "threshold": threshold, "train_miou": round(train_miou, 4), "dataset": str(dataset), "n_images": n_images,
        "store": store.url, "vocab": vocab, "vocab_sha256": vocabulary.sha256(), "checkpoint": weights,
    })
    return path


def _stored_threshold(checkpoint: str | Path, vocab: str, vocabulary: Vocabulary) -> Threshold | str:
    """The run's calibrated threshold, or why there is none to use. One calibrated with another
    vocabulary or other weights is not used: its scale may be another. A store copied elsewhere
    with the same vocabulary (names and embeddings) keeps it: the scale is the same."""
    run_dir, weights = _run_checkpoint(checkpoint)
    path = run_dir / CALIBRATION_FILE
    if not path.is_file():
        return f"{run_dir} has no calibrated threshold: `zeroseg eval --calibrate-on TRAIN` stores one"
    try:
        stored = json.loads(path.read_text())
        value, made_with, same_vocab = float(stored["threshold"]), stored["vocab"], stored["vocab_sha256"]
        made_for = stored["checkpoint"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{path} not used: unreadable ({type(e).__name__}: {e})"
    if made_with != vocab:
        return f"{path} not used: calibrated with vocabulary {made_with}, not {vocab}"
    if same_vocab != vocabulary.sha256():
        return f"{path} not used: vocabulary {vocab} has other names or embeddings than it was calibrated with"
    if made_for.get("sha256") != weights["sha256"]:
        return (f"{path} not used: calibrated for other weights (step {made_for.get('step')}, "
                f"{str(made_for.get('sha256'))[:12]}), these are step {weights['step']} ({weights['sha256'][:12]})")
    return Threshold(value, f"calibrated on {stored.get('dataset')}, stored in {path}")


def choose_threshold(
    given: float | None, checkpoint: str | Path | None, vocab: str, vocabulary: Vocabulary
) -> Threshold:
    """The given threshold, else the run's stored one, else the paper's VOC value (with the
    reason the run's was not used). A method without a run (grid, ceiling) has none stored."""
    if given is not None:
        return Threshold(given, "given by --bg-threshold")
    if checkpoint is None:
        why = "no run to remember a calibration: --calibrate-on TRAIN picks one"
    else:
        stored = _stored_threshold(checkpoint, vocab, vocabulary)
        if isinstance(stored, Threshold):
            return stored
        why = stored
    return Threshold(DEFAULT_THRESHOLD, f"the paper's VOC value; {why}")


def load_vocabulary(store_url: str, vocab: str, classes: list[str] | None = None,
                    teacher: str | None = None) -> tuple[FeatureStore, Vocabulary]:
    """The store seen through `teacher` (None: its first) and that teacher's vocabulary `vocab`."""
    store = FeatureStore.open(store_url, teacher=teacher)
    names, emb = store.read_text(vocab)  # refuses text of another teacher than the store's
    return store, Vocabulary.build(names, emb, classes)


# ---- segment ---------------------------------------------------------------------------------


def segment_images(
    checkpoint: str | Path, images: list[Path], store_url: str, vocab: str, threshold: float | None, out: Path
) -> tuple[Threshold, list[tuple[Path, Path]]]:
    """Write <stem>_mask.png (palette, pixel = label: 0 background, i = vocabulary entry i-1) and
    <stem>_overlay.png (with a legend) for each image; return the threshold used (`threshold`,
    else the run's calibrated one, else the paper's) and the (mask, overlay) paths."""
    store, vocabulary = load_vocabulary(store_url, vocab, teacher=student_teacher_key(checkpoint, FeatureStore.open(store_url)))
    predictor = StudentPredictor(load_student_for(checkpoint, store)[0], vocabulary)
    chosen = choose_threshold(threshold, checkpoint, vocab, vocabulary)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        image = np.asarray(open_image(str(path)))  # upright, as the user sees it; UserError if unreadable
        mask = predictor.raw([image])[0].mask(chosen.value)
        mask_path, overlay_path = out / f"{path.stem}_mask.png", out / f"{path.stem}_overlay.png"
        render.save_mask(mask, mask_path)
        render.overlay(image, mask, vocabulary.label_names()).save(overlay_path)
        written.append((mask_path, overlay_path))
    return chosen, written


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


def make_predictor(
    method: str, checkpoint: str | Path | None, store: FeatureStore, vocabulary: Vocabulary, dense_variant: str = "maskclip"
):
    if method == "student":
        return StudentPredictor(load_student_for(checkpoint, store)[0], vocabulary)
    if method not in ("grid", "dense", "ceiling"):
        raise UserError(f"unknown method {method!r}: student | grid | dense | ceiling")
    # The teacher's own methods. open_clip takes seconds to import: only they import it.
    from zeroseg.pipeline.teacher import load_store_teacher
    from zeroseg.segment import dense

    if method == "grid":
        return GridPredictor(load_store_teacher(store), vocabulary)
    if method == "dense":
        dense.check_variant(dense_variant)  # before the teacher is loaded
        return dense.DensePredictor(load_store_teacher(store), vocabulary, variant=dense_variant)
    return TruthSegmentsPredictor(load_store_teacher(store), vocabulary)


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
    dense_variant: str = "maskclip",
    teacher_key: str | None = None,
) -> dict:
    """Evaluate one method on a labelled dataset; write out/eval_<method>.json and
    out/confusion_<method>.png; return the JSON dict. The background threshold is `threshold`,
    or calibrated on `calibrate_on` (a train split; stored in the student's run), or the run's
    stored one, or the paper's VOC value; "bg_threshold_source" says which. A student is evaluated
    with the vocabulary of the store's teacher it was trained on; grid, dense and ceiling run the
    store's `teacher_key` (None: its first) with that teacher's vocabulary."""
    dataset = load_dataset(dataset_path, split).subset(limit)
    if method == "student" and checkpoint is not None:
        if teacher_key is not None:
            raise UserError("--teacher-key is for --method grid | dense | ceiling: a student uses the teacher it was trained on")
        teacher_key = student_teacher_key(checkpoint, FeatureStore.open(store_url))
    store, vocabulary = load_vocabulary(store_url, vocab, dataset.classes, teacher=teacher_key)
    predictor = make_predictor(method, checkpoint, store, vocabulary, dense_variant)
    calibration = None
    if threshold is None and calibrate_on is not None:
        train = load_dataset(calibrate_on, "train").subset(limit)
        if train.classes != dataset.classes:
            raise UserError(f"{calibrate_on} has other classes than {dataset_path}")
        value, train_miou = calibrate_threshold(predictor, train, len(train.classes), progress=progress)
        calibration = {"dataset": str(calibrate_on), "n_images": len(train), "miou": round(train_miou, 4)}
        if method == "student":
            stored = save_calibration(checkpoint, value, train_miou, calibrate_on, len(train), store, vocab, vocabulary)
            chosen = Threshold(value, f"calibrated on {calibrate_on}, stored in {stored}")
        else:
            chosen = Threshold(value, f"calibrated on {calibrate_on}; not stored: the {method} method has no run")
    else:
        chosen = choose_threshold(threshold, checkpoint if method == "student" else None, vocab, vocabulary)
    result = evaluate(predictor, dataset, chosen.value, progress=progress)
    report = {
        **result.to_dict(),
        "bg_threshold_source": chosen.source,
        "n_images": len(dataset),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "store": store_url,
        "vocab": vocab,
        "calibration": calibration,
        **({"dense_variant": dense_variant} if method == "dense" else {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval_{method}.json").write_text(json.dumps(report, indent=2) + "\n")
    render.save_confusion(
        result.confusion.counts, dataset.classes, out / f"confusion_{method}.png",
        f"{method} on {dataset.name}: mIoU {report['miou']}",
    )
    return report
