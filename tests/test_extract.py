"""The extraction job in this process (workers=0) and through Ray: features, layout, bad input,
store mismatch, resume and the one-writer lock."""

import hashlib
import heapq
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from images import write_bad_and_odd, write_good
from zeroseg.cli import main
from zeroseg.errors import UserError
from zeroseg.geometry import cut_crops, grid_boxes, training_view
from zeroseg.pipeline import distributor
from zeroseg.pipeline.mapper import embed_chunk
from zeroseg.pipeline.reader import read_views
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.pipeline.writer import ChunkWorker
from zeroseg.stores.features import FeatureStore, StoreError
from zeroseg.stores.schema import Status
from zeroseg.stores.lock import LOCK_NAME, LockedError, StoreLock

GRIDS = (1, 2)
SMALL = ExtractConfig(grids=GRIDS, view_size=32, batch=20, chunk_images=4, workers=0)


def quiet(_msg: str) -> None:
    pass


class CliResult:
    def __init__(self, exit_code: int, output: str):
        self.exit_code, self.output = exit_code, output


def zeroseg(capsys, *args: str) -> CliResult:
    """Run the real entry point (main(): one-line errors, exit 2) in this process."""
    capsys.readouterr()
    old = sys.argv
    sys.argv = ["zeroseg", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return CliResult(code, out.out + out.err)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root -> sha256 of its bytes: 'untouched' means equal digests."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def store_arrays(url: str) -> dict[str, np.ndarray]:
    s = FeatureStore.open(url)
    return {"features": s.features[:], "status": s.status(), "errors": s.errors(), "sizes": s.sizes(),
            "paths": s.paths(), "boxes": s.boxes, **({"pixels": s.pixels[:]} if s.has_pixels else {})}


def assert_same_store(a: str, b: str) -> None:
    x, y = store_arrays(a), store_arrays(b)
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
        if x[key].dtype.kind in "fiu":
            assert x[key].tobytes() == y[key].tobytes(), key  # bit for bit
        else:
            assert list(x[key]) == list(y[key]), key


def wait_for_a_written_chunk(job: subprocess.Popen, store: Path, timeout_s: float = 300) -> None:
    """Until the job (a running `extract`) has written its first chunk to STORE, or ended."""
    deadline = time.monotonic() + timeout_s
    while job.poll() is None and time.monotonic() < deadline:
        try:
            if (FeatureStore.open(str(store)).status() != Status.PENDING).any():
                return
        except StoreError:  # not created yet
            pass
        time.sleep(0.02)


def test_features_equal_a_direct_teacher_forward(tmp_path, tiny_teacher):
    paths = write_good(tmp_path / "imgs", 5)
    url = str(tmp_path / "s.zarr")
    summary = run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    assert (summary.ok, summary.failed, summary.pending) == (5, 0, 0)
    store = FeatureStore.open(url)
    np.testing.assert_array_equal(store.boxes, grid_boxes(GRIDS))
    views = np.stack([training_view(Image.open(p), 32) for p in paths])
    direct = tiny_teacher.encode_images(cut_crops(torch.from_numpy(views), grid_boxes(GRIDS), 64)).numpy()
    stored = store.features[:].astype(np.float32).reshape(5 * 5, 128)
    np.testing.assert_allclose(stored, direct, rtol=1e-3, atol=1e-3)  # float16 storage
    assert (store.sizes() == [40, 48]).all()
    assert store.extract_options["grids"] == [1, 2] and store.extract_options["batch"] == 20


def test_crops_follow_the_grid_layout(tmp_path, tiny_teacher):
    """A view of four coloured quadrants: the 2x2 crops, row-major, are exactly those colours."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # TL, TR, BL, BR
    img = np.zeros((32, 32, 3), np.uint8)
    for k, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        img[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = colours[k]
    (tmp_path / "imgs").mkdir()
    Image.fromarray(img).save(tmp_path / "imgs" / "quad.png")
    url = str(tmp_path / "s.zarr")
    run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    feats = FeatureStore.open(url).features[0].astype(np.float32)  # (5, 128)
    solid = torch.tensor(colours, dtype=torch.float32).div(255).view(4, 3, 1, 1).expand(4, 3, 64, 64)
    np.testing.assert_allclose(feats[1:], tiny_teacher.encode_images(solid).numpy(), rtol=1e-3, atol=1e-3)
    # and the 1x1 crop is none of them
    assert np.abs(feats[0] - feats[1]).max() > 0.05


def test_bad_input_is_data_not_a_crash(tmp_path, capsys):
    expect = write_bad_and_odd(tmp_path / "imgs")
    good = write_good(tmp_path / "imgs", 1)[0]
    manifest = tmp_path / "list.txt"
    names = sorted(expect)
    lines = [str(tmp_path / "imgs" / n) for n in names] + [str(tmp_path / "imgs" / "vanished.png"), str(good), str(good)]
    manifest.write_text("\n".join(lines))
    result = zeroseg(capsys, "extract", manifest, tmp_path / "s.zarr", "--grids", "1,2", "--view-size", "32",
                     "--chunk-images", "5", "--workers", "0")
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    status, errors, feats = store.status(), store.errors(), store.features[:]
    for i, name in enumerate(names):
        if expect[name] == "ok":
            assert status[i] == Status.OK and errors[i] == "" and np.abs(feats[i]).sum(axis=1).min() > 0, name
        else:
            assert status[i] == Status.FAILED and errors[i].split(":")[0] == expect[name], (name, errors[i])
            assert (feats[i] == 0).all()
    assert status[-3] == Status.FAILED and errors[-3].startswith("missing")
    assert status[-2] == status[-1] == Status.OK  # the same file twice: two rows, equal features
    np.testing.assert_array_equal(feats[-2], feats[-1])
    n_ok = sum(v == "ok" for v in expect.values()) + 2
    n_failed = len(lines) - n_ok
    assert f"{n_ok} ok, {n_failed} failed, 0 pending" in result.output
    assert "2 too large" in result.output and "1 missing" in result.output and "1 corrupt" in result.output


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_nothing_to_extract_exits_2(tmp_path, what, capsys):
    (tmp_path / "empty").mkdir()
    result = zeroseg(capsys, "extract", tmp_path / what, tmp_path / "s.zarr", "--workers", "0")
    assert result.exit_code == 2 and not (tmp_path / "s.zarr").exists()
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path, capsys):
    write_good(tmp_path / "images", 1)
    result = zeroseg(capsys, "extract", tmp_path / "images", tmp_path / "s.zarr", "--workers", "0", "--device", "cuda")
    assert result.exit_code == 2 and not (tmp_path / "s.zarr").exists()
    assert result.output.strip() == "error: --device cuda: torch sees no CUDA device here"


@pytest.mark.parametrize("change, words", [
    ({"--grids": "1,2,3"}, "grids: asked 1,2,3, store has 1,2"),
    ({"--view-size": "48"}, "view_size: asked 48, store has 32"),
    ({"--chunk-images": "8"}, "made with chunk_images 4, asked 8"),
])
def test_mismatch_through_the_cli_exits_2_and_touches_nothing(tmp_path, change, words, capsys):
    """(Another teacher is not a mismatch: it is added beside the first, tests/test_teachers.py.)"""
    write_good(tmp_path / "imgs", 3)
    options = {"--grids": "1,2", "--view-size": "32", "--chunk-images": "4", "--workers": "0"}

    def extract(options):
        flat = [x for pair in options.items() for x in pair]
        return zeroseg(capsys, "extract", tmp_path / "imgs", tmp_path / "s.zarr", *flat)

    assert extract(options).exit_code == 0
    before = tree_digest(tmp_path / "s.zarr")
    result = extract({**options, **change})
    assert result.exit_code == 2, result.output
    assert words in result.output.replace("\n", " ")
    assert tree_digest(tmp_path / "s.zarr") == before


def test_a_listing_that_shares_no_image_with_the_store_is_refused(tmp_path):
    """(A grown listing is appended: tests/test_append.py.)"""
    write_good(tmp_path / "imgs", 3)
    url = str(tmp_path / "s.zarr")
    run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    before = tree_digest(tmp_path / "s.zarr")
    write_good(tmp_path / "other", 1, prefix="extra")
    with pytest.raises(UserError, match="holds 3 images, none of them in .* \\(1 images\\)"):
        run_extract(str(tmp_path / "other"), url, SMALL, notify=quiet)
    assert tree_digest(tmp_path / "s.zarr") == before


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_urls(tmp_path, scheme):
    write_good(tmp_path / "imgs", 3)
    url = f"file://{tmp_path}/s.zarr" if scheme == "file" else f"memory://extract-{tmp_path.name}"
    summary = run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    assert summary.ok == 3
    plain = str(tmp_path / "plain.zarr")
    run_extract(str(tmp_path / "imgs"), plain, SMALL, notify=quiet)
    assert_same_store(url, plain)
    with pytest.raises(UserError, match="memory:// store lives inside one process"):
        run_extract(str(tmp_path / "imgs"), "memory://x", ExtractConfig(workers=2), notify=quiet)


def test_resume_after_a_partial_chunk_is_bit_identical(tmp_path, tiny_teacher):
    write_good(tmp_path / "imgs", 10)
    config = ExtractConfig(**{**SMALL.__dict__, "pixels": True})
    whole = str(tmp_path / "whole.zarr")
    run_extract(str(tmp_path / "imgs"), whole, config, notify=quiet)
    # A job that did chunk 1, then died while writing chunk 2: features there, status not.
    resumed = str(tmp_path / "resumed.zarr")
    with pytest.raises(KeyboardInterrupt):
        def die_after_first(result):
            raise KeyboardInterrupt
        run_extract(str(tmp_path / "imgs"), resumed, config, notify=quiet, progress=die_after_first)
    store = FeatureStore.open(resumed, mode="r+")
    assert store.pending_chunks() == [1, 2]
    store.features[8:10] = np.full((2, 5, 128), 7, np.float16)
    assert not (tmp_path / "resumed.zarr" / LOCK_NAME).exists()  # released on the way out
    summary = run_extract(str(tmp_path / "imgs"), resumed, config, notify=quiet)
    assert summary.done_this_run == 6 and summary.pending == 0
    assert_same_store(whole, resumed)


def test_embed_chunk_batches_whole_images(tmp_path, tiny_teacher):
    paths = [str(p) for p in write_good(tmp_path, 3)]
    one = embed_chunk(tiny_teacher, read_views(paths, 32, GRIDS), 3, 32, batch=5, boxes=grid_boxes(GRIDS))  # 1 image per forward
    three = embed_chunk(tiny_teacher, read_views(paths, 32, GRIDS), 3, 32, batch=1000, boxes=grid_boxes(GRIDS))
    np.testing.assert_allclose(one.features.astype(np.float32), three.features.astype(np.float32), atol=2e-3)
    assert one.views.shape == (3, 32, 32, 3) and (one.status == Status.OK).all()


# ---- the lock ----------------------------------------------------------------------------


def test_a_second_writer_is_refused(tmp_path, capsys):
    write_good(tmp_path / "imgs", 3)
    url = str(tmp_path / "s.zarr")
    run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    FeatureStore.open(url, mode="r+").group["images/status"][:] = 0  # as if still to do
    with StoreLock(url):
        result = zeroseg(capsys, "extract", tmp_path / "imgs", url, "--grids", "1,2", "--view-size", "32",
                         "--workers", "0")
        assert result.exit_code == 2
        assert f"is being written by pid {os.getpid()} on {socket.gethostname()}" in result.output.replace("\n", " ")
    assert FeatureStore.open(url).pending_chunks() == [0]  # the refused job wrote nothing
    assert run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet).ok == 3  # free again


def write_lock(url: str, **owner) -> None:
    Path(url, LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                "started": time.time(), "heartbeat": time.time(),
                                                "token": "other", **owner}))


def test_stale_locks_are_taken_over_with_a_notice(tmp_path):
    url = str(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    notices = []
    write_lock(url, pid=dead.pid)  # a SIGKILLed driver on this host
    with StoreLock(url, notify=notices.append):
        pass
    assert "no longer running" in notices[-1] and not Path(url, LOCK_NAME).exists()
    write_lock(url, host="elsewhere", heartbeat=time.time() - 3600)  # a silent driver elsewhere
    with StoreLock(url, stale_s=60, notify=notices.append):
        pass
    assert "no heartbeat for 3600 s" in notices[-1]
    write_lock(url, host="elsewhere", pid=1)  # alive elsewhere, fresh heartbeat
    with pytest.raises(LockedError, match="pid 1 on elsewhere"):
        StoreLock(url, notify=notices.append).acquire()


def test_the_heartbeat_moves(tmp_path):
    lock = StoreLock(str(tmp_path), heartbeat_s=0.05).acquire()
    first = lock.read()["heartbeat"]
    time.sleep(0.3)
    assert lock.read()["heartbeat"] > first
    lock.release()
    assert lock.read() is None


# ---- through Ray ---------------------------------------------------------------------------
# Each of 2 actors on 2 CPUs runs 1 torch thread. The in-process reference runs 1 thread too:
# a different thread count may flip the last float16 bit of a few values (the GEMM's summation
# order changes), which would hide a real difference in the comparison.


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ray_with_two_workers_equals_in_process(tmp_path, ray_session, one_thread):
    write_good(tmp_path / "imgs", 8)
    local, pooled = str(tmp_path / "local.zarr"), str(tmp_path / "ray.zarr")
    run_extract(str(tmp_path / "imgs"), local, SMALL, notify=quiet)
    notices = []
    summary = run_extract(str(tmp_path / "imgs"), pooled, ExtractConfig(**{**SMALL.__dict__, "workers": 2}),
                          notify=notices.append)
    assert summary.ok == 8 and not summary.lost_chunks
    assert any(n.startswith("2 Ray workers x 1 torch threads") for n in notices)
    assert_same_store(local, pooled)


@pytest.mark.slow
def test_a_killed_ray_worker_is_restarted_and_its_chunk_redone(tmp_path, ray_session, one_thread):
    write_good(tmp_path / "imgs", 16)
    local, pooled = str(tmp_path / "local.zarr"), str(tmp_path / "ray.zarr")
    config = ExtractConfig(**{**SMALL.__dict__, "chunk_images": 2})
    run_extract(str(tmp_path / "imgs"), local, config, notify=quiet)
    killed = []

    def kill_one_worker(message: str) -> None:
        pids = re.findall(r"pid (\d+) on", message)
        if message.startswith("workers:") and pids:
            def after_the_first_chunk():  # SIGKILL the first actor's process mid-job
                while (FeatureStore.open(pooled).status() == Status.PENDING).all():
                    time.sleep(0.02)
                os.kill(int(pids[0]), 9)
                killed.append(len(FeatureStore.open(pooled).pending_chunks()))
            threading.Thread(target=after_the_first_chunk).start()

    summary = run_extract(str(tmp_path / "imgs"), pooled, ExtractConfig(**{**config.__dict__, "workers": 2}),
                          notify=kill_one_worker)
    assert killed and killed[0] > 0  # chunks were still to do when the worker died
    assert summary.pending == 0 and summary.ok == 16 and not summary.lost_chunks
    assert_same_store(local, pooled)


def test_a_worker_whose_job_lost_the_lock_writes_nothing(tmp_path, tiny_teacher):
    write_good(tmp_path / "imgs", 3)
    url = str(tmp_path / "s.zarr")
    run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    FeatureStore.open(url, mode="r+").group["images/status"][:] = 0
    with StoreLock(url):  # a new job holds the store; the old job's worker has another token
        worker = ChunkWorker(url, tiny_teacher, batch=20, lock_token="old-job")
        with pytest.raises(LockedError, match="lost the lock before writing chunk 0"):
            worker.process(0)
    assert FeatureStore.open(url).pending_chunks() == [0]


def makespan(seconds: list[float], actors: int, takes) -> float:
    """When the last of the chunks (`seconds` each) is done, handed out as run_on_ray's fill does:
    idle actors first, then those `takes(in_flight, queued, actors)` allows; each actor does its
    chunks in order, the driver's round trip taken as nothing."""
    queue, queues, free_at, done = list(range(len(seconds))), [[] for _ in range(actors)], [0.0] * actors, 0.0
    events: list[tuple[float, int]] = []

    def fill(now: float) -> None:
        for depth in range(distributor.IN_FLIGHT_PER_WORKER):
            for a in range(actors):
                if len(queues[a]) == depth and takes(depth, len(queue), actors) and queue:
                    queues[a].append(queue.pop(0))
        for a in range(actors):
            if queues[a] and free_at[a] <= now:  # an idle actor starts its next chunk
                free_at[a] = now + seconds[queues[a][0]]
                heapq.heappush(events, (free_at[a], a))

    fill(0.0)
    while events:
        now, a = heapq.heappop(events)
        queues[a].pop(0)
        done = max(done, now)
        fill(now)
    return done


def test_the_last_chunks_go_one_to_each_actor():
    """Over random chunk times, the rule ends jobs sooner than keeping two chunks in flight per
    actor to the end (which can leave an actor idle beside another's queued chunk), and never later
    than the greedy bound (total / actors + the longest chunk)."""
    always_two = lambda in_flight, queued, actors: in_flight < distributor.IN_FLIGHT_PER_WORKER  # noqa: E731
    ours, theirs = [], []
    for seed in range(300):
        rng = random.Random(seed)
        actors, seconds = rng.randint(2, 4), [rng.uniform(0.5, 1.5) for _ in range(rng.randint(3, 30))]
        bound = max(sum(seconds) / actors, max(seconds))
        ours.append(makespan(seconds, actors, distributor.takes_another) / bound)
        theirs.append(makespan(seconds, actors, always_two) / bound)
        assert ours[-1] <= 1 + max(seconds) / bound + 1e-9
    assert np.mean(ours) < np.mean(theirs) and max(ours) < max(theirs)
    # a busy actor takes no second chunk when no more are queued than there are actors
    assert not distributor.takes_another(1, 2, 2) and distributor.takes_another(1, 3, 2) and distributor.takes_another(0, 1, 2)
