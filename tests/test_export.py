"""`store export --format npy-parquet`: clip-retrieval's layout, read back with numpy and pyarrow."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from synthetic import synthetic_store
from test_extract import zeroseg
from zeroseg.errors import UserError
from zeroseg.geometry import grid_boxes
from zeroseg.stores.export import export_store
from zeroseg.stores.features import FeatureStore

FAILED = (2, 9)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, tiny_teacher):
    """14 images (two failed), grids 1,2, chunks of 4."""
    url = str(tmp_path_factory.mktemp("export") / "s.zarr")
    synthetic_store(url, tiny_teacher, 14, grids=(1, 2), chunk_images=4, failed=FAILED)
    return url


def read_back(out):
    parts = sorted((out / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    emb = np.concatenate([np.load(p) for p in parts])
    meta = [pq.read_table(out / "metadata" / f"metadata_{p.stem.rsplit('_', 1)[1]}.parquet").to_pydict() for p in parts]
    return emb, {k: sum((m[k] for m in meta), []) for k in meta[0]}, len(parts)


def test_export_1x1_reads_back_as_the_store(store_url, tmp_path, capsys):
    out = tmp_path / "export"
    result = zeroseg(capsys, "store", "export", store_url, out, "--part-rows", "5")
    assert result.exit_code == 0 and "12 rows of 12 ok images in 3 parts" in result.output
    emb, meta, n_parts = read_back(out)
    store = FeatureStore.open(store_url)
    ok = np.array([i for i in range(14) if i not in FAILED])
    assert emb.dtype == np.float16 and emb.shape == (12, store.dim) and n_parts == 3
    np.testing.assert_array_equal(emb, store.features[:][ok, 0])
    assert meta["image_path"] == list(store.paths()[ok]) and meta["image_index"] == list(ok)
    assert set(meta) == {"image_path", "image_index"}


def test_export_a_grid_flattens_its_crops(store_url, tmp_path):
    out = tmp_path / "export"
    assert export_store(store_url, out, grid=2, dtype="float32") == {"rows": 48, "parts": 1, "images": 12}
    emb, meta, _ = read_back(out)
    store = FeatureStore.open(store_url)
    ok = np.array([i for i in range(14) if i not in FAILED])
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, store.features[:][ok][:, 1:5].reshape(-1, store.dim).astype(np.float32))
    assert meta["crop"][:5] == [0, 1, 2, 3, 0] and meta["image_index"][:5] == [0, 0, 0, 0, 1]
    boxes = grid_boxes((2,))
    np.testing.assert_allclose(np.stack([meta[k] for k in ("x0", "y0", "x1", "y1")], 1), np.tile(boxes, (12, 1)))

    # again into our own export: replaced whole, fewer parts leave no stale part behind
    export_store(store_url, out, grid=1, part_rows=100)
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy"]


def test_export_never_writes_into_a_users_folder(store_url, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_store(store_url, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="--grid 3"):
        export_store(store_url, tmp_path / "new", grid=3)
