"""`zeroseg store export STORE --format npy-parquet OUT`: a store's crop features in
clip-retrieval's layout, for autofaiss and clip-retrieval's back-end:

    OUT/img_emb/img_emb_<k>.npy            (rows, D) float16 or float32, part k
    OUT/metadata/metadata_<k>.parquet      the same rows: image_path, image_index (the store row),
                                           and for a grid > 1 crop (0 .. g*g-1, row-major) and its
                                           fractional box x0, y0, x1, y1 in the training view

Only the status-ok images, in store order; the 1x1 grid by default (one row per image), or one
grid's crops (g*g rows per image). Read one store chunk at a time; a part holds at most
`part_rows` rows. OUT is claimed as a zeroseg output (outputs.claim_output_dir): new, empty, or an
export of ours, whose parts are replaced; each file is written whole (temporary file, rename).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from zeroseg.errors import UserError
from zeroseg.geometry import grid_levels
from zeroseg.outputs import claim_output_dir
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status

FORMATS = ("npy-parquet",)
DTYPES = ("float16", "float32")


class _Parts:
    """Rows gathered until a part is full, then written as img_emb_<k>.npy + metadata_<k>.parquet."""

    def __init__(self, out: Path, part_rows: int, dtype: str):
        self.emb_dir, self.meta_dir = out / "img_emb", out / "metadata"
        self.part_rows, self.dtype = part_rows, dtype
        self.emb: list[np.ndarray] = []
        self.meta: list[dict[str, np.ndarray]] = []
        self.rows = self.parts = self.total = 0

    def add(self, emb: np.ndarray, meta: dict[str, np.ndarray]) -> None:
        start = 0
        while start < len(emb):  # split across parts
            take = min(len(emb) - start, self.part_rows - self.rows)
            self.emb.append(emb[start : start + take])
            self.meta.append({k: v[start : start + take] for k, v in meta.items()})
            self.rows += take
            start += take
            if self.rows == self.part_rows:
                self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        k = self.parts
        emb = np.concatenate(self.emb).astype(self.dtype)
        table = pa.table({name: np.concatenate([m[name] for m in self.meta]) for name in self.meta[0]})
        npy, parquet = self.emb_dir / f"img_emb_{k}.npy", self.meta_dir / f"metadata_{k}.parquet"
        tmp = self.emb_dir / f".img_emb_{k}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, emb)
        os.replace(tmp, npy)
        tmp = self.meta_dir / f".metadata_{k}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, parquet)
        self.parts, self.total = self.parts + 1, self.total + self.rows
        self.emb, self.meta, self.rows = [], [], 0


def export_store(
    url: str, out: str | Path, fmt: str = "npy-parquet", grid: int = 1, part_rows: int = 1_000_000,
    dtype: str = "float16", teacher_key: str | None = None,
) -> dict[str, int]:
    """Write the export of the store's teacher `teacher_key` (None: its first); returns {"rows",
    "parts", "images"}."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if part_rows < 1:
        raise UserError("--part-rows must be positive")
    store = FeatureStore.open(url, teacher=teacher_key)
    levels = dict(grid_levels(store.config.grids))
    if grid not in levels:
        raise UserError(f"--grid {grid}: the store has grids {','.join(map(str, store.config.grids))}")
    out = Path(out)
    if claim_output_dir(out, "export"):  # an export of ours: replace its parts whole
        for sub in ("img_emb", "metadata"):
            shutil.rmtree(out / sub, ignore_errors=True)
    (out / "img_emb").mkdir()
    (out / "metadata").mkdir()

    crops = levels[grid]
    boxes = store.boxes[crops]  # (g*g, 4)
    paths, status = store.paths(), store.status()
    parts = _Parts(out, part_rows, dtype)
    for chunk in range(store.n_chunks):
        sl = store.chunk_slice(chunk)
        ok = np.flatnonzero(status[sl] == Status.OK)
        if not len(ok):
            continue
        f = store.features.read_chunk(chunk)[ok][:, crops]  # (n_ok, g*g, D)
        rows = sl.start + ok
        n_crops = f.shape[1]
        names = np.array(paths[rows].tolist(), dtype=object)  # plain str for Parquet (zarr gives StringDType)
        meta = {"image_path": np.repeat(names, n_crops), "image_index": np.repeat(rows, n_crops)}
        if grid > 1:
            tiled = np.tile(boxes, (len(ok), 1))
            meta |= {"crop": np.tile(np.arange(n_crops), len(ok))} | {
                name: tiled[:, i] for i, name in enumerate(("x0", "y0", "x1", "y1"))}
        parts.add(f.reshape(-1, f.shape[-1]), meta)
    parts.flush()
    return {"rows": parts.total, "parts": parts.parts, "images": int((status == Status.OK).sum())}
