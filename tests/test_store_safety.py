"""The store's own safety (issue 11): never touch what zeroseg did not write, resume bit-identical
or refused, damaged chunks found, named and repaired, stale derived artefacts named."""

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from images import write_good
from test_extract import SMALL, assert_same_store, quiet, tree_digest, zeroseg
from zeroseg.errors import UserError
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.stores.features import FeatureStore, StoreError
from zeroseg.stores.schema import CREATING_MARKER, Status
from zeroseg.stores.inspect import verify_store

EXTRACT_ARGS = ["--grids", "1,2", "--view-size", "32", "--chunk-images", "4", "--batch", "20", "--workers", "0"]


def one_line(output: str) -> bool:
    return len(output.strip().splitlines()) == 1 and "Traceback" not in output


def one_error_line(output: str) -> bool:
    """One `error:` line and no traceback (a progress bar may have been drawn before it)."""
    return sum(line.startswith("error:") for line in output.splitlines()) == 1 and "Traceback" not in output


# ---- never delete what zeroseg did not write -------------------------------------------------


def foreign_group(folder: Path) -> None:
    """Another tool's Zarr v3 group: an array `precious` and a README.txt beside it."""
    group = zarr.open_group(str(folder), mode="w-", zarr_format=3)
    group.create_array("precious", data=np.arange(10, dtype=np.int32))
    (folder / "README.txt").write_text("my lab's data\n")


@pytest.mark.parametrize("kind", ["foreign zarr group", "plain folder", "file"])
def test_extract_refuses_what_it_did_not_write(tmp_path, capsys, kind):
    write_good(tmp_path / "imgs", 3)
    target = tmp_path / "target.zarr"
    if kind == "foreign zarr group":
        foreign_group(target)
    elif kind == "plain folder":
        target.mkdir()
        (target / "README.txt").write_text("notes\n")
        (target / "sub").mkdir()
        (target / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
    else:
        target.write_bytes(b"not a folder")
    before = tree_digest(tmp_path) if kind == "file" else tree_digest(target)
    result = zeroseg(capsys, "extract", tmp_path / "imgs", target, *EXTRACT_ARGS)
    assert result.exit_code == 2, result.output
    assert one_line(result.output) and str(target) in " ".join(result.output.split())
    assert (tree_digest(tmp_path) if kind == "file" else tree_digest(target)) == before
    if kind == "foreign zarr group":
        assert list(zarr.open_group(str(target), mode="r")["precious"][:]) == list(range(10))


def test_an_empty_folder_is_used(tmp_path):
    write_good(tmp_path / "imgs", 3)
    (tmp_path / "s.zarr").mkdir()
    assert run_extract(str(tmp_path / "imgs"), str(tmp_path / "s.zarr"), SMALL, notify=quiet).ok == 3


def test_an_interrupted_create_is_redone(tmp_path):
    """A create killed after its marker and some arrays: the next extract redoes it."""
    write_good(tmp_path / "imgs", 5)
    url = str(tmp_path / "s.zarr")
    run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    whole = str(tmp_path / "whole.zarr")
    run_extract(str(tmp_path / "imgs"), whole, SMALL, notify=quiet)
    # What a create killed before its attributes leaves: the marker, a group, some arrays.
    zarr.open_group(url, mode="r+").attrs.clear()
    (Path(url) / CREATING_MARKER).write_text("{}")
    with pytest.raises(StoreError, match="unfinished"):
        FeatureStore.open(url)
    summary = run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    assert summary.ok == 5 and not (Path(url) / CREATING_MARKER).exists()
    assert_same_store(whole, url)


# ---- resume is bit-identical or refused ---------------------------------------------------


def test_a_resume_with_another_batch_is_refused(tmp_path, capsys):
    write_good(tmp_path / "imgs", 6)
    url = tmp_path / "s.zarr"
    assert zeroseg(capsys, "extract", tmp_path / "imgs", url, *EXTRACT_ARGS).exit_code == 0
    FeatureStore.open(str(url), mode="r+").group["images/status"][4:] = 0  # chunk 1 still to do
    before = tree_digest(url)
    result = zeroseg(capsys, "extract", tmp_path / "imgs", url, *EXTRACT_ARGS[:-4], "--batch", "10", "--workers", "0")
    assert result.exit_code == 2 and one_line(result.output)
    assert "batch 20" in result.output and "batch 10" in result.output
    assert tree_digest(url) == before


def test_the_store_records_what_changes_the_bits(tmp_path):
    write_good(tmp_path / "imgs", 3)
    run_extract(str(tmp_path / "imgs"), str(tmp_path / "s.zarr"), SMALL, notify=quiet)
    options = FeatureStore.open(str(tmp_path / "s.zarr")).extract_options
    assert options["device"] == "cpu" and options["precision"] == "fp32" and options["batch"] == 20
    assert options["threads_per_worker"] >= 1


# ---- corruption detected, named, repaired ---------------------------------------------------


def chunk_file(url: str, array: str, chunk: int) -> Path:
    """The file of chunk `chunk` (along images) of a per-image array: c/<chunk>/0/... ."""
    ndim = len(zarr.open_array(str(Path(url, array)), mode="r").shape)
    return Path(url, *array.split("/"), "c", str(chunk), *["0"] * (ndim - 1))


def flip_two_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle] ^= 0xFF
    raw[middle + 1] ^= 0x0F
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.fixture
def extracted(tmp_path):
    write_good(tmp_path / "imgs", 14)
    whole, url = str(tmp_path / "whole.zarr"), str(tmp_path / "s.zarr")
    for u in (whole, url):
        run_extract(str(tmp_path / "imgs"), u, SMALL, notify=quiet)
    return tmp_path / "imgs", whole, url


