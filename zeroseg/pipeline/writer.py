"""Whole chunks into the store: a worker holds the teacher once and writes one chunk at a time."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from zeroseg.decode import Decoded
from zeroseg.errors import UserError
from zeroseg.pipeline.mapper import ChunkArrays, embed_chunk
from zeroseg.pipeline.reader import read_views
from zeroseg.pipeline.teacher import Teacher, load_teacher
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status
from zeroseg.stores.lock import LockedError, lock_holder


def resolve_device(device: str) -> str:
    """cpu | cuda | auto -> the torch device to use; asking for cuda where there is none is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: choose cpu, cuda or auto")
    return device


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher a worker loads for itself (a Ray actor builds its own, on its own machine)."""

    arch: str
    pretrained: str
    seed: int  # of the random init, when pretrained is "random"
    device: str  # cpu | cuda | auto, resolved where the worker runs

    def load(self) -> Teacher:
        return load_teacher(self.arch, self.pretrained, seed=self.seed, device=resolve_device(self.device))


def decode_threads(device: str) -> int:
    """Decoding threads per worker. On the CPU one: the teacher's torch threads already take the
    worker's cores, and more decoders would only steal them (decoding runs ahead of the teacher
    either way). On CUDA the teacher needs little CPU and a GPU eats images far faster than one
    thread decodes them, so the worker's cores all decode (capped: past ~8 threads PIL decoding
    stops scaling)."""
    if device != "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, min(8, cores))


@dataclass
class ChunkResult:
    chunk: int
    n_images: int
    n_ok: int
    waited_s: float = 0.0  # the teacher waiting for decoded images
    seconds: float = 0.0  # decode + teacher for the chunk (the store write not included)
    copied: int = 0  # of n_images: duplicates of an earlier row, copied from it instead of embedded

    @property
    def wait_share(self) -> float:
        """The share of the chunk's time the teacher sat idle for want of decoded images."""
        return self.waited_s / self.seconds if self.seconds > 0 else 0.0


