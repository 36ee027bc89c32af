import json

import numpy as np
import pytest

from zeroseg.errors import UserError
from zeroseg.experiments.scenes import render_scene
from zeroseg.experiments.toy_teacher import (
    PRESETS, ToyTeacherConfig, build_pairs, crop_caption, ensure_toy_teacher, export_toy_teacher, object_boxes,
)
from zeroseg.pipeline.teacher import load_teacher
from zeroseg.segment.datasets import SCENE_CLASSES


def test_crop_caption_names_what_the_crop_shows():
    cfg = ToyTeacherConfig(min_cover=0.1, min_own=0.5)
    cell = np.zeros((10, 10), np.uint8)
    cell[:5, :5] = 1  # "red circle": 25% of the crop
    cell[9, 9] = 5  # one pixel of class 5, whose visible area is mostly elsewhere
    cell[0, 9] = 7  # one pixel of class 7, its whole visible area: named
    assert crop_caption(cell, {1: 100, 5: 400, 7: 1}, "grass", cfg) == f"{SCENE_CLASSES[1]} and a {SCENE_CLASSES[7]}"
    assert crop_caption(np.zeros((10, 10), np.uint8), {}, "sand", cfg) == "sand"


def test_object_boxes_are_squares_around_each_object_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = render_scene(rng, 96)
        boxes = object_boxes(rng, scene, 96) * 96  # (n, 4) pixels
        assert len(boxes) == len(scene.objects)
        for (x0, y0, x1, y1), obj in zip(boxes, scene.objects):
            bx0, by0, bx1, by1 = obj["bbox"]
            assert x1 - x0 == pytest.approx(y1 - y0)  # square
            assert x0 >= -1e-4 and y0 >= -1e-4 and x1 <= 96 + 1e-4 and y1 <= 96 + 1e-4  # inside the image
            if x1 - x0 < 96 - 1e-4:  # not clipped to the whole image: it holds the object's box
                assert x0 <= bx0 + 1e-4 and y0 <= by0 + 1e-4 and x1 >= bx1 - 1e-4 and y1 >= by1 - 1e-4


def test_object_crops_add_one_captioned_crop_per_scene_object():
    cfg = ToyTeacherConfig(scene_size=64, view_size=32, n_scenes=1, n_objects=0)
    images, captions = build_pairs(cfg, 32)
    with_objects, captions2 = build_pairs(ToyTeacherConfig(**{**cfg.__dict__, "object_crops": True}), 32)
    assert len(images) == 30 and captions2[:30] == captions  # the same scene's grid crops first
    assert 30 < len(with_objects) <= 34 and len(captions2) == len(with_objects)  # 1..4 objects
    grounds = {"grass", "sand", "water", "stone", "wood"}
    assert not set(captions2[30:]) & grounds  # each object crop names what it was cut around


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_teacher_trains_caches_and_loads_through_open_clip(cache, tmp_path):
    cfg = PRESETS["tiny"]
    path, report = ensure_toy_teacher(cfg, progress=False)
    assert path.parent == cache / "teachers" and cfg.key() in path.name and path.suffix == ".safetensors"
    assert 0.0 <= report["zero_shot_accuracy"] <= 1.0 and report["heldout_images"] == 2 * 12
    assert 0.0 <= report["scene_object_accuracy"] <= 1.0
    teacher = load_teacher(cfg.arch, str(path))  # open_clip.create_model(pretrained=FILE)
    assert teacher.info.input_size == 32 and teacher.info.embed_dim == 64
    # the trained weights are not the random init
    assert teacher.info.sha256 != load_teacher(cfg.arch, "random", seed=cfg.seed).info.sha256
    # a second call reuses the cache: same file, untouched
    mtime = path.stat().st_mtime_ns
    again, report2 = ensure_toy_teacher(cfg, progress=False)
    assert again == path and path.stat().st_mtime_ns == mtime and report2 == report
    # `teacher train --out` copies the cached checkpoint
    out, _ = export_toy_teacher("tiny", tmp_path / "exported.safetensors")
    assert load_teacher(cfg.arch, str(out)).info.sha256 == teacher.info.sha256
    with pytest.raises(UserError, match="safetensors"):
        export_toy_teacher("tiny", tmp_path / "teacher.pt")
    with pytest.raises(UserError, match="unknown teacher preset"):
        export_toy_teacher("huge")


def test_training_is_deterministic(cache, tmp_path):
    from zeroseg.experiments.toy_teacher import train_toy_teacher

    cfg = PRESETS["tiny"]
    a = train_toy_teacher(cfg, tmp_path / "a.safetensors", progress=False, threads=1)
    b = train_toy_teacher(cfg, tmp_path / "b.safetensors", progress=False, threads=1)
    assert a["final_loss"] == b["final_loss"]
    assert load_teacher(cfg.arch, str(tmp_path / "a.safetensors")).info.sha256 == \
        load_teacher(cfg.arch, str(tmp_path / "b.safetensors")).info.sha256
    assert json.loads((tmp_path / "a.json").read_text())["config"]["seed"] == 0
    # another seed, another teacher
    import dataclasses

    c = train_toy_teacher(dataclasses.replace(cfg, seed=1), tmp_path / "c.safetensors", progress=False, threads=1)
    assert load_teacher(cfg.arch, str(tmp_path / "c.safetensors")).info.sha256 != \
        load_teacher(cfg.arch, str(tmp_path / "a.safetensors")).info.sha256
