"""The extract job: open or create the store under its lock, do the pending chunks, summarise."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from zeroseg.decode import content_hash
from zeroseg.errors import UserError
from zeroseg.pipeline.distributor import extract_cluster, run_in_process, run_on_ray
from zeroseg.pipeline.teacher import PRECISIONS
from zeroseg.pipeline.reader import list_inputs
from zeroseg.pipeline.writer import ChunkResult, ChunkWorker, TeacherSpec, resolve_device
from zeroseg.stores.features import FeatureStore, StoreError, StoreNotFoundError, check_location, make_store_folder
from zeroseg.stores.schema import Status, StoreConfig, config_mismatches, teacher_key
from zeroseg.stores.lock import StoreLock

DEFAULT_CHUNK_IMAGES = 64
DEFAULT_BATCH = 256
# fp32: the reference features, the same on every CPU. bf16 autocast pays only where the hardware
# has bf16 (a GPU, a CPU with AMX) and is several times slower where it has none (benchmarks/README.md).
DEFAULT_PRECISION = "fp32"
HASH_THREADS = 8  # files hashed at once: reading waits on the disk or the network, not the CPU


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
    precision: str | None = None  # the teacher's forward: fp32 | bf16 | fp16 (autocast); None: store's, or fp32
    input_format: str = "auto"  # how IMAGES is read: auto | files | webdataset | table (pipeline/reader.py)
    path_column: str = "path"  # a table's column of paths
    append: bool = False  # IMAGES lists images to add to an existing store, not the store's whole listing


@dataclass
class Summary:
    """The store's state after a job (all chunks, not only this run's)."""

    n_images: int
    ok: int
    failed: int
    pending: int
    reasons: dict[str, int]  # kind of failure ("corrupt", "too small", ...) -> count
    done_this_run: int = 0
    copied_this_run: int = 0  # of done_this_run: duplicates of an earlier row's bytes, copied, not embedded
    seconds: float = 0.0
    lost_chunks: dict[int, str] = field(default_factory=dict)  # chunk -> why it is still pending
    waited_s: float = 0.0  # this run's chunks: time their teacher waited for decoded images ...
    chunk_s: float = 0.0  # ... of their decode + teacher time, summed over chunks

    @property
    def images_per_s(self) -> float:
        return self.done_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def wait_share(self) -> float:
        """The share of the teacher's time spent waiting for decoded images, over this run."""
        return self.waited_s / self.chunk_s if self.chunk_s > 0 else 0.0


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


def _store_config(config: ExtractConfig, teacher_info) -> StoreConfig:
    return StoreConfig(
        teacher=teacher_info, grids=tuple(config.grids), view_size=config.view_size,
        chunk_images=config.chunk_images or DEFAULT_CHUNK_IMAGES, pixels=bool(config.pixels),
    )


def open_existing(url: str, config: ExtractConfig, teacher_info) -> FeatureStore | None:
    """The job's store if there is one (None: create it), seen through its first teacher. An
    existing one must have been made the same way (grids, view size, chunking, pixels), or this
    ends in a one-line error and the store is not touched. Another teacher is no mismatch: the job
    adds it beside the store's (check_beside_first)."""
    try:
        store = FeatureStore.open(url, mode="r")
    except StoreNotFoundError:
        return None
    problems = config_mismatches(_store_config(config, teacher_info), store.config, teacher=False)
    if problems:
        raise StoreError(f"{url} was made differently: " + "; ".join(problems))
    have = store.config
    for name, value in dict(chunk_images=config.chunk_images, pixels=config.pixels).items():
        if value is not None and value != getattr(have, name):
            raise UserError(f"{url} was made with {name} {getattr(have, name)}, asked {value}")
    return store


@dataclass
class ListingChange:
    """How IMAGES' listing compares with a store's paths (compared as multisets: a path listed
    twice is two rows)."""

    new: list[int]  # indices into the listing of the images the store does not hold, in listing order
    vanished: list[str]  # the store's paths that the listing no longer names (kept, never deleted)


