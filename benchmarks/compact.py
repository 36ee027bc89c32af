"""Compact targets on the demo's store: bytes on disk per image for fp16, int8 and PQ, their
cosine to fp16, and (with --seeds) the student trained on int8 vs fp16 targets, held-out mIoU.

    PYTHONPATH=. python benchmarks/compact.py [--work DIR] [--preset default] [--seeds 0,1,2] [--steps 300]

The store is the demo's (`zeroseg demo`'s scenes, toy teacher and extraction, in --work, reused
when there); each training is the demo's student recipe with --steps and the seed, reading fp16
or int8 targets; its background threshold is calibrated on train scenes, mIoU measured on the
held-out scenes, as the demo does.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
from pathlib import Path

from zeroseg.experiments.demo import PRESETS, VOCAB, cache_text, extract, make_scenes
from zeroseg.experiments.toy_teacher import ensure_toy_teacher
from zeroseg.segment.datasets import load_dataset
from zeroseg.segment.evaluate import evaluate, load_vocabulary
from zeroseg.segment.zeroshot import StudentPredictor, calibrate_threshold
from zeroseg.stores.compact import compact_store
from zeroseg.stores.inspect import store_info, verify_store
from zeroseg.trainer.checkpoint import latest_checkpoint, load_student_for
from zeroseg.trainer.config import recipe
from zeroseg.trainer.train import train


def miou_of(run_dir: Path, store_url: str, folders: dict[str, Path], calibrate_images: int) -> float:
    heldout = load_dataset(folders["heldout"])
    calib = load_dataset(folders["train"]).subset(calibrate_images)
    store, vocabulary = load_vocabulary(store_url, VOCAB, heldout.classes)
    predictor = StudentPredictor(load_student_for(run_dir, store)[0], vocabulary)
    threshold, _ = calibrate_threshold(predictor, calib, len(calib.classes), progress=False)
    return float(evaluate(predictor, heldout, threshold, progress=False).confusion.miou())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="folder for scenes, store and runs (default: a temporary one)")
    ap.add_argument("--preset", default="default", help="the demo preset whose store is measured")
    ap.add_argument("--seeds", default="", help="comma-separated seeds: train on fp16 and int8 targets for each")
    ap.add_argument("--steps", type=int, default=None, help="steps per training [default: the demo's]")
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    work = args.work or Path(tempfile.mkdtemp(prefix="zeroseg-compact-"))
    work.mkdir(parents=True, exist_ok=True)

    folders = make_scenes(cfg, work)
    teacher_ckpt, _ = ensure_toy_teacher(cfg.teacher)
    url = extract(cfg, teacher_ckpt, folders["train"], work)
    cache_text(url)
    for kind in ("int8", "pq"):
        compact_store(url, kind, notify=lambda _m: None)

    info = store_info(url)
    report = verify_store(url)[0]["compact"]
    fp16 = info["bytes"]["features_per_image"]
    print(f"machine: {platform.machine()} {platform.processor() or ''}; store {url}")
    print(f"{info['images']} images ({info['status']['ok']} ok), features {tuple(info['features']['shape'])}, "
          f"raw float16 {info['bytes']['raw_float16_per_image']} B per image")
    print(f"{'targets':<8} {'bytes/image':>12} {'x fp16':>8} {'x raw fp16':>11} {'min cos':>9} {'mean cos':>9}")
    print(f"{'fp16':<8} {fp16:>12} {1.0:>8.3f} {fp16 / info['bytes']['raw_float16_per_image']:>11.3f} {'1':>9} {'1':>9}")
    for kind, c in info["compact"].items():
        extra = f"  (+ codebook {c['codebook_bytes']} B once)" if c["codebook_bytes"] else ""
        print(f"{kind:<8} {c['per_image']:>12} {c['per_image'] / fp16:>8.3f} "
              f"{c['per_image'] / info['bytes']['raw_float16_per_image']:>11.3f} "
              f"{report[kind]['min_cosine']:>9.5f} {report[kind]['mean_cosine']:>9.5f}{extra}")

    if not args.seeds:
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = args.steps or cfg.steps
    mious: dict[str, list[float]] = {"fp16": [], "int8": []}
    for seed in seeds:
        for dtype in ("fp16", "int8"):  # alternated: a slower machine moment hits both alike
            config = recipe(cfg.recipe, cfg.student_preset, steps=steps, batch=cfg.batch, lr=cfg.lr, seed=seed,
                            threads=1, targets_dtype=dtype)
            run = work / "runs" / f"{dtype}-seed{seed}-steps{steps}"
            if not run.is_dir() or latest_checkpoint(run) is None:
                train(url, run, config, progress=False)
            mious[dtype].append(miou_of(run, url, folders, cfg.calibrate_images))
            print(f"seed {seed} {dtype}: held-out mIoU {mious[dtype][-1]:.4f}", flush=True)
    for dtype, values in mious.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{dtype} targets: mIoU {statistics.mean(values):.4f} +- {sd:.4f} over seeds {args.seeds} ({steps} steps)")


if __name__ == "__main__":
    main()
