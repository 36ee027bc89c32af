"""The share of a training step spent waiting for data, on a store too large to sit in a page
cache's hot set: `--images` images (default 20k) read in random chunk order, as `zeroseg train`
reads any store (chunks shuffled per epoch, rows shuffled within a buffer of chunks, a loader
thread keeping batches ready).

    PYTHONPATH=. python benchmarks/data_wait.py --images 20000 --steps 200   # benchmarks/README.md
    PYTHONPATH=. python benchmarks/data_wait.py --device cuda --precision bf16 --preset base --batch 64   # a GPU

The store holds blocky pixels (as `extract --pixels` stores views) and random unit features in
float16 for grids 1-4 (30 crops of 512 dims an image: the features' bytes of a ViT-B teacher;
"synthetic features are fine", issue 14). It is written once into --work and reused. The train
loop's own `data_wait` column (metrics.csv: time blocked on the next batch over wall time, per
logging interval) is what is reported, after the first interval (warm-up), median and max.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status, StoreConfig, TeacherInfo
from zeroseg.trainer.config import recipe
from zeroseg.trainer.model import PRESETS
from zeroseg.trainer.recipes import DEFAULT_PRESET, DEFAULT_RECIPE
from zeroseg.trainer.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic import blocky_views  # noqa: E402

GRIDS = (1, 2, 3, 4)


def write_store(url: str, n_images: int, dim: int, view: int, chunk_images: int) -> None:
    teacher = TeacherInfo("bench", "synthetic", "00" * 32, 224, (0.5,) * 3, (0.25,) * 3, dim)
    config = StoreConfig(teacher=teacher, grids=GRIDS, view_size=view, chunk_images=chunk_images, pixels=True)
    store = FeatureStore.create(url, config, [f"synthetic/{i:06d}.png" for i in range(n_images)])
    rng = np.random.default_rng(0)
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        m = sl.stop - sl.start
        feats = rng.standard_normal((m, config.n_crops, dim), dtype=np.float32)
        feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
        store.write_chunk(c, feats.astype(np.float16), np.full(m, Status.OK, np.uint8), [""] * m,
                          np.full((m, 2), view, np.int32), blocky_views(rng, m, view))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--view", type=int, default=None, help="stored view size (default: the preset's input size)")
    ap.add_argument("--chunk", type=int, default=64, help="store chunk size in images")
    ap.add_argument("--preset", default=DEFAULT_PRESET)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the train loop")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16 (autocast: for GPUs)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/zeroseg-data-wait"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    view = args.view or PRESETS[args.preset].image_size
    name = f"store-{args.images}-{view}px.zarr"
    url = str(args.work / name)
    if not (args.work / name).exists():
        t0 = time.perf_counter()
        write_store(url, args.images, args.dim, view, args.chunk)
        print(f"store: {args.images} images x 30 crops x {args.dim} float16 written in {time.perf_counter() - t0:.0f} s")
    store = FeatureStore.open(url)
    disk = sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())
    config = recipe(DEFAULT_RECIPE, args.preset, steps=args.steps, batch=args.batch, log_every=10,
                    checkpoint_every=10**9, device=args.device, threads=args.threads, precision=args.precision)
    run_dir = args.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    train(url, run_dir, config, progress=False)
    wall = time.perf_counter() - t0
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))[1:]  # the first interval is the warm-up
    wait = [float(r["data_wait"]) for r in rows]
    rate = statistics.median(float(r["steps_per_s"]) for r in rows)
    print(f"\nstore {store.n_images} images in {store.n_chunks} chunks of {args.chunk}, {disk / 2**20:.0f} MiB on disk; "
          f"{view}-px views, `{args.preset}` student, batch {args.batch}, {args.threads} torch thread(s), "
          f"{args.device} {args.precision}, "
          f"{args.steps} steps in {wall:.0f} s (epoch {float(rows[-1]['epoch']):.2f} at the end)\n")
    print("| steps/s (median) | data wait, median of intervals | data wait, max | goal |")
    print("|---:|---:|---:|---|")
    print(f"| {rate:.2f} | {statistics.median(wait):.1%} | {max(wait):.1%} | < 5% |")


if __name__ == "__main__":
    main()
