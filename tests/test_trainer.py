"""The trainer against real (small) feature stores: loader, train loop, resume, online targets, CLI."""

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic import synthetic_store
from zeroseg.cli import main
from zeroseg.errors import UserError
from zeroseg.stores.features import FeatureStore, StoreError
from zeroseg.stores.schema import Status, StoreConfig
from zeroseg.trainer.checkpoint import load_student, load_student_for, sha256_file
from zeroseg.trainer.config import TrainConfig, recipe
from zeroseg.trainer.loader import Batches, StoreDataset, select_columns
from zeroseg.trainer.model import preset
from zeroseg.trainer.train import train

N_IMAGES, FAILED = 30, (4, 17)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, tiny_teacher):
    """30 images (2 failed), grids 1..4, 32-px views with pixels, chunks of 8."""
    url = str(tmp_path_factory.mktemp("trainer") / "store.zarr")
    synthetic_store(url, tiny_teacher, N_IMAGES, failed=FAILED)
    return url


def tiny_config(**kw) -> TrainConfig:
    # The paper recipe: the plain grouping and losses these tests were written against.
    defaults = dict(steps=8, batch=6, log_every=1, checkpoint_every=4, lr=2e-3, threads=1)
    return dataclasses.replace(recipe("paper", "tiny"), **{**defaults, **kw})


def all_batches(dataset, batch, start_step, n):
    with Batches(dataset, batch, start_step) as batches:
        return [next(batches) for _ in range(n)]


# ---- loader -----------------------------------------------------------------------------------


def test_grid_subset_selects_columns_by_box(store_url):
    store = FeatureStore.open(store_url)
    cols = select_columns(store.boxes, store.config.grids, (1, 2, 3))
    assert cols.index.tolist() == list(range(14))
    assert cols.local.tolist() == [False] + [True] * 13
    cols = select_columns(store.boxes, store.config.grids, (2, 4))
    assert cols.index.tolist() == [1, 2, 3, 4] + list(range(14, 30))
    assert cols.local.all()
    np.testing.assert_allclose(store.boxes[cols.index], cols.boxes)
    with pytest.raises(UserError, match="grids 2,5 asked, the store has only 1,2,3,4"):
        select_columns(store.boxes, store.config.grids, (2, 5))


def test_batches_carry_the_stored_rows_of_ok_images_once_per_epoch(store_url):
    store = FeatureStore.open(store_url)
    dataset = StoreDataset(store, (1, 3), seed=3, buffer_chunks=2)
    cols = dataset.columns
    assert dataset.plan.n_ok == N_IMAGES - len(FAILED)
    batches = all_batches(dataset, 7, 0, 8)  # 56 positions = 2 epochs
    index = torch.cat([b["index"] for b in batches]).numpy()
    ok = sorted(set(range(N_IMAGES)) - set(FAILED))
    assert sorted(index[:28]) == ok and sorted(index[28:56]) == ok  # each epoch: every ok image once
    assert not np.array_equal(index[:28], index[28:56])  # reshuffled each epoch
    assert not np.array_equal(index[:28], np.sort(index[:28]))  # shuffled at all
    for b in batches[:3]:
        rows = b["index"].numpy()
        np.testing.assert_array_equal(b["features"].numpy(), store.features[:][rows][:, cols.index])
        np.testing.assert_array_equal(b["pixels"].numpy(), store.pixels[:][rows])
    assert batches[4]["epoch"] == pytest.approx(28 / 28)


def test_resumed_order_is_the_continuation_and_preload_matches(store_url):
    store = FeatureStore.open(store_url)
    dataset = StoreDataset(store, (1, 2), seed=0, buffer_chunks=3)
    straight = all_batches(dataset, 5, 0, 9)
    resumed = all_batches(dataset, 5, 4, 5)
    preloaded = all_batches(StoreDataset(store, (1, 2), seed=0, buffer_chunks=3, preload=True), 5, 0, 9)
    for a, b in zip(straight[4:], resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["features"], b["features"])
    for a, b in zip(straight, preloaded):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["features"], b["features"])


def test_store_without_pixels_decodes_image_paths(tmp_path, tiny_teacher, store_url):
    url = str(tmp_path / "paths.zarr")
    store = synthetic_store(url, tiny_teacher, 10, grids=(1, 2), pixels=False, image_dir=tmp_path / "img", chunk_images=4)
    assert not store.has_pixels
    with_pixels = FeatureStore.open(store_url)  # same seed: the same first 10 views
    (batch,) = all_batches(StoreDataset(store, (1, 2), seed=0, buffer_chunks=2), 10, 0, 1)
    np.testing.assert_array_equal(batch["pixels"].numpy(), with_pixels.pixels[:10][batch["index"].numpy()])


