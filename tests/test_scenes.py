"""Synthetic scenes: determinism, split separation, exact masks, files on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zeroseg.errors import UserError
from zeroseg.experiments.scenes import (
    BACKGROUNDS,
    class_colour,
    generate_scenes,
    render_object,
    render_scene,
    scene_rng,
)
from zeroseg.segment.datasets import SCENE_CLASSES, read_scenes_manifest
from zeroseg.segment.metrics import IGNORE
from zeroseg.segment.render import voc_palette

SIZE = 96


@pytest.fixture(scope="module")
def scenes() -> list:
    return [render_scene(scene_rng(0, "train", i), SIZE) for i in range(40)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scenes(tmp_path_factory.mktemp("ds"), 6, "train", seed=3, size=64,
                           progress=False)


def _bytes(manifest: Path) -> dict[str, bytes]:
    root = manifest.parent
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_classes_and_palette() -> None:
    assert SCENE_CLASSES[0] == "background"
    assert len(SCENE_CLASSES) - 1 >= 8 and len(set(SCENE_CLASSES)) == len(SCENE_CLASSES)
    pal = voc_palette()
    assert len(pal) == 768 and all(0 <= v <= 255 for v in pal)
    # Well-known VOC entries: background, aeroplane, bicycle, ..., 255 = ignore (224, 224, 192).
    assert pal[0:3] == [0, 0, 0]
    assert pal[3:6] == [128, 0, 0]
    assert pal[6:9] == [0, 128, 0]
    assert pal[15 * 3:16 * 3] == [192, 128, 128]
    assert pal[255 * 3:] == [224, 224, 192]


def test_scene_shapes_and_mask_values(scenes: list) -> None:
    for s in scenes:
        assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (SIZE, SIZE) and s.mask.dtype == np.uint8
        values = set(np.unique(s.mask).tolist())
        assert values <= set(range(len(SCENE_CLASSES))) | {IGNORE}
        assert 1 <= len(s.objects) <= 4
        assert s.background in BACKGROUNDS


def test_objects_match_mask_and_caption(scenes: list) -> None:
    for s in scenes:
        ids = {o["class_id"] for o in s.objects}
        # Exactly the listed objects are in the mask (plus background).
        assert set(np.unique(s.mask).tolist()) - {0} == ids
        for o in s.objects:
            assert SCENE_CLASSES[o["class_id"]] == o["class"]
            assert o["class"] in s.caption
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            inside = s.mask[y0:y1, x0:x1] == o["class_id"]
            assert inside.sum() == o["area"] == (s.mask == o["class_id"]).sum() > 0
        assert s.caption.endswith(f"on {s.background}")


def test_mask_pixels_have_class_colour(scenes: list) -> None:
    for s in scenes:
        img = s.image.astype(float)
        for o in s.objects:
            pixels = img[s.mask == o["class_id"]]
            mean = pixels.mean(axis=0)
            assert np.abs(mean - class_colour(o["class_id"])).max() < 25, (o, mean)
            # Nearest nominal class colour, pixel by pixel, is the right one for almost all.
            colours = np.array([class_colour(c) for c in range(1, len(SCENE_CLASSES))], float)
            nearest = np.argmin(((pixels[:, None] - colours[None]) ** 2).sum(-1), axis=1) + 1
            same_colour = [class_colour(int(c)) == class_colour(o["class_id"]) for c in nearest]
            assert np.mean(same_colour) > 0.99
        # Background is muted: far from every object colour on average.
        bg = img[s.mask == 0]
        if len(bg):
            for c in range(1, len(SCENE_CLASSES)):
                assert np.linalg.norm(bg.mean(0) - class_colour(c)) > 60


def test_occlusion_is_reflected_in_mask() -> None:
    # Some scene of several objects must show an object's area smaller than its full shape;
    # at least check that overlapping scenes exist and every listed object is still visible.
    found = False
    for i in range(200):
        s = render_scene(scene_rng(1, "train", i), 64)
        if len(s.objects) >= 2:
            boxes = [o["bbox"] for o in s.objects]
            for a in range(len(boxes)):
                for b in range(a + 1, len(boxes)):
                    ax0, ay0, ax1, ay1 = boxes[a]
                    bx0, by0, bx1, by1 = boxes[b]
                    if max(ax0, bx0) < min(ax1, bx1) and max(ay0, by0) < min(ay1, by1):
                        found = True
        assert all(o["area"] > 0 for o in s.objects)
    assert found


def test_render_deterministic_and_seed_sensitive() -> None:
    a = render_scene(scene_rng(0, "train", 5), SIZE)
    b = render_scene(scene_rng(0, "train", 5), SIZE)
    c = render_scene(scene_rng(1, "train", 5), SIZE)
    h = render_scene(scene_rng(0, "heldout", 5), SIZE)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.caption == b.caption and a.objects == b.objects
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.image, h.image)


def test_train_and_heldout_share_no_image() -> None:
    train = {render_scene(scene_rng(0, "train", i), 32).image.tobytes() for i in range(30)}
    held = {render_scene(scene_rng(0, "heldout", i), 32).image.tobytes() for i in range(30)}
    assert len(train) == 30 and len(held) == 30 and not train & held


def test_generate_files_manifest_and_palette(dataset: Path) -> None:
    root = dataset.parent
    assert dataset.name == "manifest.jsonl"
    recs = read_scenes_manifest(dataset)
    assert [r["index"] for r in recs] == list(range(6))
    for r in recs:
        assert Path(r["image"]).is_absolute() and Path(r["image"]).exists()
        assert Path(r["mask"]).is_absolute() and Path(r["mask"]).exists()
        assert Path(r["image"]) == (root / "images" / f"train_{r['index']:06d}.png").resolve()
        assert r["split"] == "train"
        img = Image.open(r["image"])
        assert img.mode == "RGB" and img.size == (64, 64)
        mask = Image.open(r["mask"])
        assert mask.mode == "P" and mask.size == (64, 64)
        assert mask.getpalette()[:768] == voc_palette()
        # The file holds exactly what render_scene draws, and the manifest what it reports.
        s = render_scene(scene_rng(3, "train", r["index"]), 64)
        assert np.array_equal(np.array(img), s.image)
        assert np.array_equal(np.array(mask), s.mask)
        assert r["caption"] == s.caption and r["objects"] == s.objects


def test_generate_deterministic_and_independent_of_n(dataset: Path, tmp_path: Path) -> None:
    again = generate_scenes(tmp_path / "again", 6, "train", seed=3, size=64, progress=False)
    assert _bytes(again) == _bytes(dataset)
    assert again.read_text() == dataset.read_text()
    # Image i does not depend on how many are generated.
    fewer = generate_scenes(tmp_path / "fewer", 3, "train", seed=3, size=64, progress=False)
    few, full = _bytes(fewer), _bytes(dataset)
    assert len(few) == 6 and all(full[k] == v for k, v in few.items())
    assert fewer.read_text().splitlines() == dataset.read_text().splitlines()[:3]
    # Another seed or split gives other images.
    other = generate_scenes(tmp_path / "other", 3, "train", seed=4, size=64, progress=False)
    held = generate_scenes(tmp_path / "held", 3, "heldout", seed=3, size=64, progress=False)
    imgs = {k: v for k, v in full.items() if k.startswith("images/")}
    assert not set(imgs.values()) & {v for k, v in _bytes(other).items() if "images/" in k}
    assert all(k.startswith(("images/heldout_", "masks/heldout_")) for k in _bytes(held))
    assert not set(imgs.values()) & set(_bytes(held).values())


def test_bad_split_raises(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="split"):
        generate_scenes(tmp_path, 1, "test", progress=False)
    with pytest.raises(UserError, match="split"):
        scene_rng(0, "val", 0)
    assert not (tmp_path / "manifest.jsonl").exists()


def test_render_object() -> None:
    rng = np.random.default_rng(0)
    for cid in range(1, len(SCENE_CLASSES)):
        img = render_object(rng, cid, 64)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        # The object fills a good part of the frame: many pixels near its class colour.
        near = np.abs(img.astype(float) - class_colour(cid)).max(-1) < 40
        assert near.mean() > 0.2, (SCENE_CLASSES[cid], near.mean())
        assert near[24:40, 16:48].mean() > 0.5  # centred-ish
    bare = render_object(rng, 0, 64, background="water")
    assert bare.shape == (64, 64, 3)
    with pytest.raises(ValueError):
        render_object(rng, len(SCENE_CLASSES), 64)
