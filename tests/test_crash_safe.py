"""Crash-safe writes: the lock's heartbeat, text vocabularies, ablation results, run metrics and
checkpoints. Faults are real: a write made to fail (a file-size limit, as a full disk does) or an
exception raised by the storage between two writes, never a mock of the code under test."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from images import write_good
from zeroseg.errors import UserError
from zeroseg.experiments.ablate import run_trial, trial_key
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status, StoreConfig
from zeroseg.stores.lock import LOCK_NAME, LockedError, StoreLock

ROOT = Path(__file__).resolve().parents[1]


def quiet(_msg: str) -> None:
    pass


# ---- the lock ------------------------------------------------------------------------------------


def test_a_reader_never_sees_a_half_written_heartbeat(tmp_path):
    lock = StoreLock(str(tmp_path), heartbeat_s=0.0005).acquire()
    path = tmp_path / LOCK_NAME
    reads, bad = 0, []
    deadline = time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            try:
                held = json.loads(path.read_bytes())
                assert held["token"] == lock.token
            except (ValueError, FileNotFoundError) as e:
                bad.append(repr(e))
            reads += 1
    finally:
        lock.release()
    assert reads > 200
    assert bad == [], f"{len(bad)} of {reads} reads saw a half-written lock: {bad[:3]}"


def test_an_unreadable_lock_is_taken_over_once_it_is_old(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_bytes(b'{"host": "x", "pi')  # a lock cut short (a full disk, a crash mid-write)
    with pytest.raises(LockedError, match="unreadable"):  # fresh: may be a create this instant
        StoreLock(str(tmp_path), notify=quiet).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    notices = []
    with StoreLock(str(tmp_path), notify=notices.append) as lock:
        assert json.loads(path.read_bytes())["token"] == lock.token
    assert "unreadable" in notices[-1] and "3600 s" in notices[-1]


def test_the_in_process_job_checks_its_lock_before_each_chunk(tmp_path):
    write_good(tmp_path / "imgs", 6)
    url = str(tmp_path / "s.zarr")
    config = ExtractConfig(grids=(1, 2), view_size=32, batch=20, chunk_images=2, workers=0)

    def taken_over(_result):  # after the first chunk another job takes the store over
        (Path(url) / LOCK_NAME).write_text(json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "heartbeat": time.time(), "token": "another-job"}))

    with pytest.raises(LockedError, match="lost the lock before writing chunk 1"):
        run_extract(str(tmp_path / "imgs"), url, config, notify=quiet, progress=taken_over)
    assert FeatureStore.open(url).pending_chunks() == [1, 2]


# ---- text vocabularies ----------------------------------------------------------------------------


def text_store(path, teacher):
    cfg = StoreConfig(teacher=teacher.info, grids=(1,), view_size=32, chunk_images=4)
    return FeatureStore.create(str(path), cfg, ["a.png"])


class FailAfter:
    """Make the Nth write to a zarr LocalStore raise, as a crash between two writes would stop
    the writer (the writes before it are on disk, none after)."""

    def __init__(self, monkeypatch, n: int):
        self.n, self.count = n, 0
        original = zarr.storage.LocalStore.set

        async def set_(store, key, value):
            self.count += 1
            if self.count > self.n:
                raise OSError(f"injected crash before write {self.count} ({key})")
            return await original(store, key, value)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)


def test_a_text_write_cut_between_its_parts_leaves_the_old_vocabulary(tmp_path, tiny_teacher, monkeypatch):
    url = str(tmp_path / "s.zarr")
    store = text_store(url, tiny_teacher)
    dim = store.dim
    rng = np.random.default_rng(0)
    old_names, old_emb = ["red", "blue", "green"], rng.standard_normal((3, dim)).astype(np.float32)
    new_names, new_emb = ["cat", "dog", "cow"], rng.standard_normal((3, dim)).astype(np.float32)
    store.write_text("v", old_names, old_emb, ["a {}."])

    writes, cut = None, 0
    while True:  # cut the new write after 0, 1, 2, ... of its writes until one goes through
        with monkeypatch.context() as mp:
            fault = FailAfter(mp, cut)
            try:
                FeatureStore.open(url, mode="r+").write_text("v", new_names, new_emb, ["the {}."])
                writes = fault.count
            except OSError:
                pass
        names, emb = FeatureStore.open(url).read_text("v")
        assert (names, emb.tolist()) in [(old_names, old_emb.tolist()), (new_names, new_emb.tolist())], (
            f"cut after {cut} writes: a mix of the old and the new vocabulary")
        if writes is not None:
            break
        assert names == old_names  # the pointer had not moved: the old one, whole
        FeatureStore.open(url, mode="r+").write_text("v", old_names, old_emb, ["a {}."])  # back to old
        cut += 1
    assert cut >= 3  # the write has parts to be cut between (names, embeddings, attributes)
    assert FeatureStore.open(url).read_text("v")[0] == new_names
    # the re-run completed it and left no partial generations behind
    assert FeatureStore.open(url).vocabularies() == ["v"]


def test_a_text_write_waits_for_the_store_lock(tmp_path, tiny_teacher):
    url = str(tmp_path / "s.zarr")
    store = text_store(url, tiny_teacher)
    emb = np.ones((1, store.dim), np.float32)
    with StoreLock(url):  # an extract job holds the store
        with pytest.raises(LockedError):
            FeatureStore.open(url, mode="r+").write_text("v", ["x"], emb, ["{}"])
    assert FeatureStore.open(url).vocabularies() == []


# ---- ablations ------------------------------------------------------------------------------------

BASE = {"steps": 3, "grids": [1, 2], "mask_ratio": 0.6}


def _job(tmp_path, name="t"):
    return {"trial": name, "seed": 0, "key": f"{name}0", "fields": {}, "config": BASE,
            "run_dir": str(tmp_path / f"{name}-0")}


def test_a_truncated_result_is_a_failed_trial_run_again(tmp_path):
    job = _job(tmp_path)
    run_trial(lambda config, run_dir: {"miou": 0.5}, job)
    result_file = Path(job["run_dir"]) / "result.json"
    full = result_file.read_text()
    result_file.write_text(full[: len(full) // 2])  # as a kill mid-write left it before writes were atomic
    calls = []
    result = run_trial(lambda config, run_dir: calls.append(1) or {"miou": 0.25}, job)
    assert calls == [1] and result["status"] == "ok" and result["miou"] == 0.25


RESULT_UNDER_A_FULL_DISK = """
import resource, signal, sys
sys.path[:0] = [{root!r}]
from zeroseg.experiments.ablate import run_trial
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
job = {job!r}
try:
    run_trial(lambda config, run_dir: {{"miou": 0.9, "log": "x" * 20000}}, job)
