"""Inputs labs have: WebDataset tar shards (img2dataset's layout) and Parquet/CSV tables with a
path column, read into the same store rows as a folder of the same photographs."""

import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from images import write_photos
from test_extract import assert_same_store, quiet, zeroseg
from zeroseg.decode import decode_image
from zeroseg.pipeline.reader import expand_braces, list_inputs
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status
from zeroseg.stores.views import row_views

GRIDS = (1, 2)
SMALL = ExtractConfig(grids=GRIDS, view_size=32, batch=20, chunk_images=4, workers=0)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, photos: Path, names: list[str], per_shard: int) -> list[Path]:
    """img2dataset's layout: shards 00000.tar, 00001.tar, ... each key 000000000 with its .jpg
    (or the photo's own extension), .json and .txt, numbered across shards."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(names), per_shard):
        shard = folder / f"{s // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i, name in enumerate(names[s:s + per_shard], start=s):
                key = f"{i:09d}"
                add_member(tar, f"{key}.{name.rsplit('.', 1)[-1]}", (photos / name).read_bytes())
                add_member(tar, f"{key}.json", json.dumps({"key": key, "url": f"http://x/{name}"}).encode())
                add_member(tar, f"{key}.txt", f"a photo named {name}".encode())
        shards.append(shard)
    return shards


@pytest.fixture
def photos(tmp_path) -> tuple[Path, list[str]]:
    expect = write_photos(tmp_path / "photos")
    return tmp_path / "photos", sorted(expect)


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("s/{00008..00010}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def test_a_store_from_shards_equals_the_store_from_the_folder(tmp_path, photos):
    """Same photographs, same order: the same features bit for bit; the rows decode, through the
    one view of a store row, to the very views the extractor stored."""
    folder, names = photos
    write_shards(tmp_path / "shards", folder, names, per_shard=6)  # 17 photos: 3 shards
    from_folder, from_shards = str(tmp_path / "folder.zarr"), str(tmp_path / "shards.zarr")
    run_extract(str(folder), from_folder, ExtractConfig(**{**SMALL.__dict__, "pixels": True}), notify=quiet)
    summary = run_extract(str(tmp_path / "shards" / "{00000..00002}.tar"), from_shards, SMALL, notify=quiet)
    assert (summary.ok, summary.failed) == (len(names), 0)
    a, b = FeatureStore.open(from_folder), FeatureStore.open(from_shards)
    assert a.features[:].tobytes() == b.features[:].tobytes()
    np.testing.assert_array_equal(a.sizes(), b.sizes())
    paths = [str(p) for p in b.paths()]
    assert paths[0].startswith(str(tmp_path / "shards" / "00000.tar") + "#000000000.gif@")
    assert paths[6].startswith(str(tmp_path / "shards" / "00001.tar") + "#000000006.")
    # the trainer, segment and query see rows through row_views: without pixels, the shard member
    # is decoded there exactly as the extractor decoded it
    np.testing.assert_array_equal(row_views(b, slice(None)), a.pixels[:])
    np.testing.assert_array_equal(row_views(b, [16, 3]), a.pixels.oindex[[16, 3]])
    meta = [json.loads(m) for m in b.metadata()]
    assert meta[5] == {"json": {"key": "000000005", "url": f"http://x/{names[5]}"}, "txt": f"a photo named {names[5]}"}
    assert a.metadata() is None  # a folder has none: no images/meta array


def test_truncated_shard_and_a_non_image_member_are_data_not_a_crash(tmp_path, photos, capsys):
    folder, names = photos
    shards = write_shards(tmp_path / "shards", folder, names[:8], per_shard=4)
    with tarfile.open(shards[0], "a") as tar:  # odd members in a good shard
        add_member(tar, "000000100.jpg", b"this is not an image\n")
        add_member(tar, "000000101.json", b'{"status": "failed to download"}')  # a key with no image
        add_member(tar, "000000101.cls", b"3")
    data = shards[1].read_bytes()
    last = list_inputs(str(shards[1])).paths[-1]  # cut the shard inside its last photo's bytes
    offset = int(last.rsplit("@", 1)[1].split("+")[0])
    shards[1].write_bytes(data[:offset + 100])
    manifest = tmp_path / "shards.txt"
    manifest.write_text("\n".join(f"shards/{p.name}" for p in shards))  # relative to the manifest
    result = zeroseg(capsys, "extract", manifest, tmp_path / "s.zarr", "--input-format", "webdataset",
                     "--grids", "1,2", "--view-size", "32", "--chunk-images", "4", "--workers", "0")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert f"note: shard {shards[1]} is truncated after 4 keys" in said
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    status, errors, paths = store.status(), store.errors(), [str(p) for p in store.paths()]
    assert len(paths) == 4 + 2 + 4
    assert (status[:4] == Status.OK).all() and (status[6:9] == Status.OK).all()
    assert "#000000100.jpg@" in paths[4] and errors[4].startswith("not an image")
    assert "#000000101.json@" in paths[5] and errors[5].startswith("not an image")
    assert json.loads(store.metadata()[5]) == {"json": {"status": "failed to download"}}
    assert status[9] == Status.FAILED and errors[9].startswith("truncated: the shard ends")
    assert "7 ok, 3 failed, 0 pending" in said and "1 truncated" in said


def test_a_shard_rewritten_after_listing_is_refused_not_misread(tmp_path, photos):
    folder, names = photos
    [shard] = write_shards(tmp_path / "shards", folder, names[:2], per_shard=2)
    key = list_inputs(str(shard)).paths[1]
    write_shards(tmp_path / "shards", folder, names[5:7], per_shard=2)  # same shard name, other photos
    assert decode_image(key, 32, GRIDS).error.startswith("unreadable: ")


def test_shards_at_an_fsspec_url(tmp_path, photos):
    folder, names = photos
    shards = write_shards(tmp_path / "shards", folder, names[:5], per_shard=3)
    fs = fsspec.filesystem("memory")
    for shard in shards:
        fs.pipe(f"/inputs-test/{shard.name}", shard.read_bytes())
    try:
        listing = list_inputs("memory://inputs-test/{00000..00001}.tar")
        assert len(listing.paths) == 5 and listing.paths[0].startswith("memory://inputs-test/00000.tar#")
        local = list_inputs(str(tmp_path / "shards" / "*.tar"), "webdataset")
        for remote, here in zip(listing.paths, local.paths):
            np.testing.assert_array_equal(decode_image(remote, 32, GRIDS).view, decode_image(here, 32, GRIDS).view)
    finally:
        fs.rm("/inputs-test", recursive=True)


def test_resume_of_a_store_from_shards(tmp_path, photos):
    folder, names = photos
    write_shards(tmp_path / "shards", folder, names, per_shard=6)
    pattern, url = str(tmp_path / "shards" / "{00000..00002}.tar"), str(tmp_path / "s.zarr")
    whole = str(tmp_path / "whole.zarr")
    run_extract(pattern, whole, SMALL, notify=quiet)
    with pytest.raises(KeyboardInterrupt):
        def die_after_first(result):
            raise KeyboardInterrupt
        run_extract(pattern, url, SMALL, notify=quiet, progress=die_after_first)
    assert FeatureStore.open(url).pending_chunks() == [1, 2, 3, 4]
    summary = run_extract(pattern, url, SMALL, notify=quiet)
    assert summary.done_this_run == len(names) - 4 and summary.pending == 0
    assert_same_store(whole, url)
    # fewer shards: the rows of the one left out are reported, and kept (tests/test_append.py)
    notes = []
    fewer = run_extract(str(tmp_path / "shards" / "{00000..00001}.tar"), url, SMALL, notify=notes.append)
    assert fewer.n_images == len(names) and fewer.done_this_run == 0
    assert any(f"{len(names) - 12} of" in n and "not in" in n for n in notes), notes
    assert_same_store(whole, url)


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_a_table_with_a_path_column(tmp_path, photos, kind, capsys):
    folder, names = photos
    table = pa.table({"label": [n.split(".")[0] for n in names], "file": [f"photos/{n}" for n in names]})
    path = tmp_path / f"images.{kind}"
    if kind == "parquet":
        pq.write_table(table, path)
    else:
        path.write_text("label,file\n" + "".join(f"{a},{b}\n" for a, b in zip(*table.to_pydict().values())))
    wrong = zeroseg(capsys, "extract", path, tmp_path / "x.zarr", "--workers", "0")
    assert wrong.exit_code == 2 and "has no column 'path' (columns: label, file)" in wrong.output
    assert not (tmp_path / "x.zarr").exists() or not any((tmp_path / "x.zarr").iterdir())
    result = zeroseg(capsys, "extract", path, tmp_path / "t.zarr", "--path-column", "file", "--grids", "1,2",
                     "--view-size", "32", "--chunk-images", "4", "--batch", "20", "--workers", "0")
    assert result.exit_code == 0, result.output
    run_extract(str(folder), str(tmp_path / "f.zarr"), SMALL, notify=quiet)
    t, f = FeatureStore.open(str(tmp_path / "t.zarr")), FeatureStore.open(str(tmp_path / "f.zarr"))
    assert list(t.paths()) == list(f.paths())
    assert t.features[:].tobytes() == f.features[:].tobytes()
    assert json.loads(t.metadata()[3]) == {"label": names[3].split(".")[0]}
