"""Several teachers in one store (issue 16, item 2): `extract --teacher B` on a store made with
teacher A adds B's features of the same rows and crops beside A's; train, index build, text and
ablate pick a teacher by its key; grids and view size still have to match."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from images import write_good
from test_extract import SMALL, quiet, tree_digest, zeroseg
from zeroseg.errors import UserError
from zeroseg.pipeline.estimate import estimate
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.stores.compact import CompactTargets
from zeroseg.stores.features import FeatureStore, StoreError
from zeroseg.stores.inspect import store_info
from zeroseg.stores.schema import TEACHERS_GROUP, Status

# A: zeroseg-tiny (128 dims), B: zeroseg-toy (64 dims), both random, over the same images
TEACHER_B = ExtractConfig(**{**SMALL.__dict__, "teacher": "zeroseg-toy"})


def image_folder(root: Path) -> Path:
    """6 good images, an empty file (failed for every teacher), a copy of good001 (a duplicate row)."""
    imgs = root / "imgs"
    write_good(imgs, 6)
    (imgs / "empty.png").write_bytes(b"")
    shutil.copy(imgs / "good001.png", imgs / "good009.png")
    return imgs


def teacher_arrays(url: str, key: str | None) -> dict[str, np.ndarray]:
    store = FeatureStore.open(url, teacher=key)
    return {"features": store.features[:], "status": store.status(), "errors": store.errors()}


def assert_same_teacher(a: dict, b: dict) -> None:
    assert a["features"].dtype == b["features"].dtype and a["features"].shape == b["features"].shape
    assert a["features"].tobytes() == b["features"].tobytes()  # bit for bit
    assert a["status"].tobytes() == b["status"].tobytes() and list(a["errors"]) == list(b["errors"])


def store_of_two_teachers(root: Path) -> tuple[Path, str, str]:
    """A fresh store made with A, then B added: (images, url, B's key)."""
    imgs = image_folder(root)
    url = str(root / "s.zarr")
    run_extract(str(imgs), url, SMALL, notify=quiet)
    run_extract(str(imgs), url, TEACHER_B, notify=quiet)
    return imgs, url, FeatureStore.open(url).teacher_keys()[1]


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory):
    """A store made with A, its files' digests, then B added: (images, url, digests before B, B's key)."""
    root = tmp_path_factory.mktemp("teachers")
    imgs = image_folder(root)
    url = str(root / "s.zarr")
    run_extract(str(imgs), url, SMALL, notify=quiet)
    before = tree_digest(Path(url))
    notes = []
    summary = run_extract(str(imgs), url, TEACHER_B, notify=notes.append)
    store = FeatureStore.open(url)
    key = store.teacher_keys()[1]
    assert any(f"teacher {key} added beside {store.first_teacher_key}" in n for n in notes), notes
    assert (summary.n_images, summary.ok, summary.failed, summary.done_this_run) == (8, 7, 1, 8)
    return imgs, url, before, key


def test_a_second_teacher_is_added_and_the_first_stays_byte_for_byte(two_teachers, tmp_path):
    imgs, url, before, key = two_teachers
    after = tree_digest(Path(url))
    # every file of A's store is as it was, but the group's attributes (which now list B)
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == ["zarr.json"]
    assert all(name in before or name.startswith(f"{TEACHERS_GROUP}/") for name in after)
    first = FeatureStore.open(url)
    assert first.teacher_keys() == [first.first_teacher_key, key] and first.dim == 128
    assert first.teacher_key.startswith("zeroseg-tiny-random-0-") and key.startswith("zeroseg-toy-random-0-")

    # B's features are a fresh single-teacher extraction's with B, bit for bit
    fresh = str(tmp_path / "b.zarr")
    run_extract(str(imgs), fresh, TEACHER_B, notify=quiet)
    b = teacher_arrays(url, key)
    assert_same_teacher(b, teacher_arrays(fresh, None))
    assert b["features"].shape == (8, 5, 64)
    paths = [Path(p).name for p in first.paths()]
    empty, copy, original = paths.index("empty.png"), paths.index("good009.png"), paths.index("good001.png")
    assert b["status"][empty] == Status.FAILED and b["errors"][empty] == first.errors()[empty]  # A's failure
    assert first.duplicate_of()[copy] == original and b["features"][copy].tobytes() == b["features"][original].tobytes()

    # the same command again: nothing to do; --dry-run counts each teacher's own rows to do
    again = run_extract(str(imgs), url, TEACHER_B, notify=quiet)
    assert again.done_this_run == 0 and again.pending == 0
    assert estimate(str(imgs), url, TEACHER_B, sample_images=1).pending == 0
    assert estimate(str(imgs), url, dataclasses.replace(TEACHER_B, seed=1), sample_images=1).pending == 8

    info = store_info(url)
    assert info["teacher"]["key"] == first.first_teacher_key
    assert [(t["key"], t["embed_dim"], t["status"]["ok"]) for t in info["added_teachers"]] == [(key, 64, 7)]


