"""Compact targets: a store's fp16 crop features also as int8 with a per-vector scale, or as PQ
codes with their codebook, beside the fp16 ones (`zeroseg store compact STORE --to int8|pq`).

Layout (zeroseg.stores.schema, "compact targets"): codes, then a per-vector float16 scale (int8)
or norm (PQ) whose NaN rows mean "not written". `compact_store` writes one store chunk (whole
images) at a time, codes first, scale last, under the store's lock: a killed compact leaves the
fp16 features untouched and its finished chunks finished, and a re-run writes exactly the rest.
The PQ codebook is trained once, on a fixed sample, and written before any code, so a resumed
compact encodes with the same codebook.

`CompactTargets` decodes them to float32 for the trainer; this module is the one place that
knows how.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from zeroseg.errors import UserError
from zeroseg.stores.features import DamagedChunkError, FeatureStore, StoreArray
from zeroseg.stores.lock import StoreLock
from zeroseg.stores.schema import CHECKED, COMPACT_ARRAYS, COMPRESSED, PQ_CODEBOOK, Status

KINDS = tuple(COMPACT_ARRAYS)  # int8, pq
TARGET_DTYPES = ("fp16", *KINDS)  # what the trainer may read
PQ_SAMPLE = 65536  # vectors the codebook is trained on


# ---- int8 and PQ, in memory --------------------------------------------------------------------


def quantize_int8(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., D) -> int8 codes (..., D) and float16 scales (...): symmetric, f ~ codes * scale.
    The scale is rounded to float16 first and the codes made with that rounded scale, so that
    decoding uses exactly the scale it was made with."""
    x = f.astype(np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float16)
    s = scale.astype(np.float32)[..., None]
    q = np.divide(x, s, out=np.zeros_like(x), where=s > 0)
    return np.clip(np.rint(q), -127, 127).astype(np.int8), scale


def dequantize_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale.astype(np.float32)[..., None]


def train_codebook(sample: np.ndarray, m: int) -> np.ndarray:
    """faiss PQ over unit vectors (n, D): centroids (m, K, D / m), K = 256 or fewer when the
    sample is small."""
    import faiss  # seconds to import: only compact needs it

    n, d = sample.shape
    nbits = int(min(8, np.floor(np.log2(max(n, 2)))))
    pq = faiss.ProductQuantizer(d, m, nbits)
    pq.cp.min_points_per_centroid = 1  # a small store trains on what it has, without faiss's warning
    pq.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.vector_to_array(pq.centroids).reshape(m, pq.ksub, pq.dsub)


