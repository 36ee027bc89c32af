"""`zeroseg demo`: the whole ZeroSeg loop on the offline default, each stage reusing its output.

    scenes -> toy teacher -> feature store (extract) -> vocabulary (text) -> students (train)
    -> background thresholds (calibrated on the train split, each student's stored in its run)
    -> held-out mIoU (eval) -> overlays

Four methods are compared on the same held-out split:
- student:  trained from the cache with all three losses (distillation, segment matching, MAE);
- no-match: the same with segment matching off (PAPER.md table 4's ablation);
- grid:     the teacher alone, each cell of a 4x4 grid labelled by its crop embedding: what a user
            gets from CLIP without a student;
- dense:    the teacher alone, read at every position of its last feature map (MaskCLIP, see
            segment.dense): the training-free baseline a practitioner tries first.
Beside them a bound, not a method: the true segments, each labelled by the teacher's embedding of
a crop around it (segment.zeroshot.TruthSegmentsPredictor). A student learns its labels from this
teacher, so perfect grouping would still score about this.
Each method's background threshold is chosen on train scenes, never on held-out ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from zeroseg.errors import UserError
from zeroseg.experiments import scenes
from zeroseg.experiments.toy_teacher import PRESETS as TEACHER_PRESETS
from zeroseg.experiments.toy_teacher import ToyTeacherConfig, ensure_toy_teacher
from zeroseg.outputs import claim_output_dir, write_atomic
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.pipeline.teacher import load_store_teacher
from zeroseg.segment import render
from zeroseg.segment.datasets import SCENE_CLASSES, load_dataset
from zeroseg.segment.dense import DensePredictor
from zeroseg.segment.evaluate import evaluate, load_vocabulary, save_calibration
from zeroseg.segment.text import cache_vocabulary
from zeroseg.segment.zeroshot import GridPredictor, StudentPredictor, TruthSegmentsPredictor, calibrate_threshold
from zeroseg.stores.features import FeatureStore
from zeroseg.trainer.checkpoint import latest_checkpoint, load_student_for, read_state
from zeroseg.trainer.config import TrainConfig, recipe
from zeroseg.trainer.recipes import DEFAULT_PRESET, DEFAULT_RECIPE
from zeroseg.trainer.train import train

VOCAB = "scenes"


@dataclass(frozen=True)
class DemoConfig:
    teacher: ToyTeacherConfig = field(default_factory=ToyTeacherConfig)
    seed: int = 0  # of the scenes (the teacher has its own)
    scene_size: int = 128
    n_train: int = 600
    n_heldout: int = 100
    extract_workers: int | None = None  # None: a local Ray pool, one actor per core
    student_preset: str = DEFAULT_PRESET
    recipe: str = DEFAULT_RECIPE  # trainer/recipes/; the no-match baseline is the same with match off
    students: tuple[str, ...] = ("student", "no-match")  # of STUDENTS
    seeds: tuple[int, ...] = (0,)  # each student is trained once per seed; the table shows mean +- std
    steps: int = 300
    batch: int = 32
    lr: float = 1e-3
    calibrate_images: int = 100  # train scenes the thresholds are chosen on
    overlays: int = 4

    @property
    def view_size(self) -> int:
        return self.teacher.view_size  # the student sees what the teacher was trained to see


# name -> (recipe, None = the config's; segment matching on). Every student learns from the same cache.
STUDENTS = {
    "student": (None, True),
    "no-match": (None, False),  # PAPER.md table 4's ablation: segment matching off
    "paper": ("paper", True),  # PAPER.md's exact model and losses
}

PRESETS = {
    "default": DemoConfig(),
    # `make quality`: the student with a real budget (issue 15), <= 60 min on 2 cores from an empty
    # cache: the toy teacher 4x longer (bound 0.394 -> 0.652, benchmarks/student_shape.py), 2000
    # scenes, 1000 steps, the shape recipe beside the paper's and the no-match ablation, 3 seeds.
    "quality": DemoConfig(
        teacher=dataclasses.replace(ToyTeacherConfig(), steps=2000), n_train=2000, n_heldout=200, recipe="shape",
        students=("student", "no-match", "paper"), seeds=(0, 1, 2), steps=1000,
    ),
    "tiny": DemoConfig(
        teacher=TEACHER_PRESETS["tiny"], scene_size=64, n_train=16, n_heldout=6, extract_workers=0,
        student_preset="tiny", steps=3, batch=8, calibrate_images=8, overlays=2,
    ),
}


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---- stages ----------------------------------------------------------------------------------


def make_scenes(cfg: DemoConfig, out: Path) -> dict[str, Path]:
    """out/scenes/<split>/, regenerated only when its recipe changed."""
    folders = {}
    for split, n in (("train", cfg.n_train), ("heldout", cfg.n_heldout)):
        folder = out / "scenes" / split
        made_with = {"n": n, "seed": cfg.seed, "size": cfg.scene_size, "split": split}
        stamp = folder / "recipe.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == made_with and (folder / "manifest.jsonl").is_file()):
            scenes.generate_scenes(folder, n=n, split=split, seed=cfg.seed, size=cfg.scene_size)
            stamp.write_text(json.dumps(made_with))
        folders[split] = folder
    return folders


def extract(cfg: DemoConfig, teacher_ckpt: Path, train_scenes: Path, out: Path) -> str:
    """The train scenes' crop features and pixels, in a store named after the teacher (a new
    teacher means a new store); the extraction job itself skips chunks already done."""
    url = str(out / "cache" / f"{teacher_ckpt.stem}-v{cfg.view_size}-n{cfg.n_train}.zarr")
    config = ExtractConfig(
        teacher=cfg.teacher.arch, pretrained=str(teacher_ckpt), grids=cfg.teacher.grids,
        view_size=cfg.view_size, pixels=True, workers=cfg.extract_workers,
    )
    run_extract(str(train_scenes / "manifest.jsonl"), url, config, notify=lambda msg: None)
    return url


def cache_text(store_url: str) -> None:
    if VOCAB not in FeatureStore.open(store_url).vocabularies():
        cache_vocabulary(store_url, VOCAB, list(SCENE_CLASSES[1:]))


def student_config(cfg: DemoConfig, name: str, seed: int) -> TrainConfig:
    """The TrainConfig of one of the demo's students (STUDENTS), one torch thread each: two train
    side by side (train_students)."""
    recipe_name, match = STUDENTS[name]
    config = recipe(
        recipe_name or cfg.recipe, cfg.student_preset, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, seed=seed, threads=1,
    )
    if not match:
        config = dataclasses.replace(config, losses=dataclasses.replace(config.losses, match=0.0))
    return config


def train_student(cfg: DemoConfig, store_url: str, out: Path, name: str, seed: int) -> Path:
    """A student run dir keyed by its recipe; a finished run is reused, a cut one resumed."""
    config = student_config(cfg, name, seed)
    run_dir = out / "runs" / f"{name}-{_key(store_url, config.to_dict())}"
    last = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if last is None:
        train(store_url, run_dir, config, progress=False)
    elif read_state(last)["step"] < cfg.steps:
        train(store_url, run_dir, resume=True, progress=False)
    return run_dir


def train_students(cfg: DemoConfig, store_url: str, out: Path) -> dict[str, list[Path]]:
    """Every student for every seed, two at a time, each in its own process on one torch thread:
    on two cores a pair takes the time of one. Processes, not threads: a run reseeds torch's
    global RNG every step, which two threads would share."""
    jobs = [(name, seed) for seed in cfg.seeds for name in cfg.students]
    spawn = multiprocessing.get_context("spawn")  # fork is unsafe once torch and Ray have started threads
    with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool, Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task(f"{len(jobs)} students, {cfg.steps} steps each", total=len(jobs))
        futures = {job: pool.submit(train_student, cfg, store_url, out, *job) for job in jobs}
        for future in as_completed(futures.values()):
            future.result()
            bar.advance(task)
    return {name: [futures[name, seed].result() for seed in cfg.seeds] for name in cfg.students}


# ---- the whole loop --------------------------------------------------------------------------


def run_demo(out: Path, preset: str | DemoConfig = "default", console: Console | None = None) -> dict:
    """The whole loop for a named preset, or for any DemoConfig (benchmarks/student_shape.py varies them)."""
    if isinstance(preset, DemoConfig):
        cfg, preset = preset, "custom"
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise UserError(f"unknown demo preset {preset!r}: {' | '.join(PRESETS)}")
    console = console or Console()
    out = Path(out)
    claim_output_dir(out, "demo")  # ours: each stage reuses what is there; anyone else's: refused
    t_start = time.perf_counter()
    times: dict[str, float] = {}

    def stage(name: str, fn, *args):
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        result = fn(*args)
        times[name] = time.perf_counter() - t0
        console.print(f"{name}: {times[name]:.1f} s")
        return result

    folders = stage("scenes", make_scenes, cfg, out)
    teacher_ckpt, teacher_report = stage("teacher", ensure_toy_teacher, cfg.teacher)
    console.print(
        f"toy teacher {escape(str(teacher_ckpt))}: zero-shot accuracy {teacher_report['zero_shot_accuracy']:.3f} on "
        f"{teacher_report['heldout_images']} held-out single objects, {teacher_report['scene_object_accuracy']:.3f} on "
        f"objects cut from held-out scenes (trained in {teacher_report['train_seconds']:.0f} s)"
    )
    store_url = stage("extract", extract, cfg, teacher_ckpt, folders["train"], out)
    stage("text", cache_text, store_url)
    runs = stage("train students", train_students, cfg, store_url, out)
    results = stage("evaluate", evaluate_all, cfg, store_url, runs, folders, out, console)
    overlays = stage("overlays", write_overlays, cfg, store_url, runs["student"][0], folders["heldout"], results, out)

    summary = {
        "preset": preset,
        "config": dataclasses.asdict(cfg),
        "teacher": {"checkpoint": str(teacher_ckpt), **{k: teacher_report[k] for k in ("zero_shot_accuracy", "scene_object_accuracy", "train_seconds")}},
        "store": store_url,
        "runs": {k: [str(p) for p in v] for k, v in runs.items()},
        "results": results,
        "overlays": [str(p) for p in overlays],
        "stage_seconds": {k: round(v, 1) for k, v in times.items()},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_atomic(out / "results.json", json.dumps(summary, indent=2) + "\n")
    console.print(results_table(results, teacher_report))
    console.print(f"overlays: {escape(', '.join(str(p) for p in overlays))}")
    console.print(f"results: {escape(str(out / 'results.json'))}   wall time {summary['wall_seconds']:.0f} s")
    console.print(  # the run remembers its calibrated threshold: segment uses it without --bg-threshold
        f"segment your own: zeroseg segment {runs['student'][0]} IMAGE... --store {store_url} --vocab {VOCAB} --out DIR",
        soft_wrap=True, markup=False, highlight=False,
    )
    return summary


def evaluate_all(cfg: DemoConfig, store_url: str, runs: dict[str, list[Path]], folders: dict[str, Path], out: Path, console: Console) -> dict:
    """Threshold on train scenes, mIoU on held-out ones, for every student run and the teacher's
    baselines; each run's threshold is stored in it, for `zeroseg eval` and `segment` to use.
    A method's report is its first seed's, with `seeds` (every seed's mIoU, their mean and std)."""
    heldout = load_dataset(folders["heldout"])
    train = load_dataset(folders["train"]).subset(cfg.calibrate_images)
    store, vocabulary = load_vocabulary(store_url, VOCAB, heldout.classes)
    teacher = load_store_teacher(store)
    predictors = {(name, i): StudentPredictor(load_student_for(run, store)[0], vocabulary)
                  for name, seed_runs in runs.items() for i, run in enumerate(seed_runs)}
    predictors["grid", 0] = GridPredictor(teacher, vocabulary, grid=4)
    predictors["dense", 0] = DensePredictor(teacher, vocabulary)
    predictors["ceiling", 0] = TruthSegmentsPredictor(teacher, vocabulary)
    reports: dict[str, list[dict]] = {}
    for (name, i), predictor in predictors.items():
        predictor.name = name if i == 0 else f"{name} (seed {cfg.seeds[i]})"
        threshold, train_miou = calibrate_threshold(predictor, train, len(train.classes))
        if name in runs:
            save_calibration(runs[name][i], threshold, train_miou, folders["train"], len(train), store, VOCAB, vocabulary)
        result = evaluate(predictor, heldout, threshold)
        reports.setdefault(name, []).append({**result.to_dict(), "train_miou": round(train_miou, 4), "n_images": len(heldout)})
        if i == 0:
            render.save_confusion(result.confusion.counts, heldout.classes, out / f"confusion_{name}.png",
                                  f"{name} on held-out scenes: mIoU {reports[name][0]['miou']}")
    results = {}
    for name, seed_reports in reports.items():
        mious = [r["miou"] for r in seed_reports]
        seeds = list(cfg.seeds) if name in runs else None  # the teacher's methods have no seed
        results[name] = {**seed_reports[0], "seeds": {
            "seeds": seeds, "miou": mious, "mean": round(float(np.mean(mious)), 4),
            "std": round(float(np.std(mious, ddof=1)), 4) if len(mious) > 1 else 0.0,
        }}
    return results


def write_overlays(cfg: DemoConfig, store_url: str, student_run: Path, heldout_folder: Path, results: dict, out: Path) -> list[Path]:
    """For a few held-out scenes: image | truth | student | grid baseline, each with its legend."""
    heldout = load_dataset(heldout_folder)
    store, vocabulary = load_vocabulary(store_url, VOCAB, heldout.classes)
    student = StudentPredictor(load_student_for(student_run, store)[0], vocabulary)
    grid = GridPredictor(load_store_teacher(store), vocabulary, grid=4)
    names = dict(enumerate(heldout.classes))
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(cfg.overlays, len(heldout))):
        image, truth = heldout.load(i)
        student_mask = student.raw([image])[0].mask(results["student"]["bg_threshold"])
        grid_mask = grid.raw([image])[0].mask(results["grid"]["bg_threshold"])
        scale = max(1, 256 // image.shape[0])  # small scenes are enlarged (nearest) to be seen
        big = lambda a: np.kron(a, np.ones((scale, scale) + (1,) * (a.ndim - 2), dtype=a.dtype))
        panels = [Image.fromarray(big(image))] + [
            render.overlay(big(image), big(mask), names) for mask in (truth, student_mask, grid_mask)
        ]
        path = out / "overlays" / f"{heldout.images[i].stem}.png"
        titles = ["held-out image", "ground truth", "student", "teacher alone, 4x4 grid"]
        render.side_by_side(panels, titles).save(path)
        written.append(path)
    return written


def results_table(results: dict, teacher_report: dict) -> Table:
    n_seeds = max(len(r["seeds"]["miou"]) for r in results.values())
    what = f"mean ± std over {n_seeds} seeds; thresholds etc. of the first" if n_seeds > 1 else "mIoU incl. background"
    table = Table(title=f"zero-shot segmentation, held-out synthetic scenes ({what})")
    for col in ("method", "mIoU", "pixel acc.", "bg threshold", "train mIoU"):
        table.add_column(col, justify="left" if col == "method" else "right")
    labels = {
        "student": "student (from the cache)",
        "no-match": "student, segment matching off",
        "paper": "student, the paper's recipe",
        "grid": "teacher alone, 4x4 grid",
        "dense": "teacher alone, dense (MaskCLIP)",
        "ceiling": "bound: teacher on the true segments",
    }
    for name, r in results.items():
        seeds = r["seeds"]
        miou = f"{seeds['mean']:.3f} ± {seeds['std']:.3f}" if len(seeds["miou"]) > 1 else f"{r['miou']:.3f}"
        table.add_row(labels[name], miou, f"{r['pixel_accuracy']:.3f}", f"{r['bg_threshold']:.3f}", f"{r['train_miou']:.3f}")
    table.caption = (
        f"toy teacher zero-shot accuracy: {teacher_report['zero_shot_accuracy']:.3f} on held-out single objects, "
        f"{teacher_report['scene_object_accuracy']:.3f} on objects cut from held-out scenes"
    )
    return table
