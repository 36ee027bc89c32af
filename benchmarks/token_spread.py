"""Whether a student's segments collapsed: per run, over the store's first --images views, the
segments its mask uses per image and how alike its segment tokens are in the teacher's space.

    PYTHONPATH=. python benchmarks/token_spread.py STORE RUN [RUN ...] [--images 64]

A collapsed student (docs/results.md, "Whitened targets") uses one or two segments per image and
its tokens are almost one vector (mean pairwise cosine near 1): one label per image.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from zeroseg.stores.features import FeatureStore
from zeroseg.trainer.checkpoint import load_student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    pixels = torch.from_numpy(FeatureStore.open(args.store).pixels[: args.images])
    print(f"{'run':<50} {'segments used / image (mean, min, max)':>40} {'token-token cosine':>20}")
    for run in args.runs:
        model, _, _ = load_student(run)
        with torch.no_grad():
            seg = model.segment(pixels)  # tokens (B, K, D), assignment (B, h, w) segment ids
        used = [len(np.unique(labels)) for labels in seg.assignment.flatten(1).numpy()]
        tokens = F.normalize(seg.tokens, dim=-1)
        k = tokens.shape[1]
        pairs = (tokens @ tokens.transpose(1, 2)).sum((1, 2)) - k  # each image's K(K-1) pairs, the diagonal's ones out
        cosine = (pairs / (k * (k - 1))).mean().item()
        print(f"{run:<50} {np.mean(used):>20.2f} {min(used):>9} {max(used):>9} {cosine:>20.3f}")


if __name__ == "__main__":
    main()
