"""Data-parallel training (`train --workers N`): replicas on Ray in a gloo group against the same
run played by one process, their shares of the data, stop and resume, the one-line refusals."""

import csv
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic import synthetic_store
from zeroseg.errors import UserError
from zeroseg.trainer.checkpoint import latest_checkpoint, load_student
from zeroseg.trainer.config import recipe
from zeroseg.trainer.launch import train_on_workers
from zeroseg.trainer.loader import Batches, StoreDataset
from zeroseg.trainer.launch import run_train, train

N_IMAGES, FAILED = 40, (6,)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, tiny_teacher):
    """40 images (1 failed), 32-px views with pixels, chunks of 4: 10 chunks."""
    url = str(tmp_path_factory.mktemp("ddp") / "store.zarr")
    synthetic_store(url, tiny_teacher, N_IMAGES, grids=(1, 2), failed=FAILED, chunk_images=4)
    return url


def tiny_config(**kw):
    defaults = dict(steps=12, batch=8, log_every=1, checkpoint_every=4, lr=2e-3, threads=1, buffer_chunks=1, grids=(1, 2))
    return dataclasses.replace(recipe("paper", "tiny"), **{**defaults, **kw})


def metrics(run_dir, key):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f)]


def test_each_replica_batches_its_own_chunks_of_an_epoch(store_url):
    """Batches of ranks 0 and 1 (batch 3 each): rank r's stream is its shard of the epoch's
    windows in order, the two share no chunk, and a resumed stream is the continuation."""
    read = {}
    for rank in (0, 1):
        dataset = StoreDataset(store_url, seed=2, rank=rank, world_size=2, buffer_chunks=1)
        own = np.concatenate([w.rows for w in dataset.plan.epoch(0, rank, 2)])
        n = len(own) // 3
        with Batches(dataset, 3) as batches:
            got = torch.cat([next(batches)["index"] for _ in range(n)]).numpy()
        np.testing.assert_array_equal(got, own[: 3 * n])
        with Batches(dataset, 3, start_step=2) as batches:
            np.testing.assert_array_equal(next(batches)["index"].numpy(), own[6:9])
        read[rank] = set(own // 4)  # chunks of 4 images
    assert not read[0] & read[1] and read[0] | read[1] == set(range(10))
    # windows of 4 chunks: 10 chunks still split 5 and 5, so the replicas' epochs keep in step
    plan = StoreDataset(store_url, seed=2, buffer_chunks=4).plan
    for epoch in range(3):
        shares = [[c for w in plan.epoch(epoch, rank, 2) for c in w.chunks] for rank in (0, 1)]
        assert len(shares[0]) == len(shares[1]) == 5 and sorted(shares[0] + shares[1]) == list(range(10))


@pytest.mark.slow
def test_two_gloo_workers_train_as_one_process_does_and_resume(store_url, tmp_path, ray_session):
    config = tiny_config()
    # the same data-parallel run played by one process: its replicas one after another
    alone = train(store_url, tmp_path / "alone", config, world_size=2, progress=False)
    workers = train_on_workers(store_url, tmp_path / "workers", config, workers=2)
    assert alone["step"] == workers["step"] == 12
    np.testing.assert_allclose(metrics(tmp_path / "workers", "loss"), metrics(tmp_path / "alone", "loss"), rtol=1e-3)
    assert metrics(tmp_path / "workers", "loss")[-1] < 0.9 * metrics(tmp_path / "workers", "loss")[0]
    # the schedule and step count are a single-process run's of the same global batch
    train(store_url, tmp_path / "single", config, progress=False)
    assert metrics(tmp_path / "single", "lr") == metrics(tmp_path / "workers", "lr")
    assert metrics(tmp_path / "single", "step") == metrics(tmp_path / "workers", "step")
    # the checkpoint is an ordinary one: the single-process loader reads it
    a, _, meta = load_student(tmp_path / "workers")
    b, _, _ = load_student(tmp_path / "alone")
    assert meta["step"] == 12
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4, msg=name)

    # stopped after 5 steps (checkpoint at 4 and 5), resumed by 2 workers: the straight run's weights
    stopped = train_on_workers(store_url, tmp_path / "resumed", config, workers=2, stop_after=5)
    assert stopped["step"] == 5
    run_train(store_url, tmp_path / "resumed", resume=True, workers=2, progress=False)
    c, _, meta_c = load_student(tmp_path / "resumed")
    assert meta_c["step"] == 12
    for (name, x), (_, y) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), name
    strip = lambda p: [r.rsplit(",", 2)[0] for r in (p / "metrics.csv").read_text().splitlines()]
    assert strip(tmp_path / "workers") == strip(tmp_path / "resumed")

    # another world size is refused in one line, before any worker starts
    with pytest.raises(UserError, match="trained by 2 worker\\(s\\), not 1: resume it with --workers 2"):
        run_train(store_url, tmp_path / "resumed", resume=True, progress=False)
    with pytest.raises(UserError, match="trained by 2 worker\\(s\\), not 3"):
        run_train(store_url, tmp_path / "resumed", resume=True, workers=3, progress=False)


def test_what_cannot_be_split_is_refused_in_one_line(store_url, tmp_path):
    with pytest.raises(UserError, match="batch 8 does not split evenly over 3 workers"):
        train_on_workers(store_url, tmp_path / "a", tiny_config(), workers=3)
    with pytest.raises(UserError, match="11 workers, but the store has only 10 chunks to share out"):
        train_on_workers(store_url, tmp_path / "b", tiny_config(batch=11), workers=11)
    with pytest.raises(UserError, match="--workers must be at least 1, not 0"):
        run_train(store_url, tmp_path / "c", workers=0, steps=2)
    with pytest.raises(UserError, match="--address is where --workers N"):
        run_train(store_url, tmp_path / "c", address="127.0.0.1:6379", steps=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def replica_pids() -> list[int]:
    """The live worker processes running a replica (Ray Train's workers: ray::RayTrainWorker...)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return pids


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_in_one_line_and_resume_finishes_it(store_url, tmp_path, ray_session):
    config = tiny_config(steps=60, log_every=4, checkpoint_every=4)
    run = tmp_path / "run"
    failure: list[BaseException] = []

    def start() -> None:
        try:
            train_on_workers(store_url, run, config, workers=2)
        except BaseException as e:  # noqa: BLE001 (handed to the test below)
            failure.append(e)

    thread = threading.Thread(target=start)
    thread.start()
    deadline = time.monotonic() + 120
    while not (run.is_dir() and latest_checkpoint(run)):  # killed once a checkpoint is there
        assert time.monotonic() < deadline and thread.is_alive(), failure
        time.sleep(0.05)
    pids = replica_pids()
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=120)
    assert len(failure) == 1 and isinstance(failure[0], UserError), failure
    assert "died; `train --resume --workers 2` continues from the last checkpoint" in str(failure[0])
    stopped_at = load_student(run)[2]["step"]
    assert stopped_at < 60
    result = run_train(store_url, run, resume=True, workers=2, progress=False)
    assert result["step"] == 60 and load_student(run)[2]["step"] == 60
    assert metrics(run, "step") == list(range(4, 61, 4))
