"""A living store (issue 16): `extract` on a store whose listing has grown adds the new images at
its end, resumably; the result equals one extraction of the whole listing, the old rows stay as
they were, vanished images are reported and kept, and an index built before says it is stale."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from images import write_good, write_photos
from test_extract import SMALL, assert_same_store, quiet, store_arrays, zeroseg
from zeroseg.errors import UserError
from zeroseg.pipeline.runner import ExtractConfig, compare_listing, run_extract
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status

WITH_PIXELS = ExtractConfig(**{**SMALL.__dict__, "pixels": True})  # chunks of 4 images


def grown_folder(tmp_path, first: int, more: int):
    """A folder of `first` images, extracted; then `more` images that sort after them."""
    imgs = tmp_path / "imgs"
    write_good(imgs, first)
    url = str(tmp_path / "s.zarr")
    run_extract(str(imgs), url, WITH_PIXELS, notify=quiet)
    before = store_arrays(url)
    write_good(imgs, more, seed=1, prefix="more")
    return imgs, url, before


def extract_whole(tmp_path, imgs) -> str:
    whole = str(tmp_path / "whole.zarr")
    run_extract(str(imgs), whole, WITH_PIXELS, notify=quiet)
    return whole


def assert_old_rows_kept(before: dict, url: str) -> None:
    after = store_arrays(url)
    n = len(before["paths"])
    for key in ("features", "pixels", "status", "sizes"):
        assert after[key][:n].tobytes() == before[key].tobytes(), key
    assert list(after["paths"][:n]) == list(before["paths"])


def test_a_grown_listing_is_appended_and_equals_one_extraction(tmp_path):
    imgs, url, before = grown_folder(tmp_path, 6, 5)  # 6 rows: the last chunk is half full
    notes = []
    summary = run_extract(str(imgs), url, WITH_PIXELS, notify=notes.append)
    assert (summary.n_images, summary.ok, summary.pending, summary.done_this_run) == (11, 11, 0, 5)
    assert any("5 new images" in n and "rows 6-10" in n for n in notes), notes
    assert_old_rows_kept(before, url)
    assert_same_store(extract_whole(tmp_path, imgs), url)
    # Nothing new the second time: nothing done, nothing added.
    again = run_extract(str(imgs), url, WITH_PIXELS, notify=notes.append)
    assert again.done_this_run == 0 and again.n_images == 11


def test_photographs_appended_equal_one_extraction_and_a_copied_photo_is_not_embedded_again(tmp_path):
    """A lab's photographs (EXIF orientations 1-8, progressive, CMYK, 16-bit grey, RGBA, WebP,
    TIFF, a 12-Mpx JPEG, animations) appended to a store of PNGs: the store one extraction of
    everything makes, the old rows untouched; a phone photo copied under another name is a copy of
    its row, not embedded again."""
    imgs = tmp_path / "imgs"
    write_good(imgs, 3)
    url = str(tmp_path / "s.zarr")
    run_extract(str(imgs), url, WITH_PIXELS, notify=quiet)
    before = store_arrays(url)
    expect = write_photos(imgs / "photos")
    shutil.copy(imgs / "photos" / "exif6.jpg", imgs / "photos" / "zz-exif6-copy.jpg")
    summary = run_extract(str(imgs), url, WITH_PIXELS, notify=quiet)
    n = 3 + len(expect) + 1
    assert (summary.n_images, summary.ok, summary.done_this_run, summary.copied_this_run) == (n, n, n - 3, 1)
    assert_old_rows_kept(before, url)
    assert_same_store(extract_whole(tmp_path, imgs), url)
    store = FeatureStore.open(url)
    rows = {Path(p).name: i for i, p in enumerate(store.paths())}
    copy, source = rows["zz-exif6-copy.jpg"], rows["exif6.jpg"]
    assert store.duplicate_of()[copy] == source and np.array_equal(store.features[copy], store.features[source])
    # every orientation was turned upright on the way in: its view is exif1's, up to JPEG noise
    views = store.pixels
    upright = views[rows["exif1.jpg"]].astype(int)
    for o in range(2, 9):
        assert np.abs(views[rows[f"exif{o}.jpg"]].astype(int) - upright).mean() < 4, o
    assert np.abs(views[rows["exif6.jpg"]].astype(int) - upright[:, ::-1]).mean() > 20  # a turn would show


def test_a_run_on_a_store_that_grew_since_is_refused_saying_so(tmp_path):
    from zeroseg.trainer.config import recipe
    from zeroseg.trainer.launch import run_train
    from zeroseg.trainer.train import train

    imgs, url, _ = grown_folder(tmp_path, 8, 4)
    config = recipe("paper", "tiny", steps=4, batch=4, grids=SMALL.grids, checkpoint_every=2, threads=1)
    train(url, tmp_path / "run", config, stop_after=2, progress=False)
    run_extract(str(imgs), url, WITH_PIXELS, notify=quiet)  # 4 images appended
    with pytest.raises(UserError, match="trained on another store .*: it grew from 8 to 12 images since the run "
                                        "started; train a new --out on the grown store"):
        run_train(url, tmp_path / "run", resume=True, progress=False)


def test_an_append_killed_after_a_chunk_then_rerun_equals_one_extraction(tmp_path):
    imgs, url, before = grown_folder(tmp_path, 6, 7)

    def die_after_first(result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(str(imgs), url, WITH_PIXELS, notify=quiet, progress=die_after_first)
    store = FeatureStore.open(url)
    assert store.n_images == 13 and store.pending_chunks() == [2, 3]
    summary = run_extract(str(imgs), url, WITH_PIXELS, notify=quiet)
    assert summary.done_this_run == 5 and summary.pending == 0
    assert_old_rows_kept(before, url)
    assert_same_store(extract_whole(tmp_path, imgs), url)


def test_an_append_killed_while_writing_its_paths_is_redone(tmp_path):
    """What a kill after the arrays grew but before the new paths were written leaves: rows with
    empty paths at the end. The next run writes them again."""
    imgs, url, before = grown_folder(tmp_path, 6, 5)
    store = FeatureStore.open(url, mode="r+")
    rows = store.append(["x"] * 3)
    store.group["images/path"][rows] = np.asarray([""] * 3, dtype=str)
    assert FeatureStore.open(url).n_images == 9 and len(FeatureStore.open(url).listed_paths()) == 6
    summary = run_extract(str(imgs), url, WITH_PIXELS, notify=quiet)
    assert (summary.n_images, summary.ok) == (11, 11)
    assert_old_rows_kept(before, url)
    assert_same_store(extract_whole(tmp_path, imgs), url)


def test_a_vanished_image_is_reported_and_its_row_kept(tmp_path):
    imgs, url, before = grown_folder(tmp_path, 6, 2)
    (imgs / "good005.png").unlink()  # in the half-full last chunk, which the append fills
    notes = []
    summary = run_extract(str(imgs), url, WITH_PIXELS, notify=notes.append)
    vanished = [n for n in notes if "not in" in n]
    assert len(vanished) == 1 and "1 of" in vanished[0] and "good005.png" in vanished[0], notes
    assert (summary.n_images, summary.ok) == (8, 8)
    assert_old_rows_kept(before, url)  # row 5 too: still ok, its features as they were


def test_a_listing_that_shares_no_image_is_refused_and_append_adds_it(tmp_path, capsys):
    write_good(tmp_path / "imgs", 3)
    url = str(tmp_path / "s.zarr")
    run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    write_good(tmp_path / "other", 2, seed=2, prefix="other")
    with pytest.raises(UserError, match="holds 3 images, none of them in .*--append"):
        run_extract(str(tmp_path / "other"), url, SMALL, notify=quiet)
    assert FeatureStore.open(url).n_images == 3
    args = ["--grids", "1,2", "--view-size", "32", "--workers", "0"]
    result = zeroseg(capsys, "extract", tmp_path / "other", url, *args, "--append")
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(url)
    assert store.n_images == 5 and (store.status() == Status.OK).all()
    assert [p.rsplit("/", 1)[-1] for p in store.paths()[3:]] == ["other000.png", "other001.png"]
    # --append names only additions: the store's own images are not reported vanished
    assert "not in" not in result.output
    result = zeroseg(capsys, "extract", tmp_path / "other", tmp_path / "new.zarr", *args, "--append")
    assert result.exit_code == 2 and "--append adds images to an existing store" in result.output


def test_compare_listing_counts_paths_as_multisets():
    change = compare_listing(["a", "b", "b", "c"], ["a", "b", "d", "d", "a"])
    assert change.new == [2, 3, 4] and change.vanished == ["b", "c"]


def test_an_index_built_before_an_append_says_it_is_stale(tmp_path, capsys):
    imgs, url, _ = grown_folder(tmp_path, 6, 3)
    assert zeroseg(capsys, "index", "build", url, "--out", tmp_path / "ix").exit_code == 0
    run_extract(str(imgs), url, WITH_PIXELS, notify=quiet)
    result = zeroseg(capsys, "query", tmp_path / "ix", "--image", 0, "--crop", 0)
    assert result.exit_code == 0, result.output
    stale = [line for line in result.output.splitlines() if "stale" in line]
    assert len(stale) == 1 and "grew from 6 to 9 images" in stale[0], result.output


# Runs `zeroseg ARGS` in a process that SIGKILLs itself right after images/path grew, before the
# new paths are written: the one moment at which an append has changed the store's row count.
KILL_AFTER_THE_PATHS_GROW = """
import os, signal, sys
import zarr
from zeroseg.cli import main

