"""Ablations: many short student trainings over one store, never re-running the teacher.

A spec names trainer config fields by dotted path (`grids`, `losses.match`, `mask_ratio`,
`model.group_tokens`) and either a grid of values (every combination is a trial) or an explicit
list of named trials (for tables whose rows are not a product, like the paper's loss table).
A `teachers` list (keys of the store's teachers, `store info`) crosses every trial with each
teacher: the same students distilled from each teacher's features of the same images.
Each trial x seed trains from the cache and evaluates mIoU in its own run dir, as a Ray Tune trial.
A trial's result file is keyed by the hash of everything that makes it, so a re-run skips what is
done and a failed trial is recorded without stopping the others.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from zeroseg.errors import UserError
from zeroseg.experiments.ablation_results import write_results
from zeroseg.outputs import canonical_location, claim_output_dir, output_kind, write_atomic
from zeroseg.pipeline.distributor import ray_cluster
from zeroseg.segment.evaluate import run_eval
from zeroseg.stores.features import FeatureStore
from zeroseg.trainer.checkpoint import latest_checkpoint
from zeroseg.trainer.config import TrainConfig, recipe
from zeroseg.trainer.losses import TERMS
from zeroseg.trainer.recipes import DEFAULT_PRESET, DEFAULT_RECIPE
from zeroseg.trainer.train import train

# The paper's ablation tables (PAPER.md, tables 3-5), as specs. "scales" rows are the 1x1 view
# plus one finer grid, then all; "losses" rows switch multi-scale distillation (all crops vs the
# 1x1 view only) and segment matching.
PRESETS: dict[str, dict[str, Any]] = {
    "scales": {"grid": {"grids": ["1", "1,2", "1,3", "1,4", "1,2,3,4"]}},
    "losses": {
        "trials": [
            {"name": "base", "losses.multiscale": False, "losses.match": 0.0},
            {"name": "+multi-scale", "losses.multiscale": True, "losses.match": 0.0},
            {"name": "+segment matching", "losses.multiscale": False, "losses.match": 1.0},
            {"name": "both", "losses.multiscale": True, "losses.match": 1.0},
        ]
    },
    "mask-ratio": {"grid": {"mask_ratio": [0.0, 0.2, 0.4, 0.6, 0.8]}},
    "tokens": {"grid": {"model.group_tokens": ["16,4", "16,8", "32,8", "32,16"]}},
}


@dataclass(frozen=True)
class Trial:
    """One row of a table: a name and the config fields it sets."""

    name: str
    overrides: dict[str, Any]


def load_spec(spec: str) -> dict[str, Any]:
    """A preset name, a YAML/JSON file, or inline YAML/JSON."""
    if spec in PRESETS:
        return PRESETS[spec]
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"ablation spec is not YAML/JSON: {str(e).splitlines()[0]}")
    if not isinstance(parsed, dict) or not ({"grid", "trials", "teachers"} & parsed.keys()):
        raise UserError(
            f"ablation spec {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a mapping "
            "with 'grid' (field: [values]), 'trials' (a list of {name, field: value}) or 'teachers' (a list of keys)"
        )
    return parsed


def expand(spec: dict[str, Any]) -> list[Trial]:
    """Every combination of the grid's values (in the order given), or the listed trials (or the
    recipe alone), each once per teacher of a `teachers` list."""
    trials = _expand_fields(spec)
    if "teachers" not in spec:
        return trials
    teachers = spec["teachers"]
    if not isinstance(teachers, list) or not teachers or not all(isinstance(k, str) for k in teachers):
        raise UserError("ablation spec 'teachers' needs a non-empty list of teacher keys (`zeroseg store info` lists them)")
    return [Trial(f"{t.name}, teacher={key}" if t.overrides else f"teacher={key}", {**t.overrides, "teacher_key": key})
            for t in trials for key in teachers]


def _expand_fields(spec: dict[str, Any]) -> list[Trial]:
    if "grid" not in spec and "trials" not in spec:
        return [Trial("recipe", {})]
    if "trials" in spec:
        trials = []
        for i, row in enumerate(spec["trials"]):
            fields = {k: v for k, v in row.items() if k != "name"}
            trials.append(Trial(str(row.get("name", f"trial{i}")), fields))
        return trials
    grid = spec["grid"]
    for field, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"ablation grid field {field!r} needs a non-empty list of values")
    fields = list(grid)
    return [
        Trial(", ".join(f"{f}={v}" for f, v in zip(fields, combo)), dict(zip(fields, combo)))
        for combo in itertools.product(*(grid[f] for f in fields))
    ]


def varied_fields(trials: list[Trial]) -> list[str]:
    """Fields that take more than one value across the trials (the columns of the tables)."""
    fields = dict.fromkeys(f for t in trials for f in t.overrides)
    return [f for f in fields if len({json.dumps(t.overrides.get(f)) for t in trials}) > 1]


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a nested config dict with dotted fields set; comma strings become int lists
    for list fields ("1,2" -> [1, 2]). An unknown field is a user error."""
    out = json.loads(json.dumps(config))
    for dotted, value in overrides.items():
        node = out
        keys = dotted.split(".")
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise UserError(f"unknown config field {dotted!r}")
            node = node[key]
        if keys[-1] not in node:
            raise UserError(f"unknown config field {dotted!r} (have: {', '.join(node)})")
        if isinstance(node[keys[-1]], list) and isinstance(value, str):
            value = [int(v) for v in value.split(",")]
        node[keys[-1]] = value
    return out


