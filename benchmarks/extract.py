"""How much the extraction job costs beyond the teacher itself, and what Ray costs and gives.

On the same synthetic scenes and random-init teachers, prints the median images/s of:
  bare          the teacher alone on crops cut beforehand (only the forward passes are timed)
  job           `run_extract` in this process (decode, crops, teacher, store writes: timed
                after listing and the teacher's load, as the bare teacher's load is not)
  shards        the same job reading the same images from WebDataset tar shards
                (`--input-format webdataset`, 100 images a shard, uncompressed as img2dataset writes)
and, over --ray-images scenes, the whole job with its start-up (for Ray: ray.init, the actors
loading their teachers, ray.shutdown) of:
  in-process xN `run_extract --workers 0` with N torch threads, N = 1, 2
  ray xN        `run_extract` on a local N-CPU Ray, N actors x 1 torch thread
with the ratios job/bare (goal >= 0.95), shards/folder (goal >= 0.95), ray x2 / ray x1 (goal >= 1.8) and ray xN / in-process xN
(goal >= 0.9: Ray is no tax). Every timed phase follows a warm-up call of its own kind (a small
job, or a few forward passes), the phases of a table run in turn, --repeats rounds, each round
in another order; the median rate of each phase is printed, and each ratio is the median over rounds of
the ratio within a round: the machine may be shared, so the ratios side by side mean more than the rates.
For the Ray jobs it also prints where their whole time goes: the seconds from the start to the end
of ray.init, to the actors ready (their teachers loaded), to the chunks done and to ray.shutdown.

    PYTHONPATH=. python benchmarks/extract.py --images 256 --teachers zeroseg-tiny,ViT-B-32 --ray-images 2000
    python benchmarks/extract.py --device cuda --ray-images 0 --batch 1920 --teachers ViT-B-32   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from zeroseg.decode import decode_image  # noqa: E402
from zeroseg.experiments.scenes import generate_scenes  # noqa: E402
from zeroseg.geometry import cut_crops, grid_boxes  # noqa: E402
from zeroseg.pipeline.mapper import images_per_batch  # noqa: E402
from zeroseg.pipeline.reader import list_images  # noqa: E402
from zeroseg.pipeline.runner import ExtractConfig, run_extract  # noqa: E402
from zeroseg.pipeline.teacher import load_teacher  # noqa: E402
from zeroseg.stores.inspect import store_info  # noqa: E402

WARM_UP_IMAGES = 32  # a warm-up job: imports, allocator, file cache, Ray's and torch's first calls


def manifest_of(paths: list[str], path: Path) -> str:
    path.write_text("".join(f"{p}\n" for p in paths))
    return str(path)


def shards_of(paths: list[str], folder: Path, per_shard: int = 100) -> str:
    """The images packed as img2dataset does (KEY.png + KEY.json per image, uncompressed tar
    shards): the brace pattern that names the shards."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (len(paths) + per_shard - 1) // per_shard
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i, path in enumerate(paths[s * per_shard:(s + 1) * per_shard]):
                key = f"{s:05d}{i:04d}"
                tar.add(path, arcname=f"{key}{Path(path).suffix}")
                meta = tarfile.TarInfo(f"{key}.json")
                data = f'{{"source": "{Path(path).name}"}}'.encode()
                meta.size = len(data)
                tar.addfile(meta, io.BytesIO(data))
    return f"{folder}/{{00000..{n_shards - 1:05d}}}.tar"