resize = zarr.Array.resize

def resize_then_die(self, *args, **kwargs):
    resize(self, *args, **kwargs)
    if self.path == "images/path":
        os.kill(os.getpid(), signal.SIGKILL)

zarr.Array.resize = resize_then_die
sys.argv = ["zeroseg", *sys.argv[1:]]
main()
"""
ARGS = ["--grids", "1,2", "--view-size", "32", "--chunk-images", "4", "--batch", "20", "--pixels", "--workers", "0"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_sigkill_while_the_store_grows_then_a_rerun_equals_one_extraction(tmp_path):
    imgs, url = tmp_path / "imgs", str(tmp_path / "s.zarr")
    write_good(imgs, 6)
    assert run(["-m", "zeroseg", "extract", str(imgs), url, *ARGS]).returncode == 0
    before = store_arrays(url)
    write_good(imgs, 5, seed=1, prefix="more")
    died = run(["-c", KILL_AFTER_THE_PATHS_GROW, "extract", str(imgs), url, *ARGS])
    assert died.returncode == -9, died.stderr
    store = FeatureStore.open(url)
    assert store.n_images == 11 and len(store.listed_paths()) == 6  # grown, the new paths not written
    again = run(["-m", "zeroseg", "extract", str(imgs), url, *ARGS])
    assert again.returncode == 0, again.stderr
    said = " ".join(again.stderr.split())  # the console wraps long lines
    assert "5 new images" in said and "added as rows 6-10" in said
    assert_old_rows_kept(before, url)
    assert_same_store(extract_whole(tmp_path, imgs), url)