def _unit(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = f.astype(np.float32)
    norm = np.linalg.norm(x, axis=-1)
    return np.divide(x, norm[..., None], out=np.zeros_like(x), where=norm[..., None] > 0), norm


def encode_pq(f: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., D) -> codes (..., M) uint8 of the unit vectors, and float16 norms (...)."""
    unit, norm = _unit(f)
    m, k, dsub = codebook.shape
    x = unit.reshape(-1, m, dsub)  # (n, M, dsub)
    # squared distance to each centroid, per sub-vector: |x|^2 - 2 x.c + |c|^2 (|x|^2 is constant)
    dist = (codebook**2).sum(-1)[None] - 2 * np.einsum("nmd,mkd->nmk", x, codebook)
    codes = dist.argmin(axis=-1).astype(np.uint8)
    return codes.reshape(*f.shape[:-1], m), norm.astype(np.float16)


def decode_pq(codes: np.ndarray, norm: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    m = codebook.shape[0]
    parts = codebook[np.arange(m), codes.astype(np.int64)]  # (..., M, dsub)
    return parts.reshape(*codes.shape[:-1], -1) * norm.astype(np.float32)[..., None]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (..., D) arrays, in float64; NaN where either is all zero."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.divide((a * b).sum(-1), denom, out=np.full(denom.shape, np.nan), where=denom > 0)


# ---- in the store ------------------------------------------------------------------------------


def done_chunks(store: FeatureStore, kind: str) -> list[bool]:
    """Per store chunk: whether its `kind` compact is written (and still matches its features)."""
    _, scale_name = COMPACT_ARRAYS[kind]
    if scale_name not in store.group:
        return [False] * store.n_chunks
    scale = StoreArray(store.group[scale_name], scale_name, store.url)
    done = []
    for chunk in range(store.n_chunks):
        sl = store.chunk_slice(chunk)
        try:
            done.append(sl.stop <= scale.shape[0] and not np.isnan(scale.read_chunk(chunk).astype(np.float32)).any())
        except DamagedChunkError:  # unreadable: not written, as far as anyone can tell; compact rewrites it whole
            done.append(False)
    return done


def compact_kinds(store: FeatureStore) -> dict[str, str]:
    """The store's compact targets: kind -> "complete" or "k of n chunks"."""
    out = {}
    for kind in KINDS:
        if COMPACT_ARRAYS[kind][1] in store.group:
            done = done_chunks(store, kind)
            out[kind] = "complete" if all(done) else f"{sum(done)} of {len(done)} chunks"
    return out


@dataclass
class CompactTargets:
    """A store's crop features as the trainer reads them: fp16 as stored (float16), int8 or PQ
    decoded to float32. `read(rows, columns)` -> (n, C', D). `partial` allows an unfinished
    compact (for verify, which reads only its written chunks)."""

    store: FeatureStore
    dtype: str = "fp16"
    partial: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TARGET_DTYPES:
            raise UserError(f"targets dtype must be one of {', '.join(TARGET_DTYPES)}, not {self.dtype!r}")
        if self.dtype == "fp16":
            return
        if self.store.is_added_teacher:
            raise UserError(f"{self.store.url}: compact targets are the first teacher's ({self.store.first_teacher_key}); "
                            f"teacher {self.store.teacher_key} has fp16 targets only")
        state = compact_kinds(self.store).get(self.dtype)
        if state != "complete" and not (self.partial and state):
            raise UserError(
                f"{self.store.url} has no complete {self.dtype} targets ({state or 'none written'}): "
                f"run `zeroseg store compact {self.store.url} --to {self.dtype}` first"
            )
        codes_name, scale_name = COMPACT_ARRAYS[self.dtype]
        self.codes = StoreArray(self.store.group[codes_name], codes_name, self.store.url)
        self.scale = StoreArray(self.store.group[scale_name], scale_name, self.store.url)
        if self.dtype == "pq":
            self.codebook = np.asarray(self.store.group[PQ_CODEBOOK][:], dtype=np.float32)

    def read(self, rows, columns: np.ndarray | slice = slice(None)) -> np.ndarray:
        if self.dtype == "fp16":
            return self.store.features[rows][:, columns]
        codes, scale = self.codes[rows][:, columns], self.scale[rows][:, columns]
        if self.dtype == "int8":
            return dequantize_int8(codes, scale)
        return decode_pq(codes, scale, self.codebook)


def _pq_sample(store: FeatureStore, size: int, seed: int = 0) -> np.ndarray:
    """Up to `size` unit vectors of ok images, from whole chunks taken in a seeded order."""
    rng = np.random.default_rng(seed)
    status = store.status()
    parts, have = [], 0
    for chunk in rng.permutation(store.n_chunks):
        sl = store.chunk_slice(int(chunk))
        ok = status[sl] == Status.OK
        if not ok.any():
            continue
        f = store.features.read_chunk(int(chunk))[ok].reshape(-1, store.dim)
        parts.append(_unit(f)[0])
        have += len(f)
        if have >= size:
            break
    if not parts:
        raise UserError(f"{store.url} has no ok images to train a PQ codebook on")
    sample = np.concatenate(parts)
    return sample[np.sort(rng.permutation(len(sample))[:size])]


def _require(store: FeatureStore, name: str, shape: tuple[int, ...], dtype, fill, compressors) -> None:
    """Create array `name` (chunked by the store's chunk_images along images), or grow it to the
    store's images (an append added rows: they read as not written)."""
    chunks = (store.config.chunk_images, *shape[1:])
    if name not in store.group:
        store.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, compressors=compressors)
    elif store.group[name].shape != shape:
        store.group[name].resize(shape)


def _write_chunk(store: FeatureStore, kind: str, chunk: int, codes: np.ndarray, scale: np.ndarray) -> None:
    """Codes first, scale last: a chunk whose scale rows hold no NaN is complete."""
    codes_name, scale_name = COMPACT_ARRAYS[kind]
    sl = store.chunk_slice(chunk)
    store.group[codes_name][sl] = codes
    store.group[scale_name][sl] = scale


