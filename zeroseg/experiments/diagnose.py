"""`zeroseg diagnose`: where a student loses what its teacher knows, object by object.

Every object of a labelled scenes split (class = colour x shape, one object per class and scene)
is one sample, and each source below gives it one vector in the teacher's space, in the order the
information flows from the teacher to the student's mask:

- `teacher: crop around the object`  the teacher's embedding of a square crop around the object,
  as the bound (zeroshot.object_crop) cuts it: what the teacher knows about the object;
- `cache: best grid crop`            of the store's grid crops of the image's view, the one whose
  box has the highest IoU with the object's box: the nearest thing to the object the cache holds
  (the student only ever sees grid crops);
- `student: patches, truth-pooled`   the student's patch embeddings (the region term's) averaged
  over the patches the object covers (at least half of each, else its most covered patch): what
  the encoder learnt, free of the grouping;
- `student: its segment`             the segment token that owns most of those patches: what the
  mask's label is read from.

Each source is scored three ways on the held-out objects: zero-shot (nearest class text; the
class, and separately whether its colour and its shape are right), and linear probes of shape and
colour fit on the train split's objects (multinomial logistic regression on standardised vectors,
full-batch L-BFGS from zeros: deterministic). A source that keeps shape in a probe but loses it
zero-shot holds it in directions the text does not read; a source that loses it in the probe does
not have it at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from rich.table import Table

from zeroseg.geometry import cut_crops
from zeroseg.outputs import write_atomic
from zeroseg.pipeline.teacher import load_store_teacher
from zeroseg.segment.datasets import SCENE_CLASSES, SCENE_COLOURS, SCENE_SHAPES, LabelledDataset, load_dataset
from zeroseg.segment.evaluate import load_vocabulary
from zeroseg.segment.zeroshot import Vocabulary, object_crop, student_input
from zeroseg.trainer.checkpoint import load_student_for

SOURCES = (
    "teacher: crop around the object",
    "cache: best grid crop",
    "student: patches, truth-pooled",
    "student: its segment",
)
BATCH = 16


@dataclass
class Objects:
    """One row per object: its class id and one (n, D) vector array per source."""

    classes: np.ndarray  # (n,) int64 scene class ids (1..12)
    vectors: dict[str, np.ndarray]

    @property
    def colours(self) -> np.ndarray:
        return (self.classes - 1) // len(SCENE_SHAPES)

    @property
    def shapes(self) -> np.ndarray:
        return (self.classes - 1) % len(SCENE_SHAPES)


def object_patches(where: np.ndarray, grid: int) -> torch.Tensor:
    """(H, W) bool -> (grid*grid,) bool: the patches of a grid x grid student the object covers,
    at least half of each, else its most covered patch."""
    share = F.adaptive_avg_pool2d(torch.from_numpy(where).float()[None, None], grid).flatten()  # (grid*grid,)
    return share >= 0.5 if (share >= 0.5).any() else share == share.max()


def _box(where: np.ndarray) -> np.ndarray:
    """(H, W) bool -> fractional x0, y0, x1, y1 of its bounding box."""
    ys, xs = np.nonzero(where)
    h, w = where.shape
    return np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """box (4,), boxes (C, 4) -> (C,) IoU."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area(box) + area(boxes) - inter)