def compare_listing(stored: list[str], paths: list[str]) -> ListingChange:
    unmatched = collections.Counter(stored)
    new = []
    for i, p in enumerate(paths):
        if unmatched[p] > 0:
            unmatched[p] -= 1
        else:
            new.append(i)
    vanished = []
    for p in stored:
        if unmatched[p] > 0:
            unmatched[p] -= 1
            vanished.append(p)
    return ListingChange(new, vanished)


def grow_store(url: str, images: str, listing, append: bool, notify: Callable[[str], None]) -> None:
    """Bring an existing store's rows up to IMAGES' listing: the images it does not hold yet are
    added at its end, in listing order (pending: the job then does them like any pending chunk);
    the store's images the listing no longer names are reported and kept. With `append`, IMAGES
    lists only images to add, so nothing is reported vanished. A listing that shares no image
    with the store is refused unless `append`: it is more likely the wrong IMAGES than a new set."""
    store = FeatureStore.open(url, mode="r")
    stored = [str(p) for p in store.listed_paths()]
    change = compare_listing(stored, listing.paths)
    if not append and change.vanished:
        shown = ", ".join(change.vanished[:3]) + (", ..." if len(change.vanished) > 3 else "")
        notify(f"note: {len(change.vanished)} of {url}'s {len(stored)} images are not in {images} any more "
               f"(their rows are kept): {shown}")
    if not change.new:
        return
    if not append and len(change.vanished) == len(stored):
        raise UserError(f"{url} holds {len(stored)} images, none of them in {images} ({len(listing.paths)} images): "
                        f"give the store's IMAGES, or add these with --append")
    metadata = [listing.metadata[i] for i in change.new] if listing.metadata is not None else None
    rows = FeatureStore.open(url, mode="r+").append([listing.paths[i] for i in change.new], metadata)
    notify(f"{url}: {len(change.new)} new images from {images} added as rows {rows.start}-{rows.stop - 1}")


def check_beside_first(url: str, store: FeatureStore, key: str, images: str, listing, config: ExtractConfig,
                       notify: Callable[[str], None]) -> None:
    """A teacher beside the store's first (added now, or resumed) embeds the store's rows as they
    are, once the first teacher has done them all: IMAGES adds no rows (images the store does not
    hold are reported: the first teacher adds them), and the rows the first teacher failed are
    failed for it too."""
    first = store.first_teacher_key
    if config.append:
        raise UserError(f"--append adds images with the store's first teacher ({first}), not with {key}")
    if key not in store.teacher_keys():
        store.require_teachers_schema()
    todo = int((store.status() == Status.PENDING).sum())
    if todo:
        raise UserError(f"{url}: its first teacher {first} has {todo} images pending: finish them first "
                        f"(extract with that teacher), then add {key}")
    new = compare_listing([str(p) for p in store.listed_paths()], listing.paths).new
    if new:
        notify(f"note: {len(new)} images of {images} are not in {url}: teacher {key} embeds the store's "
               f"{store.n_images} rows; extract with the first teacher ({first}) to add them")


def mark_duplicates(url: str, notify: Callable[[str], None]) -> None:
    """Hash the files of the store's pending rows (those not hashed yet) and point each at the
    first row with the same bytes (FeatureStore.mark_duplicates): the workers embed such a row
    once and copy it. Reads every pending file once more than decoding does."""
    store = FeatureStore.open(url, mode="r+")
    pending = np.flatnonzero(store.status() == Status.PENDING)
    if not store.has_dedup or not len(pending):
        return
    unhashed = pending[store.hashes()[pending] == ""]
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="zeroseg-hash") as pool:
        hashes = dict(zip(unhashed.tolist(), pool.map(content_hash, store.paths()[unhashed])))
    copies = int((store.mark_duplicates(hashes)[pending] >= 0).sum())
    if copies:
        notify(f"{copies} of the {len(pending)} images to do have the same bytes as an earlier row: "
               "embedded once, copied to the others")


