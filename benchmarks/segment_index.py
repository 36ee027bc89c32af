"""`index build --source segments`: the whole build (student tokens staged chunk by chunk, then the
index filled from them) with `--workers 1` (this process) vs `--workers N` (Ray actors), one torch
thread each, on a store of a few thousand images.

    PYTHONPATH=. python benchmarks/segment_index.py [--images 4000] [--preset small] [--workers 2] [--rounds 3]

The store holds random crop features and blocky pixel views (64 images a chunk); the student is
trained two steps on it (its speed, not its quality, is measured). Ray is started once, before
the timings (as on a cluster that is already up); each build starts its actors and loads the
student in them, which is counted. One untimed build of each first (warm-up), then the two
alternate `--rounds` times, each into a fresh folder; the medians and their ratio are printed,
and the two indexes are checked to be the same file bit for bit.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from zeroseg.segment.neighbours import BuildConfig, build_index
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.index import INDEX_FILE
from zeroseg.stores.schema import Status, StoreConfig, TeacherInfo
from zeroseg.trainer.config import recipe
from zeroseg.trainer.model import PRESETS
from zeroseg.trainer.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' view maker
from synthetic import blocky_views  # noqa: E402

DIM = 64
TEACHER = TeacherInfo("bench", "random:0", "cd" * 32, 64, (0.5,) * 3, (0.25,) * 3, DIM)


def make_store(url: str, n: int, view_size: int) -> None:
    cfg = StoreConfig(teacher=TEACHER, grids=(1, 2), view_size=view_size, chunk_images=64, pixels=True)
    store = FeatureStore.create(url, cfg, [f"bench/{i:06d}.png" for i in range(n)])
    rng = np.random.default_rng(0)
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        m = sl.stop - sl.start
        features = rng.standard_normal((m, cfg.n_crops, DIM)).astype(np.float32)
        store.write_chunk(c, features, np.full(m, Status.OK, np.uint8), [""] * m, np.full((m, 2), view_size),
                          blocky_views(rng, m, view_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the store, run and indexes (default: a temporary one)")
    args = ap.parse_args()

    import ray

    work = Path(args.work or tempfile.mkdtemp(prefix="segidx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    url, run = str(work / "store.zarr"), work / "run"
    if not Path(url).exists():
        make_store(url, args.images, PRESETS[args.preset].image_size)
    if not run.exists():
        train(url, run, recipe("paper", args.preset, steps=2, batch=8, grids=(1, 2), checkpoint_every=2, threads=1,
                              workers=1, prefetch=2), progress=False)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)

    def build(workers: int) -> float:
        out = work / f"ix-{workers}"
        shutil.rmtree(out, ignore_errors=True)  # the staging too: every build computes every token
        start = time.perf_counter()
        build_index(url, out, BuildConfig(source="segments", checkpoint=str(run), workers=workers))
        return time.perf_counter() - start

    build(1), build(args.workers)  # warm-up
    times: dict[int, list[float]] = {1: [], args.workers: []}
    for _ in range(args.rounds):
        for workers in (1, args.workers):
            times[workers].append(build(workers))
    ray.shutdown()

    same = (work / "ix-1" / INDEX_FILE).read_bytes() == (work / f"ix-{args.workers}" / INDEX_FILE).read_bytes()
    one, many = statistics.median(times[1]), statistics.median(times[args.workers])
    print(f"{args.images} images, preset {args.preset}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"--workers 1: median {one:.2f} s  {[round(t, 2) for t in times[1]]}")
    print(f"--workers {args.workers}: median {many:.2f} s  {[round(t, 2) for t in times[args.workers]]}")
    print(f"speed-up {one / many:.2f}x; indexes identical: {same}")


if __name__ == "__main__":
    main()
