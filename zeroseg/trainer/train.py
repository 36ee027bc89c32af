"""The train loop: AdamW, linear warm-up then cosine, gradient clipping, optional bf16 autocast,
deterministic from a seed, resumable to the same weights.

Run dir: config.json, metrics.csv, TensorBoard events, loss_curve.png (all updated as it goes),
and the newest checkpoint (checkpoint.py). `targets="online"` runs the store's teacher on the
same crops each step instead of reading them: the baseline, and a check of the cache.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter

from zeroseg.errors import UserError
from zeroseg.geometry import box_membership, cut_crops
from zeroseg.outputs import claim_output_dir, write_atomic
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status
from zeroseg.trainer import checkpoint as ckpt_io
from zeroseg.trainer.config import TrainConfig
from zeroseg.trainer.loader import Batches, Columns, StoreDataset, select_columns
from zeroseg.trainer.losses import TERMS, Whitening, fit_whitening, prepare_targets, zeroseg_losses
from zeroseg.trainer.model import ZeroSegStudent

# data_wait: the share of the interval's wall time the loop waited for the next batch.
METRICS = ["step", "epoch", "lr", "loss", *TERMS, "steps_per_s", "data_wait"]


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up from 0 over the first `warmup` of the steps, then cosine down to 0."""
    warmup = int(config.warmup * config.steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def steps_for_epochs(epochs: float, n_ok: int, batch: int) -> int:
    return max(1, math.ceil(epochs * n_ok / batch))


def same_store(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Store identities agree on everything but where the store lives (compared as JSON)."""
    def strip(d):
        return json.loads(json.dumps({k: v for k, v in d.items() if k != "url"}))
    return strip(a) == strip(b)


def store_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """What differs between a run's recorded store identity and the store given, in words."""
    grew = recorded["n_images"] < current["n_images"]
    changed = [k for k in current if k not in ("url", "n_images") and json.dumps(recorded.get(k)) != json.dumps(current[k])]
    if grew and not changed:  # `extract` appended images: the run's data order is over the old ones
        return (f"it grew from {recorded['n_images']} to {current['n_images']} images since the run started; "
                "train a new --out on the grown store")
    parts = [f"{k} {json.dumps(recorded.get(k))} vs {json.dumps(current[k])}" for k in changed]
    if recorded["n_images"] != current["n_images"]:
        parts.insert(0, f"{recorded['n_images']} vs {current['n_images']} images")
    return "; ".join(parts)


def check_fit(config: TrainConfig, store: FeatureStore) -> Columns:
    """The crop columns to train on; a one-line UserError if the store cannot serve this config."""
    if config.model.out_dim and config.model.out_dim != store.dim:
        raise UserError(
            f"the student projects to dim {config.model.out_dim}, the store's teacher "
            f"{store.config.teacher.arch} has dim {store.dim}"
        )
    return select_columns(store.boxes, store.config.grids, config.grids)


def targets_whitening(store: FeatureStore, columns: Columns, norm: str, images: int = 2048) -> Whitening:
    """The whitening of the targets (target_norm "whiten"), fitted on the crops of the store's
    first `images` extracted images: the same on every rank and every resume."""
    ok = np.flatnonzero(store.status()[:images] == Status.OK)
    features = torch.from_numpy(store.features[: images][ok][:, columns.index].astype(np.float32))  # (n, C', D)
    if not len(features):
        raise UserError(f"{store.url}: no extracted image among the first {images} to fit the targets' whitening on")
    return fit_whitening(prepare_targets(features, norm).reshape(-1, features.shape[-1]))


class OnlineTeacher:
    """The store's own teacher, cutting the same crops of the same view as the extractor did."""

    def __init__(self, store: FeatureStore, columns: Columns, device: str):
        # Only --targets online runs the teacher: open_clip (seconds to import) stays out of cached training.
        from zeroseg.pipeline.teacher import load_store_teacher

        self.teacher = load_store_teacher(store, device=device)
        self.boxes = columns.boxes

    def features(self, views: torch.Tensor) -> torch.Tensor:
        """views (B, S, S, 3) uint8 at the store's view size -> (B, C', D) float32."""
        crops = cut_crops(views, self.boxes, self.teacher.info.input_size)  # (B*C', 3, s, s)
        return self.teacher.encode_images(crops).view(views.shape[0], len(self.boxes), -1)


@dataclass
class RunLog:
    """metrics.csv, TensorBoard and the loss-curve PNG, all from the same logged rows."""

    run_dir: Path
    start_step: int

    def __post_init__(self) -> None:
        path = self.run_dir / "metrics.csv"
        rows = []
        if path.exists():  # a resumed run: keep what the checkpoint had reached, drop the rest
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if _complete(r) and int(r["step"]) <= self.start_step]
        # The kept rows replace the file whole (a crash keeps the old file), then rows are appended.
        kept = io.StringIO(newline="")
        writer = csv.DictWriter(kept, fieldnames=METRICS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(path, kept.getvalue())
        self.rows: list[dict[str, Any]] = rows
        self.file = open(path, "a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=METRICS)
        self.tb = SummaryWriter(str(self.run_dir), purge_step=self.start_step or None)

    def add(self, row: dict[str, Any]) -> None:
        row = {k: row.get(k, "") for k in METRICS}
        self.rows.append(row)
        self.csv.writerow(row)
        self.file.flush()
        for key in ("loss", "lr", "steps_per_s", "data_wait", *TERMS):
            if row[key] != "":
                self.tb.add_scalar(f"train/{key}", float(row[key]), int(row["step"]))

    def plot(self) -> None:
        import matplotlib  # a third of a second to import: only when a curve is drawn

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [int(r["step"]) for r in self.rows]
        for key in ("loss", *TERMS):
            values = [float(r[key]) for r in self.rows if r[key] != ""]
            if values:
                ax.plot(steps[-len(values):], values, label=key, lw=2 if key == "loss" else 1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(self.run_dir.name)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        write_atomic(self.run_dir / "loss_curve.png", png.getvalue())

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _complete(row: dict[str, Any]) -> bool:
    """A metrics.csv row with every column and an integer step (a row cut short by a kill is not)."""
    return None not in row.values() and None not in row and str(row.get("step", "")).isdigit()


def open_run(store_url: str, run_dir: Path, config: TrainConfig | None, resume: bool, world_size: int,
             claim: bool) -> tuple[FeatureStore, TrainConfig, int, Path | None, dict[str, Any] | None]:
    """The store and the run to train: (store, config, start step, checkpoint, its state), or a
    one-line UserError. `claim`: make run_dir a train output folder (the process that writes it).
    The store is seen through the config's teacher (a resumed run's own)."""
    store = FeatureStore.open(store_url, teacher=config.teacher_key if config else None)
    if resume and not run_dir.is_dir():
        raise UserError(f"nothing to resume in {run_dir} (no such folder)")
    if claim:
        claim_output_dir(run_dir, "train")  # anyone else's folder is refused before a byte is written
    start_step, ckpt, state = 0, None, None
    if resume:
        ckpt = ckpt_io.latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"nothing to resume in {run_dir} (no complete checkpoint)")
        state = ckpt_io.read_state(ckpt)
        config, start_step = TrainConfig.from_dict(state["config"]), state["step"]
        store = FeatureStore.open(store_url, teacher=config.teacher_key)  # names the run's teacher if the store lost it
        if not same_store(state["store"], store.identity()):
            raise UserError(f"{run_dir} was trained on another store than {store_url}: "
                            + store_difference(state["store"], store.identity()))
        trained_by = state.get("world_size", 1)
        if trained_by != world_size:  # the data order and the masks depend on it
            raise UserError(f"{run_dir} was trained by {trained_by} worker(s), not {world_size}: "
                            f"resume it with --workers {trained_by}")
    elif config is None:
        raise ValueError("a new run needs a config")
    elif ckpt_io.latest_checkpoint(run_dir) is not None:
        raise UserError(f"{run_dir} already holds a run: --resume it or choose another --out")
    if config.batch % world_size:
        raise UserError(f"batch {config.batch} does not split evenly over {world_size} workers")
    return store, config, start_step, ckpt, state


def mean_over_replicas(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The values averaged over the replicas of a torch.distributed group (as they are without one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(values, (t / torch.distributed.get_world_size()).tolist()))


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model under DDP (in a torch.distributed group). Parameters a recipe leaves unused (the
    MAE decoder when its weight is 0) get no gradient on any replica, which DDP must expect."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def train(
    store_url: str, run_dir: str | Path, config: TrainConfig | None = None, resume: bool = False,
    stop_after: int | None = None, preload: bool = False, progress: bool = True,
    world_size: int = 1, rank: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) a student in run_dir from the store's cached targets (or online).

    stop_after: leave after this many steps of this invocation (with a checkpoint), as a killed run
    would; `resume=True` then continues it. preload: read the whole store into RAM first (the
    benchmark's baseline). Returns {"step", "checkpoint", "metrics": the last logged row}.

    world_size > 1: a data-parallel run of that many replicas; replica r reads its own chunks of
    each epoch (shard r of the Plan) and batch // world_size images a step, with its own masks, and
    the replicas' gradients are averaged. With `rank`, this process is replica `rank` of a
    torch.distributed group (trainer/launch.py starts them; DDP averages) and only rank 0
    writes the run dir. Without, this one process plays every replica in turn and averages their
    gradients itself: the same run, world_size times slower (the check of the distributed one).
    """
    run_dir = Path(run_dir)
    writer = rank in (None, 0)  # the run dir is written by one process
    store, config, start_step, ckpt, state = open_run(store_url, run_dir, config, resume, world_size, claim=writer)
    columns = check_fit(config, store)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, out_dim=store.dim))
    if writer:
        ckpt_io.write_json(run_dir / "config.json", {"config": config.to_dict(), "store": store.identity(),
                                                     **({"world_size": world_size} if world_size > 1 else {})})

    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    student = ZeroSegStudent(config.model).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, foreach=True)
    if ckpt is not None:
        ckpt_io.load_weights(student, ckpt)
        ckpt_io.load_optimizer(optimizer, ckpt, state)
    model = student
    if rank is not None and world_size > 1:  # DDP averages the replicas' gradients in backward()
        model = data_parallel(student, device)
    teacher = OnlineTeacher(store, columns, config.device) if config.targets == "online" else None
    local = torch.from_numpy(columns.local).to(device)
    member = box_membership(columns.boxes, config.model.grid).to(device)
    whitening = (targets_whitening(store, columns, config.losses.target_norm).to(device)
                 if config.losses.target_norm == "whiten" else None)
    last_step = config.steps if stop_after is None else min(config.steps, start_step + stop_after)

    replicas = [rank] if rank is not None else list(range(world_size))  # the replicas this process plays
    datasets = [StoreDataset(store, config.grids, seed=config.seed, rank=r, world_size=world_size,
                             buffer_chunks=config.buffer_chunks, targets=teacher is None,
                             targets_dtype=config.targets_dtype, decoders=config.workers, preload=preload)
                for r in replicas]
    log = RunLog(run_dir, start_step) if writer else None
    result: dict[str, Any] = {"step": start_step, "metrics": log.rows[-1] if log and log.rows else {}}
    with ExitStack() as stack:
        if config.threads:
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(config.threads)
        if log:
            stack.callback(log.close)
        streams = []
        for dataset in datasets:
            stack.callback(dataset.close)
            streams.append(stack.enter_context(Batches(
                dataset, config.batch // world_size, start_step, prefetch=config.prefetch,
                readers=config.workers, pin=device.type == "cuda")))
        bar = stack.enter_context(Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not (progress and writer),
        ))
        task = bar.add_task("train", total=config.steps, completed=start_step, info="")
        sums: dict[str, float] = {}
        tick, tick_step, waited = time.perf_counter(), start_step, 0.0
        model.train()
        for step in range(start_step, last_step):
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            for r, batches in zip(replicas, streams):
                asked = time.perf_counter()
                batch = next(batches)
                waited += time.perf_counter() - asked
                pixels = batch["pixels"].to(device, non_blocking=True)
                features = teacher.features(pixels) if teacher else batch["features"].to(device, non_blocking=True)
                # masking and Gumbel noise: a stream per step, and per replica
                torch.manual_seed(ckpt_io.step_seed(config.seed, step, r if world_size > 1 else None))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                    out = model(pixels, config.mask_ratio, reconstruct=config.losses.mae > 0)
                loss, terms = zeroseg_losses(out, features, local, config.losses, member, whitening)
                (loss / len(replicas)).backward()
                for k, v in {"loss": float(loss.detach()), **terms}.items():
                    sums[k] = sums.get(k, 0.0) + v / len(replicas)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()

            done = step + 1
            if done % config.log_every == 0 or done == last_step:
                now = time.perf_counter()
                n = done - tick_step
                means = mean_over_replicas({**sums, "data_wait": waited / (now - tick)}, device)
                row = {k: f"{v / n:.6g}" for k, v in means.items() if k != "data_wait"}
                row.update(step=done, epoch=f"{batch['epoch']:.4f}", lr=f"{lr:.6g}", steps_per_s=f"{n / (now - tick):.4g}",
                           data_wait=f"{means['data_wait']:.3f}")
                if log:
                    log.add(row)
                result["metrics"] = row
                bar.update(task, info=f"loss {row['loss']}  {row['steps_per_s']} steps/s  "
                                            f"waiting for data {float(row['data_wait']):.0%}")
                sums, tick, tick_step, waited = {}, now, done, 0.0
            bar.update(task, completed=done)
            if writer and (done % config.checkpoint_every == 0 or done == last_step):
                result["checkpoint"] = str(ckpt_io.save_checkpoint(run_dir, done, student, optimizer, config,
                                                                   store.identity(), world_size))
                log.plot()
            result["step"] = done
    return result