def test_shards_read_disjoint_chunks_and_together_the_whole_epoch(store_url):
    dataset = StoreDataset(store_url, seed=5, buffer_chunks=1)
    plan, n_shards = dataset.plan, 3  # 4 chunks over 3 shards: shards of unequal length
    for epoch in (0, 1):
        read = []
        for shard in range(n_shards):
            windows = dataset.windows(0, shard, n_shards)
            for _ in range(sum(len(plan.epoch(e, shard, n_shards)) for e in range(epoch))):
                next(windows)  # this shard's earlier epochs
            read += [c for _ in plan.epoch(epoch, shard, n_shards) for c in next(windows)[0].chunks]
        assert sorted(read) == list(range(FeatureStore.open(store_url).n_chunks))  # each chunk by one shard
    # a shard's resumed stream is its continuation
    shard = dict(seed=5, rank=1, world_size=2, buffer_chunks=2)
    straight = [b["index"] for b in itertools.islice(StoreDataset(store_url, **shard), 40)]
    resumed = [b["index"] for b in itertools.islice(StoreDataset(store_url, **shard, start=13), 27)]
    assert resumed == straight[13:]
    with pytest.raises(UserError, match="5 shards, but the store has only 4 chunks"):
        next(iter(StoreDataset(store_url, rank=1, world_size=5)))


def test_the_dataset_in_a_dataloader_gives_views_and_their_targets(store_url):
    store = FeatureStore.open(store_url)
    loader = torch.utils.data.DataLoader(StoreDataset(store_url, (1, 2), buffer_chunks=1), batch_size=4, num_workers=2)
    seen = []
    for batch in itertools.islice(loader, 7):  # 28 images: one epoch's worth from the two workers
        rows = batch["index"].numpy()
        assert batch["pixels"].shape == (4, 32, 32, 3) and batch["features"].shape == (4, 5, store.dim)
        np.testing.assert_array_equal(batch["features"].numpy(), store.features[:][rows][:, :5])
        np.testing.assert_array_equal(batch["pixels"].numpy(), store.pixels[:][rows])
        seen += rows.tolist()
    assert not set(seen) & set(FAILED)


# ---- training ---------------------------------------------------------------------------------


def test_tiny_run_loss_falls_and_writes_its_run_dir(store_url, tmp_path):
    config = tiny_config(steps=60, batch=8, log_every=10, checkpoint_every=30, lr=3e-3)
    result = train(store_url, tmp_path / "run", config, progress=False)
    run = tmp_path / "run"
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "epoch", "lr", "loss", "distill", "match", "mae", "cover", "region", "assign", "steps_per_s", "data_wait"]
    losses = [float(r.split(",")[3]) for r in rows[1:]]
    assert all(0 <= float(r.split(",")[-1]) <= 1 for r in rows[1:])  # the share of time spent waiting for data
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses
    assert (run / "loss_curve.png").stat().st_size > 0
    assert list(run.glob("events.out.tfevents.*"))
    assert json.loads((run / "config.json").read_text())["config"]["model"]["out_dim"] == 128

    model, cfg, meta = load_student(run)
    assert meta["step"] == 60 and result["step"] == 60
    assert meta["sha256"] == sha256_file(run / "checkpoint-0000060" / "model.safetensors")
    assert meta["store"]["n_images"] == N_IMAGES
    assert cfg.model.image_size == model.config.image_size == 32 and not model.training
    seg = model.segment(torch.from_numpy(FeatureStore.open(store_url).pixels[:2]))
    assert seg.tokens.shape == (2, 4, 128) and seg.assignment.shape == (2, 4, 4)


@pytest.mark.parametrize("target_norm", ["l2", "whiten"])  # whiten: its fit is the same on resume
def test_stop_and_resume_reaches_the_same_weights(store_url, tmp_path, target_norm):
    config = tiny_config(steps=10, checkpoint_every=3)
    config = dataclasses.replace(config, losses=dataclasses.replace(config.losses, target_norm=target_norm))
    train(store_url, tmp_path / "straight", config, progress=False)
    first = train(store_url, tmp_path / "resumed", config, stop_after=5, progress=False)
    assert first["step"] == 5
    train(store_url, tmp_path / "resumed", resume=True, progress=False)
    a, _, meta_a = load_student(tmp_path / "straight")
    b, _, meta_b = load_student(tmp_path / "resumed")
    assert meta_a["step"] == meta_b["step"] == 10
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    opt_a = (tmp_path / "straight/checkpoint-0000010/optimizer.safetensors").read_bytes()
    opt_b = (tmp_path / "resumed/checkpoint-0000010/optimizer.safetensors").read_bytes()
    assert opt_a == opt_b
    # the resumed run's metrics are the straight run's, row for row except the timings
    strip = lambda p: [r.rsplit(",", 2)[0] for r in (p / "metrics.csv").read_text().splitlines()]
    assert strip(tmp_path / "straight") == strip(tmp_path / "resumed")


def test_cached_and_online_targets_agree(store_url, tmp_path):
    config = tiny_config(steps=3, grids=(1, 2, 3))
    cached = train(store_url, tmp_path / "cached", config, progress=False)
    online = train(store_url, tmp_path / "online", dataclasses.replace(config, targets="online"), progress=False)
    read = lambda p: [[float(x) for x in r.split(",")[3:7]] for r in (p / "metrics.csv").read_text().splitlines()[1:]]
    a, b = np.array(read(tmp_path / "cached")), np.array(read(tmp_path / "online"))
    assert a.shape == (3, 4)
    np.testing.assert_allclose(a, b, rtol=2e-3)  # the store holds float16 features
    assert cached["step"] == online["step"] == 3


