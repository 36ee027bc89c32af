"""A student's segment tokens for `index build --source segments`: computed out of core, chunk by
chunk, resumable, in this process or on N Ray actors.

The tokens of each store chunk are staged in the index folder before the index is built:

    OUT/segment-tokens/staging.json        what they were computed from (StagedTokens.record): the
                                           student's sha256, the store's fingerprint (its location
                                           aside), tokens per image, dim, batch, torch threads
    OUT/segment-tokens/chunk-000042.npz    ids (n,) int64 and vectors (n, D) float32 of chunk 42's
                                           non-empty segments (n may be 0)

A chunk file is written whole under a temporary name, then renamed: one that exists is complete.
A re-run with the same record skips the chunks already staged; with another record (another
checkpoint, a changed store) the staged chunks are deleted first, so tokens of two students never
mix. The FAISS index is then filled from the staged files, in bounded batches. The staging is kept
after the build: a rebuild with another `--kind` reads it instead of running the student again
(it takes about a flat index's disk, 4 D + 8 bytes a token; delete the folder to free it).

Every worker runs the student with THREADS_PER_WORKER torch threads and the same batches (never
spanning chunks), so a chunk's tokens are bit-identical whichever worker computed it and whether
the build was interrupted or not. The driver alone writes the staged files (one writer a chunk);
Ray actors only compute and return their chunk's tokens.
"""

from __future__ import annotations

import collections
import io
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from zeroseg.errors import UserError
from zeroseg.outputs import canonical_location, write_atomic
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.index import encode_ids, store_fingerprint
from zeroseg.stores.views import row_views
from zeroseg.trainer.checkpoint import load_student_for

STAGING_DIR = "segment-tokens"
RECORD_FILE = "staging.json"
STAGING_FORMAT = 1
# Torch threads per worker, in this process and on every actor: a GEMM's last bits depend on the
# thread count, so one fixed count makes `--workers 1` and `--workers N` stage the same tokens.
# More cores are used by more workers.
THREADS_PER_WORKER = 1


