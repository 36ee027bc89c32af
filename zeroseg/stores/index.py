"""The FAISS neighbour index: the one module that knows its on-disk format (DESIGN.md, step 6).

An index folder holds two files:

    index.faiss   a FAISS index (faiss.write_index), always an IndexIDMap around the search
                  structure, metric inner product over L2-normalised vectors (= cosine similarity)
    meta.json     IndexMeta: what the vectors are (source, store, teacher, checkpoint), how the
                  index was made (kind, factory string, parameters) and how ids map back

Ids are exact and need no side table: id = image_index * stride + sub_index, where sub_index is
the crop index in the store (source "crops", stride = the store's crops per image) or the segment
token index (source "segments", stride = the student's tokens per image). `decode_ids` undoes it.

Kinds (FAISS index_factory strings; `auto` picks by the number of vectors, see `choose_kind`):

    flat          IDMap,Flat                       exact, brute force: best below ~100k vectors
    hnsw          IDMap,HNSW32,Flat                graph search over the raw vectors; slow to build
                                                   (17 min for 1M x 512 on 2 cores), recall@10 0.94
    ivf-pq        IDMap,IVF{nlist},PQ{m}x4fs,RFlat coarse lists + 4-bit fast-scan PQ codes, the
                                                   shortlist re-ranked exactly on a float32 copy in
                                                   RAM (~2.1 KB a vector)
    ivf-pq-sq8    ...,Refine(SQ8)                  the same, re-ranked on an 8-bit copy (~600 B)
    ivf-rabitq-store IVF{nlist}_HNSW32,RaBitQfs    1-bit RaBitQ codes and ids only (~83 B a vector
                                                   at 512 dims); the shortlist re-ranked exactly on
                                                   the store's own features (StoreRows): `auto` above
                                                   100k crops of a store whose raw feature chunks
                                                   map in place
    ivf-pq-store  IVF{nlist},PQ{m}x4fs             the same with a 4-bit PQ shortlist (~72 B a vector):
                                                   auto's before RaBitQ; its shortlist blurs at 5M
                                                   (49 candidates a neighbour for recall 0.97)

This module imports neither pipeline nor trainer: it builds an index out of core from any
`chunk(i) -> (ids, vectors)`; what the vectors are made of (crops, or a student's segment
tokens) is zeroseg.segment.neighbours' business.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from zeroseg.errors import UserError
from zeroseg.outputs import canonical_location
from zeroseg.stores import mapped
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.mapped import MappedRows, ShortChunkFile

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
KINDS = ("auto", "flat", "hnsw", "ivf-pq", "ivf-pq-sq8", "ivf-rabitq-store", "ivf-pq-store")
# The kinds whose exact re-ranking reads the candidates' features from the store by id: RAM holds
# only the codes and ids. Crops only (a student's segment tokens are not in the store). The first
# is auto's: at 5M x 512 its shortlist needs 8 candidates a neighbour where PQ's needs 49
# (benchmarks/README.md, "Neighbour index").
STORE_RERANKED = ("ivf-rabitq-store", "ivf-pq-store")
# Without a mapped store, `auto` keeps a re-ranking copy in RAM while the whole index takes at most
# this share of the memory available now; when none fits, it re-ranks from the (compressed) store.
AUTO_RAM_SHARE = 0.25
# Decoded store chunks kept for re-ranking a compressed store (an LRU): bounds its memory.
RERANK_CACHE_BYTES = 256 * 2**20
# Below this many vectors exact search is fast enough and needs no training (one 100k x 512
# query: 24 ms on one thread of the busy 2-core dev box, and exact). Above it, benchmarks/index.py
# at 1M x 512 (benchmarks/README.md): ivf-rabitq-store from a mapped store 97 B a vector, recall@10
# 0.999, p50 0.27 ms; ivf-pq 2142 B, 0.995, 0.21 ms; ivf-pq-sq8 606 B, 0.972, 0.30 ms; re-ranked
# from a compressed store, 1.8 s a query (a chunk decoded per candidate): the last resort.
AUTO_EXACT_LIMIT = 100_000
# An IVF index probes the fewest lists of TUNE_NPROBES that reach TUNE_RECALL recall@10 on
# TUNE_QUERIES of its own vectors (NeighbourIndex.tune_nprobe): what a query needs depends on the
# data (benchmarks/index.py's clusters need 8 of 4096 lists; real embeddings may need more), so it
# is measured at build, not guessed. 0.97 leaves a margin over 0.95 for 200 queries' sampling error.
TUNE_RECALL = 0.97
TUNE_QUERIES = 200
TUNE_NPROBES = (4, 8, 16, 32, 64, 128, 256)
AUTO_APPROXIMATE = ("ivf-pq", "ivf-pq-sq8")


class NeighbourIndexError(UserError):
    """A missing, corrupt or mismatched index folder: one line."""


@dataclass(frozen=True)
class IndexSpec:
    """How one kind of index is made and searched, for a given size and dimension."""

    kind: str
    factory: str  # faiss.index_factory string, metric inner product
    build_params: dict[str, Any] = field(default_factory=dict)  # set before adding
    search_params: dict[str, Any] = field(default_factory=dict)  # set before searching (saved)
    train_size: int = 0  # vectors to train on; 0 = needs no training

    def parameter_string(self, params: dict[str, Any]) -> str:
        return ",".join(f"{k}={v}" for k, v in params.items())


def choose_kind(n_vectors: int, dim: int = 512, store_rows: str | None = None,
                available_bytes: int | None = None) -> str:
    """`auto`: exact below AUTO_EXACT_LIMIT vectors. Above it, vectors the store holds raw
    (`store_rows` "mapped": crops of a store whose feature chunks map in place) are re-ranked from
    the store: ~72 B a vector of RAM and as fast as an in-RAM copy. Otherwise the first of
    AUTO_APPROXIMATE (fastest first) whose RAM takes at most AUTO_RAM_SHARE of the memory available;
    when none does, vectors in a compressed store (`store_rows` "chunks") are re-ranked from it
    (slow: a chunk decoded per candidate), others (segment tokens, None) get the smallest in-RAM kind."""
    if n_vectors < AUTO_EXACT_LIMIT:
        return "flat"
    if store_rows == "mapped":
        return STORE_RERANKED[0]
    available = _available_memory() if available_bytes is None else available_bytes
    for kind in AUTO_APPROXIMATE:
        if index_footprint(kind, n_vectors, dim)["ram_bytes"] <= AUTO_RAM_SHARE * available:
            return kind
    return STORE_RERANKED[0] if store_rows == "chunks" else AUTO_APPROXIMATE[-1]


def _available_memory() -> int:
    """MemAvailable (Linux) in bytes; without /proc, the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _pq_subquantizers(dim: int) -> int:
    """Largest m <= dim / 4 that divides dim: 4-bit codes of about one byte per 8 dimensions."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _nlist(n_vectors: int) -> int:
    # About 2 sqrt(n) lists as a power of two (FAISS suggests 4-16 sqrt(n); fewer lists train
    # much faster and fast-scan makes scanning longer lists cheap), trained on 40 vectors per list
    # (k-means wants at least 39).
    nlist = int(2 ** round(np.log2(max(16, 2 * np.sqrt(n_vectors)))))
    return max(1, min(nlist, n_vectors // 40))


def index_spec(kind: str, n_vectors: int, dim: int, store_rows: str | None = None) -> IndexSpec:
    """The factory string and parameters of `kind` for n_vectors of dimension dim (`store_rows`:
    how the vectors can be read back from the store, see choose_kind)."""
    if kind == "auto":
        kind = choose_kind(n_vectors, dim, store_rows)
    if kind == "flat":
        return IndexSpec("flat", "IDMap,Flat")
    if kind == "hnsw":
        return IndexSpec(
            "hnsw", "IDMap,HNSW32,Flat",
            build_params={"efConstruction": 40}, search_params={"efSearch": 256},
        )
    if kind == "ivf-rabitq-store":
        # RaBitQ (Gao & Long 2024): a sign bit a dimension of the residual to the list's centroid,
        # with two correction factors a vector, estimates inner products far better than 4-bit PQ
        # at the same bytes. The coarse centroids are searched by a small HNSW graph, not a flat
        # scan of all of them (~0.1 ms a query at 4096 lists of 512 dims).
        nlist = _nlist(n_vectors)
        return IndexSpec(kind, f"IVF{nlist}_HNSW32,RaBitQfs", train_size=min(n_vectors, 40 * nlist),
                         search_params={"nprobe": min(nlist, 16), "quantizer_efSearch": 32,
                                        RERANK_FACTOR: rabitq_rerank_factor(n_vectors)})
    if kind in ("ivf-pq", "ivf-pq-sq8", "ivf-pq-store"):
        nlist = _nlist(n_vectors)
        ivf = f"IVF{nlist},PQ{_pq_subquantizers(dim)}x4fs"
        train_size = min(n_vectors, 40 * nlist)
        # Measured at 1M x 512 (benchmarks/index.py): the PQ shortlist, not nprobe, limits
        # recall; re-ranking 32 k exact candidates lifts recall@10 from 0.87 (8 k) to 0.996
        # for ~0.2 ms. nprobe: a start; build_index measures the one this data needs (tune_nprobe).
        nprobe = min(nlist, 16)
        if kind == "ivf-pq":  # re-ranked on a float32 copy of every vector in RAM
            return IndexSpec(kind, f"IDMap,{ivf},RFlat", search_params={"nprobe": nprobe, "k_factor_rf": 32},
                             train_size=train_size)
        if kind == "ivf-pq-sq8":  # re-ranked on an 8-bit copy in RAM (a quarter of RFlat's)
            return IndexSpec(kind, f"IDMap,{ivf},Refine(SQ8)", search_params={"nprobe": nprobe, "k_factor_rf": 32},
                             train_size=train_size)
        # Re-ranked on the store's own features (StoreRows): the IVF lists hold the ids, no IDMap.
        return IndexSpec(kind, ivf, search_params={"nprobe": nprobe, RERANK_FACTOR: store_rerank_factor(n_vectors)},
                         train_size=train_size)
    raise NeighbourIndexError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")


# Search parameter of the store-reranked kinds (not FAISS's): candidates = RERANK_FACTOR * k.
RERANK_FACTOR = "k_factor_store"


def rabitq_rerank_factor(n_vectors: int) -> int:
    """Candidates an ivf-rabitq-store search reads, per neighbour asked for: 8 gave recall@10 0.999
    at 1M and 0.997 at 5M x 512 (benchmarks/index.py). More near neighbours crowd a larger collection; beyond
    5M it grows as sqrt(n) (not measured), capped at 32."""
    return min(32, max(8, round(8 * (n_vectors / 5e6) ** 0.5)))


def store_rerank_factor(n_vectors: int) -> int:
    """Candidates an ivf-pq-store search reads, per neighbour asked for. The PQ shortlist blurs
    as more near neighbours crowd a larger collection, so it grows with n: benchmarks/index.py
    measured recall@10 0.964 with 16 at 1M x 512, and at 5M 0.942 with 32, 0.973 with 49. Each
    candidate is a row read from the page cache (~0.5 us). Not measured beyond 5M: capped at 64."""
    return min(64, max(16, round(16 * (n_vectors / 1e6) ** 0.7)))


def index_footprint(kind: str, n_vectors: int, dim: int) -> dict[str, float]:
    """What `kind` takes for n_vectors of dimension dim, computed from FAISS's layouts: bytes per
    vector in RAM and on disk, and totals (fixed parts: coarse centroids, PQ tables). The
    store-reranked kind's RAM leaves out its bounded chunk cache (RERANK_CACHE_BYTES)."""
    spec = index_spec(kind, n_vectors, dim)
    m = _pq_subquantizers(dim)
    if spec.kind == "flat":
        per_vector, fixed = 4 * dim + 8, 0
    elif spec.kind == "hnsw":
        per_vector, fixed = 4 * dim + 8 + 2 * 32 * 4 + 4, 0  # level-0 links (2 M ints) and levels
    elif spec.kind == "ivf-rabitq-store":
        per_vector = -(-dim // 8) + 8 + 8  # a bit a dimension, two float32 factors, the list's id
        fixed = _nlist(n_vectors) * (4 * dim + 2 * 32 * 4 + 4)  # coarse centroids and their HNSW links
    else:
        nlist = _nlist(n_vectors)
        fixed = 4 * nlist * dim + 4 * m * 16 * (dim // m)  # coarse centroids, 4-bit PQ centroids
        codes_ids = m / 2 + 8  # fast-scan codes (half a byte per sub-quantizer) and the list's id
        refine = {"ivf-pq": 4 * dim + 8, "ivf-pq-sq8": dim + 8, "ivf-pq-store": 0}[spec.kind]  # + IDMap id
        per_vector = codes_ids + refine
    return {"kind": spec.kind, "factory": spec.factory, "ram_per_vector": per_vector, "disk_per_vector": per_vector,
            "ram_bytes": int(per_vector * n_vectors + fixed), "disk_bytes": int(per_vector * n_vectors + fixed)}


# ---- ids ---------------------------------------------------------------------------------


def encode_ids(image: np.ndarray, sub: np.ndarray, stride: int) -> np.ndarray:
    """(image index, crop or token index) -> int64 id = image * stride + sub."""
    return np.asarray(image, dtype=np.int64) * stride + np.asarray(sub, dtype=np.int64)


def decode_ids(ids: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids -> (image index, crop or token index); FAISS's -1 (no result) stays -1."""
    ids = np.asarray(ids, dtype=np.int64)
    image, sub = np.divmod(ids, stride)
    return np.where(ids < 0, -1, image), np.where(ids < 0, -1, sub)


# ---- where the vectors came from ---------------------------------------------------------


def store_fingerprint(store: FeatureStore) -> dict[str, Any]:
    """The store's identity plus a hash of its image paths: tells two stores apart even when
    they share a teacher and a size, and still matches a store that was moved. `status_sha256`
    (a hash of every image's status) tells whether the store changed since: chunks marked
    pending by `store verify --repair`, or redone. A chunk is only ever rewritten bit-identical
    (extract refuses a resume that would not be), so status is all that can change."""
    fp = {**store.identity(), "paths_sha256": _paths_sha256(store.paths()),
          "status_sha256": hashlib.sha256(store.status().tobytes()).hexdigest()}
    fp["url"] = canonical_location(fp["url"])  # absolute: a query from another folder finds it
    return json.loads(json.dumps(fp))  # tuples -> lists: equal to itself after a save and load


def _paths_sha256(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _store_label(fp: dict[str, Any]) -> str:
    t = fp["teacher"]
    return f"{fp['url']} ({t['arch']}/{t['pretrained']} {t['sha256'][:12]}, {fp['n_images']} images)"


def _store_mismatches(built: dict[str, Any], given: dict[str, Any], grew: bool) -> list[str]:
    pairs = [
        ("teacher", built["teacher"]["sha256"][:12], given["teacher"]["sha256"][:12]),
        ("grids", built["grids"], given["grids"]),
        ("view_size", built["view_size"], given["view_size"]),
    ]
    if not grew:  # an appended store is the same store, stale (see NeighbourIndex.check_store)
        pairs += [("images", built["n_images"], given["n_images"]),
                  ("image paths", built["paths_sha256"][:12], given["paths_sha256"][:12])]
    return [f"{name} {a} vs {b}" for name, a, b in pairs if a != b]


def check_complete(store: FeatureStore) -> None:
    """Refuse to index a store with pending chunks: the index would miss their images for good."""
    pending = store.pending_chunks()
    if pending:
        raise NeighbourIndexError(
            f"{store.url} has {len(pending)} pending chunks (e.g. {pending[0]}): finish it with the same "
            "`zeroseg extract` command first, then build the index"
        )


def store_changed(built: dict[str, Any], given: dict[str, Any]) -> str | None:
    """A one-line warning when the store's image status changed since the index was built
    (None when not, or when the index predates the record)."""
    if "status_sha256" not in built or built["status_sha256"] == given["status_sha256"]:
        return None
    return (f"warning: store {given['url']} changed since the index was built (image status differs: "
            "chunks were marked pending or redone); rebuild it with `zeroseg index build`")


class StoreRows:
    """Crop features read back from the store by id for exact re-ranking. A store with raw
    feature chunks (FEATURE_CODECS, local) is mapped and each candidate read as one row from the
    page cache (stores/mapped.py). A compressed or remote store is read chunk by chunk: the ids
    are grouped by chunk and each chunk decoded once, whole, since a compressed chunk reads one
    row at about the cost of all of it; an LRU keeps the last decoded chunks (at most
    RERANK_CACHE_BYTES), so a repeated or nearby query reads few chunks again."""

    def __init__(self, store: FeatureStore, stride: int, cache_bytes: int = RERANK_CACHE_BYTES):
        self.features = store.features
        self.stride = stride  # the store's crops per image (a crops index's id stride)
        self.chunk_images = store.config.chunk_images
        try:
            self.mapped = map_rows(self.features)
            self.unmapped_reason = None
        except OSError as e:  # the system refused the maps (e.g. too many chunks): read whole chunks
            self.mapped = None
            self.unmapped_reason = (f"warning: the store's features could not be mapped ({e}): each candidate "
                                    "decodes a whole chunk, ~1000x slower")
        chunk_bytes = self.chunk_images * store.n_crops * store.dim * 4  # kept as float32, normalised
        self.cache_chunks = max(1, cache_bytes // chunk_bytes)
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.chunk_reads = 0  # chunks decoded from the store (cache misses)

    def _chunk(self, chunk: int) -> np.ndarray:
        if chunk in self.cache:
            self.cache.move_to_end(chunk)
            return self.cache[chunk]
        x = np.asarray(self.features.read_chunk(chunk), dtype=np.float32)  # (b, C, D)
        self.chunk_reads += 1
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
        x /= np.where(norms > 0, norms, 1)
        self.cache[chunk] = x
        if len(self.cache) > self.cache_chunks:
            self.cache.popitem(last=False)
        return x

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """ids (n,) -> their unit-normalised features (n, D) float32."""
        if self.mapped is not None:
            x = self._mapped(ids)
            return (x / _norms(x)[:, None]).numpy()
        image, crop = decode_ids(ids, self.stride)
        chunk = image // self.chunk_images
        out = np.empty((len(ids), self.features.shape[-1]), dtype=np.float32)
        order = np.argsort(chunk, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk[order])) + 1
        for group in np.split(order, bounds) if len(order) else []:
            c = int(chunk[group[0]])
            out[group] = self._chunk(c)[image[group] - c * self.chunk_images, crop[group]]
        return out

    def scores(self, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        """ids (n,) (none -1), a unit query (D,) -> the exact cosine of each (n,) float32."""
        if self.mapped is None:
            return self.rows(ids) @ query
        import torch

        x = self._mapped(ids)
        return ((x @ torch.from_numpy(query)) / _norms(x)).numpy()

    def _mapped(self, ids: np.ndarray):
        """ids (n,) -> their features as a float32 torch tensor (n, D): torch casts float16 ~20x
        faster than numpy, which matters at a few hundred rows a query."""
        import torch

        # A crop id is image * crops + crop (stride = the store's crops): its row in the mapped array.
        return torch.from_numpy(self.mapped.rows(ids)).float()


def _norms(x):
    """Row norms of a torch tensor, floored so that zero rows divide to zero."""
    import torch

    return torch.linalg.vector_norm(x, dim=1).clamp_min(1e-12)


def store_rows(store: FeatureStore) -> str:
    """How the store's crop features can be read back by id: "mapped" (raw chunks, in place) or
    "chunks" (a compressed or remote store: a chunk decoded per read)."""
    return "mapped" if mapped.available() and store.features.raw_chunk_files() is not None else "chunks"


def map_rows(features) -> MappedRows | None:
    """The store's crop features mapped in place (rows = image * crops + crop), or None when they
    cannot be (compressed or remote store, not Linux). A chunk file shorter than a chunk is
    NeighbourIndexError (damaged); maps the system refuses are OSError."""
    files = features.raw_chunk_files()
    if files is None or not mapped.available():
        return None
    _, c, d = features.shape
    try:
        return MappedRows(files, features.chunks[0] * c, (d,), features.dtype)
    except ShortChunkFile as e:
        raise NeighbourIndexError(f"{e}: the chunk is damaged; run `zeroseg store verify --repair {features.url}`, "
                                  "then extract again") from None


@dataclass
class IndexMeta:
    """meta.json: everything needed to trust and read an index file."""

    source: str  # "crops" | "segments"
    kind: str
    factory: str
    build_params: dict[str, Any]
    search_params: dict[str, Any]
    dim: int
    stride: int  # id = image * stride + sub
    count: int  # vectors in the index
    store: dict[str, Any]  # store_fingerprint of the store the vectors came from
    checkpoint: dict[str, Any] | None = None  # {"path", "sha256"} of the student (segments)
    grids: list[int] | None = None  # crop grids indexed (crops), a subset of the store's
    # IVF kinds: how search_params["nprobe"] was chosen (tune_nprobe): {"target", "recall", "queries",
    # "recall_by_nprobe"}; None for other kinds and indexes built before
    tuned: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> IndexMeta:
        d = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class NeighbourIndex:
    """A FAISS index over L2-normalised vectors with its meta. Build: `new`, then `fill` (or
    `train` when `needs_training` and `add` in batches), `save`. Read: `open`, `check_store`,
    `search`."""

    def __init__(self, index: faiss.Index, meta: IndexMeta, train_size: int = 0):
        self.index = index
        self.meta = meta
        self.train_size = train_size  # vectors `fill` trains on (IndexSpec.train_size)

    @classmethod
    def new(cls, spec: IndexSpec, meta: IndexMeta) -> NeighbourIndex:
        index = faiss.index_factory(meta.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
        cls._set_parameters(index, {**spec.build_params, **spec.search_params})
        return cls(index, meta, spec.train_size)

    @staticmethod
    def _set_parameters(index: faiss.Index, params: dict[str, Any]) -> None:
        """FAISS's own parameters (a saved index keeps nprobe and k_factor, not ours)."""
        params = {k: v for k, v in params.items() if k != RERANK_FACTOR}
        if params:
            faiss.ParameterSpace().set_index_parameters(index, ",".join(f"{k}={v}" for k, v in params.items()))

    @property
    def reranks_from_store(self) -> bool:
        return self.meta.kind in STORE_RERANKED

    def attach_store(self, store: FeatureStore) -> None:
        """The store a store-reranked index reads its candidates' features from (check_store first)."""
        self.rows = StoreRows(store, self.meta.stride)

    @property
    def probes_lists(self) -> bool:
        """An IVF index: its nprobe is a search parameter (tune_nprobe)."""
        return faiss.try_extract_index_ivf(self.index) is not None

    @property
    def needs_training(self) -> bool:
        return not self.index.is_trained

    @staticmethod
    def _normalised(vectors: np.ndarray) -> np.ndarray:
        """(n, D) any float -> contiguous float32 copy with unit rows (zero rows stay zero)."""
        x = np.array(vectors, dtype=np.float32, order="C", copy=True)
        faiss.normalize_L2(x)
        return x

    def train(self, sample: np.ndarray) -> None:
        self.index.train(self._normalised(sample))

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add one batch (n, D) with its int64 ids; the caller keeps batches small."""
        self.index.add_with_ids(self._normalised(vectors), np.ascontiguousarray(ids, dtype=np.int64))
        self.meta.count = int(self.index.ntotal)

    def fill(
        self,
        chunk: Callable[[int], tuple[np.ndarray, np.ndarray]],
        n_chunks: int,
        *,
        batch_vectors: int,
        seed: int,
        on_chunk: Callable[[], None] | None = None,
    ) -> None:
        """Out of core: train (when `needs_training`) on about `train_size` vectors from randomly
        chosen whole chunks, then add every chunk, `chunk(i)` -> (ids (n,) int64, vectors (n, D)),
        in batches of about `batch_vectors` (bounds memory). `on_chunk` is called after each chunk."""
        sampled = self._train_on_sample(chunk, n_chunks, seed) if self.needs_training else {}
        pending_ids, pending_x, pending_n = [], [], 0
        for i in range(n_chunks):
            ids, x = sampled.pop(i) if i in sampled else chunk(i)
            pending_ids.append(ids)
            pending_x.append(x)
            pending_n += len(ids)
            if pending_n >= batch_vectors:
                self.add(np.concatenate(pending_x), np.concatenate(pending_ids))
                pending_ids, pending_x, pending_n = [], [], 0
            if on_chunk:
                on_chunk()
        if pending_n:
            self.add(np.concatenate(pending_x), np.concatenate(pending_ids))

    def _train_on_sample(self, chunk, n_chunks: int, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Train on about train_size vectors from randomly chosen whole chunks (reads only what it
        keeps); returns those chunks' (ids, vectors), so that the add pass does not read them (or
        run the student) again."""
        n = self.train_size
        order = np.random.default_rng(seed).permutation(n_chunks)
        chunks, have = {}, 0
        for i in order.tolist():
            chunks[i] = chunk(i)
            have += len(chunks[i][1])
            if have >= n:
                break
        self.train(np.concatenate([x for _, x in chunks.values()])[:n])
        return chunks

    def tune_nprobe(
        self,
        chunk: Callable[[int], tuple[np.ndarray, np.ndarray]],
        n_chunks: int,
        *,
        seed: int,
        target: float = TUNE_RECALL,
        queries: int = TUNE_QUERIES,
        on_chunk: Callable[[], None] | None = None,
    ) -> None:
        """An IVF index probes as few lists as reach `target` recall@10 on this data: `queries` of
        its own vectors (from random chunks) are searched exactly, by one more pass over `chunk(i)`,
        then with each of TUNE_NPROBES; the smallest that reaches it is kept (the best measured when
        none does), with what was measured in meta.tuned. A query's own id is left out of both lists.
        A store-reranked index needs its store attached first. `on_chunk` after each chunk."""
        ivf = faiss.extract_index_ivf(self.index)
        rng = np.random.default_rng(seed)
        picked = rng.permutation(n_chunks)[: max(1, min(n_chunks, queries // 8))]
        own_ids, q = [], []
        for i in picked.tolist():
            ids, x = chunk(i)
            take = rng.permutation(len(ids))[: -(-queries // len(picked))]
            own_ids.append(ids[take])
            q.append(self._normalised(x[take]))
        own_ids, q = np.concatenate(own_ids)[:queries], np.concatenate(q)[:queries]
        k = 10
        exact = faiss.ResultHeap(len(q), k + 1, keep_max=True)  # cosine, the query's own id among them
        for i in range(n_chunks):
            ids, x = chunk(i)
            if len(ids):
                scores, rows = faiss.knn(q, self._normalised(x), min(k + 1, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
                exact.add_result(scores, np.where(rows >= 0, np.asarray(ids, np.int64)[rows], -1))
            if on_chunk:
                on_chunk()
        exact.finalize()

        def others(found: np.ndarray, own: int) -> set:
            return set(found[(found != own) & (found >= 0)][:k].tolist())

        truth = [others(t, own) for t, own in zip(exact.I, own_ids)]
        recall_by_nprobe = {}
        for nprobe in [p for p in TUNE_NPROBES if p < ivf.nlist] + [ivf.nlist]:
            ivf.nprobe = nprobe
            found = self.search(q, k + 1)[1]
            recall_by_nprobe[nprobe] = float(np.mean([len(others(f, own) & t) / max(1, len(t))
                                                      for f, own, t in zip(found, own_ids, truth)]))
            if recall_by_nprobe[nprobe] >= target or nprobe >= TUNE_NPROBES[-1]:
                break
        reached = [p for p, r in recall_by_nprobe.items() if r >= target]
        # Short of the target the shortlist, not the lists, limits recall (more lists then crowd it):
        # the best measured.
        ivf.nprobe = reached[0] if reached else max(recall_by_nprobe, key=recall_by_nprobe.get)
        self.meta.search_params = {**self.meta.search_params, "nprobe": ivf.nprobe}
        self.meta.tuned = {"target": target, "recall": round(recall_by_nprobe[ivf.nprobe], 4), "queries": len(q),
                           "recall_by_nprobe": {str(p): round(r, 4) for p, r in recall_by_nprobe.items()}}  # JSON's keys

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (q, D) -> cosine scores (q, k) float32, ids (q, k) int64 (-1 past the end)."""
        if queries.shape[-1] != self.meta.dim:
            raise NeighbourIndexError(f"query has dimension {queries.shape[-1]}, the index {self.meta.dim}")
        q = self._normalised(np.atleast_2d(queries))
        if not self.reranks_from_store:
            return self.index.search(q, k)
        rows = getattr(self, "rows", None)
        if rows is None:
            raise NeighbourIndexError(f"a {self.meta.kind} index re-ranks from its store: attach_store first")
        _, candidates = self.index.search(q, k * int(self.meta.search_params.get(RERANK_FACTOR, 32)))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        for i, (query, found) in enumerate(zip(q, candidates)):
            found = found[found >= 0]
            exact = rows.scores(found, query)
            top = np.argsort(-exact, kind="stable")[:k]
            scores[i, : len(top)], ids[i, : len(top)] = exact[top], found[top]
        return scores, ids

    # ---- files ---------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write both files; each goes to a temporary name first, so an interrupted save never
        leaves a half-written file under the real name."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp_index, tmp_meta = folder / (INDEX_FILE + ".tmp"), folder / (META_FILE + ".tmp")
        faiss.write_index(self.index, str(tmp_index))
        tmp_meta.write_text(self.meta.to_json())
        os.replace(tmp_index, folder / INDEX_FILE)
        os.replace(tmp_meta, folder / META_FILE)
        return folder

    @classmethod
    def open(cls, folder: str | Path) -> NeighbourIndex:
        folder = Path(folder)
        index_path, meta_path = folder / INDEX_FILE, folder / META_FILE
        for path in (meta_path, index_path):
            if not path.is_file():
                raise NeighbourIndexError(f"no neighbour index at {folder} ({path.name} missing)")
        try:
            meta = IndexMeta.from_json(meta_path.read_text())
        except (ValueError, TypeError) as e:
            raise NeighbourIndexError(f"{meta_path} is corrupt: {e}")
        if meta.format_version != FORMAT_VERSION:
            raise NeighbourIndexError(
                f"{folder}: index format {meta.format_version}, this zeroseg reads {FORMAT_VERSION}"
            )
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as e:
            raise NeighbourIndexError(f"{index_path} is corrupt: {str(e).strip().splitlines()[-1]}")
        if index.ntotal != meta.count or index.d != meta.dim:
            raise NeighbourIndexError(
                f"{folder}: {INDEX_FILE} holds {index.ntotal} x {index.d}, "
                f"{META_FILE} says {meta.count} x {meta.dim}"
            )
        return cls(index, meta)

    # ---- provenance checks ---------------------------------------------------------------

    def check_store(self, store: FeatureStore) -> str | None:
        """Refuse a store other than the one the index was built from, naming both sides; the
        same store changed or grown since the build gives a warning line (see store_changed)."""
        built, given = self.meta.store, store_fingerprint(store)
        # `extract` appends images at the end and leaves the rows before as they were: the store
        # the index was built from, grown, when its first rows hold the same paths
        n = built["n_images"]
        grew = given["n_images"] > n and _paths_sha256(store.paths()[:n]) == built["paths_sha256"]
        problems = _store_mismatches(built, given, grew)
        if problems:
            raise NeighbourIndexError(
                f"index was built from store {_store_label(built)}, "
                f"given {_store_label(given)}: " + "; ".join(problems)
            )
        if grew:
            return (f"warning: the index is stale: store {given['url']} grew from {n} to {given['n_images']} images "
                    "since it was built (the new ones are not in it); rebuild it with `zeroseg index build`")
        return store_changed(built, given)

    def check_checkpoint(self, path: str, sha256: str) -> None:
        built = self.meta.checkpoint
        if built is None:
            raise NeighbourIndexError(f"index holds {self.meta.source}, not segment tokens: it has no checkpoint, given {path}")
        if built["sha256"] != sha256:
            raise NeighbourIndexError(
                f"index was built from checkpoint {built['path']} ({built['sha256'][:12]}), "
                f"given {path} ({sha256[:12]})"
            )