def copies_from(store: FeatureStore, pending: list[int]) -> dict[int, set[int]]:
    """Pending chunk -> the other pending chunks it copies duplicate rows from (done first)."""
    duplicate_of, b, todo = store.duplicate_of(), store.config.chunk_images, set(pending)
    waits = {}
    for chunk in pending:
        first = duplicate_of[store.chunk_slice(chunk)]
        others = {int(c) for c in first[first >= 0] // b if c != chunk} & todo
        if others:
            waits[chunk] = others
    return waits


def plan_compute(url: str, config: ExtractConfig, recorded: Compute | None,
                 cluster: tuple[int, int] | None) -> tuple[Compute, int]:
    """(how this run computes, how many workers): a new store's from the options and the machine,
    a resumed store's from its record. `cluster` is the Ray cluster's (CPUs, GPUs); None runs in
    this process. Threads per worker are never derived from the number of pending chunks."""
    batch = config.batch or (recorded.batch if recorded else DEFAULT_BATCH)
    precision = config.precision or (recorded.precision if recorded else DEFAULT_PRECISION)
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
    run = Compute(device, precision, threads, batch)
    if recorded is None:
        return run, workers
    phrase = {"device": f"device {run.device}", "precision": run.precision,
              "threads_per_worker": f"{run.threads_per_worker} threads per worker", "batch": f"batch {run.batch}"}
    fixes = {"device": f"--device {recorded.device}", "batch": f"--batch {recorded.batch} (or no --batch)",
             "threads_per_worker": hint, "precision": f"--precision {recorded.precision} (or no --precision)"}
    differs = [name for name in Compute.KEYS if getattr(run, name) != getattr(recorded, name)]
    if differs:
        how = " and ".join(fixes[name] for name in differs if fixes[name])
        raise UserError(f"{url} was made with {recorded.describe()}; this run would use "
                        f"{', '.join(phrase[name] for name in differs)}, which changes the features' last bits: "
                        + (f"re-run with {how} or use a new STORE" if how else "use a new STORE"))
    return run, workers


def run_extract(
    images: str,
    url: str,
    config: ExtractConfig,
    notify: Callable[[str], None] = print,
    progress: Callable[[ChunkResult], None] | None = None,
    started: Callable[[FeatureStore, int], None] | None = None,
) -> Summary:
    """The whole job: list, lock, open or create the store, do the pending chunks, summarise.
    `started(store, n_pending_images)` and `progress(result)` let a caller draw a progress bar.

    Resume: a chunk is written features first, status last, so a killed job leaves whole chunks
    pending and a re-run of the same command does only those. Features of a chunk depend only on
    the chunk's images (batches never span chunks) and on what the store records as `Compute`
    (device, precision, torch threads per worker, batch: the thread count changes a GEMM's
    summation order, hence the last bits), so a resume runs with the recorded values or is
    refused: a resumed store is bit-identical to an uninterrupted one."""
    if config.precision not in (None, *PRECISIONS):
        raise UserError(f"--precision {config.precision}: choose {' | '.join(PRECISIONS)}")
    if url.startswith("memory://") and config.workers != 0:
        raise UserError("a memory:// store lives inside one process: use --workers 0 with it")
    # In this process the driver's teacher does the work; for Ray it only names the teacher
    # (loaded on the CPU: each actor builds its own from `spec`).
    spec = TeacherSpec(config.teacher, config.pretrained, config.seed, config.device)
    teacher = spec.load() if config.workers == 0 else dataclasses.replace(spec, device="cpu").load()
    listing = list_inputs(images, config.input_format, config.path_column)
    paths = listing.paths
    for note in listing.notes:
        notify(f"note: {note}")
    # The order that never writes into what is not ours: look at STORE first (a foreign folder
    # is refused before even our lock file goes in), make the folder if there is none, take the
    # lock inside it, then open or create the store under the lock (check_location again there:
    # the lock file is the one entry it allows beside a new store).
    if check_location(url) == "new":
        make_store_folder(url)
    t0 = time.perf_counter()
    done, copied, waited, chunk_s = 0, 0, 0.0, 0.0
    threads_before = torch.get_num_threads()
    key = teacher_key(teacher.info)
    with StoreLock(url, notify=notify) as lock, contextlib.ExitStack() as stack:
        store = open_existing(url, config, teacher.info)
        # Another teacher than the store's first is added beside it (or resumed), over its rows.
        adding = store is not None and key != store.first_teacher_key
        expect = _store_config(config, teacher.info)
        if adding:
            check_beside_first(url, store, key, images, listing, config, notify)
            store = FeatureStore.open(url, teacher=key, expect=expect) if key in store.teacher_keys() else None
        elif store:
            FeatureStore.open(url, expect=expect)  # the same weights as the first teacher's, to the last digit
            grow_store(url, images, listing, config.append, notify)
            mark_duplicates(url, notify)
            store = FeatureStore.open(url)
        elif config.append:
            raise UserError(f"--append adds images to an existing store; {url} holds none: leave out --append to create it")
        pending = store.pending_chunks() if store else None
        if pending == []:
            return summarize(store)
        on_ray = config.workers != 0
        cluster = stack.enter_context(extract_cluster(config.address, config.device)) if on_ray else None
        recorded = Compute.recorded(store.extract_options) if store else None
        if store and recorded is None:
            notify(f"note: {url} does not record its threads, device and precision (schema version 1): "
                   "the resumed chunks may differ in the last bits")
        compute, n_workers = plan_compute(url, config, recorded, cluster)
        if store is None:
            options = {**dataclasses.asdict(config), "grids": list(config.grids),
                       "chunk_images": config.chunk_images or DEFAULT_CHUNK_IMAGES, "pixels": bool(config.pixels),
                       "source": images}
            for runtime_only in ("workers", "address", "append"):  # how it ran, not what it made
                options.pop(runtime_only)
            options.update(dataclasses.asdict(compute))
            if adding:
                first = FeatureStore.open(url, mode="r+")
                options.update(chunk_images=first.config.chunk_images, pixels=first.config.pixels)
                first.add_teacher(teacher.info, options)
                notify(f"{url}: teacher {key} added beside {first.first_teacher_key} "
                       f"(train, index and ablate pick it with --teacher-key {key})")
            else:
                FeatureStore.create(url, _store_config(config, teacher.info), paths, extract=options,
                                    metadata=listing.metadata)
                mark_duplicates(url, notify)
        store = FeatureStore.open(url, mode="r+", teacher=key)
        pending = store.pending_chunks()
        todo = int((store.status() == Status.PENDING).sum())
        if started:
            started(store, todo)

        def finished(result: ChunkResult) -> None:
            nonlocal done, copied, waited, chunk_s
            copied += result.copied
            done += result.n_images
            waited, chunk_s = waited + result.waited_s, chunk_s + result.seconds
            if progress:
                progress(result)

        try:
            if cluster is None:
                # the driver's teacher serves; the token: a job that took the store over stops us too
                worker = ChunkWorker(url, teacher, compute.batch, compute.threads_per_worker, lock_token=lock.token,
                                     teacher_key=key)
                lost = run_in_process(worker, pending, finished)
            else:
                del teacher  # the actors build their own
                lost = run_on_ray(url, spec, compute.batch, compute.threads_per_worker, min(n_workers, len(pending)),
                                  cluster, pending, teacher_sha=store.config.teacher.sha256, lock_token=lock.token,
                                  finished=finished, notify=notify, waits_for=copies_from(store, pending),
                                  teacher_key=key)
        finally:
            torch.set_num_threads(threads_before)  # the in-process worker set the store's count
    return dataclasses.replace(summarize(FeatureStore.open(url, teacher=key), done, time.perf_counter() - t0, lost),
                               waited_s=waited, chunk_s=chunk_s, copied_this_run=copied)


def summarize(store: FeatureStore, done: int = 0, seconds: float = 0.0, lost: dict | None = None) -> Summary:
    status = store.status()
    failed = status == Status.FAILED
    kinds = collections.Counter(str(e).split(":")[0] for e in store.errors()[failed])
    return Summary(
        n_images=len(status), ok=int((status == Status.OK).sum()), failed=int(failed.sum()),
        pending=int((status == Status.PENDING).sum()), reasons=dict(kinds.most_common()),
        done_this_run=done, seconds=seconds, lost_chunks=dict(lost or {}),
    )
