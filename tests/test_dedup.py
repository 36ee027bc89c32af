"""Identical bytes embedded once (issue 16): a row whose file holds the same bytes as an earlier
row's (the same file under two paths, listed twice, or appended again) is copied from it, not
embedded; `store info` counts them and the trainer sees each distinct image once per epoch."""

import shutil

import faiss
import numpy as np
import pytest

from images import write_good
from test_extract import SMALL, assert_same_store, one_thread, quiet, zeroseg  # noqa: F401 (fixture)
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.segment.neighbours import BuildConfig, build_index, query_index
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.index import NeighbourIndex, decode_ids
from zeroseg.stores.schema import Status
from zeroseg.trainer.loader import StoreDataset

WITH_PIXELS = ExtractConfig(**{**SMALL.__dict__, "pixels": True})  # chunks of 4 images


def images_with_copies(folder):
    """good000-good005, then zcopy1.png (= good001, row 7) and zcopy5.png (= good005, row 8);
    a manifest lists them all and good002 twice more (rows 9, 10)."""
    paths = write_good(folder, 6)
    shutil.copy(paths[1], folder / "zcopy1.png")
    shutil.copy(paths[5], folder / "zcopy5.png")
    write_good(folder, 1, seed=3, prefix="y")  # row 6: a distinct image
    listing = sorted(str(p) for p in folder.iterdir()) + [str(paths[2])] * 2
    manifest = folder.parent / "list.txt"
    manifest.write_text("\n".join(listing) + "\n")
    return manifest


def test_the_same_bytes_are_embedded_once_and_copied(tmp_path, capsys):
    manifest = images_with_copies(tmp_path / "imgs")
    url = str(tmp_path / "s.zarr")
    results, notes = [], []
    summary = run_extract(str(manifest), url, WITH_PIXELS, notify=notes.append, progress=results.append)
    assert (summary.ok, summary.copied_this_run) == (11, 4)
    assert sum(r.copied for r in results) == 4 and sum(r.n_images for r in results) == 11
    assert any("4 of the 11 images to do have the same bytes" in n for n in notes), notes
    store = FeatureStore.open(url)
    assert list(store.duplicate_of()) == [-1, -1, -1, -1, -1, -1, -1, 1, 5, 2, 2]
    features, pixels = store.features[:], store.pixels[:]
    for row, first in [(7, 1), (8, 5), (9, 2), (10, 2)]:
        assert np.array_equal(features[row], features[first]) and np.array_equal(pixels[row], pixels[first])
    assert (store.sizes()[7:] == store.sizes()[[1, 5, 2, 2]]).all()
    assert len(set(store.hashes())) == 7
    result = zeroseg(capsys, "store", "info", url)
    assert "4 duplicates" in result.output, result.output
    assert zeroseg(capsys, "store", "verify", url).exit_code == 0  # copies agree with their status
    # the trainer's epoch: each distinct image once
    assert StoreDataset(url, seed=0).plan.n_ok == 7
    # the index: each distinct image once (a copy would come back as its own neighbour at score 1)
    meta = build_index(url, tmp_path / "ix", BuildConfig(kind="flat"))
    index = NeighbourIndex.open(tmp_path / "ix").index  # held: id_map lives as long as it does
    ids = faiss.vector_to_array(index.id_map)
    assert meta.count == 7 * store.n_crops and set(decode_ids(ids, store.n_crops)[0]) == set(range(7))
    found = query_index(tmp_path / "ix", image=7, crop=0, k=2)  # a copy's query: its first row, whole
    assert found.neighbours[0].image == 1 and found.neighbours[0].score == pytest.approx(1.0, abs=1e-3)


