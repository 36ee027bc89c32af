"""`extract --address` on a two-node Ray cluster started on this machine (issue 13: a real
cluster): actors on both nodes, the store bit-identical to the in-process run; a node killed
mid-job and the job finishes on the other, bit-identical. The cluster and the job run in
subprocesses of their own: this session's Ray (the `ray_session` fixture) is not involved."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster import LocalCluster
from images import write_good
from test_extract import assert_same_store, wait_for_a_written_chunk
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.stores.features import FeatureStore

ROOT = Path(__file__).resolve().parent.parent
# One torch thread per worker: each node has one CPU, so this is what the cluster's workers get.
CONFIG = ExtractConfig(grids=(1, 2), view_size=32, batch=20, chunk_images=2, workers=0)


def extract_on(address: str, images: Path, store: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "zeroseg", "extract", str(images), str(store), "--grids", "1,2", "--view-size", "32",
           "--batch", "20", "--chunk-images", "2", "--workers", "2", "--address", address]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def in_process(images: Path, store: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_extract(str(images), str(store), CONFIG, notify=lambda _: None)
    finally:
        torch.set_num_threads(before)


def worker_nodes(output: str) -> set[str]:
    line = next(line for line in output.splitlines() if line.startswith("workers:"))
    return set(re.findall(r"node (\w+)", line))


@pytest.mark.slow
def test_extract_on_two_nodes_equals_in_process_and_survives_a_node_killed(tmp_path):
    images = tmp_path / "imgs"
    write_good(images, 120)
    in_process(images, tmp_path / "local.zarr")
    with LocalCluster() as cluster:
        job = extract_on(cluster.address, images, tmp_path / "whole.zarr")
        output = job.communicate(timeout=600)[0]
        assert job.returncode == 0, output
        assert len(worker_nodes(output)) == 2, output  # one actor on each node
        assert_same_store(str(tmp_path / "local.zarr"), str(tmp_path / "whole.zarr"))

        store = tmp_path / "killed.zarr"
        job = extract_on(cluster.address, images, store)
        wait_for_a_written_chunk(job, store)
        cluster.kill_second_node()
        left = len(FeatureStore.open(str(store)).pending_chunks())
        output = job.communicate(timeout=600)[0]
    assert left > 0, output  # the node died mid-job
    assert job.returncode == 0, output
    assert len(worker_nodes(output)) == 2, output
    assert_same_store(str(tmp_path / "local.zarr"), str(store))
