"""`zeroseg extract`: images -> crop embeddings in a feature store, resumable, one writer.

The job is clip-retrieval's reader -> mapper -> writer -> distributor, each a small piece:
- reader: `sources.list_images` (the path list) and `decode.decode_image` (one training view);
- mapper: `embed_chunk` cuts the grid crops from the decoded views and runs the teacher;
- writer: `ChunkWorker.process` writes one whole chunk through `FeatureStore.write_chunk`;
- distributor: `run_extract` hands pending chunks to ChunkWorkers, in this process
  (`workers=0`) or as a pool of Ray actors (each builds the teacher once).

Resume: a chunk is written features first, status last, so a killed job leaves whole chunks
pending and a re-run of the same command does only those. Features of a chunk depend only on the
chunk's images (batches never span chunks) and on what the store records as `Compute` (device,
precision, torch threads per worker, batch: the thread count changes a GEMM's summation order,
hence the last bits), so a resume runs with the recorded values or is refused: a resumed store is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from zeroseg.errors import UserError
from zeroseg.decode import Decoded, decode_image
from zeroseg.geometry import cut_crops
from zeroseg.pipeline.sources import list_images
from zeroseg.pipeline.teacher import Teacher, load_teacher
from zeroseg.stores.features import (
    FeatureStore,
    Status,
    StoreConfig,
    StoreNotFoundError,
    StoreWriteError,
    check_location,
    make_store_folder,
)
from zeroseg.stores.lock import LockedError, StoreLock, lock_holder

DEFAULT_CHUNK_IMAGES = 64
DEFAULT_BATCH = 256
PRECISION = "fp32"  # the teacher's only precision today
# Each actor's calls queue in order; a second call in flight means the actor never waits on the
# driver between chunks.
IN_FLIGHT_PER_WORKER = 2


@dataclass
class ExtractConfig:
    """The options of one extraction job. None means: the store's value when resuming, else the
    default (chunk_images 64, pixels off, batch 256)."""

    teacher: str = "zeroseg-tiny"
    pretrained: str = "random"
    seed: int = 0  # of the random init, when pretrained is "random"
    grids: tuple[int, ...] = (1, 2, 3, 4)
    view_size: int = 224
    batch: int | None = None  # crops per teacher forward, rounded down to whole images
    chunk_images: int | None = None
    pixels: bool | None = None
    workers: int | None = None  # None: one per CPU (or GPU, on cuda) of the Ray cluster; 0: this process
    device: str = "cpu"  # where the teacher runs: cpu | cuda | auto (cuda when there is one)
    address: str | None = None  # a Ray cluster to join; None starts a local one


@dataclass
class ChunkResult:
    chunk: int
    n_images: int
    n_ok: int


@dataclass
class Summary:
    """The store's state after a job (all chunks, not only this run's)."""

    n_images: int
    ok: int
    failed: int
    pending: int
    reasons: dict[str, int]  # kind of failure ("corrupt", "too small", ...) -> count
    done_this_run: int = 0
    seconds: float = 0.0
    lost_chunks: dict[int, str] = field(default_factory=dict)  # chunk -> why it is still pending

    @property
    def images_per_s(self) -> float:
        return self.done_this_run / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Compute:
    """What changes a feature's last bits, recorded in the store's `extract` attributes; a resume
    runs with the same values or is refused."""

    device: str  # cpu | cuda (resolved)
    precision: str
    threads_per_worker: int  # torch threads of each worker (Ray actor, or this process)
    batch: int  # crops per teacher forward

    KEYS = ("device", "precision", "threads_per_worker", "batch")

    @classmethod
    def recorded(cls, options: dict) -> Compute | None:
        """The store's record; None for a store that predates it (schema version 1)."""
        if not all(k in options for k in cls.KEYS):
            return None
        return cls(**{k: options[k] for k in cls.KEYS})

    def describe(self) -> str:
        t = self.threads_per_worker
        return f"{t} torch thread{'s' if t != 1 else ''} per worker on {self.device}, {self.precision}, batch {self.batch}"


# ---- mapper: one chunk of paths -> arrays --------------------------------------------------


