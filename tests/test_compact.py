"""Compact targets (`store compact --to int8|pq`): cosine to fp16, bytes, a killed compact resumed,
the trainer reading them, and a re-extracted chunk making them stale."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from synthetic import synthetic_store
from test_extract import zeroseg
from zeroseg.errors import UserError
from zeroseg.stores import compact
from zeroseg.stores.compact import CompactTargets, compact_kinds, compact_store, cosine
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.inspect import store_info, verify_store
from zeroseg.stores.schema import Status
from zeroseg.trainer.config import recipe
from zeroseg.trainer.train import train

FAILED = (3,)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, tiny_teacher):
    """A complete 20-image store (one failed), grids 1,2, chunks of 6 (the last one short)."""
    url = str(tmp_path_factory.mktemp("compact") / "fresh.zarr")
    synthetic_store(url, tiny_teacher, 20, grids=(1, 2), chunk_images=6, failed=FAILED, pixels=True)
    return url


@pytest.fixture
def store_url(fresh, tmp_path):
    url = str(tmp_path / "s.zarr")
    shutil.copytree(fresh, url)
    return url


def quiet(_msg: str) -> None:
    pass


def test_int8_keeps_every_vector_and_is_smaller(store_url, capsys):
    fp16_before = FeatureStore.open(store_url).features[:]
    assert compact_store(store_url, "int8", notify=quiet) == {"written": 4, "chunks": 4}
    store = FeatureStore.open(store_url)
    np.testing.assert_array_equal(store.features[:], fp16_before)  # the fp16 features untouched
    ok = store.status() == Status.OK
    decoded = CompactTargets(store, "int8").read(slice(None))
    assert decoded.dtype == np.float32 and decoded.shape == fp16_before.shape
    cos = cosine(decoded[ok], fp16_before[ok])
    assert cos.min() >= 0.999
    assert (decoded[~ok] == 0).all()  # a failed image's zero features stay zero

    report, problems, _ = verify_store(store_url)
    assert problems == [] and report["compact"]["int8"]["min_cosine"] == pytest.approx(cos.min())
    assert report["compact"]["int8"]["vectors"] == ok.sum() * store.n_crops
    info = store_info(store_url)
    assert info["compact"]["int8"]["state"] == "complete"
    assert info["compact"]["int8"]["per_image"] < info["bytes"]["features_per_image"]
    out = zeroseg(capsys, "store", "verify", store_url).output
    assert "int8 targets: cosine to fp16 min 0.99" in out
    assert "int8      " in zeroseg(capsys, "store", "info", store_url).output
    assert zeroseg(capsys, "store", "compact", store_url, "--to", "int8").output.startswith(
        f"{store_url}: int8 targets written for 0 chunks")  # nothing left to do


def test_killed_compact_resumes_to_the_same_bytes(store_url, fresh, tmp_path, monkeypatch):
    straight = str(tmp_path / "straight.zarr")
    shutil.copytree(fresh, straight)
    compact_store(straight, "int8", notify=quiet)

    real_write = compact._write_chunk

    def dies_at_chunk_2(store, kind, chunk, codes, scale):
        if chunk == 2:  # after the codes of chunk 2, before its scale: the worst moment
            store.group["crops/int8"][store.chunk_slice(chunk)] = codes
            raise KeyboardInterrupt("killed")
        real_write(store, kind, chunk, codes, scale)

    monkeypatch.setattr(compact, "_write_chunk", dies_at_chunk_2)
    with pytest.raises(KeyboardInterrupt):
        compact_store(store_url, "int8", notify=quiet)
    store = FeatureStore.open(store_url)
    assert compact_kinds(store) == {"int8": "2 of 4 chunks"}
    with pytest.raises(UserError, match="no complete int8 targets"):
        CompactTargets(store, "int8")
    np.testing.assert_array_equal(store.features[:], FeatureStore.open(fresh).features[:])

    monkeypatch.setattr(compact, "_write_chunk", real_write)
    assert compact_store(store_url, "int8", notify=quiet)["written"] == 2  # the lock was released
    a, b = FeatureStore.open(store_url).group, FeatureStore.open(straight).group
    for name in ("crops/int8", "crops/int8_scale", "crops/features"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


def test_rewriting_a_chunk_marks_its_compact_stale(store_url):
    compact_store(store_url, "int8", notify=quiet)
    store = FeatureStore.open(store_url, mode="r+")
    sl = store.chunk_slice(1)
    n = sl.stop - sl.start
    store.write_chunk(1, np.ones((n, store.n_crops, store.dim)), np.full(n, Status.OK), [""] * n, np.ones((n, 2)))
    assert compact_kinds(FeatureStore.open(store_url)) == {"int8": "3 of 4 chunks"}
    assert compact_store(store_url, "int8", notify=quiet)["written"] == 1
    decoded = CompactTargets(FeatureStore.open(store_url), "int8").read(sl)
    np.testing.assert_allclose(decoded, 1.0, rtol=1e-3)  # the new features, to the float16 scale's precision


def test_pq_round_trip(store_url):
    compact_store(store_url, "pq", pq_subvectors=32, notify=quiet)
    store = FeatureStore.open(store_url)
    assert store.group["crops/pq_codes"].shape == (20, 5, 32) and store.group["crops/pq_codebook"].shape[0] == 32
    report = verify_store(store_url)[0]["compact"]["pq"]
    # a codebook trained on only 95 vectors still points every code the right way
    assert report["mean_cosine"] > 0.9 and report["min_cosine"] > 0.7
    info = store_info(store_url)["compact"]["pq"]
    assert info["state"] == "complete" and info["per_image"] < store_info(store_url)["bytes"]["features_per_image"]
    with pytest.raises(UserError, match="must divide"):
        compact_store(store_url, "pq", pq_subvectors=5, notify=quiet)


def test_trainer_reads_int8_targets(store_url, tmp_path):
    config = dataclasses.replace(recipe("paper", "tiny"), steps=3, batch=4, log_every=1, checkpoint_every=3,
                                 threads=1, grids=(1, 2), targets_dtype="int8")
    with pytest.raises(UserError, match="store compact"):
        train(store_url, tmp_path / "early", config, progress=False)
    compact_store(store_url, "int8", notify=quiet)
    result = train(store_url, tmp_path / "run", config, progress=False)
    assert result["step"] == 3 and np.isfinite(float(result["metrics"]["loss"]))
    fp16 = train(store_url, tmp_path / "fp16", dataclasses.replace(config, targets_dtype="fp16"), progress=False)
    # the same data order and seed: the int8 targets move the loss by little
    assert float(result["metrics"]["loss"]) == pytest.approx(float(fp16["metrics"]["loss"]), rel=0.02)
    with pytest.raises(UserError, match="for cached targets"):
        dataclasses.replace(config, targets="online")


def test_a_damaged_compact_chunk_is_named_repaired_and_written_again(store_url, capsys):
    compact_store(store_url, "int8", notify=quiet)
    chunk_file = Path(store_url) / "crops" / "int8" / "c" / "1" / "0" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk_file.write_bytes(bytes(data))
    result = zeroseg(capsys, "store", "verify", "--repair", store_url)
    assert result.exit_code == 1 and "crops/int8 chunk 1 (images 6-11) is damaged" in result.output
    assert compact_kinds(FeatureStore.open(store_url)) == {"int8": "3 of 4 chunks"}
    assert FeatureStore.open(store_url).pending_chunks() == []  # the fp16 features were sound: not redone
    assert compact_store(store_url, "int8", notify=quiet)["written"] == 1
    report, problems, _ = verify_store(store_url)
    assert problems == [] and report["compact"]["int8"]["min_cosine"] >= 0.999
