"""The whole loop at its smallest size: scenes, toy teacher, extraction, text, two students, eval,
overlays; then a second run that reuses every stage."""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("zeroseg.trainer.train")  # the student trainer (another room of the project)
from zeroseg.demo.run import run_demo  # noqa: E402


@pytest.fixture
def demo_out(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "demo"


def test_tiny_demo_runs_end_to_end_and_reuses_its_stages(demo_out):
    summary = run_demo(demo_out, "tiny")
    results = summary["results"]
    assert set(results) == {"student", "no-match", "grid"}
    for r in results.values():
        assert 0.0 <= r["miou"] <= 1.0 and r["n_images"] == 6
        assert set(r["iou"]) >= {"background", "red circle"}
    assert len(summary["overlays"]) == 2
    for p in summary["overlays"]:
        img = Image.open(p)
        assert img.mode == "RGB" and img.width > 4 * 64  # image | truth | student | grid
    assert json.loads((demo_out / "results.json").read_text())["results"] == results
    assert (demo_out / "confusion_student.png").is_file()

    # A second run reuses scenes, teacher, store, vocabulary and students: same numbers, and the
    # stages that would recompute take no time worth naming.
    stamp = {p: p.stat().st_mtime_ns for p in demo_out.rglob("*.safetensors")}
    again = run_demo(demo_out, "tiny")
    assert again["results"] == results
    assert {p: p.stat().st_mtime_ns for p in demo_out.rglob("*.safetensors")} == stamp
    assert again["runs"] == summary["runs"] and again["store"] == summary["store"]
