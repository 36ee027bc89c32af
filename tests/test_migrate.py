"""`store migrate`: a version-1 store (no checksums) made version 5 in place, also after a kill."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from zarr.codecs import BloscCodec

from synthetic import synthetic_store
from test_extract import zeroseg
from zeroseg.stores import migrate
from zeroseg.stores.features import DamagedChunkError, FeatureStore
from zeroseg.stores.migrate import migrate_store
from zeroseg.stores.schema import DEDUP_ARRAYS, MIGRATING_DIR, SCHEMA_VERSION

ARRAYS = ("crops/features", "crops/boxes", "images/path", "images/status", "images/error", "images/size", "images/pixels")


def quiet(_msg: str) -> None:
    pass


def as_version_1(url: str) -> None:
    """Rewrite the store's arrays as zeroseg's schema version 1 wrote them: no crc32c checksum, no hashes."""
    group = FeatureStore.open(url, mode="r+").group
    for name in DEDUP_ARRAYS:
        del group[name]
    for name in ARRAYS:
        a = group[name]
        data, chunks, fill = a[:], a.chunks, a.fill_value
        del group[name]
        compressors = [BloscCodec(cname="zstd", clevel=3)] if name in ("crops/features", "images/pixels") else None
        group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=fill, compressors=compressors)
        group[name][:] = data
    group.update_attributes({"schema_version": 1})


@pytest.fixture(scope="module")
def v1(tmp_path_factory, tiny_teacher):
    url = str(tmp_path_factory.mktemp("migrate") / "v1.zarr")
    synthetic_store(url, tiny_teacher, 10, grids=(1, 2), chunk_images=4, failed=(2,))
    as_version_1(url)
    return url


def contents(url):
    group = FeatureStore.open(url).group
    return {name: group[name][:] for name in ARRAYS}


def flip_a_byte_of_features_chunk_0(url) -> None:
    chunk = Path(url) / "crops" / "features" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def test_a_version_1_store_migrated_keeps_its_data_and_gains_checksums(v1, tmp_path, capsys):
    url = str(tmp_path / "s.zarr")
    shutil.copytree(v1, url)
    before = contents(url)
    result = zeroseg(capsys, "store", "migrate", url)
    assert result.exit_code == 0 and "schema version 1 -> 5: 7 arrays rewritten" in result.output
    assert "image hashes added" in result.output
    store = FeatureStore.open(url)
    assert store.group.attrs["schema_version"] == SCHEMA_VERSION and "migration" not in store.group.attrs
    assert not (tmp_path / "s.zarr" / MIGRATING_DIR).exists()
    for name, data in contents(url).items():
        np.testing.assert_array_equal(data, before[name])
    flip_a_byte_of_features_chunk_0(url)
    with pytest.raises(DamagedChunkError, match="crops/features chunk 0"):
        FeatureStore.open(url).features.read_chunk(0)
    assert (store.duplicate_of() == -1).all() and (store.hashes() == "").all()
    assert store.features.is_raw()  # rewritten with today's codecs: features raw
    assert "already schema version 5" in zeroseg(capsys, "store", "migrate", url).output


@pytest.mark.parametrize("killed_in", ["stage", "swap"])
def test_a_killed_migration_finishes_on_a_re_run(v1, tmp_path, monkeypatch, killed_in):
    url = str(tmp_path / "s.zarr")
    shutil.copytree(v1, url)
    before = contents(url)
    real = getattr(migrate, f"_{killed_in}")
    calls = []

    def dies_at_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        real(*args)

    monkeypatch.setattr(migrate, f"_{killed_in}", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        migrate_store(url, notify=quiet)
    monkeypatch.setattr(migrate, f"_{killed_in}", real)
    if killed_in == "stage":  # the originals untouched: still a readable version-1 store
        assert FeatureStore.open(url).group.attrs["schema_version"] == 1
        for name, data in contents(url).items():
            np.testing.assert_array_equal(data, before[name])
    notes = []
    assert "1 -> 5" in migrate_store(url, notify=notes.append)
    assert notes and ("redoing" in notes[0] if killed_in == "stage" else "finishing" in notes[0])
    assert FeatureStore.open(url).group.attrs["schema_version"] == SCHEMA_VERSION
    for name, data in contents(url).items():
        np.testing.assert_array_equal(data, before[name])


@pytest.mark.parametrize("version", [2, 3])
def test_versions_2_and_3_gain_the_hash_arrays_only(v1, tmp_path, version):
    url = str(tmp_path / "s.zarr")
    shutil.copytree(v1, url)
    migrate_store(url, notify=quiet)
    before = contents(url)
    group = FeatureStore.open(url, mode="r+").group
    for name in DEDUP_ARRAYS:
        del group[name]
    group.update_attributes({"schema_version": version})
    assert not FeatureStore.open(url).has_dedup
    assert f"{version} -> 5: no array rewritten; image hashes added" in migrate_store(url, notify=quiet)
    store = FeatureStore.open(url)
    assert store.has_dedup and store.group.attrs["schema_version"] == 5
    for name, data in contents(url).items():
        np.testing.assert_array_equal(data, before[name])


def with_compressed_features(url: str) -> None:
    """The store's crop features as version 5 wrote them before 2026-12-03: Blosc zstd, then crc32c."""
    from zeroseg.stores.schema import COMPRESSED

    group = FeatureStore.open(url, mode="r+").group
    a = group["crops/features"]
    data, chunks = a[:], a.chunks
    del group["crops/features"]
    group.create_array("crops/features", data=data, chunks=chunks, fill_value=0, compressors=COMPRESSED)


@pytest.mark.parametrize("killed_in", [None, "stage", "swap"])
def test_compressed_features_of_a_version_5_store_are_rewritten_raw(v1, tmp_path, monkeypatch, capsys, killed_in):
    from zeroseg.stores.index import store_rows

    url = str(tmp_path / "s.zarr")
    shutil.copytree(v1, url)
    migrate_store(url, notify=quiet)
    with_compressed_features(url)
    before = contents(url)
    store = FeatureStore.open(url)
    assert not store.features.is_raw() and store_rows(store) == "chunks"
    assert "compressed: `zeroseg store migrate` stores them raw" in zeroseg(capsys, "store", "info", url).output
    if killed_in:
        real = getattr(migrate, f"_{killed_in}")

        def dies(*args):
            raise KeyboardInterrupt("killed")

        monkeypatch.setattr(migrate, f"_{killed_in}", dies)
        with pytest.raises(KeyboardInterrupt):
            migrate_store(url, notify=quiet)
        monkeypatch.setattr(migrate, f"_{killed_in}", real)
        for name, data in contents(url).items():  # killed before any swap: the store reads as before
            np.testing.assert_array_equal(data, before[name])
    result = zeroseg(capsys, "store", "migrate", url)
    assert result.exit_code == 0 and "1 feature arrays rewritten raw" in result.output, result.output
    assert "->" not in result.output  # the version stays 5
    store = FeatureStore.open(url)
    assert store.features.is_raw() and store_rows(store) == "mapped" and store.group.attrs["schema_version"] == 5
    assert "migration" not in store.group.attrs and not (tmp_path / "s.zarr" / MIGRATING_DIR).exists()
    for name, data in contents(url).items():
        np.testing.assert_array_equal(data, before[name])
    assert "nothing to do" in zeroseg(capsys, "store", "migrate", url).output
    assert "stored raw: an index re-ranks from them in place" in zeroseg(capsys, "store", "info", url).output
