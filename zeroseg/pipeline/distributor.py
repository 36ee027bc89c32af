"""Where the work runs: in this process or on Ray, the one place that knows the cluster."""

from __future__ import annotations

import collections
import contextlib
from typing import TYPE_CHECKING, Callable, Iterator

from zeroseg.errors import UserError
from zeroseg.stores.features import StoreWriteError

if TYPE_CHECKING:
    from zeroseg.pipeline.writer import ChunkResult, ChunkWorker, TeacherSpec

# Each actor's calls queue in order; a second call in flight means the actor never waits on the
# driver between chunks.
IN_FLIGHT_PER_WORKER = 2


@contextlib.contextmanager
def ray_cluster(address: str | None = None) -> Iterator[tuple[int, int]]:
    """Join the Ray cluster at `address`, or start a local one on this machine's cores, and shut
    down on the way out what was started here (a Ray already running is used as it is). Yields the
    cluster's (CPUs, GPUs)."""
    import ray  # here, not at the top: importing Ray takes seconds that runs without it never need

    own_cluster = not ray.is_initialized()
    if own_cluster:
        # Only small things travel through Ray (chunk indices, results): a small object store will do.
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 object_store_memory=None if address else 256 * 2**20)
    try:
        resources = ray.cluster_resources()
        yield int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    finally:
        if own_cluster:
            ray.shutdown()


@contextlib.contextmanager
def extract_cluster(address: str | None, device: str) -> Iterator[tuple[int, int]]:
    """Ray for an extraction job; yields the (CPUs, GPUs) its workers may use (no GPU on --device cpu)."""
    with ray_cluster(address) as (cpus, gpus):
        gpus = gpus if device != "cpu" else 0
        if device == "cuda" and not gpus:
            raise UserError("--device cuda: the Ray cluster has no GPU")
        yield cpus, gpus


def run_in_process(worker: ChunkWorker, pending: list[int],
                   finished: Callable[[ChunkResult], None]) -> dict[int, str]:
    """The pending chunks one after another by one worker here; nothing is lost (an error stops
    the job), so the chunks left pending with a reason are none."""
    for chunk, then in zip(pending, [*pending[1:], None]):
        finished(worker.process(chunk, then))
    return {}


def run_on_ray(url: str, teacher: TeacherSpec, batch: int, threads: int, n_workers: int,
               cluster: tuple[int, int], pending: list[int], teacher_sha: str, lock_token: str,
               finished: Callable[[ChunkResult], None], notify: Callable[[str], None]) -> dict[int, str]:
    """Keep every actor busy with IN_FLIGHT_PER_WORKER chunks until none are left. An actor that
    dies is restarted by Ray and its calls retried (max_restarts / max_task_retries); a chunk whose
    retries run out stays pending for the next run. Returns those chunks with the reason. A failed
    write (disk full) stops the job at once: every later write would fail the same way."""
    import ray  # here, not at the top: see ray_cluster
    from ray.exceptions import RayActorError, RayTaskError

    # Here too: the worker's imports (open_clip, seconds) would slow every user of ray_cluster (ablate).
    from zeroseg.pipeline.writer import ChunkWorker

    cpus, gpus = cluster
    share = cpus / n_workers  # CPUs per actor; Ray wants whole numbers above 1
    notify(f"{n_workers} Ray workers x {threads} torch threads ({cpus} CPUs, {gpus} GPUs in the cluster)")
    actor_class = ray.remote(num_cpus=share if share < 1 else min(threads, int(share)), num_gpus=gpus / n_workers,
                             max_restarts=2, max_task_retries=2)(ChunkWorker)
    # Actors can outlive a SIGKILLed driver for a moment: with the job's lock token, each
    # checks before writing a chunk that no new job has taken the store over.
    actors = [actor_class.remote(url, teacher, batch, threads, lock_token=lock_token) for _ in range(n_workers)]
    try:
        infos = ray.get([a.describe.remote() for a in actors])
        for info in infos:
            if info["sha256"] != teacher_sha:
                raise UserError(f"worker pid {info['pid']} on {info['host']} loaded a different "
                                f"{teacher.arch} ({info['sha256'][:12]}, store has {teacher_sha[:12]})")
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
