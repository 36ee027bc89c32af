"""extract --precision, the teacher's wait for decoded images, and extract --dry-run."""

from __future__ import annotations

import time

import numpy as np
import pytest

from images import write_good
from test_extract import SMALL, quiet, tree_digest, zeroseg
from zeroseg.geometry import grid_boxes
from zeroseg.pipeline.mapper import embed_chunk
from zeroseg.pipeline.reader import read_views
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.pipeline.writer import ChunkWorker, decode_threads
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status, StoreConfig

CLI_SMALL = ["--grids", "1,2", "--view-size", "32", "--chunk-images", "4", "--workers", "0"]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float32), b.reshape(-1, b.shape[-1]).astype(np.float32)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_autocast_features_are_close_to_fp32_and_recorded(tmp_path):
    write_good(tmp_path / "imgs", 4)
    features = {}
    for p in ("fp32", "bf16", "fp16"):  # fp16 autocast works on the CPU too (torch >= 2.4)
        url = str(tmp_path / f"{p}.zarr")
        summary = run_extract(str(tmp_path / "imgs"), url, ExtractConfig(**{**SMALL.__dict__, "precision": p}), notify=quiet)
        assert summary.ok == 4
        store = FeatureStore.open(url)
        assert store.extract_options["precision"] == p
        features[p] = store.features[:]
    for p in ("bf16", "fp16"):
        assert cosines(features["fp32"], features[p]).min() >= 0.99
        assert features["fp32"].tobytes() != features[p].tobytes()  # autocast really ran: not the fp32 bits


def test_a_resume_with_another_precision_is_refused_in_one_line(tmp_path, capsys):
    write_good(tmp_path / "imgs", 6)
    url = tmp_path / "s.zarr"
    # a job that did chunk 0 in bf16 and was stopped: chunk 1 pending
    with pytest.raises(KeyboardInterrupt):
        def stop(_result):
            raise KeyboardInterrupt
        run_extract(str(tmp_path / "imgs"), str(url), ExtractConfig(**{**SMALL.__dict__, "precision": "bf16"}),
                    notify=quiet, progress=stop)
    before = tree_digest(url)
    result = zeroseg(capsys, "extract", tmp_path / "imgs", url, *CLI_SMALL, "--precision", "fp32")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--precision bf16" in result.output
    assert tree_digest(url) == before
    # without --precision the resume takes the store's
    result = zeroseg(capsys, "extract", tmp_path / "imgs", url, *CLI_SMALL)
    assert result.exit_code == 0, result.output
    assert "teacher waited" in result.output  # the summary reports the wait share
    assert FeatureStore.open(str(url)).pending_chunks() == []


def test_an_unknown_precision_is_one_line(tmp_path, capsys):
    write_good(tmp_path / "imgs", 1)
    result = zeroseg(capsys, "extract", tmp_path / "imgs", tmp_path / "s.zarr", *CLI_SMALL, "--precision", "fp8")
    assert result.exit_code == 2 and not (tmp_path / "s.zarr").exists()
    assert result.output.strip() == "error: --precision fp8: choose fp32 | bf16 | fp16"


def test_the_wait_for_decoded_images_is_measured(tmp_path, tiny_teacher):
    paths = [str(p) for p in write_good(tmp_path, 3)]

    def slow_decoder():
        for view in read_views(paths, 32, (1, 2)):
            time.sleep(0.1)
            yield view

    slow = embed_chunk(tiny_teacher, slow_decoder(), 3, 32, batch=20, boxes=grid_boxes((1, 2)))
    assert slow.waited_s >= 0.3 and slow.seconds >= slow.waited_s
    decoded = list(read_views(paths, 32, (1, 2)))  # decoded beforehand: nothing to wait for
    ready = embed_chunk(tiny_teacher, iter(decoded), 3, 32, batch=20, boxes=grid_boxes((1, 2)))
    assert ready.waited_s < 0.05
    np.testing.assert_array_equal(slow.features, ready.features)


def test_the_job_reports_each_chunks_wait_share(tmp_path):
    write_good(tmp_path / "imgs", 6)
    results = []
    summary = run_extract(str(tmp_path / "imgs"), str(tmp_path / "s.zarr"), SMALL, notify=quiet, progress=results.append)
    assert len(results) == 2 and all(r.seconds > 0 and 0 <= r.wait_share <= 1 for r in results)
    assert summary.chunk_s == pytest.approx(sum(r.seconds for r in results))
    assert 0 <= summary.wait_share <= 1


def test_decoding_threads_leave_the_cpu_to_the_teacher():
    assert decode_threads("cpu") == 1
    assert decode_threads("cuda") >= 2


def test_dry_run_prints_the_cost_and_writes_nothing(tmp_path, capsys):
    write_good(tmp_path / "imgs", 3)
    store = tmp_path / "s.zarr"
    result = zeroseg(capsys, "extract", tmp_path / "imgs", store, *CLI_SMALL, "--pixels", "--dry-run")
    assert result.exit_code == 0, result.output
    assert not store.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]
    lines = result.output.splitlines()
    for start in ("images: 3", "crops: 15 (5 per image)", "teacher FLOPs: ", "store on disk: ", "ETA: "):
        assert any(line.startswith(start) for line in lines), (start, result.output)
    assert "pixels" in result.output and "nothing written" in result.output
    # on an existing store: read only, its pending images named
    assert zeroseg(capsys, "extract", tmp_path / "imgs", store, *CLI_SMALL).exit_code == 0
    before = tree_digest(store)
    result = zeroseg(capsys, "extract", tmp_path / "imgs", store, *CLI_SMALL, "--dry-run")
    assert result.exit_code == 0 and "the store exists, 0 images to do" in result.output, result.output
    assert tree_digest(store) == before
    # a grown listing: the images an append would add are to do, and still nothing is written
    write_good(tmp_path / "imgs", 2, prefix="more")
    result = zeroseg(capsys, "extract", tmp_path / "imgs", store, *CLI_SMALL, "--dry-run")
    assert result.exit_code == 0 and "the store exists, 2 images to do" in result.output, result.output
    assert tree_digest(store) == before


def test_the_next_chunk_decodes_while_this_one_is_written(tmp_path, tiny_teacher):
    """A worker told the next chunk decodes it ahead (during this chunk's write); the features are
    those of a worker that was not told."""
    write_good(tmp_path / "imgs", 6)
    config = StoreConfig(teacher=tiny_teacher.info, grids=(1, 2), view_size=32, chunk_images=4)
    paths = [str(p) for p in sorted((tmp_path / "imgs").iterdir())]
    stores = []
    for told in (False, True):
        url = str(tmp_path / f"{told}.zarr")
        FeatureStore.create(url, config, paths)
        worker = ChunkWorker(url, tiny_teacher, SMALL.batch)
        worker.process(0, then=1 if told else None)
        assert list(worker.ahead) == ([1] if told else [])
        worker.process(1)
        assert worker.ahead == {}
        stores.append(FeatureStore.open(url))
    assert (stores[0].status() == Status.OK).all()
    assert stores[0].features[:].tobytes() == stores[1].features[:].tobytes()
