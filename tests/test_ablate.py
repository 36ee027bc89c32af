import csv
import json
from pathlib import Path

import pytest

from zeroseg.errors import UserError
from zeroseg.experiments.ablate import PRESETS, Trial, apply_overrides, expand, load_spec, run_trial, trial_key, varied_fields
from zeroseg.experiments.ablation_results import render_tables, write_results

BASE = {"grids": [1, 2, 3, 4], "mask_ratio": 0.6, "losses": {"match": 1.0, "mae": 1.0}, "seed": 0}


def test_grid_expansion_is_the_product_in_order():
    trials = expand(load_spec('{"grid": {"grids": ["1", "1,2"], "losses.match": [0, 1]}}'))
    assert [t.overrides for t in trials] == [
        {"grids": "1", "losses.match": 0}, {"grids": "1", "losses.match": 1},
        {"grids": "1,2", "losses.match": 0}, {"grids": "1,2", "losses.match": 1},
    ]
    assert trials[1].name == "grids=1, losses.match=1"
    assert varied_fields(trials) == ["grids", "losses.match"]


def test_presets_are_the_papers_tables():
    assert [t.overrides["grids"] for t in expand(load_spec("scales"))] == ["1", "1,2", "1,3", "1,4", "1,2,3,4"]
    losses = expand(load_spec("losses"))
    assert [t.name for t in losses] == ["base", "+multi-scale", "+segment matching", "both"]
    assert varied_fields(losses) == ["losses.multiscale", "losses.match"]
    assert len(expand(PRESETS["mask-ratio"])) == 5


