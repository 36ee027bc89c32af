"""Every GPU figure of issue 13 in one command: is the teacher fed, and what does bf16 buy?

On synthetic scenes, one teacher with random weights, grids 1,2,3,4 (30 crops per image), prints:
  bare bf16     the teacher alone in bf16 on crops cut beforehand, already on the device
  job bf16      `run_extract` in this process, --precision bf16 (decode, crops, teacher, store writes)
  job fp32      the same job in fp32
and the ratios job/bare (goal >= 0.9), bf16/fp32 (goal >= 3), the share of time the teacher waited
for decoded images (goal < 10%), the cosine of bf16 vs fp32 features (goal >= 0.999, min and
mean over crops) and the hours ImageNet's 1.28M images would take at the job's bf16 rate. Each
phase is warmed up once, the three are alternated `--repeats` times, medians reported.

    PYTHONPATH=. python benchmarks/gpu.py                      # on a CUDA machine: ViT-B-16, 224 px
    PYTHONPATH=. python benchmarks/gpu.py --device cpu         # the same table, tiny teacher, on this CPU

Without CUDA (and without --device cpu) it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
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
from zeroseg.pipeline.runner import ExtractConfig, Summary, run_extract  # noqa: E402
from zeroseg.pipeline.teacher import load_teacher  # noqa: E402
from zeroseg.stores.features import FeatureStore  # noqa: E402

GRIDS = (1, 2, 3, 4)  # 30 crops per image
IMAGENET_IMAGES = 1_281_167
# per device: teacher, images, batch (crops per forward), scene side in pixels (ImageNet's median is
# about 400 x 350: decoding cost like ImageNet's)
DEFAULTS = {"cuda": ("ViT-B-16", 1024, 1920, 400), "cpu": ("zeroseg-tiny", 48, 240, 224)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_rate(arch: str, paths: list[str], args) -> float:
    """crops/s of the teacher alone in bf16: views decoded and crops cut on the device before the
    clock (as uint8, to fit memory); embeddings come back to the CPU, as the job's do."""
    teacher = load_teacher(arch, "random", device=args.device)
    boxes = grid_boxes(GRIDS)
    views = torch.from_numpy(np.stack([decode_image(p, args.view_size, GRIDS).view for p in paths]))
    per = images_per_batch(args.batch, len(boxes))
    groups = [cut_crops(views[i:i + per].to(args.device), boxes, teacher.info.input_size).mul(255).round().to(torch.uint8)
              for i in range(0, len(views), per)]

    def run() -> float:
        sync(args.device)
        start = time.perf_counter()
        for crops in groups:
            teacher.encode_images(crops.float().div_(255), "bf16").cpu()
        sync(args.device)
        return sum(len(g) for g in groups) / (time.perf_counter() - start)

    run()  # warm-up
    return run


def job(manifest: str, store: str, config: ExtractConfig) -> Summary:
    summary = run_extract(manifest, store, config, notify=lambda _: None)
    assert summary.pending == 0 and summary.done_this_run == summary.n_images, summary
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--teacher", help=f"open_clip architecture, random weights [default: {DEFAULTS['cuda'][0]} on "
                                          f"cuda, {DEFAULTS['cpu'][0]} on cpu]")
    parser.add_argument("--images", type=int, help="synthetic scenes per job")
    parser.add_argument("--batch", type=int, help="crops per forward (whole images)")
    parser.add_argument("--scene-size", type=int, help="side of the synthetic scenes in pixels (what is decoded)")
    parser.add_argument("--view-size", type=int, default=224)
    parser.add_argument("--chunk-images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine (or give --device cpu for the tiny table on this CPU)")
        return 2
    arch, n_images, batch, scene_size = DEFAULTS[args.device]
    args.teacher, args.images = args.teacher or arch, args.images or n_images
    args.batch, args.scene_size = args.batch or batch, args.scene_size or scene_size

    work = Path(tempfile.mkdtemp(prefix="zeroseg-gpu-bench-"))
    manifest = str(generate_scenes(work / "scenes", n=args.images, split="train", seed=0, size=args.scene_size,
                                   progress=False))
    paths = list_images(manifest)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    print(f"{args.teacher} (random weights) on {where}: {len(paths)} scenes of {args.scene_size} px, view {args.view_size}, "
          f"{sum(g * g for g in GRIDS)} crops/image, batch {args.batch} crops, chunk {args.chunk_images} images")
    base = ExtractConfig(teacher=args.teacher, grids=GRIDS, view_size=args.view_size, batch=args.batch,
                         chunk_images=args.chunk_images, workers=0, device=args.device)
    crops_per_image = sum(g * g for g in GRIDS)

    bare = bare_rate(args.teacher, paths, args)
    runs = 0

    def job_rate(precision: str) -> tuple[float, float, str]:
        """(crops/s, wait share, store) of one whole job at `precision`, into a new store."""
        nonlocal runs
        runs += 1
        store = str(work / f"{precision}-{runs}.zarr")
        s = job(manifest, store, dataclasses.replace(base, precision=precision))
        return s.done_this_run * crops_per_image / s.seconds, s.wait_share, store

    rates: dict[str, list[float]] = {"bare bf16": [], "job bf16": [], "job fp32": []}
    waits: dict[str, list[float]] = {"job bf16": [], "job fp32": []}
    stores = {}
    job_rate("bf16"), job_rate("fp32")  # warm-up: first-call allocations, cuDNN/GEMM selection
    for _ in range(args.repeats):
        rates["bare bf16"].append(bare())
        for precision in ("bf16", "fp32"):
            rate, wait, stores[precision] = job_rate(precision)
            rates[f"job {precision}"].append(rate)
            waits[f"job {precision}"].append(wait)

    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"\n{'phase':<10} {'crops/s':>10} {'images/s':>10} {'teacher waited':>15}   (median of {args.repeats})")
    for name, rate in med.items():
        wait = f"{statistics.median(waits[name]):.1%}" if name in waits else "-"
        print(f"{name:<10} {rate:10.0f} {rate / crops_per_image:10.1f} {wait:>15}")
    a = FeatureStore.open(stores["bf16"]).features[:].astype(np.float32).reshape(-1, FeatureStore.open(stores["bf16"]).features.shape[-1])
    b = FeatureStore.open(stores["fp32"]).features[:].astype(np.float32).reshape(a.shape)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    hours = IMAGENET_IMAGES / (med["job bf16"] / crops_per_image) / 3600
    print(f"\njob bf16 / bare bf16     {med['job bf16'] / med['bare bf16']:.2f}   (goal >= 0.9)")
    print(f"job bf16 / job fp32      {med['job bf16'] / med['job fp32']:.2f}x  (goal >= 3 on a GPU)")
    print(f"teacher waited (bf16)    {statistics.median(waits['job bf16']):.1%}  (goal < 10%)")
    print(f"cosine bf16 vs fp32      min {cos.min():.4f}, mean {cos.mean():.4f} over {len(cos)} crops  (goal >= 0.999)")
    print(f"ImageNet (1.28M images)  {hours:.1f} h for one job at the bf16 rate on this device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