def trial_key(config: dict[str, Any], seed: int, store_identity: dict[str, Any], dataset: str) -> str:
    """Hash of everything that makes a trial's result: a re-run with the same key is the same trial.
    Paths count by where they lead, not how they were spelled (./s.zarr, s.zarr/, /abs/s.zarr)."""
    store_identity = {**store_identity, "url": canonical_location(store_identity["url"])}
    blob = json.dumps({"config": config, "seed": seed, "store": store_identity, "eval": canonical_location(dataset)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- running -----------------------------------------------------------------------------------

TrialFn = Callable[[dict[str, Any], Path], dict[str, Any]]


def run_trial(trial_fn: TrialFn, job: dict[str, Any]) -> dict[str, Any]:
    """Run one trial x seed in its dir unless it already succeeded there; never raises: a failure
    is a result with status "failed" and the error's first line (a re-run tries it again)."""
    done = finished_result(job)
    if done is not None:
        return done
    run_dir = Path(job["run_dir"])
    result_file = run_dir / "result.json"
    start = time.perf_counter()
    try:
        claim_output_dir(run_dir, "train")  # a trial's run dir is a train run (train.train claims it too)
        write_atomic(run_dir / "trial.json", json.dumps(job, indent=2))
        result = {"status": "ok", "error": "", **trial_fn(job["config"], run_dir)}
    except Exception as e:  # noqa: BLE001 - a failed trial is data, the others go on
        result = {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    result = {"trial": job["trial"], "seed": job["seed"], "key": job["key"], **job["fields"],
              "wall_s": round(time.perf_counter() - start, 2), **result}
    if output_kind(run_dir) == "train":  # not into a folder the claim refused
        write_atomic(result_file, json.dumps(result, indent=2))
    return result


def finished_result(job: dict[str, Any]) -> dict[str, Any] | None:
    """The result of a job that already succeeded in its run dir, else None."""
    result = _read_result(Path(job["run_dir"]) / "result.json")
    return result if result is not None and result.get("status") == "ok" else None


def _read_result(path: Path) -> dict[str, Any] | None:
    """A trial's recorded result; None when there is none or it cannot be read (a write cut short
    before results were atomic, a damaged file): that trial is simply run again."""
    try:
        result = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def train_and_evaluate(
    config: dict[str, Any], run_dir: Path, *, store: str, dataset: str, vocab: str,
    calibrate_on: str | None, threshold: float | None,
) -> dict[str, Any]:
    """One trial: train from the cache (continuing a run a kill interrupted), then held-out mIoU."""
    start = time.perf_counter()
    if latest_checkpoint(run_dir) is not None:
        result = train(store, run_dir, resume=True, progress=False)
    else:
        result = train(store, run_dir, TrainConfig.from_dict(config), progress=False)
    train_s = time.perf_counter() - start
    report = run_eval(run_dir, dataset, store, vocab, run_dir, threshold=threshold,
                      calibrate_on=calibrate_on, progress=False)
    losses = {f"final_{k}": result["metrics"].get(k) for k in ("loss", *TERMS) if k in result["metrics"]}
    return {"steps": result["step"], "train_s": round(train_s, 2), "miou": report["miou"],
            "bg_threshold": report["bg_threshold"], **losses}


@dataclass
class AblationReport:
    rows: list[dict[str, Any]]
    markdown: str
    wall_s: float
    teacher_passes_saved: int
    online_estimate_s: float


def plan_jobs(
    trials: list[Trial], seeds: list[int], base: dict[str, Any], store: FeatureStore, dataset: str, out: Path
) -> list[dict[str, Any]]:
    """One job per trial x seed, each with its config, its key and its own run dir."""
    fields = varied_fields(trials)
    jobs = []
    for trial in trials:
        for seed in seeds:
            config = apply_overrides({**base, "seed": seed}, trial.overrides)
            key = trial_key(config, seed, store.identity(), dataset)
            jobs.append({"trial": trial.name, "seed": seed, "key": key, "config": config,
                         "fields": {f: trial.overrides.get(f, "") for f in fields},
                         "run_dir": str(out / "trials" / key)})
    return jobs


def run_ablation(
    store_url: str, spec: str | None, out: Path, dataset: str, vocab: str, *, steps: int = 300,
    seeds: list[int] = (0,), preset: str = DEFAULT_PRESET, recipe_name: str = DEFAULT_RECIPE, batch: int | None = None,
    calibrate_on: str | None = None, threshold: float | None = None, parallel: int | None = None,
    address: str | None = None, online_ratio: float = 191.0, progress: bool = True, teachers: list[str] | None = None,
) -> AblationReport:
    """Every trial x seed of `spec` over one store: Ray Tune trials of one CPU each (`parallel` at
    a time; 0 runs them one by one in this process), resumable, then the tables, plot and cost.
    `teachers` (keys of the store's teachers) adds a teachers axis to the spec (or replaces its own);
    with no spec, the trials are the recipe alone, once per teacher."""
    # Tune runs each trial in a folder of its own: every path it is given must be absolute
    store_url, dataset, out = canonical_location(store_url), canonical_location(dataset), Path(canonical_location(str(out)))
    calibrate_on = canonical_location(calibrate_on) if calibrate_on else None
    store = FeatureStore.open(store_url)
    loaded = load_spec(spec) if spec is not None else {}
    trials = expand({**loaded, "teachers": teachers} if teachers else loaded)
    for key in dict.fromkeys(t.overrides["teacher_key"] for t in trials if "teacher_key" in t.overrides):
        FeatureStore.open(store_url, teacher=key).read_text(vocab)  # each teacher there, with the vocabulary: before any trial
    batch_given = {} if batch is None else {"batch": batch}  # else TrainConfig's
    base = recipe(recipe_name, preset, steps=steps, grids=store.config.grids, threads=1, **batch_given).to_dict()
    claim_output_dir(out, "ablation")  # ours is resumed; anyone else's folder is refused untouched
    jobs = plan_jobs(trials, list(seeds), base, store, dataset, out)
    trial_fn = functools.partial(train_and_evaluate, store=store_url, dataset=dataset, vocab=vocab,
                                 calibrate_on=calibrate_on, threshold=threshold)
    start = time.perf_counter()
    bar = Progress(TextColumn("ablation"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress)
    with bar:
        task = bar.add_task("trials", total=len(jobs))
        done = lambda: bar.advance(task)  # noqa: E731
        rows = _run_jobs(trial_fn, jobs, parallel, address, out, done)
    wall_s = time.perf_counter() - start
    fields = varied_fields(trials)
    ok = [r for r in rows if r["status"] == "ok"]
    # teacher passes one step of a trial replaces: its batch x its crops per image
    per_step = {j["key"]: j["config"]["batch"] * sum(g * g for g in j["config"]["grids"]) for j in jobs}
    saved = sum(int(r["steps"]) * per_step[r["key"]] for r in ok)
    train_s = sum(float(r["train_s"]) for r in ok)
    online_s = train_s * online_ratio
    footer = (
        f"\nCost: {len(ok)} trainings over one cache saved {saved:,} teacher crop passes "
        f"(steps x batch x crops). They trained for {train_s / 60:.1f} CPU-min in all (this invocation: "
        f"{wall_s / 60:.1f} min wall); with online targets the same trainings would take about "
        f"{online_s / 3600:.1f} h (x {online_ratio:g}, the cached/online ratio measured by "
        "benchmarks/train.py with a ViT-B-32 teacher).\n"
    )
    markdown = write_results(rows, fields, out, footer)
    return AblationReport(rows, markdown, wall_s, saved, online_s)


def _run_jobs(trial_fn: TrialFn, jobs: list[dict[str, Any]], parallel: int | None, address: str | None,
              out: Path, done: Callable[[], None]) -> list[dict[str, Any]]:
    """Results in job order. A trial already finished is read back from its run dir; the others
    run one by one here (parallel=0) or as a Ray Tune grid, `parallel` trials at a time (default:
    one per CPU of the cluster), one CPU each."""
    rows: dict[str, dict[str, Any]] = {}
    for job in jobs:
        result = finished_result(job)
        if result is not None:
            rows[job["key"]] = result
            done()
    todo = [job for job in jobs if job["key"] not in rows]
    if parallel == 0:
        for job in todo:
            rows[job["key"]] = run_trial(trial_fn, job)
            done()
    elif todo:
        with ray_cluster(address) as (cpus, _):
            rows |= _run_on_tune(trial_fn, todo, parallel or max(1, cpus), out, done)
    return [rows[job["key"]] for job in jobs]


def _run_on_tune(trial_fn: TrialFn, jobs: list[dict[str, Any]], parallel: int, out: Path,
                 done: Callable[[], None]) -> dict[str, dict[str, Any]]:
    """The jobs as one Tune experiment in OUT/tune/: a trial whose worker or node dies is retried
    on another (FailureConfig). Each trial is `run_trial`: a failed one is a result row, not a Tune
    error, and a killed ablation's next run starts from the run dirs, not from Tune's state."""
    # Tune's newer console output prints a header and paths even at verbose=0; the older one is silent
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    from ray import tune

    def trainable(config: dict[str, Any]) -> dict[str, Any]:
        return {"row": run_trial(trial_fn, config["job"])}

    class CountFinished(tune.Callback):  # `done` passed in, not closed over: Tune pickles the class too
        def __init__(self, done: Callable[[], None]) -> None:
            self.done: Callable[[], None] | None = done

        def __getstate__(self) -> dict:  # Tune saves its callbacks with the experiment; the bar stays here
            return {"done": None}

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            if self.done:
                self.done()

    storage = (out / "tune").resolve()
    name = f"run-{len(list(storage.glob('run-*'))) if storage.exists() else 0:03d}"  # one experiment per invocation
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"job": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=parallel, reuse_actors=True),  # no process start per trial
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=[CountFinished(done)],
                                  failure_config=tune.FailureConfig(max_failures=2)),
    )
    rows = {r.metrics["row"]["key"]: r.metrics["row"] for r in tuner.fit() if r.metrics and "row" in r.metrics}
    # a trial Tune gave up on (its workers kept dying) has no row: failed here, tried again next run
    return {j["key"]: rows.get(j["key"]) or {"trial": j["trial"], "seed": j["seed"], "key": j["key"], **j["fields"],
                                              "status": "failed", "error": "its worker died (Tune gave up)"}
            for j in jobs}
