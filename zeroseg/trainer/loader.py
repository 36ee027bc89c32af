"""Cached-target loader: batches of (pixels, crop features) from a feature store, never reading
single random rows.

Order. Epochs are concatenated into one stream of status-ok images and batch s is positions
[s*B, (s+1)*B) of that stream, so the data a step sees is a pure function of (seed, step): a
resumed run fast-forwards by arithmetic, without reading anything it skips. Within an epoch the
chunks are permuted (seed, epoch), then taken `buffer_chunks` at a time (a window), and the images
of a window are shuffled together: whole-chunk reads, shuffled well enough for SGD.

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
    """The data order: a pure function of (seed, epoch) over the status-ok images."""

    def __init__(self, status: np.ndarray, chunk_images: int, seed: int, buffer_chunks: int):
        self.chunk_images, self.seed, self.buffer_chunks = chunk_images, seed, max(1, buffer_chunks)
        n_chunks = -(-len(status) // chunk_images)
        ok = np.flatnonzero(status == Status.OK)
        self.ok_rows = [ok[(ok >= c * chunk_images) & (ok < (c + 1) * chunk_images)] for c in range(n_chunks)]
        self.n_ok = len(ok)
        if self.n_ok == 0:
            raise UserError("the store has no status-ok images to train on")

    def epoch(self, epoch: int) -> list[Window]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.ok_rows))
        windows = []
        for i in range(0, len(perm), self.buffer_chunks):
            chunks = tuple(int(c) for c in perm[i : i + self.buffer_chunks])
            rows = np.concatenate([self.ok_rows[c] for c in chunks])
            windows.append(Window(chunks, rows[rng.permutation(len(rows))]))
        return windows

    def windows_from(self, position: int) -> Iterator[tuple[Window, int]]:
        """From stream position on: (window, rows of it to skip), epoch after epoch, forever."""
        epoch, offset = divmod(position, self.n_ok)
        while True:
            for window in self.epoch(epoch):
                if offset >= len(window.rows):
                    offset -= len(window.rows)
                    continue
                yield window, offset
                offset = 0
            epoch += 1


# ---- batches -----------------------------------------------------------------------------------


class Batches:
    """Iterator of batches from `start_step` on: dict of "pixels" (B, S, S, 3) uint8,
    "features" (B, C', D) float16, float32 from compact targets (unless the source reads none), "index" (B,) int64 and
    "epoch" (float: stream position / ok images). Call close() (or use as a context manager)."""

    def __init__(self, source, plan: Plan, batch: int, start_step: int = 0, prefetch: int = 8, readers: int = 2, lookahead: int = 2):
        self.source, self.plan, self.batch = source, plan, batch
        self.position = start_step * batch
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.readers = ThreadPoolExecutor(readers, thread_name_prefix="read")
        self.lookahead = lookahead
        self.thread = threading.Thread(target=self._produce, name="batches", daemon=True)
        self.thread.start()

    def _read_window(self, window: Window) -> dict[str, np.ndarray]:
        """The window's images in its training order, arrays stacked."""
        parts = [self.source.read(c) for c in window.chunks]
        starts = {c: c * self.plan.chunk_images for c in window.chunks}
        offsets, at = {}, 0
        for c, part in zip(window.chunks, parts):
            offsets[c] = at
            at += len(next(iter(part.values())))
        chunk_of = window.rows // self.plan.chunk_images
        where = np.array([offsets[c] + r - starts[c] for c, r in zip(chunk_of, window.rows)], dtype=np.int64)
        return {k: np.concatenate([p[k] for p in parts])[where] for k in parts[0]} | {"index": window.rows}

    def _produce(self) -> None:
        try:
            windows = self.plan.windows_from(self.position)
            pending: deque[tuple[Future, int]] = deque()
            carry: dict[str, np.ndarray] | None = None
            position = self.position
            while not self.stop.is_set():
                while len(pending) < self.lookahead:
                    window, skip = next(windows)
                    pending.append((self.readers.submit(self._read_window, window), skip))
                future, skip = pending.popleft()
                data = {k: v[skip:] for k, v in future.result().items()}
                if carry is not None:
                    data = {k: np.concatenate([carry[k], data[k]]) for k in data}
                n = len(data["index"])
                for start in range(0, n - self.batch + 1, self.batch):
                    batch = {k: torch.from_numpy(np.ascontiguousarray(v[start : start + self.batch])) for k, v in data.items()}
                    batch["epoch"] = position / self.plan.n_ok
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
