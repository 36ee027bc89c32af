"""Ablations: many short student trainings over one store, never re-running the teacher.

A spec names trainer config fields by dotted path (`grids`, `losses.match`, `mask_ratio`,
`model.group_tokens`) and either a grid of values (every combination is a trial) or an explicit
list of named trials (for tables whose rows are not a product, like the paper's loss table).
Each trial x seed trains from the cache and evaluates mIoU in its own run dir, as a Ray task.
A trial's result file is keyed by the hash of everything that makes it, so a re-run skips what is
done and a failed trial is recorded without stopping the others.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from zeroseg.errors import UserError

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
    if not isinstance(parsed, dict) or not ({"grid", "trials"} & parsed.keys()):
        raise UserError(
            f"ablation spec {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a mapping "
            "with 'grid' (field: [values]) or 'trials' (a list of {name, field: value})"
        )
    return parsed


def expand(spec: dict[str, Any]) -> list[Trial]:
    """Every combination of the grid's values (in the order given), or the listed trials."""
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
    """Hash of everything that makes a trial's result: a re-run with the same key is the same trial."""
    blob = json.dumps({"config": config, "seed": seed, "store": store_identity, "eval": dataset}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- results -----------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def render_tables(rows: list[dict[str, Any]], fields: list[str]) -> str:
    """Markdown: one table per varied field (or one by trial name when a table's rows are named
    trials), mIoU as mean +- std over seeds, in the order the trials were given."""
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    groupings = fields if fields else ["trial"]
    parts = []
    for field in groupings:
        by_value: dict[str, list[float]] = {}
        for r in ok:
            by_value.setdefault(str(r[field]), []).append(float(r["miou"]))
        parts.append(f"| {field} | mIoU (%) | seeds |\n|---|---|---|")
        for value, mious in by_value.items():
            m, sd = mean_std([100 * v for v in mious])
            parts.append(f"| {value} | {m:.1f} ± {sd:.1f} | {len(mious)} |")
        parts.append("")
    if failed:
        parts.append("Failed trials:\n")
        parts += [f"- {r['trial']} (seed {r['seed']}): {r['error']}" for r in failed]
        parts.append("")
    return "\n".join(parts)


def plot(rows: list[dict[str, Any]], fields: list[str], path: Path) -> None:
    """mIoU against each varied field (mean with std error bars), one panel per field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groupings = fields if fields else ["trial"]
    fig, axes = plt.subplots(1, len(groupings), figsize=(4.5 * len(groupings), 3.6), squeeze=False)
    for ax, field in zip(axes[0], groupings):
        by_value: dict[str, list[float]] = {}
        for r in rows:
            if r["status"] == "ok":
                by_value.setdefault(str(r[field]), []).append(100 * float(r["miou"]))
        labels = list(by_value)
        stats = [mean_std(v) for v in by_value.values()]
        ax.errorbar(range(len(labels)), [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set_xlabel(field)
        ax.set_ylabel("held-out mIoU (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[dict[str, Any]], fields: list[str], out: Path) -> str:
    """results.csv, results.md and mIoU.png in out; returns the Markdown."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    markdown = render_tables(rows, fields)
    (out / "results.md").write_text(markdown)
    if any(r["status"] == "ok" for r in rows):
        plot(rows, fields, out / "miou.png")
    return markdown


# ---- running -----------------------------------------------------------------------------------

TrialFn = Callable[[dict[str, Any], Path], dict[str, Any]]


def run_trial(trial_fn: TrialFn, job: dict[str, Any]) -> dict[str, Any]:
    """Run one trial x seed in its dir unless it already succeeded there; never raises: a failure
    is a result with status "failed" and the error's first line (a re-run tries it again)."""
    run_dir = Path(job["run_dir"])
    result_file = run_dir / "result.json"
    if result_file.exists():
        done = json.loads(result_file.read_text())
        if done["status"] == "ok":
            return done
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "trial.json").write_text(json.dumps(job, indent=2))
    start = time.perf_counter()
    try:
        result = {"status": "ok", "error": "", **trial_fn(job["config"], run_dir)}
    except Exception as e:  # noqa: BLE001 - a failed trial is data, the others go on
        result = {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    result = {"trial": job["trial"], "seed": job["seed"], "key": job["key"], **job["fields"],
              "wall_s": round(time.perf_counter() - start, 2), **result}
    result_file.write_text(json.dumps(result, indent=2))
    return result
