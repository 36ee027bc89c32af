"""What the student's architecture can read at all: the student trained on the true masks.

    PYTHONPATH=. python benchmarks/supervised_readout.py --scenes demo-out/scenes [--steps 300] [--n-train 600]

Not a ZeroSeg recipe (it reads the masks): a capacity check beside `zeroseg diagnose`. The demo's
student (preset small: 64 px, patch 8), its patch embeddings projected to the 13 classes, trained
with per-patch cross entropy on each patch's majority class, no masking, the demo's batch and
learning rate, one torch thread. Then, on held-out scenes, each object's class from its
truth-pooled patch logits (as diagnose pools the distilled student's patches): is its shape right,
its colour? A stem that reads shape here and not through distillation loses it to the targets;
one that does not read it here cannot learn it from any target.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from zeroseg.experiments.diagnose import object_patches
from zeroseg.segment.datasets import SCENE_CLASSES, SCENE_SHAPES, load_dataset
from zeroseg.segment.zeroshot import student_input
from zeroseg.trainer.config import recipe
from zeroseg.trainer.model import ZeroSegStudent
from zeroseg.trainer.train import lr_at


def load(folder: Path, n: int | None, size: int, grid: int) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """(n, size, size, 3) uint8 views, (n, grid*grid) majority class per patch, and the full masks."""
    data = load_dataset(folder).subset(n)
    views, labels, masks = [], [], []
    for i in range(len(data)):
        image, mask = data.load(i)
        views.append(student_input(image, size))
        onehot = F.one_hot(torch.from_numpy(mask.astype(np.int64)), len(SCENE_CLASSES)).permute(2, 0, 1).float()
        labels.append(F.adaptive_avg_pool2d(onehot[None], grid)[0].flatten(1).argmax(0))  # (grid*grid,)
        masks.append(mask)
    return torch.from_numpy(np.stack(views)), torch.stack(labels), masks


def object_accuracy(model: ZeroSegStudent, views: torch.Tensor, masks: list[np.ndarray]) -> tuple[float, float]:
    """Shape and colour accuracy of each held-out object's truth-pooled patch logits."""
    g = model.config.grid
    with torch.inference_mode():
        logits = model.segment(views).patches  # (n, g*g, classes)
    right_shape = right_colour = total = 0
    for b, mask in enumerate(masks):
        for c in [c for c in np.unique(mask).tolist() if 0 < c < len(SCENE_CLASSES)]:
            mine = object_patches(mask == c, g)
            guess = int(logits[b, mine].mean(0)[1:].argmax()) + 1  # an object class: the object is there
            right_shape += (guess - 1) % len(SCENE_SHAPES) == (c - 1) % len(SCENE_SHAPES)
            right_colour += (guess - 1) // len(SCENE_SHAPES) == (c - 1) // len(SCENE_SHAPES)
            total += 1
    return right_shape / total, right_colour / total


def run(scenes: Path, stem: str, steps: int, n_train: int, image_size: int, patch_size: int, batch: int = 32,
        lr: float = 1e-3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    config = recipe(steps=steps, batch=batch, lr=lr, seed=seed)
    model = ZeroSegStudent(dataclasses.replace(config.model, out_dim=len(SCENE_CLASSES), stem=stem,
                                               image_size=image_size, patch_size=patch_size))
    size, g = model.config.image_size, model.config.grid
    views, labels, _ = load(scenes / "train", n_train, size, g)
    test_views, _, test_masks = load(scenes / "heldout", None, size, g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay, betas=config.betas)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:  # the trainer's schedule: linear warm-up, then cosine
            group["lr"] = lr_at(step, config)
        idx = torch.from_numpy(rng.choice(len(views), batch, replace=False))
        out = model(views[idx], 0.0, reconstruct=False)
        target = labels[idx].gather(1, out.keep)  # the patches come in the order of keep (a permutation)
        loss = F.cross_entropy(out.patches.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    shape, colour = object_accuracy(model.eval(), test_views, test_masks)
    return {"stem": stem, "steps": steps, "n_train": len(views), "shape": shape, "colour": colour,
            "loss": float(loss.detach()), "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=Path, required=True, help="a demo's scenes folder (train/, heldout/)")
    parser.add_argument("--steps", default="300", help="comma list")
    parser.add_argument("--n-train", default="600", help="comma list")
    parser.add_argument("--stems", default="patch,conv")
    parser.add_argument("--image-size", type=int, default=64, help="the student's input side (the demo's: 64)")
    parser.add_argument("--patch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = Table(title="the student trained on the true masks: held-out objects (chance: shape 0.333, colour 0.25)")
    for col in ("stem", "input", "steps", "train scenes", "shape", "colour", "final loss", "s"):
        table.add_column(col, justify="left" if col == "stem" else "right")
    for n in map(int, args.n_train.split(",")):
        for steps in map(int, args.steps.split(",")):
            for stem in args.stems.split(","):
                r = run(args.scenes, stem, steps, n, args.image_size, args.patch_size)
                table.add_row(stem, f"{args.image_size} px / {args.patch_size}", str(steps), str(r["n_train"]), f"{r['shape']:.3f}", f"{r['colour']:.3f}",
                              f"{r['loss']:.3f}", f"{r['seconds']:.0f}")
                Console(width=160).print(table)


if __name__ == "__main__":
    main()
