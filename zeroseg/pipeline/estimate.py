"""`extract --dry-run`: what a job would cost (crops, teacher FLOPs, bytes on disk, hours) before
running it, from a short timed sample through the real worker on this machine, writing nothing
at STORE."""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

import fsspec
import torch
from torch.utils.flop_counter import FlopCounterMode

from zeroseg.errors import UserError
from zeroseg.pipeline.reader import list_inputs
from zeroseg.pipeline.runner import DEFAULT_BATCH, DEFAULT_PRECISION, ExtractConfig, _store_config, compare_listing
from zeroseg.pipeline.teacher import PRECISIONS, Teacher
from zeroseg.pipeline.writer import ChunkWorker, TeacherSpec, resolve_device
from zeroseg.stores.features import FeatureStore, check_location
from zeroseg.stores.schema import Status, teacher_key

SAMPLE_IMAGES = 8  # timed per run; the first n of IMAGES


@dataclass
class Estimate:
    images: int
    crops_per_image: int
    flops_per_image: float  # teacher forward, counted on one image's crops
    features_bytes_per_image: float  # as the store writes them (raw), measured on the sample
    pixels_bytes_per_image: float  # 0 without --pixels
    sample_images: int
    sample_images_per_s: float  # one worker on this device, decode + teacher + writes
    wait_share: float  # of the sample: the teacher waiting for decoded images
    device: str
    precision: str
    threads: int
    pending: int | None = None  # images STORE still has to do, where it exists, those IMAGES adds included (None: a new store)

    @property
    def crops(self) -> int:
        return self.images * self.crops_per_image

    @property
    def bytes_on_disk(self) -> float:
        return self.images * (self.features_bytes_per_image + self.pixels_bytes_per_image)

    @property
    def seconds(self) -> float:
        return self.images / self.sample_images_per_s


def teacher_flops(teacher: Teacher, n_crops: int, precision: str) -> float:
    """FLOPs of the teacher's forward over `n_crops` crops (torch's FlopCounterMode: matmuls and
    convolutions, 2 per multiply-add)."""
    size = teacher.info.input_size
    crops = torch.rand(n_crops, 3, size, size, device=teacher.device)
    counter = FlopCounterMode(display=False)
    with counter:
        teacher.encode_images(crops, precision)
    return float(counter.get_total_flops())


def estimate(images: str, url: str, config: ExtractConfig, sample_images: int = SAMPLE_IMAGES) -> Estimate:
    """Lists IMAGES, loads the teacher, and runs the first `sample_images` images twice (a warm-up,
    then timed) through a ChunkWorker into a throw-away in-memory store. STORE is only looked at
    (read-only) to say how many of its images are still pending."""
    if config.precision not in (None, *PRECISIONS):
        raise UserError(f"--precision {config.precision}: choose {' | '.join(PRECISIONS)}")
    paths = list_inputs(images, config.input_format, config.path_column).paths
    device = resolve_device(config.device)
    precision = config.precision or DEFAULT_PRECISION
    teacher = TeacherSpec(config.teacher, config.pretrained, config.seed, device).load()
    pending = None
    if check_location(url) == "store":
        store = FeatureStore.open(url)
        key = teacher_key(teacher.info)
        if key == store.first_teacher_key:
            added = compare_listing([str(p) for p in store.listed_paths()], paths).new  # what the job would append
            pending = int((store.status() == Status.PENDING).sum()) + len(added)
        elif key in store.teacher_keys():  # another teacher of the store: its pending rows
            pending = int((FeatureStore.open(url, teacher=key).status() == Status.PENDING).sum())
        else:  # a new teacher: all the store's rows
            pending = store.n_images
    sample = paths[:sample_images]
    k = len(sample)
    store_config = dataclasses.replace(_store_config(config, teacher.info), chunk_images=k)
    url = f"memory://zeroseg-dry-run-{uuid.uuid4().hex}"
    threads_before = torch.get_num_threads()
    try:
        # the sample twice: chunk 0 warms up (first-call allocations, lazy inits), chunk 1 is timed
        FeatureStore.create(url, store_config, sample + sample, extract={"precision": precision})
        worker = ChunkWorker(url, teacher, config.batch or DEFAULT_BATCH)
        worker.process(0)
        start = time.perf_counter()
        result = worker.process(1)
        seconds = time.perf_counter() - start
        fs = fsspec.filesystem("memory")
        root = url.removeprefix("memory://")
        features = fs.du(f"{root}/crops/features") / (2 * k)
        pixels = fs.du(f"{root}/images/pixels") / (2 * k) if store_config.pixels else 0.0
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(url.removeprefix("memory://")):
            fs.rm(url.removeprefix("memory://"), recursive=True)
        torch.set_num_threads(threads_before)
    return Estimate(
        images=len(paths), crops_per_image=store_config.n_crops,
        flops_per_image=teacher_flops(teacher, store_config.n_crops, precision),
        features_bytes_per_image=features, pixels_bytes_per_image=pixels,
        sample_images=k, sample_images_per_s=k / seconds, wait_share=result.wait_share,
        device=device, precision=precision, threads=torch.get_num_threads(), pending=pending,
    )


def format_estimate(e: Estimate, url: str) -> str:
    return "\n".join([
        f"{url}: dry run, nothing written"
        + (f"; the store exists, {e.pending:,} images to do, new ones included (the figures below are for all)"
           if e.pending is not None else ""),
        f"images: {e.images:,}",
        f"crops: {e.crops:,} ({e.crops_per_image} per image)",
        f"teacher FLOPs: {e.flops_per_image * e.images:.3g} ({e.flops_per_image:.3g} per image, {e.precision})",
        f"store on disk: {_bytes(e.bytes_on_disk)} (features {_bytes(e.features_bytes_per_image)} per image"
        + (f", pixels {_bytes(e.pixels_bytes_per_image)} per image" if e.pixels_bytes_per_image else "")
        + f", measured on {e.sample_images} images)",
        f"ETA: {_duration(e.seconds)} for one worker on {e.device} ({e.threads} torch threads, {e.precision}): "
        f"{e.sample_images_per_s:.1f} images/s on a timed sample of {e.sample_images} images, "
        f"teacher waited {e.wait_share:.0%} for decoded images; N workers on N such devices take about 1/N",
    ])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError
