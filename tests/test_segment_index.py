"""`index build --source segments` at scale: the student's tokens staged chunk by chunk in the
index folder (a failed build resumes without recomputing what was staged, and ends with the index
of an uninterrupted build), computed on Ray workers alike, never reused for another student."""

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from synthetic import synthetic_store
from zeroseg.errors import UserError
from zeroseg.segment.neighbours import BuildConfig, build_index
from zeroseg.segment.tokens import RECORD_FILE, STAGING_DIR, StagedTokens
from zeroseg.stores.index import INDEX_FILE, NeighbourIndex
from zeroseg.trainer.config import recipe
from zeroseg.trainer.train import train

N_IMAGES, CHUNK_IMAGES = 24, 4  # 6 chunks


def tiny_student(store_url, run_dir, seed=0, steps=4):
    config = recipe("paper", "tiny", steps=steps, batch=8, grids=(1, 2), checkpoint_every=steps, log_every=2,
                    workers=1, prefetch=2, seed=seed)
    train(store_url, run_dir, config, progress=False)
    return str(run_dir)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_teacher):
    """A store whose views are image files (so one can be taken away) and a student trained on it:
    (store url, image folder, run dir)."""
    root = tmp_path_factory.mktemp("segidx")
    url = str(root / "store.zarr")
    synthetic_store(url, tiny_teacher, N_IMAGES, grids=(1, 2), chunk_images=CHUNK_IMAGES, pixels=False,
                    image_dir=root / "images")
    return url, root / "images", tiny_student(url, root / "run")


@pytest.fixture(scope="module")
def one_process(student, tmp_path_factory):
    """The uninterrupted build in this process (--workers 1): its index folder."""
    url, _, run = student
    out = tmp_path_factory.mktemp("one") / "ix"
    build_index(url, out, BuildConfig(source="segments", checkpoint=run))
    return out


def staged(out) -> dict[str, dict[str, np.ndarray]]:
    """Every staged chunk file's arrays, by file name."""
    result = {}
    for path in sorted((out / STAGING_DIR).glob("chunk-*.npz")):
        with np.load(path) as f:
            result[path.name] = {"ids": f["ids"], "vectors": f["vectors"]}
    return result


def assert_same_index(a, b) -> None:
    """Same index file bit for bit (vectors, ids, order), and same staged tokens."""
    assert (a / INDEX_FILE).read_bytes() == (b / INDEX_FILE).read_bytes()
    x, y = staged(a), staged(b)
    assert x.keys() == y.keys() and len(x) == N_IMAGES // CHUNK_IMAGES
    for name in x:
        for key in ("ids", "vectors"):
            assert x[name][key].tobytes() == y[name][key].tobytes(), (name, key)