@dataclass
class ChunkArrays:
    features: np.ndarray  # (n, C, D) float16, zeros for failed images
    status: np.ndarray  # (n,) uint8 Status
    errors: list[str]  # (n,) "" for ok images
    sizes: np.ndarray  # (n, 2) int32 original height, width
    views: np.ndarray  # (n, S, S, 3) uint8, zeros for failed images


def images_per_batch(batch: int, n_crops: int) -> int:
    return max(1, batch // n_crops)


def embed_chunk(
    teacher: Teacher,
    paths: list[str],
    store_config: StoreConfig,
    batch: int,
    boxes: np.ndarray,
    decoder: ThreadPoolExecutor | None = None,
) -> ChunkArrays:
    """Decode each image once, cut its grid crops from the view, embed them `batch` crops at a
    time (whole images per batch). With a `decoder` thread, decoding runs ahead of the teacher."""
    n, c, s = len(paths), len(boxes), store_config.view_size
    decode = lambda p: decode_image(p, s, store_config.grids)  # noqa: E731
    decoded: Iterator[Decoded] = decoder.map(decode, paths) if decoder else map(decode, paths)
    out = ChunkArrays(
        features=np.zeros((n, c, teacher.info.embed_dim), np.float16),
        status=np.full(n, Status.FAILED, np.uint8),
        errors=[""] * n,
        sizes=np.zeros((n, 2), np.int32),
        views=np.zeros((n, s, s, 3), np.uint8),
    )
    group: list[int] = []  # indices of ok images waiting for the teacher
    per_batch = images_per_batch(batch, c)
    for i, d in enumerate(decoded):
        out.sizes[i] = d.size
        if d.view is None:
            out.errors[i] = d.error
            continue
        out.views[i], out.status[i] = d.view, Status.OK
        group.append(i)
        if len(group) == per_batch:
            _embed_group(teacher, out, group, boxes)
            group = []
    if group:
        _embed_group(teacher, out, group, boxes)
    return out


def _embed_group(teacher: Teacher, out: ChunkArrays, rows: list[int], boxes: np.ndarray) -> None:
    views = torch.from_numpy(out.views[rows]).to(teacher.device)  # (G, S, S, 3): crops are cut where the teacher runs
    crops = cut_crops(views, boxes, teacher.info.input_size)  # (G*C, 3, in, in), image-major
    emb = teacher.encode_images(crops).cpu().numpy()  # (G*C, D)
    out.features[rows] = emb.reshape(len(rows), len(boxes), -1).astype(np.float16)


# ---- writer: one worker, one teacher, whole chunks ------------------------------------------


class ChunkWorker:
    """Holds the teacher once and writes whole chunks of one store. Used as is by the in-process
    path and wrapped as a Ray actor by the pool (each actor: one teacher, `threads` torch
    threads, so N actors share the cores instead of each taking them all)."""

    def __init__(self, url: str, config: ExtractConfig, batch: int, threads: int | None = None,
                 teacher: Teacher | None = None, lock_token: str | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.teacher = teacher or load_teacher(config.teacher, config.pretrained, seed=config.seed,
                                               device=resolve_device(config.device))
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
        arrays = embed_chunk(
            self.teacher, list(self.paths[sl]), self.store.config, self.batch, self.boxes, self.decoder
        )
        if self.lock_token and (lock_holder(self.url) or {}).get("token") != self.lock_token:
            # Our driver died and a new job took the store over: leave the chunk to it.
            raise LockedError(f"{self.url}: lost the lock before writing chunk {chunk}")
        self.store.write_chunk(
            chunk, arrays.features, arrays.status, arrays.errors, arrays.sizes,
            arrays.views if self.store.has_pixels else None,
        )
        return ChunkResult(chunk, sl.stop - sl.start, int((arrays.status == Status.OK).sum()))


# ---- driver ------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """cpu | cuda | auto -> the torch device to use; asking for cuda where there is none is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: choose cpu, cuda or auto")
    return device


def _store_config(config: ExtractConfig, teacher_info) -> StoreConfig:
    return StoreConfig(
        teacher=teacher_info, grids=tuple(config.grids), view_size=config.view_size,
        chunk_images=config.chunk_images or DEFAULT_CHUNK_IMAGES, pixels=bool(config.pixels),
    )


def open_existing(url: str, images: str, paths: list[str], config: ExtractConfig, teacher_info) -> FeatureStore | None:
    """The job's store if there is one (None: create it). An existing one must have been made the
    same way (teacher, grids, view size, chunking, pixels) and from the same paths, or this ends in
    a one-line error and the store is not touched."""
    try:
        store = FeatureStore.open(url, mode="r", expect=_store_config(config, teacher_info))
    except StoreNotFoundError:
        return None
    have = store.config
    for name, value in dict(chunk_images=config.chunk_images, pixels=config.pixels).items():
        if value is not None and value != getattr(have, name):
            raise UserError(f"{url} was made with {name} {getattr(have, name)}, asked {value}")
    stored = [str(p) for p in store.paths()]
    if stored != paths:
        raise UserError(f"{url} holds {len(stored)} images from its first listing; {images} now lists "
                        f"{len(paths)} ({_first_difference(stored, paths)}): give the same IMAGES or a new STORE")
    return store


def plan_compute(url: str, config: ExtractConfig, recorded: Compute | None,
                 cluster: tuple[int, int] | None) -> tuple[Compute, int]:
    """(how this run computes, how many workers): a new store's from the options and the machine,
    a resumed store's from its record. `cluster` is the Ray cluster's (CPUs, GPUs); None runs in
    this process. Threads per worker are never derived from the number of pending chunks."""
    batch = config.batch or (recorded.batch if recorded else DEFAULT_BATCH)
    if cluster is None:  # in this process: the record's thread count, else this process's
        device = resolve_device(config.device)
        threads = recorded.threads_per_worker if recorded else torch.get_num_threads()
        workers, hint = 1, ""  # never differs: this process takes the recorded count
    else:
        cpus, gpus = cluster
        device = "cuda" if gpus else "cpu"
        if config.workers or not recorded:
            workers = config.workers or gpus or cpus
            threads = max(1, cpus // workers)
        else:  # a plain resume: as many workers as give the recorded threads each
            threads = recorded.threads_per_worker
            workers = gpus or max(1, cpus // threads)
        fitting = gpus or max(1, cpus // recorded.threads_per_worker) if recorded else 0
        hint = f"--workers {fitting}" if recorded and max(1, cpus // fitting) == recorded.threads_per_worker else "no --workers"
    run = Compute(device, PRECISION, threads, batch)
    if recorded is None:
        return run, workers
    phrase = {"device": f"device {run.device}", "precision": run.precision,
              "threads_per_worker": f"{run.threads_per_worker} threads per worker", "batch": f"batch {run.batch}"}
    fixes = {"device": f"--device {recorded.device}", "batch": f"--batch {recorded.batch} (or no --batch)",
             "threads_per_worker": hint, "precision": f"precision {recorded.precision}"}
    differs = [name for name in Compute.KEYS if getattr(run, name) != getattr(recorded, name)]
    if differs:
        how = " and ".join(fixes[name] for name in differs if fixes[name])
        raise UserError(f"{url} was made with {recorded.describe()}; this run would use "
                        f"{', '.join(phrase[name] for name in differs)}, which changes the features' last bits: "
                        + (f"re-run with {how} or use a new STORE" if how else "use a new STORE"))
    return run, workers


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"row {i}: {x} vs {y}"
    return f"row {min(len(a), len(b))} onwards"


def run_extract(
    images: str,
    url: str,
    config: ExtractConfig,
    notify: Callable[[str], None] = print,
    progress: Callable[[ChunkResult], None] | None = None,
    started: Callable[[FeatureStore, int], None] | None = None,
) -> Summary:
    """The whole job: list, lock, open or create the store, do the pending chunks, summarise.
    `started(store, n_pending_images)` and `progress(result)` let a caller draw a progress bar."""
    if url.startswith("memory://") and config.workers != 0:
        raise UserError("a memory:// store lives inside one process: use --workers 0 with it")
    # In this process the driver's teacher does the work; for Ray it only names the teacher.
    device = resolve_device(config.device) if config.workers == 0 else "cpu"
    teacher = load_teacher(config.teacher, config.pretrained, seed=config.seed, device=device)
    paths = list_images(images)
    # The order that never writes into what is not ours: look at STORE first (a foreign folder
    # is refused before even our lock file goes in), make the folder if there is none, take the
    # lock inside it, then open or create the store under the lock (check_location again there:
    # the lock file is the one entry it allows beside a new store).
    if check_location(url) == "new":
        make_store_folder(url)
    t0 = time.perf_counter()
    done, lost = 0, {}
    threads_before = torch.get_num_threads()
    with StoreLock(url, notify=notify) as lock, contextlib.ExitStack() as stack:
        store = open_existing(url, images, paths, config, teacher.info)
        pending = store.pending_chunks() if store else None
        if pending == []:
            return summarize(store)
        cluster = stack.enter_context(_ray_cluster(config)) if config.workers != 0 else None
        recorded = Compute.recorded(store.extract_options) if store else None
        if store and recorded is None:
            notify(f"note: {url} does not record its threads, device and precision (schema version 1): "
                   "the resumed chunks may differ in the last bits")
        compute, n_workers = plan_compute(url, config, recorded, cluster)
        if store is None:
            options = {**dataclasses.asdict(config), "grids": list(config.grids),
                       "chunk_images": config.chunk_images or DEFAULT_CHUNK_IMAGES, "pixels": bool(config.pixels),
                       "source": images}
            for runtime_only in ("workers", "address"):  # how it ran, not what it made
                options.pop(runtime_only)
            options.update(dataclasses.asdict(compute))
            FeatureStore.create(url, _store_config(config, teacher.info), paths, extract=options)
        store = FeatureStore.open(url, mode="r+")
        pending = store.pending_chunks()
        todo = sum(_len(store.chunk_slice(c)) for c in pending)
        if started:
            started(store, todo)

        def finished(result: ChunkResult) -> None:
            nonlocal done
            done += result.n_images
            if progress:
                progress(result)

        try:
            if cluster is None:
                # the driver's teacher serves; the token: a job that took the store over stops us too
                worker = ChunkWorker(url, config, compute.batch, compute.threads_per_worker, teacher=teacher,
                                     lock_token=lock.token)
                for chunk in pending:
                    finished(worker.process(chunk))
            else:
                del teacher  # the actors build their own
                lost = _run_ray_pool(url, config, compute, min(n_workers, len(pending)), cluster, pending,
                                     teacher_sha=store.config.teacher.sha256, lock_token=lock.token,
                                     finished=finished, notify=notify)
        finally:
            torch.set_num_threads(threads_before)  # the in-process worker set the store's count
    return summarize(FeatureStore.open(url), done, time.perf_counter() - t0, lost)


@contextlib.contextmanager
def _ray_cluster(config: ExtractConfig):
    """Join or start Ray for the job; yields the cluster's (CPUs, GPUs usable by this job)."""
    import ray

    own_cluster = not ray.is_initialized()
    if own_cluster:
        # Only chunk indices and small results travel through Ray: a small object store will do.
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False,
                 object_store_memory=None if config.address else 256 * 2**20)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        gpus = int(ray.cluster_resources().get("GPU", 0)) if config.device != "cpu" else 0
        if config.device == "cuda" and not gpus:
            raise UserError("--device cuda: the Ray cluster has no GPU")
        yield cpus, gpus
    finally:
        if own_cluster:
            ray.shutdown()


def _len(sl: slice) -> int:
    return sl.stop - sl.start


def _run_ray_pool(url, config, compute: Compute, n_workers: int, cluster, pending, teacher_sha, lock_token,
                  finished, notify) -> dict[int, str]:
    """Keep every actor busy with IN_FLIGHT_PER_WORKER chunks until none are left. An actor that
    dies is restarted by Ray and its calls retried (max_restarts / max_task_retries); a chunk whose
    retries run out stays pending for the next run. Returns those chunks with the reason. A failed
    write (disk full) stops the job at once: every later write would fail the same way."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    cpus, gpus = cluster
    threads = compute.threads_per_worker
    share = cpus / n_workers  # CPUs per actor; Ray wants whole numbers above 1
    notify(f"{n_workers} Ray workers x {threads} torch threads ({cpus} CPUs, {gpus} GPUs in the cluster)")
    actor_class = ray.remote(num_cpus=share if share < 1 else min(threads, int(share)), num_gpus=gpus / n_workers,
                             max_restarts=2, max_task_retries=2)(ChunkWorker)
    # Actors can outlive a SIGKILLed driver for a moment: with the job's lock token, each
    # checks before writing a chunk that no new job has taken the store over.
    actors = [actor_class.remote(url, config, compute.batch, threads, lock_token=lock_token)
              for _ in range(n_workers)]
    try:
        infos = ray.get([a.describe.remote() for a in actors])
        for info in infos:
            if info["sha256"] != teacher_sha:
                raise UserError(f"worker pid {info['pid']} on {info['host']} loaded a different "
                                f"{config.teacher} ({info['sha256'][:12]}, store has {teacher_sha[:12]})")
        notify("workers: " + ", ".join(f"pid {i['pid']} on {i['host']}" for i in infos))
        queue = collections.deque(pending)
        in_flight: dict = {}
        lost: dict[int, str] = {}

        def submit(actor) -> None:
            if queue:
                chunk = queue.popleft()
                in_flight[actor.process.remote(chunk)] = (actor, chunk)

        for actor in actors:
            for _ in range(IN_FLIGHT_PER_WORKER):
                submit(actor)
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, chunk = in_flight.pop(ref)
            try:
                finished(ray.get(ref))
                submit(actor)
            except RayActorError as e:  # the actor is gone for good: its chunks stay pending
                lost[chunk] = f"worker died: {str(e).strip().splitlines()[0]}"
            except RayTaskError as e:
                if isinstance(e.cause, StoreWriteError):  # disk full: the next writes would fail too
                    raise StoreWriteError(str(e.cause)) from None
                lost[chunk] = f"worker error: {str(e).strip().splitlines()[-1]}"  # a bug, not bad data
                submit(actor)
        for chunk in queue:
            lost[chunk] = "no live worker left"
        return lost
    finally:
        for actor in actors:  # none writes after the job ends (nor could: the lock goes with it)
            ray.kill(actor)


def summarize(store: FeatureStore, done: int = 0, seconds: float = 0.0, lost: dict | None = None) -> Summary:
    status = store.status()
    failed = status == Status.FAILED
    kinds = collections.Counter(str(e).split(":")[0] for e in store.errors()[failed])
    return Summary(
        n_images=len(status), ok=int((status == Status.OK).sum()), failed=int(failed.sum()),
        pending=int((status == Status.PENDING).sum()), reasons=dict(kinds.most_common()),
        done_this_run=done, seconds=seconds, lost_chunks=dict(lost or {}),
    )


# ---- the command's face: progress bar and summary --------------------------------------------


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} images/s" if task.speed else "- images/s", style="cyan")


def extract_with_progress(images: str, url: str, config: ExtractConfig, console: Console) -> Summary:
    """run_extract with a progress bar (images/s, ETA) and a printed summary."""
    bar = Progress(
        TextColumn("extract"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )
    task = None

    def started(store: FeatureStore, todo: int) -> None:
        nonlocal task
        console.print(f"{url}: {store.n_images} images, {todo} to do in {len(store.pending_chunks())} of "
                      f"{store.n_chunks} chunks; teacher {store.config.teacher.arch} "
                      f"({store.config.teacher.pretrained}), {store.n_crops} crops per image")
        task = bar.add_task("extract", total=todo)
        bar.start()

    try:
        summary = run_extract(images, url, config, notify=console.print, started=started,
                              progress=lambda r: bar.advance(task, r.n_images))
    finally:
        bar.stop()
    console.print(format_summary(summary))
    return summary


def format_summary(s: Summary) -> str:
    lines = [f"{s.ok} ok, {s.failed} failed, {s.pending} pending of {s.n_images} images"
             f" ({s.done_this_run} this run in {s.seconds:.1f} s, {s.images_per_s:.1f} images/s)"]
    if s.reasons:
        lines.append("failed: " + ", ".join(f"{n} {kind}" for kind, n in s.reasons.items()))
    for chunk, why in sorted(s.lost_chunks.items()):
        lines.append(f"chunk {chunk} left pending: {why}")
    if s.pending:
        lines.append("re-run the same command to finish the pending chunks")
    return "\n".join(lines)