def test_store_that_does_not_fit_the_config(store_url, tmp_path):
    bad_dim = tiny_config(model=preset("tiny", out_dim=512))
    with pytest.raises(UserError, match="projects to dim 512, the store's teacher zeroseg-tiny has dim 128"):
        train(store_url, tmp_path / "a", bad_dim, progress=False)
    with pytest.raises(UserError, match="the store has only 1,2,3,4"):
        train(store_url, tmp_path / "b", tiny_config(grids=(1, 6)), progress=False)
    with pytest.raises(UserError, match="nothing to resume"):
        train(store_url, tmp_path / "c", resume=True, progress=False)


def run_cli(monkeypatch, capsys, args):
    """The real entry point (main), as a shell would call it: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["zeroseg", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_cli_train_and_one_line_errors(store_url, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    args = ["train", store_url, "--out", str(out), "--preset", "tiny", "--steps", "4", "--batch", "4",
            "--grids", "1,2", "--loss", "distill,match=0.5", "--mask-ratio", "0.5", "--threads", "1"]
    code, stdout, _ = run_cli(monkeypatch, capsys, args)
    assert code == 0 and "step 4" in stdout
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["grids"] == [1, 2] and cfg["mask_ratio"] == 0.5 and cfg["steps"] == 4
    assert cfg["losses"] == {
        "distill": 1.0, "multiscale": True, "match": 0.5, "cover": 0.0, "mae": 0.0, "region": 0.0, "assign": 0.0,
        "assign_tau": 0.1, "target_norm": "l2",
    }
    assert cfg["recipe"] == "localised" and cfg["model"]["gumbel_noise"] == 0.0  # --loss replaced only the losses
    for bad_args, message in [
        (args, "already holds a run"),
        (["train", store_url, "--out", str(tmp_path / "x"), "--grids", "1,5"], "the store has only 1,2,3,4"),
        (["train", store_url, "--out", str(tmp_path / "y"), "--loss", "hungarian"], "unknown loss"),
        (["train", store_url, "--out", str(tmp_path / "y"), "--recipe", "hungarian"], "unknown recipe"),
        (["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "z")], "no feature store"),
        # a resumed run keeps its own config: an option that would change it is refused, not ignored
        (["train", store_url, "--out", str(out), "--resume", "--steps", "8", "--lr", "0.1"],
         f"--resume continues the run in {out} with its own config: --steps, --lr would change it"),
    ]:
        code, _, stderr = run_cli(monkeypatch, capsys, bad_args)
        # one message, no traceback (rich wraps a long line at the console width, hence the join)
        assert code == 2 and message in " ".join(stderr.split()) and "Traceback" not in stderr
        assert stderr.startswith("error:") and stderr.count("error:") == 1
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 4  # the refused resume wrote nothing
    code, stdout, _ = run_cli(monkeypatch, capsys, ["train", store_url, "--out", str(out), "--resume"])
    assert code == 0 and "step 4" in stdout  # already finished: nothing more to do


def test_a_student_is_loaded_only_for_a_store_of_its_teacher(store_url, tmp_path, tiny_teacher):
    run = tmp_path / "run"
    train(store_url, run, tiny_config(steps=2, batch=4), progress=False)
    _, _, meta = load_student_for(run, FeatureStore.open(store_url))
    assert meta["step"] == 2
    other_teacher = dataclasses.replace(tiny_teacher.info, sha256="0" * 64)
    config = StoreConfig(teacher=other_teacher, grids=(1, 2), view_size=32, chunk_images=4)
    other = FeatureStore.create(str(tmp_path / "other.zarr"), config, ["a.png"])
    with pytest.raises(StoreError, match="trained on features of zeroseg-tiny/random:0 .*holds features of zeroseg-tiny/random:0 .000000000000"):
        load_student_for(run, other)


def test_a_checkpoint_of_another_model_version_is_refused_in_one_line(store_url, tmp_path):
    from safetensors.torch import load_file, save_file

    from zeroseg.trainer.checkpoint import MODEL_FILE, STATE_FILE, read_state, write_json

    ckpt = Path(train(store_url, tmp_path / "run", tiny_config(steps=2, batch=4), progress=False)["checkpoint"])
    weights = load_file(ckpt / MODEL_FILE)
    del weights["patch_proj.1.weight"]  # as written by a student without patch embeddings
    save_file(weights, ckpt / MODEL_FILE)
    state = read_state(ckpt)  # that version recorded the hash of its own weights
    write_json(ckpt / STATE_FILE, {**state, "sha256": sha256_file(ckpt / MODEL_FILE)})
    with pytest.raises(UserError, match="does not fit this zeroseg's student .1 weights missing"):
        load_student(ckpt)