def file_stamps(out) -> dict[str, tuple[int, int]]:
    """Staged chunk file -> (inode, mtime in ns): a chunk computed again is a new file."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / STAGING_DIR).glob("chunk-*.npz")}


def test_a_failed_build_resumes_without_recomputing_and_equals_an_uninterrupted_one(student, one_process, tmp_path):
    url, images, run = student
    out = tmp_path / "ix"
    # A real failure in chunk 3: one of its image files is gone, so the student cannot see it.
    gone = images / "000013.png"
    gone.rename(tmp_path / "aside.png")
    with pytest.raises(UserError, match="cannot read image 13"):
        build_index(url, out, BuildConfig(source="segments", checkpoint=run))
    first = file_stamps(out)
    assert sorted(first) == [f"chunk-{i:06d}.npz" for i in range(3)]  # chunks 0-2 staged, in order
    assert not (out / INDEX_FILE).exists()

    (tmp_path / "aside.png").rename(gone)
    meta = build_index(url, out, BuildConfig(source="segments", checkpoint=run))
    after = file_stamps(out)
    assert {name: after[name] for name in first} == first  # the staged chunks were not computed again
    assert len(after) == 6 and meta.count == NeighbourIndex.open(one_process).meta.count
    assert_same_index(out, one_process)


def test_a_rebuild_with_another_kind_reads_the_staged_tokens(student, one_process, tmp_path):
    import shutil

    url, _, run = student
    out = tmp_path / "ix"
    shutil.copytree(one_process, out)
    before = file_stamps(out)
    meta = build_index(url, out, BuildConfig(source="segments", checkpoint=run, kind="hnsw"))
    assert meta.kind == "hnsw" and meta.count == NeighbourIndex.open(one_process).meta.count
    assert file_stamps(out) == before


def test_two_ray_workers_stage_what_one_process_does(student, one_process, tmp_path, ray_session):
    url, _, run = student
    build_index(url, tmp_path / "ix", BuildConfig(source="segments", checkpoint=run, workers=2))
    assert_same_index(tmp_path / "ix", one_process)


def kill_token_workers(how_many: int) -> int:
    """SIGKILL up to how_many of Ray's TokenWorker processes (found by the process title Ray gives
    them, in /proc); returns how many were killed."""
    killed = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes()
        except OSError:  # gone meanwhile
            continue
        if killed < how_many and b"TokenWorker" in title and int(cmdline.parent.name) != os.getpid():
            os.kill(int(cmdline.parent.name), signal.SIGKILL)
            killed += 1
    return killed


@pytest.mark.parametrize("deaths", [1, 2])
def test_a_dead_token_worker_s_chunks_go_to_the_live_one(student, one_process, tmp_path, ray_session, monkeypatch,
                                                          deaths):
    """One of two workers SIGKILLed after the first chunk is staged: the live one computes the dead
    one's chunks and the index is the one-process build's. Both killed: one line, the staged
    chunks kept, and the same command finishes the build to the same index."""
    url, _, run = student
    write, killed = StagedTokens.write, []

    def write_then_kill(self, chunk, ids, vectors):
        write(self, chunk, ids, vectors)
        if not killed:
            killed.append(kill_token_workers(deaths))

    monkeypatch.setattr(StagedTokens, "write", write_then_kill)
    out = tmp_path / "ix"
    config = BuildConfig(source="segments", checkpoint=run, workers=2)
    if deaths == 1:
        build_index(url, out, config)
    else:
        with pytest.raises(UserError, match="a token worker died .*no live worker left; what was staged is kept"):
            build_index(url, out, config)
        assert 1 <= len(staged(out)) < N_IMAGES // CHUNK_IMAGES and not (out / INDEX_FILE).exists()
        monkeypatch.setattr(StagedTokens, "write", write)
        build_index(url, out, config)
    assert killed == [deaths]
    assert_same_index(out, one_process)


def test_another_checkpoint_does_not_reuse_staged_tokens(student, one_process, tmp_path, capsys):
    import json
    import shutil

    url, _, run = student
    other = tiny_student(url, tmp_path / "other", seed=1, steps=2)
    out = tmp_path / "ix"
    shutil.copytree(one_process, out)  # staged by the first student
    before = file_stamps(out)
    meta = build_index(url, out, BuildConfig(source="segments", checkpoint=other))
    assert "6 staged chunks of another checkpoint deleted" in capsys.readouterr().err
    after = file_stamps(out)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)  # every chunk anew
    assert json.loads((out / STAGING_DIR / RECORD_FILE).read_text())["checkpoint_sha256"] == meta.checkpoint["sha256"]

    fresh = tmp_path / "fresh"
    build_index(url, fresh, BuildConfig(source="segments", checkpoint=other))
    assert_same_index(out, fresh)  # nothing of the first student's left in it
    assert (out / INDEX_FILE).read_bytes() != (one_process / INDEX_FILE).read_bytes()


@pytest.mark.parametrize("args, words", [
    (["--workers", "2"], "for --source segments"),
    (["--source", "segments", "--checkpoint", "RUN", "--address", "127.0.0.1:1"], "give --workers too"),
    (["--source", "segments", "--checkpoint", "RUN", "--workers", "0"], "at least 1"),
])
def test_workers_options_that_do_not_fit_are_one_line(student, tmp_path, monkeypatch, capsys, args, words):
    from zeroseg.cli import main

    url, _, run = student
    argv = ["zeroseg", "index", "build", url, "--out", str(tmp_path / "ix"), *[run if a == "RUN" else a for a in args]]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ix").exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_build_then_the_same_command_finishes_it(student, tmp_path, tiny_teacher, request, workers):
    import subprocess
    import time
    from pathlib import Path

    _, _, run = student  # the student loads on any store of its teacher
    url = str(tmp_path / "store.zarr")
    synthetic_store(url, tiny_teacher, 96, grids=(1, 2), chunk_images=1, seed=3)  # 96 chunks
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    build_index(url, whole, BuildConfig(source="segments", checkpoint=run))

    cmd = [sys.executable, "-m", "zeroseg", "index", "build", url, "--source", "segments", "--checkpoint", run,
           "--out", str(killed), "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_AUTH_MODE": "disabled"}
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline and not list((killed / STAGING_DIR).glob("chunk-*")):
            time.sleep(0.005)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the build and, with workers, its Ray (same process group)
        job.wait()
    first = file_stamps(killed)
    assert 0 < len(first) < 96 and not (killed / INDEX_FILE).exists(), "the kill must land mid-build"

    if workers > 1:
        request.getfixturevalue("ray_session")  # the re-run here: on the tests' one Ray
    build_index(url, killed, BuildConfig(source="segments", checkpoint=run, workers=workers))
    after = file_stamps(killed)
    assert {name: after[name] for name in first} == first and len(after) == 96
    assert not list((killed / STAGING_DIR).glob(".*.tmp"))  # a write cut by the kill is cleared
    assert (killed / INDEX_FILE).read_bytes() == (whole / INDEX_FILE).read_bytes()