class SegmentVectors:
    """A trained student's segment tokens for every status-ok image; tokens that own no patch
    (empty segments) are left out. The student sees each image's training view (`row_views`:
    the store's pixels, or the file decoded as the extractor did); it resizes that itself."""

    source = "segments"

    def __init__(self, store: FeatureStore, checkpoint: str, batch_images: int = 32):
        model, _, meta = load_student_for(checkpoint, store)
        self.store = store
        self.rows = store.distinct_ok()  # read once; a copy of an earlier row would be found twice
        self.model = model
        self.batch_images = batch_images
        self.grids = None  # crops only
        self.checkpoint = {"path": str(Path(meta["checkpoint"]).resolve()), "sha256": meta["sha256"]}
        blank = np.zeros((1, store.config.view_size, store.config.view_size, 3), dtype=np.uint8)
        self.stride = int(self.segment(blank)[0].shape[1])  # K tokens per image

    def estimate_count(self) -> int:
        """An upper bound (empty segments are dropped): sizes the index kind."""
        return int(self.rows.sum()) * self.stride

    def segment(self, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """views (B, S, S, 3) uint8 -> tokens (B, K, D) float32, assignment (B, h, w) int64."""
        tokens, assignment = [], []
        with torch.inference_mode():
            for i in range(0, len(views), self.batch_images):
                seg = self.model.segment(torch.from_numpy(np.array(views[i : i + self.batch_images])))  # a writable copy
                tokens.append(seg.tokens.numpy())
                assignment.append(seg.assignment.numpy())
        return np.concatenate(tokens), np.concatenate(assignment)

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk i -> ids (n,) int64, vectors (n, D) float32 of its non-empty segments."""
        sl = self.store.chunk_slice(i)
        ok = np.flatnonzero(self.rows[sl])
        if len(ok) == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.store.dim), np.float32)
        tokens, assignment = self.segment(row_views(self.store, sl.start + ok))  # (n, K, D), (n, h, w)
        k = tokens.shape[1]
        used = (assignment.reshape(len(ok), -1)[:, :, None] == np.arange(k)).any(axis=1)  # (n, K)
        image, token = np.nonzero(used)
        return encode_ids(sl.start + ok[image], token, self.stride), tokens[image, token]


# ---- the staging area --------------------------------------------------------------------


def staging_record(vectors: SegmentVectors) -> dict[str, Any]:
    """What a staged chunk's tokens depend on: equal records stage bit-identical tokens."""
    store = {k: v for k, v in store_fingerprint(vectors.store).items() if k != "url"}  # a moved store is the same
    return {"format": STAGING_FORMAT, "checkpoint_sha256": vectors.checkpoint["sha256"], "store": store,
            "chunk_images": vectors.store.config.chunk_images, "stride": vectors.stride, "dim": vectors.store.dim,
            "batch_images": vectors.batch_images, "threads_per_worker": THREADS_PER_WORKER}


class StagedTokens:
    """The staged chunks of one index folder (see the module's docstring)."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def open(cls, out: str | Path, record: dict[str, Any], notify: Callable[[str], None]) -> StagedTokens:
        """The staging area of index folder `out` (claimed by the caller) for `record`: staged
        chunks of another record are deleted (with a notice) before the new record is written."""
        staging = cls(Path(out) / STAGING_DIR)
        staging.folder.mkdir(parents=True, exist_ok=True)
        record_path = staging.folder / RECORD_FILE
        try:
            have = json.loads(record_path.read_text())
        except (OSError, ValueError):
            have = None
        record = json.loads(json.dumps(record))  # tuples -> lists: comparable with what was read back
        if have != record:
            stale = staging.chunk_files()
            if stale:
                why = ("another checkpoint" if have and have.get("checkpoint_sha256") != record["checkpoint_sha256"]
                       else "another store or settings")
                notify(f"{staging.folder}: {len(stale)} staged chunks of {why} deleted; computing the tokens again")
            for path in stale:  # ours only: the chunk files, by name
                path.unlink()
            write_atomic(record_path, json.dumps(record, indent=2))  # after the deletes: never a stale chunk under it
        for path in staging.folder.glob(".chunk-*.tmp"):  # a write killed before its rename (write_atomic)
            path.unlink()
        return staging

    def chunk_files(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.npz"))

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:06d}.npz"

    def staged(self) -> set[int]:
        """The chunks whose tokens are staged (a file exists only once written whole)."""
        return {int(p.stem.split("-")[1]) for p in self.chunk_files()}

    def write(self, chunk: int, ids: np.ndarray, vectors: np.ndarray) -> None:
        data = io.BytesIO()
        np.savez(data, ids=np.asarray(ids, np.int64), vectors=np.asarray(vectors, np.float32))
        write_atomic(self.path(chunk), data.getvalue())

    def read(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk -> (ids (n,) int64, vectors (n, D) float32), as staged."""
        path = self.path(chunk)
        try:
            with np.load(path) as f:
                return f["ids"], f["vectors"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"staged tokens {path} are unreadable ({e}): delete the file and run the same "
                            "command again to compute that chunk anew")


# ---- computing the tokens ----------------------------------------------------------------


class TokenWorker:
    """A Ray actor: loads the student once, then computes whole chunks' tokens on request."""

    def __init__(self, store_url: str, teacher: str, checkpoint: str):
        torch.set_num_threads(THREADS_PER_WORKER)  # its own process: set for good
        # seen through the driver's teacher: a student of an added teacher is checked against it
        self.vectors = SegmentVectors(FeatureStore.open(store_url, teacher=teacher), checkpoint)

    def describe(self) -> dict[str, Any]:
        return {"sha256": self.vectors.checkpoint["sha256"], "pid": os.getpid(), "host": socket.gethostname()}

    def chunk(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        return (i, *self.vectors.chunk(i))


def stage_tokens(vectors: SegmentVectors, staging: StagedTokens, *, workers: int = 1, address: str | None = None,
                 on_chunk: Callable[[], None] | None = None) -> int:
    """Compute and stage every chunk not staged yet: here (`workers` 1, no Ray) or on `workers`
    Ray actors (at `address`). Returns the number of chunks computed."""
    todo = sorted(set(range(vectors.store.n_chunks)) - staging.staged())
    if not todo:
        return 0
    if workers == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(THREADS_PER_WORKER)
        try:
            for i in todo:
                staging.write(i, *vectors.chunk(i))
                if on_chunk:
                    on_chunk()
        finally:
            torch.set_num_threads(before)
    else:
        _stage_on_ray(vectors, staging, todo, workers, address, on_chunk)
    return len(todo)


def _stage_on_ray(vectors: SegmentVectors, staging: StagedTokens, todo: list[int], workers: int,
                  address: str | None, on_chunk: Callable[[], None] | None) -> None:
    """The chunks of `todo` on Ray actors, handed out as actors finish (IN_FLIGHT_PER_WORKER each
    queued); the driver writes each result. A worker that dies has its chunks handed to the live
    ones (each chunk tried at most MAX_TRIES_PER_CHUNK times); an error, or no live worker left,
    ends the build: what was staged stays, and the same command continues from there."""
    import ray  # here, not at the top: a build without --workers imports no Ray
    from ray.exceptions import RayActorError, RayTaskError

    from zeroseg.pipeline.distributor import IN_FLIGHT_PER_WORKER, MAX_TRIES_PER_CHUNK, ray_cluster

    with ray_cluster(address) as (cpus, _):
        if workers * THREADS_PER_WORKER > cpus:
            raise UserError(f"{workers} workers, the Ray cluster has {cpus} CPUs")
        actor_class = ray.remote(num_cpus=THREADS_PER_WORKER, max_restarts=0)(TokenWorker)
        # The same path or URL must reach the store and the student from every worker.
        url, checkpoint = canonical_location(vectors.store.url), vectors.checkpoint["path"]
        teacher = vectors.store.teacher_key
        pool = [actor_class.remote(url, teacher, checkpoint) for _ in range(min(workers, len(todo)))]
        resume = "what was staged is kept: run the same command again to continue"
        try:
            try:
                infos = ray.get([actor.describe.remote() for actor in pool])
            except RayActorError as e:  # its __init__ failed: the store or the student does not load there
                raise UserError(f"a token worker did not start ({str(e).strip().splitlines()[-1]})") from None
            for info in infos:
                if info["sha256"] != vectors.checkpoint["sha256"]:
                    raise UserError(f"worker pid {info['pid']} on {info['host']} loaded another student from "
                                    f"{checkpoint} ({info['sha256'][:12]}, here {vectors.checkpoint['sha256'][:12]})")
            queue = collections.deque(todo)
            in_flight = {}  # chunk() call -> (its actor, its chunk)
            live, tries = list(pool), collections.Counter()

            def fill() -> None:  # every live actor up to IN_FLIGHT_PER_WORKER calls
                for actor in live:
                    load = sum(a is actor for a, _ in in_flight.values())
                    for _ in range(IN_FLIGHT_PER_WORKER - load):
                        if queue:
                            chunk = queue.popleft()
                            in_flight[actor.chunk.remote(chunk)] = (actor, chunk)

            fill()
            while in_flight:
                (done,), _ = ray.wait(list(in_flight), num_returns=1)
                actor, chunk = in_flight.pop(done)
                try:
                    _, ids, x = ray.get(done)
                except RayTaskError as e:
                    if isinstance(e.cause, UserError):
                        raise UserError(f"{e.cause}; {resume}") from None
                    raise
                except RayActorError as e:  # gone: its chunks go to the live workers
                    if actor in live:
                        live.remove(actor)
                    tries[chunk] += 1
                    if not live or tries[chunk] >= MAX_TRIES_PER_CHUNK:
                        why = "no live worker left" if not live else f"chunk {chunk} lost {tries[chunk]} workers"
                        raise UserError(f"a token worker died ({str(e).strip().splitlines()[0]}), {why}; {resume}") from None
                    queue.appendleft(chunk)
                else:
                    staging.write(chunk, ids, x)
                    if on_chunk:
                        on_chunk()
                fill()
        finally:
            for actor in pool:
                ray.kill(actor)
