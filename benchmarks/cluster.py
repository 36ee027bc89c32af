"""A large job through a two-node local Ray cluster with a node killed in the middle: does it
complete, is the store identical to the in-process run's, and does the driver's memory stay flat
as the job grows (it never holds the features: the workers write them, the driver gets counts)?

Starts a head and a second node (tests/cluster.py: each its own `ray start`, one CPU each),
runs `zeroseg extract --address` over --small and then --images tiny synthetic photographs
(the second run: the second node SIGKILLed once half the chunks are written), and prints each
driver's peak RSS, the run's seconds, and whether the store equals the in-process run's (same
threads per worker: one).

    PYTHONPATH=. python benchmarks/cluster.py --images 20000 --small 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from cluster import LocalCluster  # noqa: E402
from zeroseg.pipeline.runner import ExtractConfig, run_extract  # noqa: E402
from zeroseg.stores.features import FeatureStore, StoreError  # noqa: E402
from zeroseg.stores.schema import Status  # noqa: E402

OPTIONS = ["--grids", "1,2", "--view-size", "32", "--batch", "320", "--chunk-images", "64"]


def write_images(folder: Path, n: int) -> Path:
    """n small random PNGs, as tests/images.py makes them but many: one RNG draw each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    manifest = folder.with_suffix(".txt")
    manifest.write_text("".join(f"{folder / f'{i:06d}.png'}\n" for i in range(n)))
    return manifest


def in_process(manifest: Path, store: Path) -> float:
    torch.set_num_threads(1)  # what each one-CPU node's worker gets
    start = time.perf_counter()
    run_extract(str(manifest), str(store), ExtractConfig(grids=(1, 2), view_size=32, batch=320, chunk_images=64,
                                                         workers=0), notify=lambda _: None)
    return time.perf_counter() - start


def on_cluster(cluster: LocalCluster, manifest: Path, store: Path, kill_at: float | None) -> tuple[int, float, int, str]:
    """(exit code, seconds, the driver's peak RSS in MiB, output) of the job; with `kill_at`, the
    second node is killed once that share of the chunks is written."""
    cmd = [sys.executable, "-m", "zeroseg", "extract", str(manifest), str(store), *OPTIONS,
           "--workers", "2", "--address", cluster.address]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = store.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        while kill_at is not None and job.poll() is None:
            try:
                if (FeatureStore.open(str(store)).status() != Status.PENDING).mean() >= kill_at:
                    cluster.kill_second_node()
                    print(f"  second node killed at {time.perf_counter() - start:.1f} s", flush=True)
                    break
            except StoreError:  # not created yet
                pass
            time.sleep(0.5)
        _, status, usage = os.wait4(job.pid, 0)  # this driver's own peak, not its siblings'
        job.returncode = os.waitstatus_to_exitcode(status)
    return job.returncode, time.perf_counter() - start, usage.ru_maxrss // 1024, log.read_text()


def same_store(a: Path, b: Path) -> bool:
    x, y = FeatureStore.open(str(a)), FeatureStore.open(str(b))
    return (x.features[:].tobytes() == y.features[:].tobytes() and x.status().tobytes() == y.status().tobytes()
            and list(x.errors()) == list(y.errors()) and list(x.paths()) == list(y.paths()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--small", type=int, default=2000, help="images of the first, smaller job")
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of chunks written when the node dies")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zeroseg-cluster-"))
    try:
        runs = [("small", args.small, None), ("large", args.images, args.kill_at)]
        manifests = {name: write_images(work / name, n) for name, n, _ in runs}
        print(f"{', '.join(f'{n} images' for _, n, _ in runs)} ({' '.join(OPTIONS)}), two 1-CPU nodes")
        rows = []
        for name, n, kill_at in runs:
            seconds_local = in_process(manifests[name], work / f"{name}-local.zarr")
            with LocalCluster() as cluster:
                code, seconds, rss, output = on_cluster(cluster, manifests[name], work / f"{name}.zarr", kill_at)
            identical = code == 0 and same_store(work / f"{name}-local.zarr", work / f"{name}.zarr")
            rows.append((n, "yes" if kill_at else "no", code, seconds, seconds_local, rss, identical))
            print("  " + "\n  ".join(line for line in output.splitlines() if line.startswith(("workers", "worker "))), flush=True)
            print("  " + " ".join(output.strip().splitlines()[-2:]), flush=True)
        print("\nimages | node killed | exit | cluster s | in-process s (1 thread) | driver peak RSS MiB | store identical")
        for row in rows:
            print(" | ".join(map(str, row[:3])) + f" | {row[3]:.1f} | {row[4]:.1f} | {row[5]} | {row[6]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
