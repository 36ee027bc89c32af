"""SIGKILL the extraction driver mid-job, re-run the same command: only the pending chunks are
done, and the store is bit-identical to an uninterrupted run's (issue: resume)."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from images import write_good
from test_extract import assert_same_store, wait_for_a_written_chunk
from zeroseg.stores.features import FeatureStore

ROOT = Path(__file__).resolve().parent.parent


def extract_command(images: Path, store: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "zeroseg", "extract", str(images), str(store), "--grids", "1,2,3,4",
            "--view-size", "64", "--chunk-images", "4", "--batch", "60", "--pixels", "--workers", str(workers)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def kill_mid_job(cmd: list[str], store: Path) -> None:
    """Start the extract job and SIGKILL its driver once a first chunk is written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_a_written_chunk(job, store)
        os.kill(job.pid, signal.SIGKILL)  # the driver only: its Ray workers die with it
        job.wait()
    finally:
        if job.poll() is None:
            os.kill(job.pid, signal.SIGKILL)
    # Ray leaves helper processes behind when its driver is SIGKILLed (dashboard and runtime-env
    # agents): they are in the job's own process group, so end them with it.
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_rerun_gives_a_bit_identical_store(tmp_path, workers):
    write_good(tmp_path / "imgs", 40, size=48)
    whole, killed = tmp_path / "whole.zarr", tmp_path / "killed.zarr"
    assert run(extract_command(tmp_path / "imgs", whole, workers)).returncode == 0

    kill_mid_job(extract_command(tmp_path / "imgs", killed, workers), killed)
    pending = FeatureStore.open(str(killed)).pending_chunks()
    assert 0 < len(pending) < 10, "the kill must land mid-job"

    again = run(extract_command(tmp_path / "imgs", killed, workers))
    assert again.returncode == 0, again.stderr
    assert "taking over a stale lock" in again.stderr and "no longer running" in again.stderr
    # Only pending chunks are redone (a killed driver's Ray workers may finish one or two more
    # before they notice: they stop writing once the new job holds the lock).
    todo = int(re.search(r"(\d+) to do in", again.stderr).group(1))
    assert todo <= len(pending) * 4 and f"{todo} this run" in again.stderr
    assert_same_store(str(whole), str(killed))


@pytest.mark.slow
def test_a_resume_with_another_worker_count_is_refused_then_a_plain_resume_is_identical(tmp_path):
    """Killed with 2 workers (1 torch thread each on 2 CPUs); --workers 1 would run 2 threads and
    change the last bits: refused, nothing written. Without --workers the job keeps 1 thread each."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs for 2 workers of 1 thread")
    write_good(tmp_path / "imgs", 40, size=48)
    whole, killed = tmp_path / "whole.zarr", tmp_path / "killed.zarr"
    assert run(extract_command(tmp_path / "imgs", whole, 2)).returncode == 0
    kill_mid_job(extract_command(tmp_path / "imgs", killed, 2), killed)
    pending = FeatureStore.open(str(killed)).pending_chunks()
    assert 0 < len(pending) < 10, "the kill must land mid-job"

    refused = run(extract_command(tmp_path / "imgs", killed, 1))
    assert refused.returncode == 2, refused.stderr
    line = " ".join(refused.stderr.split())
    assert "was made with 1 torch thread per worker on cpu" in line and "2 threads per worker" in line
    assert "--workers 2" in line and "Traceback" not in line
    # The refused job wrote nothing (the killed driver's own Ray workers may still finish a
    # chunk or two meanwhile, with the store's own threads: they stop once a new job holds the lock).
    assert "to do in" not in refused.stderr

    plain = extract_command(tmp_path / "imgs", killed, 2)
    plain = plain[: plain.index("--workers")]
    again = run(plain)
    assert again.returncode == 0, again.stderr
    assert_same_store(str(whole), str(killed))