@torch.inference_mode()
def collect(dataset: LabelledDataset, student, teacher, boxes: np.ndarray, view_size: int, limit: int | None) -> Objects:
    """Every object of the first `limit` images of `dataset`, with its vector from each source."""
    dataset = dataset.subset(limit)
    s, g = teacher.info.input_size, student.config.grid
    classes, vectors = [], {name: [] for name in SOURCES}
    for start in track(range(0, len(dataset), BATCH), description=f"objects of {dataset.name}", console=Console(stderr=True)):
        items = [dataset.load(i) for i in range(start, min(start + BATCH, len(dataset)))]
        views = torch.from_numpy(np.stack([student_input(im, view_size) for im, _ in items]))
        cells = teacher.encode_images(cut_crops(views, boxes, s)).float().view(len(items), len(boxes), -1)  # (B, C, D)
        seg = student.segment(torch.from_numpy(np.stack([student_input(im, student.config.image_size) for im, _ in items])))
        for b, (image, truth) in enumerate(items):
            for c in [c for c in np.unique(truth).tolist() if 0 < c < len(SCENE_CLASSES)]:
                where = truth == c
                mine = object_patches(where, g)
                owner = seg.assignment[b].flatten()[mine].mode().values
                classes.append(c)
                vectors[SOURCES[0]].append(teacher.encode_images(object_crop(image, where, s)[None])[0].float())
                vectors[SOURCES[1]].append(cells[b, int(np.argmax(_iou(_box(where), boxes)))])
                vectors[SOURCES[2]].append(seg.patches[b, mine].mean(0))
                vectors[SOURCES[3]].append(seg.tokens[b, owner])
    return Objects(np.array(classes), {k: torch.stack(v).numpy() for k, v in vectors.items()})


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, weight_decay: float = 1e-3) -> float:
    """Accuracy on (x_test, y_test) of a multinomial logistic regression fit on the train rows."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (torch.from_numpy((x - mu) / sd).double() for x in (x_train, x_test))
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    w = torch.zeros(xtr.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    ytr = torch.from_numpy(y_train)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1).numpy() == y_test).mean())


def zero_shot(vectors: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    """(n, D) -> (n,) the nearest class text's scene class id."""
    sims = F.normalize(torch.from_numpy(vectors), dim=-1) @ vocab.embeddings.T
    return vocab.class_ids[sims.argmax(-1)].numpy()


def diagnose(run: str | Path, store_url: str, vocab_name: str, train: str | Path, heldout: str | Path,
             out: Path | None = None, limit: int | None = 200) -> dict:
    heldout_set, train_set = load_dataset(heldout), load_dataset(train)
    store, vocab = load_vocabulary(store_url, vocab_name, heldout_set.classes)
    student = load_student_for(run, store)[0].eval()
    teacher = load_store_teacher(store)
    boxes, view = store.boxes, store.config.view_size
    fit, test = (collect(d, student, teacher, boxes, view, limit) for d in (train_set, heldout_set))
    rows = {}
    for name in SOURCES:
        guess = zero_shot(test.vectors[name], vocab)
        guessed = Objects(guess, {})
        rows[name] = {
            "zero_shot_class": round(float((guess == test.classes).mean()), 4),
            "zero_shot_colour": round(float((guessed.colours == test.colours).mean()), 4),
            "zero_shot_shape": round(float((guessed.shapes == test.shapes).mean()), 4),
            "probe_colour": round(linear_probe(fit.vectors[name], fit.colours, test.vectors[name], test.colours), 4),
            "probe_shape": round(linear_probe(fit.vectors[name], fit.shapes, test.vectors[name], test.shapes), 4),
        }
    report = {
        "run": str(run), "store": store_url, "vocab": vocab_name,
        "objects": {"fit": int(len(fit.classes)), "test": int(len(test.classes))},
        "chance": {"class": round(1 / (len(SCENE_CLASSES) - 1), 4), "colour": round(1 / len(SCENE_COLOURS), 4), "shape": round(1 / len(SCENE_SHAPES), 4)},
        "sources": rows,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "diagnose.json", json.dumps(report, indent=2) + "\n")
    return report


def diagnose_table(report: dict) -> Table:
    table = Table(title=f"where shape is lost: {report['objects']['test']} held-out objects "
                        f"(probes fit on {report['objects']['fit']} train objects)")
    table.add_column("source")
    for col in ("zero-shot class", "colour", "shape", "probe colour", "probe shape"):
        table.add_column(col, justify="right")
    for name, r in report["sources"].items():
        table.add_row(name, *(f"{r[k]:.3f}" for k in ("zero_shot_class", "zero_shot_colour", "zero_shot_shape", "probe_colour", "probe_shape")))
    c = report["chance"]
    table.caption = f"chance: class {c['class']:.3f}, colour {c['colour']:.3f}, shape {c['shape']:.3f}"
    return table