def test_verify_names_flipped_bytes_and_a_truncated_chunk(extracted, capsys):
    _, _, url = extracted
    flip_two_bytes(chunk_file(url, "crops/features", 1))
    truncate(chunk_file(url, "crops/features", 3))
    result = zeroseg(capsys, "store", "verify", url)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert "crops/features chunk 1 (images 4-7)" in text and "crops/features chunk 3 (images 12-13)" in text
    assert "chunk 0" not in text and "chunk 2" not in text
    assert "--repair" in text


def test_repair_then_extract_is_bit_identical(extracted, capsys):
    imgs, whole, url = extracted
    flip_two_bytes(chunk_file(url, "crops/features", 1))
    truncate(chunk_file(url, "images/size", 2))
    truncate(chunk_file(url, "images/status", 3))
    result = zeroseg(capsys, "store", "verify", url, "--repair")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "marked 3 chunks pending" in " ".join(result.output.split())
    assert FeatureStore.open(url).pending_chunks() == [1, 2, 3]
    summary = run_extract(str(imgs), url, SMALL, notify=quiet)
    assert summary.done_this_run == 4 + 4 + 2 and summary.pending == 0
    assert_same_store(whole, url)
    result = zeroseg(capsys, "store", "verify", url)
    assert result.exit_code == 0, result.output


def test_a_damaged_path_chunk_cannot_be_repaired(extracted, capsys):
    _, _, url = extracted
    truncate(chunk_file(url, "images/path", 0))
    result = zeroseg(capsys, "store", "verify", url, "--repair")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "images/path chunk 0 (images 0-3) cannot be repaired" in " ".join(result.output.split())


def test_readers_stop_with_one_line_naming_the_chunk(extracted, capsys, tmp_path):
    _, _, url = extracted
    flip_two_bytes(chunk_file(url, "crops/features", 2))
    result = zeroseg(capsys, "index", "build", url, "--out", tmp_path / "ix")
    assert result.exit_code == 2 and one_error_line(result.output), result.output
    assert "crops/features chunk 2 (images 8-11)" in result.output and "store verify --repair" in result.output
    assert not (tmp_path / "ix").exists()
    result = zeroseg(capsys, "train", url, "--out", tmp_path / "run", "--preset", "tiny", "--steps", "2",
                     "--batch", "4", "--threads", "1")
    assert result.exit_code == 2 and one_error_line(result.output), result.output
    assert "crops/features chunk 2 (images 8-11)" in result.output


def test_query_names_a_damaged_chunk(extracted, capsys, tmp_path):
    _, _, url = extracted
    assert zeroseg(capsys, "index", "build", url, "--out", tmp_path / "ix").exit_code == 0
    flip_two_bytes(chunk_file(url, "crops/features", 2))
    result = zeroseg(capsys, "query", tmp_path / "ix", "--image", 9, "--crop", 0, "--store", url)
    assert result.exit_code == 2 and one_error_line(result.output), result.output
    assert "crops/features chunk 2 (images 8-11)" in result.output


# ---- stale derived artefacts ----------------------------------------------------------------


def test_index_build_refuses_a_store_with_pending_chunks(extracted, capsys, tmp_path):
    _, _, url = extracted
    FeatureStore.open(url, mode="r+").group["images/status"][4:8] = 0
    result = zeroseg(capsys, "index", "build", url, "--out", tmp_path / "ix")
    assert result.exit_code == 2 and one_error_line(result.output), result.output
    assert "pending" in result.output and not (tmp_path / "ix").exists()


def test_query_says_when_the_store_changed_since_the_build(extracted, capsys, tmp_path):
    imgs, _, url = extracted
    assert zeroseg(capsys, "index", "build", url, "--out", tmp_path / "ix").exit_code == 0
    result = zeroseg(capsys, "query", tmp_path / "ix", "--image", 0, "--crop", 0)
    assert result.exit_code == 0 and "changed since" not in result.output
    # `verify --repair` marks chunk 1 pending: the index now lists crops the store does not vouch for.
    flip_two_bytes(chunk_file(url, "crops/features", 1))
    zeroseg(capsys, "store", "verify", url, "--repair")
    result = zeroseg(capsys, "query", tmp_path / "ix", "--image", 0, "--crop", 0)
    assert result.exit_code == 0
    assert "changed since the index was built" in " ".join(result.output.split())
    # Re-extracted, bit-identical: the same store again, no warning.
    run_extract(str(imgs), url, SMALL, notify=quiet)
    result = zeroseg(capsys, "query", tmp_path / "ix", "--image", 0, "--crop", 0)
    assert result.exit_code == 0 and "changed since" not in result.output