def compact_store(
    url: str, to: str, pq_subvectors: int | None = None, notify: Callable[[str], None] = print
) -> dict[str, int]:
    """Write `to` (int8 | pq) compact targets of every chunk not yet written; returns
    {"written": chunks written now, "chunks": all chunks}. pq_subvectors: PQ sub-vectors M
    (D must divide by it; default D / 4)."""
    if to not in KINDS:
        raise UserError(f"--to must be one of {', '.join(KINDS)}, not {to!r}")
    with StoreLock(url):
        store = FeatureStore.open(url, mode="r+")
        version = store.group.attrs["schema_version"]
        if version < 2:
            raise UserError(f"{url} is a version-{version} store (no checksums): run `zeroseg store migrate {url}` "
                            "first, then compact it")
        n, c, d = store.n_images, store.n_crops, store.dim
        codes_name, scale_name = COMPACT_ARRAYS[to]
        if to == "int8":
            _require(store, codes_name, (n, c, d), "int8", 0, COMPRESSED)
        else:
            m = pq_subvectors or max(1, d // 4)
            if d % m:
                raise UserError(f"--pq-subvectors {m}: the features' {d} dims must divide by it")
            if PQ_CODEBOOK in store.group and store.group[PQ_CODEBOOK].shape[0] != m:
                notify(f"{url}: replacing its PQ targets of {store.group[PQ_CODEBOOK].shape[0]} sub-vectors by {m}")
                for name in (scale_name, codes_name, PQ_CODEBOOK):  # scale first: a crash leaves no valid chunk
                    if name in store.group:
                        del store.group[name]
            if PQ_CODEBOOK not in store.group:
                codebook = train_codebook(_pq_sample(store, PQ_SAMPLE), m)
                store.group.create_array(PQ_CODEBOOK, data=codebook, compressors=CHECKED)
            codebook = np.asarray(store.group[PQ_CODEBOOK][:], dtype=np.float32)
            _require(store, codes_name, (n, c, m), "uint8", 0, COMPRESSED)
        _require(store, scale_name, (n, c), "float16", np.nan, CHECKED)
        if version == 2:
            # An older zeroseg would rewrite a chunk without marking its compact stale: it must not write here.
            store.group.update_attributes({"schema_version": 3})
        done = done_chunks(store, to)
        written = 0
        for chunk in range(store.n_chunks):
            if done[chunk]:
                continue
            f = store.features.read_chunk(chunk)
            codes, scale = quantize_int8(f) if to == "int8" else encode_pq(f, codebook)
            _write_chunk(store, to, chunk, codes, scale)
            written += 1
    return {"written": written, "chunks": store.n_chunks}


def mark_unwritten(store: FeatureStore, kind: str, chunk: int) -> None:
    """Chunk `chunk` of the `kind` compact becomes not written (its scale rows NaN, written whole
    over whatever is there), for `compact` to redo: verify --repair's fix for a damaged chunk."""
    sl = store.chunk_slice(chunk)
    store.group[COMPACT_ARRAYS[kind][1]][sl] = np.full((sl.stop - sl.start, store.n_crops), np.nan, np.float16)


def compact_report(store: FeatureStore) -> dict[str, dict]:
    """Per complete-or-partial compact kind: the cosine to the fp16 features per vector of ok
    images in its written chunks (min, mean), the chunks written, and the chunks whose codes
    cannot be read back ("damaged": chunk -> DamagedChunkError's line). Out of core."""
    status = store.status()
    report = {}
    for kind in compact_kinds(store):
        done = done_chunks(store, kind)
        targets = CompactTargets(store, kind, partial=True)
        lo, total, count, damaged = np.inf, 0.0, 0, {}
        for chunk in range(store.n_chunks):
            sl = store.chunk_slice(chunk)
            ok = status[sl] == Status.OK
            if not done[chunk] or not ok.any():
                continue
            try:
                cos = cosine(targets.read(sl)[ok], store.features.read_chunk(chunk)[ok])
            except DamagedChunkError as e:
                damaged[chunk] = str(e)
                continue
            cos = cos[np.isfinite(cos)]
            if cos.size:
                lo, total, count = min(lo, float(cos.min())), total + float(cos.sum()), count + cos.size
        report[kind] = {"min_cosine": lo if count else float("nan"), "mean_cosine": total / count if count else float("nan"),
                        "vectors": count, "chunks_written": sum(done), "chunks": len(done), "damaged": damaged}
    return report
