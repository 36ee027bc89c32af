"""Real faults during `extract`: a process killed between the writes of one chunk, a disk that
fills up. Each ends in a store that a re-run finishes bit-identical to an uninterrupted run."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from images import write_good
from test_extract import SMALL, assert_same_store, one_thread, quiet  # noqa: F401 (fixture)
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.stores.features import FeatureStore, StoreWriteError
from zeroseg.stores.schema import Status

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--grids", "1,2", "--view-size", "32", "--chunk-images", "4", "--batch", "20", "--pixels", "--workers", "0"]

# Runs `zeroseg ARGS` in a process that SIGKILLs itself right after the first write that touches
# chunk KILL_CHUNK of any per-image array: with features written first and status last, that
# leaves the chunk's features on disk and its status pending.
KILL_AFTER_FIRST_WRITE_OF_A_CHUNK = """
import os, signal, sys
import zarr
from zeroseg.cli import main

chunk = int(os.environ["KILL_CHUNK"])
write = zarr.Array.__setitem__

def write_then_die(self, key, value):
    write(self, key, value)
    first_row = key.start if isinstance(key, slice) else None
    # (images/hash and images/duplicate_of are written for every pending row before any chunk is embedded)
    chunk_write = self.path.startswith(("crops/", "images/")) and self.path not in ("images/hash", "images/duplicate_of")
    if chunk_write and first_row == chunk * self.chunks[0] and first_row:
        os.kill(os.getpid(), signal.SIGKILL)

zarr.Array.__setitem__ = write_then_die
sys.argv = ["zeroseg", *sys.argv[1:]]
main()
"""


def run(args: list[str], **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", **env}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_kill_between_the_two_writes_of_a_chunk_is_redone(tmp_path):
    write_good(tmp_path / "imgs", 10)
    whole, killed = tmp_path / "whole.zarr", tmp_path / "killed.zarr"
    assert run(["-m", "zeroseg", "extract", str(tmp_path / "imgs"), str(whole), *ARGS]).returncode == 0
    died = run(["-c", KILL_AFTER_FIRST_WRITE_OF_A_CHUNK, "extract", str(tmp_path / "imgs"), str(killed), *ARGS],
               KILL_CHUNK="1")
    assert died.returncode == -9, died.stderr
    store = FeatureStore.open(str(killed))
    assert store.pending_chunks() == [1, 2]  # chunk 1 died half-written: features, no status
    assert (store.features[4:8] != 0).any()
    again = run(["-m", "zeroseg", "extract", str(tmp_path / "imgs"), str(killed), *ARGS])
    assert again.returncode == 0, again.stderr
    assert "6 to do in 2 of 3 chunks" in " ".join(again.stderr.split())
    assert_same_store(str(whole), str(killed))


# ---- out of disk space --------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size at tmp_path/disk (we are root in the dev container); resized by
    calling the returned function again. Skipped where mount is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def size(kib: int) -> Path:
        mounted = os.path.ismount(disk)
        opts = f"remount,size={kib}k" if mounted else f"size={kib}k"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(disk)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root and CAP_SYS_ADMIN")
        return disk

    yield size
    if os.path.ismount(disk):
        subprocess.run(["umount", str(disk)], check=True)


def tmpfs_kib(files) -> int:
    """What FILES take on a tmpfs: whole 4 KiB pages each (their apparent sizes undercount a store
    of small chunk files by a third, which left no room for even one chunk on CI's run)."""
    return sum(-(-f.stat().st_size // 4096) * 4 for f in files)


def room_for_half_the_chunks(store: Path) -> int:
    """KiB for STORE's metadata and write-once arrays plus half of its per-chunk files, with a few
    pages for the lock and the atomic rewrites of the attributes."""
    files = [f.relative_to(store) for f in store.rglob("*") if f.is_file()]
    array_of = {f: Path(*f.parts[:f.parts.index("c")]) for f in files if "c" in f.parts}
    per_chunk = [f for f, array in array_of.items() if len(list((store / array / "c").iterdir())) > 1]
    fixed = [f for f in files if f not in per_chunk]
    fixed, per_chunk = [store / f for f in fixed], [store / f for f in per_chunk]
    return tmpfs_kib(fixed) + tmpfs_kib(per_chunk) // 2 + 3 * 4


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_full_disk_stops_at_the_first_failed_write_and_a_rerun_finishes(tmp_path, small_disk, capsys, workers,
                                                                          request):
    if workers:
        request.getfixturevalue("ray_session")
        request.getfixturevalue("one_thread")
    write_good(tmp_path / "imgs", 24, size=64)
    config = ExtractConfig(**{**SMALL.__dict__, "view_size": 64, "pixels": True, "workers": workers})
    whole = tmp_path / "whole.zarr"
    run_extract(str(tmp_path / "imgs"), str(whole), config, notify=quiet)
    disk = small_disk(room_for_half_the_chunks(whole))
    url = str(disk / "s.zarr")
    with pytest.raises(StoreWriteError, match=r"writing .* of chunk \d+ \(images \d+-\d+\) failed: No space left on device"):
        run_extract(str(tmp_path / "imgs"), url, config, notify=quiet)
    store = FeatureStore.open(url)
    assert 0 < len(store.pending_chunks()) < store.n_chunks  # stopped part way, with whole chunks done
    small_disk(4 * tmpfs_kib(f for f in whole.rglob("*") if f.is_file()))  # space freed
    summary = run_extract(str(tmp_path / "imgs"), url, config, notify=quiet)
    assert summary.pending == 0 and summary.ok == 24
    assert_same_store(str(whole), url)


@pytest.mark.slow
def test_a_full_disk_is_one_line_through_the_cli(tmp_path, small_disk):
    write_good(tmp_path / "imgs", 24, size=64)
    disk = small_disk(64)
    result = run(["-m", "zeroseg", "extract", str(tmp_path / "imgs"), str(disk / "s.zarr"), *ARGS[:2],
                  "--view-size", "64", *ARGS[4:]])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in result.stderr