class Bare:
    """The teacher alone: crops cut (as uint8, to fit memory) before the clock; the embeddings
    come back to the CPU, as the job's do."""

    def __init__(self, config: ExtractConfig, paths: list[str]):
        self.teacher = load_teacher(config.teacher, "random", device=config.device)
        boxes = grid_boxes(config.grids)
        views = torch.from_numpy(np.stack([decode_image(p, config.view_size, config.grids).view for p in paths]))
        per = images_per_batch(config.batch, len(boxes))
        self.groups = [cut_crops(views[i:i + per], boxes, self.teacher.info.input_size).mul(255).round().to(torch.uint8)
                       for i in range(0, len(views), per)]
        self.n = len(paths)

    def forward(self, groups) -> None:
        for crops in groups:
            self.teacher.encode_images(crops.float().div_(255)).cpu()

    def rate(self) -> float:
        self.forward(self.groups[:1])  # warm-up
        start = time.perf_counter()
        self.forward(self.groups)
        return self.n / (time.perf_counter() - start)


def job_rate(manifest: str, warm_up: str, work: Path, config: ExtractConfig, ray_cpus: int = 0, threads: int = 0,
             whole: bool = True, marks: list[dict[str, float]] | None = None) -> float:
    """images/s of the job, after a warm-up job of the same kind: `ray_cpus` > 0 runs it on a
    local Ray of that many CPUs, started and shut down inside the timing; else in this process
    with `threads` torch threads (0: as they are). `whole`: the whole call is timed, else the
    job's own seconds (after listing and the driver's teacher load, as the bare teacher's).
    `marks`: the timed job's stage times (run_job) are appended to it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        run_job(warm_up, work / "warm.zarr", config, ray_cpus)
        start = time.perf_counter()
        n, seconds, stages = run_job(manifest, work / "timed.zarr", config, ray_cpus)
        if marks is not None:
            marks.append(stages)
        return n / ((time.perf_counter() - start) if whole else seconds)
    finally:
        torch.set_num_threads(before)
        for name in ("warm.zarr", "timed.zarr"):
            shutil.rmtree(work / name, ignore_errors=True)


def run_job(manifest: str, store: Path, config: ExtractConfig, ray_cpus: int) -> tuple[int, float, dict[str, float]]:
    """Images done, the job's own seconds, and the seconds from this call's start to the end of
    each stage (on Ray: ray.init, the actors ready, the chunks done, ray.shutdown)."""
    start = time.perf_counter()
    stages: dict[str, float] = {}
    mark = lambda stage: stages.setdefault(stage, time.perf_counter() - start)  # noqa: E731
    if ray_cpus:
        import ray

        ray.init(num_cpus=ray_cpus, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
        mark("ray.init")
    try:
        # the distributor's "workers: ..." line comes once every actor has loaded its teacher
        summary = run_extract(manifest, str(store), dataclasses.replace(config, workers=ray_cpus),
                              notify=lambda line: line.startswith("workers:") and mark("actors ready"))
        mark("chunks done")
    finally:
        if ray_cpus:
            ray.shutdown()
            mark("ray.shutdown")
    assert summary.pending == 0 and summary.done_this_run == summary.n_images
    return summary.done_this_run, summary.seconds, stages


def rounds(phases: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each phase once per round, every round in another order (rotated): each phase's rates, by round."""
    names = list(phases)
    seen: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seen[name].append(phases[name]())
    return seen