def test_train_with_either_teacher_and_resume_with_the_recorded_one(two_teachers, tmp_path, capsys):
    from test_trainer import tiny_config
    from zeroseg.trainer.train import train

    _, url, _, key = two_teachers
    first = train(url, tmp_path / "a", tiny_config(steps=2, batch=4, grids=(1, 2)), progress=False)
    assert first["step"] == 2
    config_a = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config_a["config"]["teacher_key"] is None and config_a["store"]["teacher"]["embed_dim"] == 128

    result = zeroseg(capsys, "train", url, "--out", tmp_path / "b", "--teacher-key", key, "--preset", "tiny",
                     "--steps", "4", "--batch", "4", "--threads", "1", "--stop-after", "2")
    assert result.exit_code == 0, result.output
    config_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config_b["config"]["teacher_key"] == key and config_b["config"]["model"]["out_dim"] == 64
    assert config_b["store"]["teacher"]["arch"] == "zeroseg-toy"
    resumed = train(url, tmp_path / "b", resume=True, progress=False)  # the run's own teacher, from its config
    assert resumed["step"] == 4

    missing = zeroseg(capsys, "train", url, "--out", tmp_path / "c", "--teacher-key", "nobody")
    assert missing.exit_code == 2 and f"has no teacher 'nobody' (has: {FeatureStore.open(url).first_teacher_key}, {key})" in " ".join(missing.output.split())


def test_index_build_and_query_with_the_second_teacher(two_teachers, tmp_path, capsys):
    from zeroseg.segment.neighbours import query_index

    _, url, _, key = two_teachers
    result = zeroseg(capsys, "index", "build", url, "--out", tmp_path / "ix", "--teacher-key", key)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    # 7 ok rows, one a copy of another: 6 distinct images of 5 crops
    assert meta["dim"] == 64 and meta["count"] == 6 * 5 and meta["store"]["teacher"]["arch"] == "zeroseg-toy"
    found = query_index(tmp_path / "ix", image=1, crop=0, k=3)  # reopens the store through B (row 0: empty.png)
    assert found.itself.score == pytest.approx(1.0, abs=1e-3) and len(found.neighbours) == 3


def test_text_vocabularies_are_each_teachers_own(two_teachers):
    from zeroseg.segment.text import TEMPLATES, cache_vocabulary

    _, url, _, key = two_teachers
    cache_vocabulary(url, "colours", ["red", "green"])
    emb = cache_vocabulary(url, "colours", ["red", "green"], TEMPLATES, teacher=key)
    assert emb.shape == (2, 64)
    names, first = FeatureStore.open(url).read_text("colours")
    assert names == ["red", "green"] and first.shape == (2, 128)
    np.testing.assert_array_equal(FeatureStore.open(url, teacher=key).read_text("colours")[1], emb)
    with pytest.raises(StoreError, match=f"no vocabulary 'animals' of teacher {key}.*--teacher-key {key}"):
        FeatureStore.open(url, teacher=key).read_text("animals")


