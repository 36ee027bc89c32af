"""Trainer throughput, side by side in one run: same student preset, same batch, same store.

(a) steps/s reading the Zarr store vs with every target preloaded in RAM (goal >= 0.9: the loader
    is never the bottleneck);
(b) steps/s with cached targets vs `--targets online`, the teacher (ViT-B-32, random weights)
    embedding the 30 crops of every image in the step (goal >= 10x);
(c) with --workers N: steps/s of N data-parallel workers (`train --workers N`, gloo) vs one process,
    same global batch, one torch thread each (goal for 2 on 2 cores: >= 1.7x), beside the same DDP
    without Ray (N processes in a torch.distributed group made here: what Ray Train costs) and the
    ceiling the machine allows: N plain processes of batch / N side by side (no DDP).

    PYTHONPATH=. python benchmarks/train.py [--images 256] [--preset small] [--batch 32] [--device cpu] [--workers 2]

The store is built once (in --work) with the same teacher, so cached and online runs distil the
same features. steps/s is the steady state: the mean rate of the second half of the logged
intervals (the first half holds the warm-up, and in (c) Ray Train's own actors starting beside
the replicas: a controller, a preemption watcher, a dataset manager); (c) prints each phase's
whole wall time beside it, start-up included.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from zeroseg.pipeline.teacher import load_teacher
from zeroseg.stores.features import FeatureStore
from zeroseg.trainer.config import recipe
from zeroseg.trainer.recipes import DEFAULT_PRESET, DEFAULT_RECIPE, RECIPE_NAMES
from zeroseg.trainer.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' in-process store maker
from synthetic import synthetic_store  # noqa: E402


def steps_per_s(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["steps_per_s"]) for r in rows[len(rows) // 2:]]  # the steady state's
    return statistics.mean(rates)


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    if device.startswith("cuda"):
        text += f", {torch.cuda.get_device_name()}"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--view", type=int, default=224, help="store view size (the crops' source)")
    ap.add_argument("--preset", default=DEFAULT_PRESET)
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, choices=RECIPE_NAMES, help="as `zeroseg train --recipe`")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--online-steps", type=int, default=6, help="online steps are slow: fewer of them (0: skip (b))")
    ap.add_argument("--teacher", default="ViT-B-32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--chunk", type=int, default=64, help="store chunk size in images")
    ap.add_argument("--rounds", type=int, default=2, help="phases (a) and (c) alternate this many times; medians")
    ap.add_argument("--work", type=Path, default=None, help="folder for the store and runs (default: a temp dir)")
    ap.add_argument("--workers", type=int, default=0, help="(c): N data-parallel workers vs 1 process (0: skip)")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="zeroseg-bench-"))
    url = str(work / "store.zarr")
    teacher = load_teacher(args.teacher, "random", seed=0, device=args.device)
    if not (work / "store.zarr").exists():
        t0 = time.perf_counter()
        synthetic_store(url, teacher, args.images, grids=(1, 2, 3, 4), view_size=args.view, chunk_images=args.chunk, batch=64)
        print(f"store: {args.images} images x 30 crops of {args.teacher} in {time.perf_counter() - t0:.1f} s")
    store = FeatureStore.open(url)
    del teacher
    if args.threads:  # the timed runs' threads; the store above is built on all of them
        torch.set_num_threads(args.threads)

    base = recipe(
        args.recipe, args.preset, steps=args.steps, batch=args.batch,
        log_every=5, checkpoint_every=10**9, device=args.device, threads=args.threads,
    )

    def run(name: str, **kw) -> float:
        preload = kw.pop("preload", False)
        config = dataclasses.replace(base, **kw)
        run_dir = work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        train(url, run_dir, config, preload=preload, progress=False)
        rate = steps_per_s(run_dir)
        print(f"  {name:<14} {rate:8.3f} steps/s")
        return rate

    print(f"machine: {machine(args.device)}")
    print(f"student {args.preset}, batch {args.batch}, store {store.n_images} images of {args.view} px, "
          f"{store.n_crops} crops x {store.dim} dims, device {args.device}")
    zarr_rates, ram_rates = [], []
    for r in range(args.rounds):
        zarr_rates.append(run(f"zarr-{r}"))
        ram_rates.append(run(f"ram-{r}", preload=True))
    cached = statistics.median(zarr_rates)
    ram = statistics.median(ram_rates)
    print(f"(a) zarr / RAM   = {cached:.3f} / {ram:.3f} = {cached / ram:.2f}  (goal >= 0.9)")
    if args.online_steps:
        online = run("online", targets="online", steps=args.online_steps, log_every=1)
        print(f"(b) cached / online ({args.teacher}, 30 crops/image) = {cached:.3f} / {online:.3f} = {cached / online:.1f}x  (goal >= 10x)")
    if args.workers > 1:
        data_parallel(url, work, base, args.workers, args.rounds)
    if args.work is None:
        shutil.rmtree(work)


def data_parallel(url: str, work: Path, base, workers: int, rounds: int) -> None:
    """(c): one process vs `workers` Ray workers, the same global batch, one torch thread each,
    alternated over `rounds`, medians. Beside them, the ceiling this machine allows: `workers`
    plain single-process runs of batch // workers each, side by side with no DDP (a replica's
    work with no all-reduce and no waiting for its peer): their steps/s over the one-process
    rate is the most any data-parallel run can reach here. Each epoch's windows are single chunks
    (buffer_chunks 1), so that there are enough to share out."""
    import multiprocessing

    from zeroseg.trainer.launch import train_on_workers

    config = dataclasses.replace(base, threads=1, buffer_chunks=1)
    share = dataclasses.replace(config, batch=config.batch // workers)
    rates: dict[str, list[float]] = {"1 process": [], f"{workers} workers": [], f"{workers} DDP, no Ray": [],
                                     f"{workers} side by side": []}
    walls: dict[str, list[float]] = {k: [] for k in rates}
    for r in range(rounds):
        t0 = time.perf_counter()
        run_dir = work / f"workers-1-{r}"
        shutil.rmtree(run_dir, ignore_errors=True)
        train(url, run_dir, config, progress=False)
        rates["1 process"].append(steps_per_s(run_dir))
        walls["1 process"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_dir = work / f"workers-{workers}-{r}"
        shutil.rmtree(run_dir, ignore_errors=True)
        train_on_workers(url, run_dir, config, workers=workers)  # steps/s as rank 0 timed them
        rates[f"{workers} workers"].append(steps_per_s(run_dir))
        walls[f"{workers} workers"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_dir = work / f"ddp-{workers}-{r}"
        shutil.rmtree(run_dir, ignore_errors=True)
        port = 29500 + r  # a fresh rendezvous each round
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.starmap(ddp_replica, [(url, run_dir, config, rank, workers, port) for rank in range(workers)])
        rates[f"{workers} DDP, no Ray"].append(steps_per_s(run_dir))
        walls[f"{workers} DDP, no Ray"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dirs = [work / f"alone-{i}-{r}" for i in range(workers)]
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.starmap(train_quietly, [(url, d, share) for d in dirs])
        rates[f"{workers} side by side"].append(statistics.mean(steps_per_s(d) for d in dirs))
        walls[f"{workers} side by side"].append(time.perf_counter() - t0)
        print("  round", r, "  ".join(f"{k} {v[-1]:.3f} steps/s ({walls[k][-1]:.1f} s)" for k, v in rates.items()), flush=True)
    one, many, plain, alone = (statistics.median(v) for v in rates.values())
    print(f"(c) {workers} workers / 1 process, global batch {config.batch}, 1 torch thread each = "
          f"{many:.3f} / {one:.3f} = {many / one:.2f}x  (goal >= 1.7x for 2)")
    print(f"    the same DDP without Ray: {plain:.3f} steps/s = {plain / one:.2f}x; Ray Train's workers reach "
          f"{many / plain:.2f} of it")
    print("    whole runs, start-up included: " + ", ".join(f"{k} {statistics.median(v):.1f} s" for k, v in walls.items()))
    print(f"    ceiling here: {workers} single processes of batch {share.batch} side by side, no DDP = "
          f"{alone:.3f} steps/s each = {alone / one:.2f}x; the workers reach {many / alone:.2f} of it")


def ddp_replica(url: str, run_dir: Path, config, rank: int, world_size: int, port: int) -> None:
    """Replica `rank` of a gloo group on this machine, as Ray Train's replicas are, without Ray."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        train(url, run_dir, config, progress=False, world_size=world_size, rank=rank)
    finally:
        dist.destroy_process_group()


def train_quietly(url: str, run_dir: Path, config) -> None:
    torch.set_num_threads(1)
    train(url, run_dir, config, progress=False)


if __name__ == "__main__":
    main()