def ratio(seen: dict[str, list[float]], top: str, bottom: str) -> float:
    """The median over rounds of top / bottom within a round: the two ran minutes apart at most,
    so a machine that slows down or speeds up between rounds moves both."""
    return statistics.median(a / b for a, b in zip(seen[top], seen[bottom]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="scenes of the bare-vs-job table")
    parser.add_argument("--teachers", default="zeroseg-tiny,ViT-B-32")
    parser.add_argument("--view-size", type=int, default=224)
    parser.add_argument("--grids", default="1,2,3,4")
    parser.add_argument("--batch", type=int, default=256, help="crops per forward (whole images)")
    parser.add_argument("--chunk-images", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where the teacher runs")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each table's phases")
    parser.add_argument("--ray-images", type=int, default=2000, help="scenes of the Ray table (tiny teacher); 0: no Ray table")
    parser.add_argument("--ray-teacher", default="zeroseg-tiny")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zeroseg-bench-"))
    grids = tuple(int(g) for g in args.grids.split(","))
    n_scenes = max(args.images, args.ray_images, WARM_UP_IMAGES)
    paths = list_images(str(generate_scenes(work / "scenes", n=n_scenes, split="train", seed=0, size=args.view_size)))
    warm_up = manifest_of(paths[:WARM_UP_IMAGES], work / "warm.txt")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"synthetic scenes ({args.view_size} px), grids {grids}, batch {args.batch} crops, chunk {args.chunk_images} "
          f"images, torch threads {torch.get_num_threads()}, teacher on {where}; median of {args.repeats} rounds")

    def config_of(arch: str) -> ExtractConfig:
        return ExtractConfig(teacher=arch, grids=grids, view_size=args.view_size, batch=args.batch,
                             chunk_images=args.chunk_images, device=args.device)

    table = manifest_of(paths[:args.images], work / "table.txt")
    shards = shards_of(paths[:args.images], work / "shards")
    warm_shards = shards_of(paths[:WARM_UP_IMAGES], work / "warm-shards")
    print(f"\n{args.images} images | bare teacher | job (in-process) | job / bare (goal >= 0.95) | job from "
          f"webdataset shards | shards / folder (goal >= 0.95) | features B/image vs raw fp16")
    for arch in filter(None, args.teachers.split(",")):
        config = dataclasses.replace(config_of(arch), workers=0)
        from_shards = dataclasses.replace(config, input_format="webdataset")
        bare = Bare(config, paths[:args.images])
        seen = rounds({"bare": bare.rate, "job": lambda: job_rate(table, warm_up, work, config, whole=False),
                       "shards": lambda: job_rate(shards, warm_shards, work, from_shards, whole=False)}, args.repeats)
        rates = {name: statistics.median(r) for name, r in seen.items()}
        run_job(table, work / "sizes.zarr", config, 0)
        info = store_info(str(work / "sizes.zarr"))["bytes"]
        shutil.rmtree(work / "sizes.zarr")
        print(f"{arch:>12} | {rates['bare']:8.2f} | {rates['job']:8.2f} | {ratio(seen, 'job', 'bare'):.2f} | "
              f"{rates['shards']:8.2f} | {ratio(seen, 'shards', 'job'):.2f} | "
              f"{info['features_per_image']} vs {info['raw_float16_per_image']} "
              f"({info['features_per_image'] / info['raw_float16_per_image']:.2f})")

    if args.ray_images:
        manifest = manifest_of(paths[:args.ray_images], work / "ray.txt")
        config = config_of(args.ray_teacher)
        phases = {f"in-process x{n}": (lambda n=n: job_rate(manifest, warm_up, work, config, threads=n)) for n in (1, 2)}
        marks: dict[str, list[dict[str, float]]] = {"ray x1": [], "ray x2": []}
        phases |= {name: (lambda n=n, name=name: job_rate(manifest, warm_up, work, config, ray_cpus=n, marks=marks[name]))
                   for n, name in ((1, "ray x1"), (2, "ray x2"))}
        seen = rounds(phases, args.repeats)
        print(f"\n{args.ray_teacher}, {args.ray_images} images, whole job with start-up (images/s):")
        print(" | ".join(f"{name} {statistics.median(r):.2f}" for name, r in seen.items()))
        print(f"ray x2 / ray x1 {ratio(seen, 'ray x2', 'ray x1'):.2f} (goal >= 1.8) | "
              f"ray x1 / in-process x1 {ratio(seen, 'ray x1', 'in-process x1'):.2f} | "
              f"ray x2 / in-process x2 {ratio(seen, 'ray x2', 'in-process x2'):.2f} (goal >= 0.9)")
        print("Ray jobs, seconds from the call's start to the end of each stage (median over rounds):")
        for name, runs in marks.items():
            print(f"  {name}: " + ", ".join(f"{stage} {statistics.median(r[stage] for r in runs):.1f}" for stage in runs[0]))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
