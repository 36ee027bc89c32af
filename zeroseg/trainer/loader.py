"""Cached-target loader: batches of (pixels, crop features) from a feature store, never reading
single random rows. `StoreDataset` is the store as a torch dataset (the trainer's, and a user's);
`Batches` cuts its stream into the trainer's batches ahead of the train step.

Order. Epochs are concatenated into one stream of status-ok images and batch s is positions
[s*B, (s+1)*B) of that stream, so the data a step sees is a pure function of (seed, step): a
resumed run fast-forwards by arithmetic, without reading anything it skips. Within an epoch the
chunks are permuted (seed, epoch), then taken `buffer_chunks` at a time (a window), and the images
of a window are shuffled together: whole-chunk reads, shuffled well enough for SGD.

Shards. Data-parallel replicas and DataLoader workers each read their own chunks of an epoch
(chunk i of the epoch's permutation goes to shard i % shards, which makes it into windows and
shuffles them with its own generator): no chunk is read twice in an epoch, and the shards' epochs
hold the same number of chunks to one, so they keep in step.

Speed. A background thread cuts batches and keeps `prefetch` of them queued; the chunks of the next
windows are read ahead by a pool of reader threads (zarr's Blosc decompression and PIL's decoding
release the GIL), so the train step takes a ready batch. A store without images/pixels has its
image paths decoded into training views (`stores.views.row_views`: exactly as the extractor
decoded them) by a pool of decoder threads, once per epoch.

Grid subset. The store's crop boxes name each crop column; asking for grids 1,2,3 from a 1,2,3,4
store selects those columns, no re-extraction.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from zeroseg.errors import UserError
from zeroseg.geometry import grid_boxes
from zeroseg.stores.compact import CompactTargets
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status
from zeroseg.stores.views import row_views


# ---- crop columns ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    index: np.ndarray  # (C',) store crop columns, in the order of grid_boxes(grids)
    local: np.ndarray  # (C',) bool, False at the 1x1 crop (not a local crop)
    boxes: np.ndarray  # (C', 4) their fractional boxes


def select_columns(store_boxes: np.ndarray, store_grids: Sequence[int], grids: Sequence[int]) -> Columns:
    """The store columns holding the crops of `grids`, found by their boxes."""
    missing = [g for g in grids if g not in store_grids]
    if missing:
        raise UserError(
            f"grids {','.join(map(str, grids))} asked, the store has only {','.join(map(str, store_grids))}"
        )
    want = grid_boxes(grids)  # (C', 4)
    match = np.abs(want[:, None, :] - store_boxes[None, :, :]).max(axis=-1) < 1e-6  # (C', C)
    index = match.argmax(axis=1)
    assert match.any(axis=1).all(), "store boxes disagree with its grids"
    local = ~np.all(np.isclose(want, [0.0, 0.0, 1.0, 1.0]), axis=1)
    return Columns(index=index, local=local, boxes=want)


# ---- chunk sources -----------------------------------------------------------------------------


class StoreSource:
    """Reads one whole chunk: the selected feature columns and the student's pixels (zeros for
    the images that failed extraction: they have no view, and no batch takes them)."""

    def __init__(self, store: FeatureStore, columns: Columns, features: bool = True, workers: int = 2,
                 targets_dtype: str = "fp16"):
        self.store, self.columns, self.with_features = store, columns, features
        # fp16 as stored, or int8 / PQ targets decoded to float32 (stores/compact.py)
        self.targets = CompactTargets(store, targets_dtype) if features else None
        self.ok = store.status() == Status.OK
        self.decoder = None if store.has_pixels else ThreadPoolExecutor(workers, thread_name_prefix="decode")

    def read(self, chunk: int) -> dict[str, np.ndarray]:
        sl = self.store.chunk_slice(chunk)
        out = {}
        if self.with_features:
            out["features"] = self.targets.read(sl, self.columns.index)  # (n, C', D) float16 or float32
        ok = self.ok[sl]
        s = self.store.config.view_size
        out["pixels"] = np.zeros((len(ok), s, s, 3), np.uint8)  # (n, S, S, 3)
        out["pixels"][ok] = row_views(self.store, sl if ok.all() else sl.start + np.flatnonzero(ok), self.decoder)
        return out

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.shutdown(wait=True)


class MemorySource:
    """Every chunk read once into RAM up front (the benchmark's "all targets preloaded")."""

    def __init__(self, source: StoreSource, n_chunks: int):
        self.chunks = [source.read(i) for i in range(n_chunks)]

    def read(self, chunk: int) -> dict[str, np.ndarray]:
        return self.chunks[chunk]

    def close(self) -> None:
        pass


# ---- order -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    chunks: tuple[int, ...]  # chunks read together
    rows: np.ndarray  # (n,) global image indices in training order


class Plan:
    """The data order: a pure function of (seed, epoch) over the status-ok images, each distinct
    image once: a row with `duplicate_of` >= 0 holds the same bytes as an earlier row, and is left out."""

    def __init__(self, status: np.ndarray, chunk_images: int, seed: int, buffer_chunks: int,
                 duplicate_of: np.ndarray | None = None):
        self.chunk_images, self.seed, self.buffer_chunks = chunk_images, seed, max(1, buffer_chunks)
        n_chunks = -(-len(status) // chunk_images)
        distinct = duplicate_of < 0 if duplicate_of is not None else True
        ok = np.flatnonzero((status == Status.OK) & distinct)
        self.ok_rows = [ok[(ok >= c * chunk_images) & (ok < (c + 1) * chunk_images)] for c in range(n_chunks)]
        self.n_ok = len(ok)
        if self.n_ok == 0:
            raise UserError("the store has no status-ok images to train on")

    def epoch(self, epoch: int, shard: int = 0, n_shards: int = 1) -> list[Window]:
        """The windows of one epoch, or of shard `shard` of it: every n_shards-th chunk of the
        epoch's chunk permutation, shuffled with the shard's own generator."""
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.ok_rows))[shard::n_shards]
        if n_shards > 1:
            rng = np.random.default_rng([self.seed, epoch, shard, n_shards])
        windows = []
        for i in range(0, len(perm), self.buffer_chunks):
            chunks = tuple(int(c) for c in perm[i : i + self.buffer_chunks])
            rows = np.concatenate([self.ok_rows[c] for c in chunks])
            windows.append(Window(chunks, rows[rng.permutation(len(rows))]))
        return windows

    def windows_from(self, position: int, shard: int = 0, n_shards: int = 1) -> Iterator[tuple[Window, int]]:
        """From stream position on: (window, rows of it to skip), epoch after epoch, forever. With
        `n_shards`, this shard's stream (`epoch`): the shards read disjoint chunks and together read
        every chunk of an epoch once."""
        if n_shards > len(self.ok_rows):
            raise UserError(f"{n_shards} shards, but the store has only {len(self.ok_rows)} chunks: use fewer ranks "
                            "or DataLoader workers")
        epoch, offset = 0, position
        if n_shards == 1:  # every epoch holds all ok rows: skip whole epochs by arithmetic
            epoch, offset = divmod(position, self.n_ok)
        empty = 0  # epochs in a row in which this shard's chunks held no ok image
        while True:
            windows = self.epoch(epoch, shard, n_shards)
            empty = 0 if any(len(w.rows) for w in windows) else empty + 1
            if empty > 100:
                raise UserError(f"shard {shard} of {n_shards} gets no status-ok images: use fewer shards")
            for window in windows:
                if offset >= len(window.rows):
                    offset -= len(window.rows)
                    continue
                yield window, offset
                offset = 0
            epoch += 1

    def read_window(self, source, window: Window) -> dict[str, np.ndarray]:
        """The window's images in its training order, arrays stacked, with their "index"."""
        parts = [source.read(c) for c in window.chunks]
        offsets, at = {}, 0
        for c, part in zip(window.chunks, parts):
            offsets[c] = at - c * self.chunk_images  # row r of chunk c sits at r + offsets[c]
            at += len(next(iter(part.values())))
        chunk_of = window.rows // self.chunk_images
        where = np.array([offsets[c] + r for c, r in zip(chunk_of, window.rows)], dtype=np.int64)
        return {k: np.concatenate([p[k] for p in parts])[where] for k in parts[0]} | {"index": window.rows}