def test_yaml_spec_file_and_bad_specs(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_text("grid:\n  mask_ratio: [0.2, 0.6]\n")
    assert [t.overrides for t in expand(load_spec(str(f)))] == [{"mask_ratio": 0.2}, {"mask_ratio": 0.6}]
    with pytest.raises(UserError, match="neither a preset"):
        load_spec("no-such-preset")
    with pytest.raises(UserError, match="non-empty list"):
        expand({"grid": {"mask_ratio": 0.5}})


def test_overrides_set_nested_fields_and_refuse_unknown_ones():
    cfg = apply_overrides(BASE, {"grids": "1,2", "losses.match": 0.0, "mask_ratio": 0.4})
    assert cfg["grids"] == [1, 2] and cfg["losses"]["match"] == 0.0 and cfg["mask_ratio"] == 0.4
    assert BASE["grids"] == [1, 2, 3, 4]  # the base is not modified
    with pytest.raises(UserError, match="unknown config field 'losses.nope'"):
        apply_overrides(BASE, {"losses.nope": 1})
    with pytest.raises(UserError, match="unknown config field 'model.width'"):
        apply_overrides(BASE, {"model.width": 1})


def test_trial_key_changes_with_what_makes_a_result():
    store = {"url": "s", "n_images": 10}
    key = trial_key(BASE, 0, store, "heldout")
    assert key == trial_key(json.loads(json.dumps(BASE)), 0, store, "heldout")
    assert key != trial_key(BASE, 1, store, "heldout")
    assert key != trial_key(apply_overrides(BASE, {"mask_ratio": 0.4}), 0, store, "heldout")
    assert key != trial_key(BASE, 0, {**store, "n_images": 11}, "heldout")
    assert key != trial_key(BASE, 0, store, "voc")


def _job(tmp_path, name="t", seed=0):
    return {"trial": name, "seed": seed, "key": f"{name}{seed}", "fields": {"mask_ratio": 0.6},
            "config": BASE, "run_dir": str(tmp_path / f"{name}-{seed}")}


def test_resume_skips_finished_trials_and_retries_failed_ones(tmp_path):
    calls = []

    def trial_fn(config, run_dir):
        calls.append(run_dir.name)
        if run_dir.name.startswith("bad") and len(calls) < 3:
            raise RuntimeError("loss is NaN\nlong traceback text")
        return {"miou": 0.5, "steps": 3}

    good = run_trial(trial_fn, _job(tmp_path, "good"))
    bad = run_trial(trial_fn, _job(tmp_path, "bad"))
    assert good["status"] == "ok" and good["miou"] == 0.5 and good["mask_ratio"] == 0.6
    assert bad == {**bad, "status": "failed", "error": "RuntimeError: loss is NaN"}
    assert json.loads((tmp_path / "bad-0" / "result.json").read_text())["status"] == "failed"

    assert run_trial(trial_fn, _job(tmp_path, "good")) == good  # finished: not run again
    assert run_trial(trial_fn, _job(tmp_path, "bad"))["status"] == "ok"  # failed: tried again
    assert calls == ["good-0", "bad-0", "bad-0"]


def test_tables_from_a_hand_made_results_file(tmp_path):
    rows = [
        {"trial": f"grids={g}, match={m}", "seed": s, "grids": g, "match": m, "status": "ok", "error": "", "miou": v}
        for g, m, s, v in [
            ("1", 0, 0, 0.20), ("1", 0, 1, 0.30), ("1,2", 0, 0, 0.50), ("1,2", 0, 1, 0.50),
            ("1,2", 1, 0, 0.70), ("1,2", 1, 1, 0.70),
        ]
    ] + [{"trial": "grids=1,3, match=0", "seed": 0, "grids": "1,3", "match": 0, "status": "failed",
          "error": "ValueError: x", "miou": ""}]
    markdown = write_results(rows, ["grids", "match"], tmp_path, footer="Cost: none\n")
    tables = markdown.split("\n\n")
    assert tables[0].splitlines() == [
        "| trial | grids | match | mIoU (%) | seeds |",
        "|---|---|---|---|---|",
        "| grids=1, match=0 | 1 | 0 | 25.0 ± 7.1 | 2 |",
        "| grids=1,2, match=0 | 1,2 | 0 | 50.0 ± 0.0 | 2 |",
        "| grids=1,2, match=1 | 1,2 | 1 | 70.0 ± 0.0 | 2 |",
    ]
    assert "| 1,2 | 60.0 ± 11.5 | 4 |" in tables[1]  # grids averaged over match
    assert "| 0 | 37.5 ± 15.0 | 4 |" in tables[2]  # match averaged over grids
    assert "- grids=1,3, match=0 (seed 0): ValueError: x" in markdown
    assert markdown.endswith("Cost: none\n")
    assert (tmp_path / "results.md").read_text() == markdown
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 7
    assert (tmp_path / "miou.png").stat().st_size > 1000
    one_field = render_tables(rows[:2], ["grids"])
    assert one_field.count("mIoU (%)") == 1  # one field varies: the trial table alone


def test_an_ablation_over_the_tiny_demo_store_runs_resumes_and_records_failures(tiny_demo, ray_session, tmp_path, monkeypatch):
    import os

    from zeroseg.experiments.ablate import run_ablation

    out, summary = tiny_demo
    monkeypatch.chdir(tmp_path)  # paths relative to here: Tune runs each trial in a folder of its own
    store, heldout = os.path.relpath(summary["store"]), os.path.relpath(out / "scenes" / "heldout")
    spec = '{"grid": {"mask_ratio": [0.25, 1.5]}}'  # 1.5 is no ratio: that trial must fail alone
    kwargs = dict(steps=2, seeds=[0], preset="tiny", batch=4, threshold=0.5, parallel=2, progress=False)
    report = run_ablation(store, spec, Path("."), heldout, "scenes", **kwargs)
    ok, failed = report.rows
    assert ok["status"] == "ok" and ok["steps"] == 2 and 0.0 <= ok["miou"] <= 1.0 and ok["mask_ratio"] == 0.25
    assert failed["status"] == "failed" and "mask ratio must be in [0, 1)" in failed["error"]
    run_dir = tmp_path / "trials" / ok["key"]
    assert json.loads((run_dir / "config.json").read_text())["config"]["mask_ratio"] == 0.25
    assert report.teacher_passes_saved == 2 * 4 * 30
    assert "| mask_ratio=0.25 | 0.25 |" in report.markdown and "Failed trials" in report.markdown

    stamp = (run_dir / "result.json").stat().st_mtime_ns
    again = run_ablation(store, spec, Path("."), heldout, "scenes", **kwargs)
    assert again.rows[0] == ok  # finished: read back, not re-run
    assert (run_dir / "result.json").stat().st_mtime_ns == stamp