def test_copies_of_photographs_are_embedded_once_and_indexed_once(tmp_path):
    """Photographs (EXIF orientations, CMYK, 16-bit, RGBA, WebP, TIFF, 12 Mpx, animations) with
    byte copies of two of them under other names (a rotated JPEG, the 12 Mpx one)."""
    from images import write_photos

    folder = tmp_path / "photos"
    names = write_photos(folder)
    shutil.copy(folder / "exif6.jpg", folder / "z-exif6-again.jpg")
    shutil.copy(folder / "large.jpg", folder / "z-large-again.jpg")
    url = str(tmp_path / "s.zarr")
    summary = run_extract(str(folder), url, WITH_PIXELS, notify=quiet)
    n = len(names) + 2
    assert (summary.ok, summary.copied_this_run) == (n, 2)
    store = FeatureStore.open(url)
    paths = [p.rsplit("/", 1)[-1] for p in store.paths()]
    copies = {paths[row]: paths[first] for row, first in enumerate(store.duplicate_of()) if first >= 0}
    assert copies == {"z-exif6-again.jpg": "exif6.jpg", "z-large-again.jpg": "large.jpg"}
    features, pixels = store.features[:], store.pixels[:]
    for copy, first in copies.items():
        assert np.array_equal(features[paths.index(copy)], features[paths.index(first)])
        assert np.array_equal(pixels[paths.index(copy)], pixels[paths.index(first)])
    meta = build_index(url, tmp_path / "ix", BuildConfig(kind="flat"))
    index = NeighbourIndex.open(tmp_path / "ix").index  # held: id_map lives as long as it does
    indexed = set(decode_ids(faiss.vector_to_array(index.id_map), store.n_crops)[0])
    assert meta.count == len(names) * store.n_crops and indexed == set(range(n)) - {paths.index(c) for c in copies}


def test_ray_copies_after_the_first_row_is_written_and_equals_in_process(tmp_path, ray_session, one_thread):
    """Rows 7-10 copy rows of chunks 0 and 1: Ray starts chunk 2 only once those are written."""
    manifest = images_with_copies(tmp_path / "imgs")
    local, pooled = str(tmp_path / "local.zarr"), str(tmp_path / "ray.zarr")
    run_extract(str(manifest), local, WITH_PIXELS, notify=quiet)
    summary = run_extract(str(manifest), pooled, ExtractConfig(**{**WITH_PIXELS.__dict__, "workers": 2}), notify=quiet)
    assert (summary.ok, summary.copied_this_run) == (11, 4)
    assert_same_store(local, pooled)


def test_an_image_appended_again_under_another_path_is_copied(tmp_path):
    paths = write_good(tmp_path / "imgs", 5)
    url = str(tmp_path / "s.zarr")
    run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    (tmp_path / "more").mkdir()
    shutil.copy(paths[3], tmp_path / "more" / "again.png")
    summary = run_extract(str(tmp_path / "more"), url, ExtractConfig(**{**SMALL.__dict__, "append": True}), notify=quiet)
    assert (summary.n_images, summary.done_this_run, summary.copied_this_run) == (6, 1, 1)
    store = FeatureStore.open(url)
    assert store.duplicate_of()[5] == 3 and store.status()[5] == Status.OK
    assert np.array_equal(store.features[5], store.features[3])


def test_verify_finds_a_copy_that_differs_from_its_first_row_and_repair_redoes_both(tmp_path, capsys):
    manifest = images_with_copies(tmp_path / "imgs")
    url = str(tmp_path / "s.zarr")
    run_extract(str(manifest), url, WITH_PIXELS, notify=quiet)
    whole = str(tmp_path / "whole.zarr")
    run_extract(str(manifest), whole, WITH_PIXELS, notify=quiet)
    # row 7 is a copy of row 1: give it other (finite, non-zero) features, its checksum rewritten by zarr
    features = FeatureStore.open(url, mode="r+").group["crops/features"]
    features[7] = features[7] * 0.5
    result = zeroseg(capsys, "store", "verify", url)
    assert result.exit_code == 1, result.output
    assert "1 copies whose features or status differ from their first row's (images/duplicate_of) (e.g. 7 " in result.output
    result = zeroseg(capsys, "store", "verify", "--repair", url)
    assert "marked 2 chunks pending (0, 1)" in result.output, result.output  # row 1's chunk and row 7's
    run_extract(str(manifest), url, WITH_PIXELS, notify=quiet)
    assert zeroseg(capsys, "store", "verify", url).exit_code == 0
    assert_same_store(whole, url)