# ---- the cache as a dataset ----------------------------------------------------------------------


class StoreDataset(torch.utils.data.IterableDataset):
    """A feature store as a torch dataset, for the trainer and for a user's own training code.

    Yields one dict per image: "pixels" (S, S, 3) uint8, the view the teacher embedded;
    "features" (C', D) float16, the cached crop targets of `grids` (default: all the store's; none
    with targets=False; float32 decoded from the store's compact ones with targets_dtype int8 | pq);
    "index", the image's row. `teacher` picks whose features (a key of the store's teacher_keys();
    None its first, or the given FeatureStore's). The order is the trainer's (chunk-shuffled, a pure function of seed
    and epoch); epochs follow each other forever. Sharded without overlap by
    (rank, world_size) and by the DataLoader worker: each shard reads its own chunks. `start`
    resumes a shard's stream after that many images (exact with at most one DataLoader worker per
    rank: several workers each skip start // workers of their own streams)."""

    def __init__(self, store: str | FeatureStore, grids: Sequence[int] | None = None, *, seed: int = 0,
                 start: int = 0, rank: int = 0, world_size: int = 1, buffer_chunks: int = 4,
                 targets: bool = True, targets_dtype: str = "fp16", decoders: int = 2, preload: bool = False,
                 teacher: str | None = None):
        store = store if isinstance(store, FeatureStore) else FeatureStore.open(store, teacher=teacher)
        self.url, self.teacher_key, self.grids = store.url, store.teacher_key, tuple(grids or store.config.grids)
        self.columns = select_columns(store.boxes, store.config.grids, self.grids)
        self.plan = Plan(store.status(), store.config.chunk_images, seed, buffer_chunks, store.duplicate_of())
        self.start, self.rank, self.world_size = start, rank, world_size
        self.targets, self.targets_dtype = targets, targets_dtype
        self.decoders, self.preload = decoders, preload
        self._store, self._source = store, None

    @property
    def source(self) -> StoreSource | MemorySource:
        """The chunk reader, made in the process that reads (a DataLoader worker makes its own)."""
        if self._source is None:
            self._store = self._store or FeatureStore.open(self.url, teacher=self.teacher_key)
            source = StoreSource(self._store, self.columns, features=self.targets, workers=self.decoders,
                                 targets_dtype=self.targets_dtype)
            self._source = MemorySource(source, self._store.n_chunks) if self.preload else source
        return self._source

    def __getstate__(self) -> dict:  # what travels to a DataLoader worker: no open store, no threads
        return {**self.__dict__, "_store": None, "_source": None}

    def windows(self, position: int, shard: int = 0, n_shards: int = 1) -> Iterator[tuple[Window, int]]:
        return self.plan.windows_from(position, shard, n_shards)

    def read_window(self, window: Window) -> dict[str, np.ndarray]:
        return self.plan.read_window(self.source, window)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | int]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shard, n_shards = self.rank * workers + worker, self.world_size * workers
        for window, skip in self.windows(self.start // workers, shard, n_shards):
            data = self.read_window(window)
            for i in range(skip, len(window.rows)):
                yield {k: (torch.from_numpy(v[i]) if k != "index" else int(v[i])) for k, v in data.items()}

    def close(self) -> None:
        if self._source is not None:
            self._source.close()


# ---- batches -----------------------------------------------------------------------------------


class Batches:
    """Iterator of a dataset's batches (of its rank's shard) from `start_step` on: dict of "pixels" (B, S, S, 3) uint8,
    "features" (B, C', D) float16, float32 from compact targets (unless the dataset reads none), "index" (B,) int64 and
    "epoch" (float: stream position / ok images). `pin`: page-locked batches, so that copies to a
    GPU can be non-blocking. Call close() (or use as a context manager)."""

    def __init__(self, dataset: StoreDataset, batch: int, start_step: int = 0, prefetch: int = 8, readers: int = 2,
                 lookahead: int = 2, pin: bool = False):
        self.dataset, self.plan, self.batch, self.pin = dataset, dataset.plan, batch, pin
        self.position = start_step * batch
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.readers = ThreadPoolExecutor(readers, thread_name_prefix="read")
        self.lookahead = lookahead
        self.thread = threading.Thread(target=self._produce, name="batches", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        try:
            # this replica's own stream: its chunks, batch // world_size of its images a step
            windows = self.dataset.windows(self.position, self.dataset.rank, self.dataset.world_size)
            pending: deque[tuple[Future, int]] = deque()
            carry: dict[str, np.ndarray] | None = None
            position = self.position
            while not self.stop.is_set():
                while len(pending) < self.lookahead:
                    window, skip = next(windows)
                    pending.append((self.readers.submit(self.dataset.read_window, window), skip))
                future, skip = pending.popleft()
                data = {k: v[skip:] for k, v in future.result().items()}
                if carry is not None:
                    data = {k: np.concatenate([carry[k], data[k]]) for k in data}
                n = len(data["index"])
                for start in range(0, n - self.batch + 1, self.batch):
                    batch = {k: torch.from_numpy(np.ascontiguousarray(v[start : start + self.batch])) for k, v in data.items()}
                    if self.pin:
                        batch = {k: v.pin_memory() for k, v in batch.items()}
                    batch["epoch"] = position * self.dataset.world_size / self.plan.n_ok
                    position += self.batch
                    if not self._put(batch):
                        return
                rest = n - n % self.batch
                carry = {k: v[rest:] for k, v in data.items()} if n % self.batch else None
        except BaseException as e:  # hand the error to the consumer rather than dying silently
            self._put(e)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.readers.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
