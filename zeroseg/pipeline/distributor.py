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
# A chunk whose worker dies this many times stays pending (it may be what kills them).
MAX_TRIES_PER_CHUNK = 3
# How long a job whose live workers are all gone waits for a replacement to come up.
REPLACEMENT_WAIT_S = 120


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


def takes_another(in_flight: int, queued: int, actors: int) -> bool:
    """Whether an actor with `in_flight` chunks gets one more. An idle one always; a busy one only
    while more chunks are queued than there are actors: at the end of a job the last chunks go one
    to each actor, never two to one actor while another sits idle for a whole chunk."""
    return in_flight == 0 or (in_flight < IN_FLIGHT_PER_WORKER and queued > actors)


def run_on_ray(url: str, teacher: TeacherSpec, batch: int, threads: int, n_workers: int,
               cluster: tuple[int, int], pending: list[int], teacher_sha: str, lock_token: str,
               finished: Callable[[ChunkResult], None], notify: Callable[[str], None],
               waits_for: dict[int, set[int]] | None = None, teacher_key: str | None = None) -> dict[int, str]:
    """Keep every actor busy with IN_FLIGHT_PER_WORKER chunks until none are left. An actor that
    dies (its process, or its whole node) hands its chunks back to the queue for the live actors,
    and a replacement is started that serves once it is up (on a node that is gone it never is); a
    chunk whose worker died MAX_TRIES_PER_CHUNK times stays pending for the next run. A chunk in
    `waits_for` (chunk -> chunks it copies duplicate rows from) starts once those are written.
    `teacher_key` names the store's teacher the actors write (None: the first). Returns the chunks
    left pending with the reason. A failed write (disk full) stops the job at once: every
    later write would fail the same way."""
    import ray  # here, not at the top: see ray_cluster
    from ray.exceptions import RayActorError, RayTaskError

    # Here too: the worker's imports (open_clip, seconds) would slow every user of ray_cluster (ablate).
    from zeroseg.pipeline.writer import ChunkWorker

    class RayChunkWorker(ChunkWorker):
        def describe(self) -> dict:  # and its Ray node: two nodes can share a host
            return {**ChunkWorker.describe(self), "node": ray.get_runtime_context().get_node_id()}

    cpus, gpus = cluster
    share = cpus / n_workers  # CPUs per actor; Ray wants whole numbers above 1
    notify(f"{n_workers} Ray workers x {threads} torch threads ({cpus} CPUs, {gpus} GPUs in the cluster)")
    # No Ray restarts: a restarted actor whose node is gone would wait for room forever, and its
    # retried calls with it. The loop below moves a dead actor's chunks to the live ones instead.
    actor_class = ray.remote(num_cpus=share if share < 1 else min(threads, int(share)), num_gpus=gpus / n_workers,
                             max_restarts=0)(RayChunkWorker)
    every_actor: list = []  # killed on the way out, whatever their state
    starting: dict = {}  # describe() call -> an actor not serving yet
    live: list = []  # actors serving chunks
    load: dict[int, int] = {}  # id(actor) -> its chunks in flight
    in_flight: dict = {}  # process() call -> (actor, chunk)
    queue = collections.deque(pending)
    tries: collections.Counter = collections.Counter()  # chunk -> deaths of the worker doing it
    lost: dict[int, str] = {}
    written: set[int] = set()
    waits_for = waits_for or {}
    replacements = 2 * n_workers

    def start_actor() -> None:
        # Actors can outlive a SIGKILLed driver for a moment: with the job's lock token, each
        # checks before writing a chunk that no new job has taken the store over.
        actor = actor_class.remote(url, teacher, batch, threads, lock_token=lock_token, teacher_key=teacher_key)
        every_actor.append(actor)
        starting[actor.describe.remote()] = actor

    def serve(actor, info: dict) -> None:
        if info["sha256"] != teacher_sha:
            raise UserError(f"worker pid {info['pid']} on {info['host']} loaded a different "
                            f"{teacher.arch} ({info['sha256'][:12]}, store has {teacher_sha[:12]})")
        live.append(actor)
        load[id(actor)] = 0

    def next_ready() -> int | None:
        chunk = next((c for c in queue if waits_for.get(c, set()) <= written), None)
        if chunk is not None:
            queue.remove(chunk)
        return chunk

    def fill() -> None:
        for depth in range(IN_FLIGHT_PER_WORKER):  # idle actors first
            for actor in live:
                if load[id(actor)] == depth and takes_another(depth, len(queue), len(live)) and (chunk := next_ready()) is not None:
                    in_flight[actor.process.remote(chunk)] = (actor, chunk)
                    load[id(actor)] += 1

    def named(info: dict) -> str:
        return f"pid {info['pid']} on {info['host']} node {info['node'][:8]}"

    try:
        for _ in range(n_workers):
            start_actor()
        first = list(starting.items())
        infos = ray.get([ref for ref, _ in first])
        starting.clear()
        for (_, actor), info in zip(first, infos):
            serve(actor, info)
        notify("workers: " + ", ".join(named(i) for i in infos))
        fill()
        while in_flight or (queue and starting):
            # with nothing in flight, only replacements are awaited: a while, not forever
            ready, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=None if in_flight else REPLACEMENT_WAIT_S)
            if not ready:
                break
            [ref] = ready
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    info = ray.get(ref)
                except RayActorError:  # died while starting
                    continue
                serve(actor, info)
                notify(f"worker replaced: {named(info)}")
            else:
                actor, chunk = in_flight.pop(ref)
                load[id(actor)] -= 1
                try:
                    finished(ray.get(ref))
                    written.add(chunk)
                except RayActorError as e:  # the actor is gone: its chunks go to the live ones
                    if actor in live:
                        live.remove(actor)
                        if replacements:
                            replacements -= 1
                            start_actor()
                    tries[chunk] += 1
                    if tries[chunk] < MAX_TRIES_PER_CHUNK:
                        queue.appendleft(chunk)
                    else:
                        lost[chunk] = f"worker died: {str(e).strip().splitlines()[0]}"
                except RayTaskError as e:
                    if isinstance(e.cause, StoreWriteError):  # disk full: the next writes would fail too
                        raise StoreWriteError(str(e.cause)) from None
                    lost[chunk] = f"worker error: {str(e).strip().splitlines()[-1]}"  # a bug, not bad data
            fill()
        for chunk in queue:
            waiting = sorted(waits_for.get(chunk, set()) - written)
            lost[chunk] = (f"copies rows of chunk {waiting[0]}, which was not written" if waiting
                           else "no live worker left")
        return lost
    finally:
        for actor in every_actor:  # none writes after the job ends (nor could: the lock goes with it)
            ray.kill(actor)
