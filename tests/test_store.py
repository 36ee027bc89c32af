import numpy as np
import pytest

import zarr

from zeroseg.geometry import grid_boxes
from zeroseg.stores.features import FeatureStore, StoreError, StoreNotFoundError
from zeroseg.stores.schema import CREATING_MARKER, Status, StoreConfig, TeacherInfo

TEACHER = TeacherInfo("zeroseg-tiny", "random:0", "ab" * 32, 64, (0.5,) * 3, (0.25,) * 3, 16)


def make_config(**kw) -> StoreConfig:
    return StoreConfig(teacher=TEACHER, grids=(1, 2), view_size=32, chunk_images=4, **kw)


def test_grid_boxes_tile_each_level():
    boxes = grid_boxes((1, 2, 3))
    assert boxes.shape == (14, 4)
    for start, g in ((0, 1), (1, 2), (5, 3)):
        level = boxes[start : start + g * g]
        area = ((level[:, 2] - level[:, 0]) * (level[:, 3] - level[:, 1])).sum()
        assert area == pytest.approx(1.0)
    # row-major: second cell of the 2x2 grid is the top-right one
    np.testing.assert_allclose(boxes[2], [0.5, 0.0, 1.0, 0.5])


@pytest.mark.parametrize("scheme", ["path", "file", "memory"])
def test_round_trip(tmp_path, scheme):
    url = {"path": str(tmp_path / "s.zarr"), "file": f"file://{tmp_path}/s.zarr", "memory": f"memory://rt-{id(tmp_path)}"}[scheme]
    cfg = make_config(pixels=True)
    paths = [f"img{i}.png" for i in range(10)]
    store = FeatureStore.create(url, cfg, paths, extract={"batch": 8})
    assert store.pending_chunks() == [0, 1, 2]
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(4, 5, 16)).astype(np.float16)
    pixels = rng.integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8)
    store.write_chunk(1, feats, np.full(4, Status.OK), [""] * 4, np.full((4, 2), 7), pixels)

    again = FeatureStore.open(url, expect=cfg)
    assert again.config == cfg
    assert again.pending_chunks() == [0, 2]
    assert list(again.paths()) == paths
    assert again.extract_options == {"batch": 8}
    chunk = again.read_chunk(1)
    np.testing.assert_array_equal(chunk["features"], feats)
    np.testing.assert_array_equal(chunk["pixels"], pixels)
    assert (again.sizes()[4:8] == 7).all()
    assert again.chunk_slice(2) == slice(8, 10)  # the last chunk is short


def test_write_chunk_checks_shape_and_status(tmp_path):
    store = FeatureStore.create(str(tmp_path / "s"), make_config(), ["a", "b"])
    with pytest.raises(ValueError, match="features"):
        store.write_chunk(0, np.zeros((2, 5, 8)), np.ones(2), ["", ""], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="ok or failed"):
        store.write_chunk(0, np.zeros((2, 5, 16)), np.zeros(2), ["", ""], np.zeros((2, 2)))
    assert store.pending_chunks() == [0]


def test_create_refuses_existing_store(tmp_path):
    FeatureStore.create(str(tmp_path / "s"), make_config(), ["a"])
    with pytest.raises(StoreError, match="already holds a store"):
        FeatureStore.create(str(tmp_path / "s"), make_config(), ["a"])


def test_open_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    "change, words",
    [
        ({"grids": (1, 2, 3)}, "grids: asked 1,2,3, store has 1,2"),
        ({"view_size": 64}, "view_size: asked 64, store has 32"),
        ({"teacher": TeacherInfo("ViT-B-32", "random:0", "cd" * 32, 224, (0.5,) * 3, (0.25,) * 3, 512)}, "teacher.arch: asked ViT-B-32, store has zeroseg-tiny"),
    ],
)
def test_mismatch_names_both_sides(tmp_path, change, words):
    url = str(tmp_path / "s")
    FeatureStore.create(url, make_config(), ["a"])
    before = sorted(p.name for p in (tmp_path / "s").rglob("*"))
    asked = StoreConfig(**{**make_config().__dict__, **change})
    with pytest.raises(StoreError, match=words):
        FeatureStore.open(url, expect=asked)
    assert sorted(p.name for p in (tmp_path / "s").rglob("*")) == before


def test_schema_version_refused(tmp_path):
    url = str(tmp_path / "s")
    store = FeatureStore.create(url, make_config(), ["a"])
    store.group.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema version 99, this zeroseg reads versions 1, 2, 3, 4, 5"):
        FeatureStore.open(url)


def test_a_version_1_store_still_opens(tmp_path):
    url = str(tmp_path / "s")
    FeatureStore.create(url, make_config(), ["a"]).group.attrs["schema_version"] = 1
    assert FeatureStore.open(url).n_images == 1 and FeatureStore.open(url).pending_chunks() == [0]


def test_text_vocabulary_round_trip_and_teacher_check(tmp_path):
    store = FeatureStore.create(str(tmp_path / "s"), make_config(), ["a"])
    emb = np.arange(32, dtype=np.float32).reshape(2, 16)
    store.write_text("toy", ["red circle", "blue square"], emb, ["a photo of a {}."])
    names, got = FeatureStore.open(str(tmp_path / "s")).read_text("toy")
    assert names == ["red circle", "blue square"]
    np.testing.assert_array_equal(got, emb)
    with pytest.raises(StoreError, match="no vocabulary 'voc'"):
        store.read_text("voc")
    vocab = store.group["text/toy"]
    current = vocab[vocab.attrs["current"]]  # the generation readers follow
    current.attrs["teacher"] = {**current.attrs["teacher"], "arch": "ViT-B-32"}
    with pytest.raises(StoreError, match="embedded by ViT-B-32"):
        store.read_text("toy")


def test_an_interrupted_create_is_created_again(tmp_path):
    url = str(tmp_path / "s")
    zarr.open_group(url, mode="w-", zarr_format=3)  # a create killed before its attributes
    (tmp_path / "s" / CREATING_MARKER).write_text("{}")  # ... which it had begun with its marker
    with pytest.raises(StoreNotFoundError, match="unfinished store"):
        FeatureStore.open(url)
    store = FeatureStore.create(url, make_config(), ["a", "b"])
    assert FeatureStore.open(url).n_images == 2 and store.pending_chunks() == [0]
    assert not (tmp_path / "s" / CREATING_MARKER).exists()


def test_a_group_without_the_marker_is_not_ours(tmp_path):
    url = str(tmp_path / "s")
    zarr.open_group(url, mode="w-", zarr_format=3)
    with pytest.raises(StoreError, match="without zeroseg's attributes"):
        FeatureStore.open(url)
    with pytest.raises(StoreError, match="not empty and not a zeroseg store"):
        FeatureStore.create(url, make_config(), ["a"])
    assert (tmp_path / "s" / "zarr.json").exists()