except OSError as e:
    print("write failed:", e)
"""


def test_a_result_write_that_fails_leaves_the_previous_result_whole(tmp_path):
    job = _job(tmp_path)
    first = run_trial(lambda config, run_dir: (_ for _ in ()).throw(RuntimeError("diverged")), job)
    assert first["status"] == "failed"
    before = (Path(job["run_dir"]) / "result.json").read_text()
    proc = subprocess.run([sys.executable, "-c", RESULT_UNDER_A_FULL_DISK.format(root=str(ROOT), job=job)],
                          capture_output=True, text=True, timeout=120)
    assert "write failed" in proc.stdout, proc.stdout + proc.stderr
    assert (Path(job["run_dir"]) / "result.json").read_text() == before  # old result, whole
    assert sorted(p.name for p in Path(job["run_dir"]).iterdir() if p.name.endswith(".tmp")) == []


def test_trial_keys_do_not_depend_on_how_the_store_path_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keys = {trial_key(BASE, 0, {"url": url, "n_images": 10}, data)
            for url, data in [("s.zarr", "scenes"), ("./s.zarr", "./scenes/"), ("s.zarr/", str(tmp_path / "scenes")),
                              (str(tmp_path / "s.zarr"), "scenes")]}
    assert len(keys) == 1
    assert trial_key(BASE, 0, {"url": "t.zarr", "n_images": 10}, "scenes") not in keys


# ---- run metrics --------------------------------------------------------------------------------


def test_a_resumed_runs_metrics_survive_a_failed_rewrite(tmp_path, tiny_teacher):
    """RunLog rewrites metrics.csv on resume; a write that fails must not lose the rows."""
    from synthetic import synthetic_store

    url = str(tmp_path / "store.zarr")
    synthetic_store(url, tiny_teacher, 8)
    run = tmp_path / "run"
    code = f"""
import resource, signal, sys
sys.path[:0] = [{str(ROOT)!r}]
from zeroseg.trainer.config import recipe
from zeroseg.trainer.train import train
if sys.argv[1] == "first":
    config = recipe("paper", "tiny", steps=120, batch=4, log_every=1, checkpoint_every=60, threads=1)
    train({url!r}, {str(run)!r}, config, stop_after=60, progress=False)
else:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        train({url!r}, {str(run)!r}, resume=True, stop_after=1, progress=False)
    except OSError as e:
        print("write failed:", e)
"""
    subprocess.run([sys.executable, "-c", code, "first"], check=True, timeout=300)
    before = (run / "metrics.csv").read_text()
    # a disk that holds config.json again but not the metrics rewrite
    limit = (run / "config.json").stat().st_size + 64
    assert len(before.splitlines()) == 61 and len(before) > limit + 256
    proc = subprocess.run([sys.executable, "-c", code, "resume", str(limit)], capture_output=True, text=True,
                          timeout=300)
    assert "write failed" in proc.stdout, proc.stdout + proc.stderr
    assert (run / "metrics.csv").read_text() == before


# ---- checkpoints ----------------------------------------------------------------------------------


def test_a_checkpoint_whose_weights_changed_is_refused(tmp_path, tiny_teacher):
    from synthetic import synthetic_store
    from zeroseg.trainer.checkpoint import MODEL_FILE, find_checkpoint, load_student
    from zeroseg.trainer.config import recipe
    from zeroseg.trainer.train import train

    url = str(tmp_path / "store.zarr")
    synthetic_store(url, tiny_teacher, 8)
    config = recipe("paper", "tiny", steps=1, batch=4, threads=1)
    train(url, tmp_path / "run", config, progress=False)
    weights = find_checkpoint(tmp_path / "run") / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{weights}.*sha256") as e:
        load_student(tmp_path / "run")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="sha256"):
        train(url, tmp_path / "run", resume=True, progress=False)