class ChunkWorker:
    """Holds the teacher once and writes whole chunks of one store. Used as is in this process
    (given the driver's teacher) and wrapped as a Ray actor by the distributor (each actor: one
    teacher, `threads` torch threads, so N actors share the cores instead of each taking them all).
    With `teacher_key` of a teacher added beside the first, it writes that teacher's arrays: the
    rows the first teacher found failed are failed here too, without decoding them again."""

    def __init__(self, url: str, teacher: Teacher | TeacherSpec, batch: int, threads: int | None = None,
                 lock_token: str | None = None, teacher_key: str | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.teacher = teacher.load() if isinstance(teacher, TeacherSpec) else teacher
        self.store = FeatureStore.open(url, mode="r+", teacher=teacher_key)
        self.batch = batch
        self.paths = self.store.paths()  # the store's list is authoritative
        self.duplicate_of = self.store.duplicate_of()  # marked by the job before any worker starts
        # An added teacher's job starts once the first teacher's rows are all done: those it
        # failed are failed rows for every teacher (the same image, the same decoder).
        first = self.store.first_teacher()
        self.failed_before = first.status() == Status.FAILED if self.store.is_added_teacher else np.zeros(len(self.paths), bool)
        self.errors_before = first.errors() if self.store.is_added_teacher else None
        # the teacher's precision as the store records it (the job refuses a run that differs)
        self.precision = self.store.extract_options.get("precision", "fp32")
        self.boxes = self.store.boxes
        self.decoder = ThreadPoolExecutor(max_workers=decode_threads(self.teacher.device.type),
                                          thread_name_prefix="zeroseg-decode")
        self.url, self.lock_token = url, lock_token
        self.ahead: dict[int, Iterator[Decoded]] = {}  # chunk -> its views, decoding ahead of time

    def describe(self) -> dict:
        return {"sha256": self.teacher.info.sha256, "host": socket.gethostname(), "pid": os.getpid(),
                "threads": torch.get_num_threads()}

    def _own_rows(self, chunk: int) -> np.ndarray:
        """The chunk's rows (counted from its start) embedded here: all but duplicates of an earlier
        row and (for an added teacher) the rows the first teacher failed."""
        sl = self.store.chunk_slice(chunk)
        return np.flatnonzero((self.duplicate_of[sl] < 0) & ~self.failed_before[sl])

    def _decode(self, chunk: int) -> Iterator[Decoded]:
        """The views of the chunk's own rows, decoding from now on in the pool (or already, if read
        ahead), or an added teacher's from the store's stored views."""
        if chunk in self.ahead:
            return self.ahead.pop(chunk)
        if self.store.is_added_teacher and self.store.has_pixels:
            # The first teacher stored every row's view (its rows are all done): the same bytes a
            # decode would give, so an added teacher embeds those and never opens a file again.
            own = self._own_rows(chunk)
            views, sizes = self.store.pixels.read_chunk(chunk)[own], self.store.array("images/size").read_chunk(chunk)[own]
            return iter([Decoded(view, (int(h), int(w))) for view, (h, w) in zip(views, sizes)])
        config = self.store.config
        paths = self.paths[self.store.chunk_slice(chunk)][self._own_rows(chunk)]
        return read_views(list(paths), config.view_size, config.grids, self.decoder)

    def _with_duplicates(self, chunk: int, own: np.ndarray, embedded: ChunkArrays) -> ChunkArrays:
        """The whole chunk's arrays: its own rows as embedded, the rows the first teacher failed
        failed with its error, each duplicate a copy of its first row (in this chunk, or in a chunk
        already done: the job schedules this chunk after it)."""
        sl = self.store.chunk_slice(chunk)
        n = sl.stop - sl.start
        out = ChunkArrays(
            features=np.zeros((n, *embedded.features.shape[1:]), np.float16), status=np.zeros(n, np.uint8),
            errors=[""] * n, sizes=np.zeros((n, 2), np.int32), views=np.zeros((n, *embedded.views.shape[1:]), np.uint8),
            waited_s=embedded.waited_s, seconds=embedded.seconds,
        )
        for k, i in enumerate(own):
            out.features[i], out.status[i], out.errors[i] = embedded.features[k], embedded.status[k], embedded.errors[k]
            out.sizes[i], out.views[i] = embedded.sizes[k], embedded.views[k]
        for i in np.flatnonzero(self.failed_before[sl] & (self.duplicate_of[sl] < 0)):
            out.status[i], out.errors[i] = Status.FAILED, str(self.errors_before[sl.start + i])
        done: dict[int, tuple] = {}  # another chunk -> its arrays, read once
        for i in np.flatnonzero(self.duplicate_of[sl] >= 0):
            first = int(self.duplicate_of[sl.start + i])
            if first >= sl.start:  # in this chunk: an own row, filled above
                j = first - sl.start
                row = out.features[j], out.status[j], out.errors[j], out.sizes[j], out.views[j]
            else:
                row = self._done_row(first, done)
            out.features[i], out.status[i], out.errors[i], out.sizes[i], out.views[i] = row
        return out

    def _done_row(self, row: int, done: dict[int, tuple]) -> tuple:
        """(features, status, error, size, view) of `row`, in a chunk written before."""
        chunk, j = divmod(row, self.store.config.chunk_images)
        if chunk not in done:
            done[chunk] = (self.store.features.read_chunk(chunk), self.store.array("images/status").read_chunk(chunk),
                           self.store.array("images/error").read_chunk(chunk), self.store.array("images/size").read_chunk(chunk),
                           self.store.pixels.read_chunk(chunk) if self.store.has_pixels else None)
        features, status, error, size, views = done[chunk]
        if status[j] == Status.PENDING:
            raise RuntimeError(f"{self.url}: row {row} is copied before it is done (chunk {chunk} is pending)")
        return features[j], status[j], str(error[j]), size[j], views[j] if views is not None else 0

    def process(self, chunk: int, then: int | None = None) -> ChunkResult:
        """Embed and write one chunk. `then`, the chunk this worker does next if known, starts
        decoding before this one's write, so the teacher does not wait at the next chunk's start."""
        sl = self.store.chunk_slice(chunk)
        config = self.store.config
        # An append that filled the old last chunk's tail leaves its first rows done: they are
        # embedded again (the batches then are a whole extraction's, so the new rows' bits are too)
        # but not written, so that they stay byte for byte what they were.
        status = self.store.array("images/status").read_chunk(chunk)
        skip = int(np.argmax(status == Status.PENDING)) if (status == Status.PENDING).any() else 0
        own = self._own_rows(chunk)
        arrays = embed_chunk(self.teacher, self._decode(chunk), len(own), config.view_size, self.batch, self.boxes,
                             self.precision)
        if len(own) < sl.stop - sl.start:
            arrays = self._with_duplicates(chunk, own, arrays)
        if then is not None:
            self.ahead = {then: self._decode(then)}  # at most one chunk ahead: its views in memory
        if self.lock_token and (lock_holder(self.url) or {}).get("token") != self.lock_token:
            # Our driver died and a new job took the store over: leave the chunk to it.
            raise LockedError(f"{self.url}: lost the lock before writing chunk {chunk}")
        self.store.write_chunk(
            chunk, arrays.features, arrays.status, arrays.errors, arrays.sizes,
            arrays.views if self.store.has_pixels else None, skip=skip,
        )
        return ChunkResult(chunk, sl.stop - sl.start - skip, int((arrays.status[skip:] == Status.OK).sum()),
                           arrays.waited_s, arrays.seconds, int((self.duplicate_of[sl][skip:] >= 0).sum()))