def test_an_added_teacher_embeds_the_stored_views_and_needs_no_file(tmp_path):
    """A store with views (`--pixels`): B embeds the stored views, so a file gone since A's
    extraction is still an ok row for B, and B is bit for bit a B-only extraction of the files."""
    imgs = image_folder(tmp_path)
    url, fresh = str(tmp_path / "s.zarr"), str(tmp_path / "b.zarr")
    run_extract(str(imgs), url, dataclasses.replace(SMALL, pixels=True), notify=quiet)
    run_extract(str(imgs), fresh, dataclasses.replace(TEACHER_B, pixels=True), notify=quiet)
    (imgs / "good003.png").unlink()
    summary = run_extract(str(imgs), url, dataclasses.replace(TEACHER_B, pixels=True), notify=quiet)
    assert (summary.ok, summary.failed) == (7, 1)  # the empty file only, as for A
    key = FeatureStore.open(url).teacher_keys()[1]
    assert_same_teacher(teacher_arrays(url, key), teacher_arrays(fresh, None))


def test_an_added_teacher_on_stored_views_of_photographs_matches_one_on_the_files(tmp_path):
    """Photographs (EXIF orientations 1-8, CMYK, 16-bit, RGBA, WebP, TIFF, 12 Mpx, animations):
    the views A stored are what B would decode from the files itself, bit for bit."""
    from images import write_photos

    photos = tmp_path / "photos"
    names = write_photos(photos)
    url, fresh = str(tmp_path / "s.zarr"), str(tmp_path / "b.zarr")
    run_extract(str(photos), url, dataclasses.replace(SMALL, pixels=True), notify=quiet)
    run_extract(str(photos), fresh, dataclasses.replace(TEACHER_B, pixels=True), notify=quiet)
    summary = run_extract(str(photos), url, dataclasses.replace(TEACHER_B, pixels=True), notify=quiet)
    assert (summary.ok, summary.failed) == (len(names), 0)
    key = FeatureStore.open(url).teacher_keys()[1]
    assert_same_teacher(teacher_arrays(url, key), teacher_arrays(fresh, None))


def test_export_either_teacher(two_teachers, tmp_path, capsys):
    from test_export import read_back

    _, url, _, key = two_teachers
    for teacher, dim in ((None, 128), (key, 64)):
        out = tmp_path / f"export-{dim}"
        result = zeroseg(capsys, "store", "export", url, out, *(["--teacher-key", teacher] if teacher else []))
        assert result.exit_code == 0 and "7 rows of 7 ok images" in result.output, result.output
        store = FeatureStore.open(url, teacher=teacher)
        ok = np.flatnonzero(store.status() == Status.OK)
        emb, meta, _ = read_back(out)
        assert emb.shape == (7, dim)
        np.testing.assert_array_equal(emb, store.features[:][ok, 0])
        assert meta["image_index"] == list(ok)


def test_compact_targets_are_the_first_teachers_only(two_teachers):
    _, url, _, key = two_teachers
    with pytest.raises(UserError, match=f"compact targets are the first teacher's .*teacher {key} has fp16 targets only"):
        CompactTargets(FeatureStore.open(url, teacher=key), "int8")


def test_another_grid_or_view_size_is_still_refused(two_teachers):
    imgs, url, _, _ = two_teachers
    before = tree_digest(Path(url))
    for change, words in [({"grids": (1, 2, 3)}, "grids: asked 1,2,3, store has 1,2"),
                          ({"view_size": 48}, "view_size: asked 48, store has 32")]:
        with pytest.raises(StoreError, match=words):
            run_extract(str(imgs), url, dataclasses.replace(TEACHER_B, **change), notify=quiet)
        with pytest.raises(StoreError, match=words):  # a third teacher too
            run_extract(str(imgs), url, dataclasses.replace(TEACHER_B, seed=1, **change), notify=quiet)
    assert tree_digest(Path(url)) == before


