"""How much the extraction job costs beyond the teacher itself, and how it scales with workers.

On the same synthetic scenes and teacher, prints images/s of:
  bare      the teacher alone on crops cut beforehand (only the forward passes are timed)
  extract   `run_extract` in this process (decode, crops, teacher, store writes, all timed)
  ray x1    `run_extract` through Ray, 1 actor x 1 torch thread on a 1-CPU local cluster
  ray x2    `run_extract` through Ray, 2 actors x 1 torch thread on a 2-CPU local cluster
and the ratios extract/bare (goal >= 0.9) and ray x2 / ray x1 (goal >= 1.8 on 2 cores), plus the
store's bytes per image on disk against raw float16. Each Ray pool runs twice, over half the scenes
and over all: besides the whole job's rate, the difference of the two gives its steady rate, with
the pool's start-up (each worker loading its teacher, several seconds) cancelled out.

    PYTHONPATH=. python benchmarks/extract.py --images 256 --teachers zeroseg-tiny
    PYTHONPATH=. python benchmarks/extract.py --images 16 --teachers ViT-B-32
    python benchmarks/extract.py --device cuda --no-ray --batch 1920 --teachers ViT-B-32   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

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

GRIDS = (1, 2, 3, 4)


def bare_teacher(arch: str, paths: list[str], view_size: int, batch: int, device: str) -> float:
    """images/s of the teacher alone: crops are cut (as uint8, to fit memory) before the clock;
    the embeddings come back to the CPU, as the job's do."""
    teacher = load_teacher(arch, "random", device=device)
    boxes = grid_boxes(GRIDS)
    views = torch.from_numpy(np.stack([decode_image(p, view_size, GRIDS).view for p in paths]))
    per = images_per_batch(batch, len(boxes))
    groups = [cut_crops(views[i:i + per], boxes, teacher.info.input_size).mul(255).round().to(torch.uint8)
              for i in range(0, len(views), per)]
    start = time.perf_counter()
    for crops in groups:
        teacher.encode_images(crops.float().div_(255)).cpu()
    return len(paths) / (time.perf_counter() - start)


def extract_rate(images: str, store: str, config: ExtractConfig, ray_cpus: int | None = None) -> tuple[int, float]:
    """(images, seconds) of the job itself: after listing and the driver's teacher load, with the
    Ray pool's start-up (each worker loading its teacher) included."""
    if ray_cpus:
        import ray

        ray.init(num_cpus=ray_cpus, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    try:
        summary = run_extract(images, store, config, notify=lambda _: None)
    finally:
        if ray_cpus:
            ray.shutdown()
    assert summary.pending == 0 and summary.done_this_run == summary.n_images
    return summary.done_this_run, summary.seconds


def pool_rates(manifests: tuple[str, str], work: Path, config: ExtractConfig, workers: int) -> tuple[float, float]:
    """images/s of a Ray pool of `workers` over the half and the whole listing: the whole job's,
    and the steady rate (images - half's) / (seconds - half's), in which start-up cancels."""
    runs = [
        extract_rate(m, str(work / f"{config.teacher}-ray{workers}-{i}.zarr"), dataclasses.replace(config, workers=workers), ray_cpus=workers)
        for i, m in enumerate(manifests)
    ]
    (n_half, s_half), (n, s) = runs
    return n / s, (n - n_half) / (s - s_half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--teachers", default="zeroseg-tiny,ViT-B-32")
    parser.add_argument("--view-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256, help="crops per forward (whole images)")
    parser.add_argument("--chunk-images", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where the teacher runs")
    parser.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True, help="also time the Ray pool")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zeroseg-bench-"))
    manifest = generate_scenes(work / "scenes", n=args.images, split="train", seed=0, size=args.view_size)
    paths = list_images(str(manifest))
    half = work / "half.txt"  # the first half of the scenes: a second, smaller job for pool_rates
    half.write_text("".join(f"{p}\n" for p in paths[: len(paths) // 2]))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"{len(paths)} synthetic scenes ({args.view_size} px), grids {GRIDS}, batch {args.batch} crops, "
          f"chunk {args.chunk_images} images, torch threads {torch.get_num_threads()}, teacher on {where}")
    for arch in args.teachers.split(","):
        config = ExtractConfig(teacher=arch, grids=GRIDS, view_size=args.view_size, batch=args.batch,
                               chunk_images=args.chunk_images, device=args.device)
        bare = bare_teacher(arch, paths, args.view_size, args.batch, args.device)
        n, seconds = extract_rate(str(manifest), str(work / f"{arch}-local.zarr"), dataclasses.replace(config, workers=0))
        local = n / seconds
        info = store_info(str(work / f"{arch}-local.zarr"))["bytes"]
        print(f"\n{arch}")
        print(f"  bare teacher      {bare:8.2f} images/s")
        print(f"  extract (local)   {local:8.2f} images/s   extract/bare = {local / bare:.2f}  (goal >= 0.9)")
        if args.ray:
            one, two = (pool_rates((str(half), str(manifest)), work, config, w) for w in (1, 2))
            print("                    job images/s  steady images/s (start-up cancelled)")
            print(f"  ray 1 worker x1t  {one[0]:8.2f}      {one[1]:8.2f}")
            print(f"  ray 2 workers x1t {two[0]:8.2f}      {two[1]:8.2f}")
            print(f"  2 vs 1 workers: job {two[0] / one[0]:.2f}x, steady {two[1] / one[1]:.2f}x  (goal >= 1.8)")
        print(f"  features on disk  {info['features_per_image']} B/image vs raw float16 {info['raw_float16_per_image']} B/image"
              f" ({info['features_per_image'] / info['raw_float16_per_image']:.2f}); whole store {info['per_image']} B/image")


if __name__ == "__main__":
    main()
