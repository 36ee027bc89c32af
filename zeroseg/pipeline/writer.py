"""Whole chunks into the store: a worker holds the teacher once and writes one chunk at a time."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from zeroseg.errors import UserError
from zeroseg.pipeline.mapper import embed_chunk
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


@dataclass
class ChunkResult:
    chunk: int
    n_images: int
    n_ok: int


class ChunkWorker:
    """Holds the teacher once and writes whole chunks of one store. Used as is in this process
    (given the driver's teacher) and wrapped as a Ray actor by the distributor (each actor: one
    teacher, `threads` torch threads, so N actors share the cores instead of each taking them all)."""

    def __init__(self, url: str, teacher: Teacher | TeacherSpec, batch: int, threads: int | None = None,
                 lock_token: str | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.teacher = teacher.load() if isinstance(teacher, TeacherSpec) else teacher
        self.store = FeatureStore.open(url, mode="r+")
        self.batch = batch
        self.paths = self.store.paths()  # the store's list is authoritative
        self.boxes = self.store.boxes
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zeroseg-decode")
        self.url, self.lock_token = url, lock_token

    def describe(self) -> dict:
        return {"sha256": self.teacher.info.sha256, "host": socket.gethostname(), "pid": os.getpid(),
                "threads": torch.get_num_threads()}

    def process(self, chunk: int) -> ChunkResult:
        sl = self.store.chunk_slice(chunk)
        config = self.store.config
        paths = list(self.paths[sl])
        views = read_views(paths, config.view_size, config.grids, self.decoder)
        arrays = embed_chunk(self.teacher, views, len(paths), config.view_size, self.batch, self.boxes)
        if self.lock_token and (lock_holder(self.url) or {}).get("token") != self.lock_token:
            # Our driver died and a new job took the store over: leave the chunk to it.
            raise LockedError(f"{self.url}: lost the lock before writing chunk {chunk}")
        self.store.write_chunk(
            chunk, arrays.features, arrays.status, arrays.errors, arrays.sizes,
            arrays.views if self.store.has_pixels else None,
        )
        return ChunkResult(chunk, sl.stop - sl.start, int((arrays.status == Status.OK).sum()))