def test_a_damaged_chunk_of_the_second_teacher_is_found_repaired_and_redone(tmp_path, capsys):
    from test_store_safety import chunk_file, flip_two_bytes

    imgs, url, key = store_of_two_teachers(tmp_path)
    done = teacher_arrays(url, key)
    flip_two_bytes(chunk_file(url, f"{TEACHERS_GROUP}/{key}/features", 1))
    assert zeroseg(capsys, "store", "verify", url).exit_code == 0  # the first teacher's arrays are sound
    result = zeroseg(capsys, "store", "verify", url, "--teacher-key", key, "--repair")
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and f"{TEACHERS_GROUP}/{key}/features chunk 1 (images 4-7)" in text, text
    assert "marked 1 chunks pending" in text
    assert FeatureStore.open(url, teacher=key).pending_chunks() == [1] and FeatureStore.open(url).pending_chunks() == []
    summary = run_extract(str(imgs), url, TEACHER_B, notify=quiet)  # as after a kill: only the pending chunk
    assert summary.done_this_run == 4 and summary.pending == 0
    assert_same_teacher(teacher_arrays(url, key), done)
    assert zeroseg(capsys, "store", "verify", url, "--teacher-key", key).exit_code == 0


def test_the_first_teacher_appends_and_the_second_follows(tmp_path):
    imgs, url, key = store_of_two_teachers(tmp_path)
    before = teacher_arrays(url, key)
    write_good(imgs, 3, seed=1, prefix="more")
    notes = []
    run_extract(str(imgs), url, TEACHER_B, notify=notes.append)  # B adds no rows: it says so
    assert any("3 images of" in n and "extract with the first teacher" in n for n in notes), notes
    run_extract(str(imgs), url, SMALL, notify=quiet)  # A appends 3 rows: pending for B
    grown = FeatureStore.open(url, teacher=key)
    assert grown.n_images == 11 and (grown.status()[8:] == Status.PENDING).all()
    assert grown.status()[:8].tobytes() == before["status"].tobytes()
    run_extract(str(imgs), url, TEACHER_B, notify=quiet)
    whole = str(tmp_path / "whole.zarr")
    run_extract(str(imgs), whole, TEACHER_B, notify=quiet)
    assert_same_teacher(teacher_arrays(url, key), teacher_arrays(whole, None))


def test_a_version_4_store_is_migrated_before_a_teacher_is_added(tmp_path, capsys):
    imgs = image_folder(tmp_path)
    url = str(tmp_path / "s.zarr")
    run_extract(str(imgs), url, SMALL, notify=quiet)
    FeatureStore.open(url, mode="r+").group.update_attributes({"schema_version": 4})  # as version 4 wrote it
    before = tree_digest(Path(url))
    with pytest.raises(StoreError, match="schema version 4; another teacher needs version 5: run `zeroseg store migrate"):
        run_extract(str(imgs), url, TEACHER_B, notify=quiet)
    assert tree_digest(Path(url)) == before
    result = zeroseg(capsys, "store", "migrate", url)
    assert result.exit_code == 0 and "schema version 4 -> 5: no array rewritten" in result.output
    assert "hashes added" not in result.output and FeatureStore.open(url).duplicate_of().max() >= 0  # kept
    result = zeroseg(capsys, "extract", imgs, url, "--teacher", "zeroseg-toy", "--grids", "1,2", "--view-size", "32",
                     "--batch", "20", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert len(FeatureStore.open(url).teacher_keys()) == 2


def test_a_teachers_axis_crosses_every_trial():
    from zeroseg.experiments.ablate import expand, load_spec

    trials = expand({"grid": {"mask_ratio": [0.2, 0.4]}, "teachers": ["a", "b"]})
    assert [(t.overrides["mask_ratio"], t.overrides["teacher_key"]) for t in trials] == [
        (0.2, "a"), (0.2, "b"), (0.4, "a"), (0.4, "b")]
    assert [t.overrides for t in expand(load_spec('{"teachers": ["a", "b"]}'))] == [{"teacher_key": "a"}, {"teacher_key": "b"}]
    with pytest.raises(UserError, match="'teachers' needs a non-empty list"):
        expand({"teachers": "a"})


def test_an_ablation_over_two_teachers_trains_and_evaluates_each(tmp_path):
    from zeroseg.experiments.ablate import run_ablation
    from zeroseg.experiments.scenes import generate_scenes
    from zeroseg.segment.datasets import SCENE_CLASSES
    from zeroseg.segment.text import TEMPLATES, cache_vocabulary

    scenes = tmp_path / "scenes"
    generate_scenes(scenes, n=8, split="train", size=32, progress=False)
    url = str(tmp_path / "s.zarr")
    run_extract(str(scenes / "manifest.jsonl"), url, SMALL, notify=quiet)
    run_extract(str(scenes / "manifest.jsonl"), url, TEACHER_B, notify=quiet)
    keys = FeatureStore.open(url).teacher_keys()
    cache_vocabulary(url, "scenes", list(SCENE_CLASSES[1:]))
    kwargs = dict(steps=2, seeds=[0], preset="tiny", batch=4, threshold=0.5, parallel=0, progress=False)
    with pytest.raises(StoreError, match=f"no vocabulary 'scenes' of teacher {keys[1]}"):  # before any trial
        run_ablation(url, None, tmp_path / "abl", str(scenes), "scenes", teachers=keys, **kwargs)
    cache_vocabulary(url, "scenes", list(SCENE_CLASSES[1:]), TEMPLATES, teacher=keys[1])
    report = run_ablation(url, None, tmp_path / "abl", str(scenes), "scenes", teachers=keys, **kwargs)
    assert [(r["status"], r["teacher_key"]) for r in report.rows] == [("ok", keys[0]), ("ok", keys[1])], report.rows
    dims = [json.loads((tmp_path / "abl" / "trials" / r["key"] / "config.json").read_text())["config"]["model"]["out_dim"]
            for r in report.rows]
    assert dims == [128, 64] and all(0.0 <= r["miou"] <= 1.0 for r in report.rows)
    assert f"teacher={keys[1]}" in report.markdown
    # the teacher alone, B's grid with B's vocabulary; a student has its own teacher
    from zeroseg.segment.evaluate import run_eval

    grid = run_eval(None, scenes, url, "scenes", tmp_path / "ev", threshold=0.5, method="grid", progress=False,
                    teacher_key=keys[1])
    assert 0.0 <= grid["miou"] <= 1.0
    with pytest.raises(UserError, match="--teacher-key is for --method grid"):
        run_eval(tmp_path / "abl" / "trials" / report.rows[1]["key"], scenes, url, "scenes", tmp_path / "ev",
                 threshold=0.5, progress=False, teacher_key=keys[1])


def test_a_segments_index_of_the_second_teachers_student_on_ray_workers(two_teachers, tmp_path, capsys, ray_session):
    """The Ray workers see the store through the driver's teacher, so they accept B's student."""
    from zeroseg.segment.neighbours import BuildConfig, build_index

    _, url, _, key = two_teachers
    trained = zeroseg(capsys, "train", url, "--out", tmp_path / "b", "--teacher-key", key, "--preset", "tiny",
                      "--steps", "2", "--batch", "4", "--threads", "1")
    assert trained.exit_code == 0, trained.output
    for workers in (1, 2):
        build_index(url, tmp_path / f"ix{workers}", BuildConfig(source="segments", checkpoint=str(tmp_path / "b"),
                                                                teacher_key=key, workers=workers))
    assert (tmp_path / "ix1" / "index.faiss").read_bytes() == (tmp_path / "ix2" / "index.faiss").read_bytes()


def test_migrate_rewrites_every_teachers_compressed_features_raw(two_teachers, tmp_path):
    from zeroseg.stores.migrate import migrate_store
    from zeroseg.stores.schema import COMPRESSED

    _, url, _, key = two_teachers
    copy = str(tmp_path / "s.zarr")
    shutil.copytree(url, copy)
    group = FeatureStore.open(copy, mode="r+").group
    names = ["crops/features", f"{TEACHERS_GROUP}/{key}/features"]
    before = {}
    for name in names:  # as stores wrote them before 2026-12-03
        a = group[name]
        before[name], chunks = a[:], a.chunks
        del group[name]
        group.create_array(name, data=before[name], chunks=chunks, fill_value=0, compressors=COMPRESSED)
    assert not any(FeatureStore.open(copy, teacher=t).features.is_raw() for t in (None, key))
    assert "2 feature arrays rewritten raw" in migrate_store(copy, notify=quiet)
    for teacher, name in zip((None, key), names):
        features = FeatureStore.open(copy, teacher=teacher).features
        assert features.is_raw()
        np.testing.assert_array_equal(features[:], before[name])
