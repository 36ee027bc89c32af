"""How `zeroseg train` runs: its options made a TrainConfig, then the train loop (train.py) in this
process alone, or `--workers N` replicas of it on Ray Train's TorchTrainer, one process each, in
the torch.distributed group TorchTrainer makes (gloo on CPU, NCCL on GPUs); DDP averages their
gradients in backward().

What each replica does is train.train(rank=r, world_size=N): its own chunks of every epoch,
batch // N images a step, the global batch's learning-rate schedule and step count; rank 0 alone
writes the run dir (checkpoints included: Ray Train keeps none of ours, and retries none), and
the logged losses are the replicas' mean. The run dir and the store must be reachable under the same
path or URL from every worker (one machine, or a shared filesystem). A single process imports no Ray.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from zeroseg.errors import UserError
from zeroseg.outputs import check_output_dir
from zeroseg.stores.features import FeatureStore
from zeroseg.trainer.config import TrainConfig, recipe
from zeroseg.trainer.losses import LossConfig
from zeroseg.trainer.model import PRESETS
from zeroseg.trainer.recipes import DEFAULT_PRESET, DEFAULT_RECIPE
from zeroseg.trainer.train import open_run, steps_for_epochs, train

# A replica waiting this long for the others in a collective gives up (a peer is gone).
COLLECTIVE_TIMEOUT_S = 600


def run_train(
    store_url: str, out: str | Path, *, preset_name: str | None = None, recipe_name: str | None = None,
    epochs: float | None = None, grids: tuple[int, ...] | None = None, loss: str | None = None,
    multiscale: bool | None = None, target_norm: str | None = None, resume: bool = False,
    stop_after: int | None = None, progress: bool = True, workers: int | None = None, address: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The `zeroseg train` verb: a config from command-line options (a resumed run keeps its own).
    Every option left None keeps the recipe's or TrainConfig's value; `fields` are TrainConfig
    fields (steps, batch, lr, mask_ratio, targets, targets_dtype, teacher_key, precision, seed, threads, device).
    `loss` ("distill,match=0.5") replaces the recipe's loss terms. `workers` N > 1: N data-parallel
    replicas on Ray (at `address`); otherwise this process alone, no Ray."""
    if address is not None and workers in (None, 1):
        raise UserError("--address is where --workers N (N >= 2) run: give --workers too")
    if resume:  # the run's config is its own (the schedule depends on its steps): refuse, never ignore
        given = {"preset": preset_name, "recipe": recipe_name, "epochs": epochs, "grids": grids, "loss": loss,
                 "multiscale": multiscale, "target_norm": target_norm, **fields}
        changed = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if changed:
            raise UserError(f"--resume continues the run in {out} with its own config: {', '.join(changed)} "
                            "would change it; train another config into a new --out")
    config = None if resume else command_config(store_url, preset_name, recipe_name, epochs, grids, loss, multiscale,
                                                target_norm, fields)
    if workers in (None, 1):
        return train(store_url, out, config, resume=resume, stop_after=stop_after, progress=progress)
    return train_on_workers(store_url, out, config, workers=workers, address=address, resume=resume, stop_after=stop_after)


def command_config(store_url: str, preset_name: str | None, recipe_name: str | None, epochs: float | None,
                   grids: tuple[int, ...] | None, loss: str | None, multiscale: bool | None, target_norm: str | None,
                   fields: dict[str, Any]) -> TrainConfig:
    """A new run's TrainConfig from the command's options (see run_train)."""
    preset_name = preset_name or DEFAULT_PRESET
    if preset_name not in PRESETS:
        raise UserError(f"unknown preset {preset_name!r} (have: {', '.join(PRESETS)})")
    fields = {k: v for k, v in fields.items() if v is not None}
    if "steps" in fields and epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    store = FeatureStore.open(store_url, teacher=fields.get("teacher_key"))
    config = recipe(recipe_name or DEFAULT_RECIPE, preset_name, grids=grids or store.config.grids, **fields)
    if epochs is not None:
        config = dataclasses.replace(config, steps=steps_for_epochs(epochs, int((store.status() == 1).sum()), config.batch))
    multiscale = config.losses.multiscale if multiscale is None else multiscale
    target_norm = target_norm or config.losses.target_norm
    losses = (
        LossConfig.parse(loss, target_norm, multiscale) if loss
        else dataclasses.replace(config.losses, target_norm=target_norm, multiscale=multiscale)
    )
    return dataclasses.replace(config, losses=losses)


def replica(kwargs: dict[str, Any]) -> None:
    """One Ray Train worker: the train loop as its rank of the group TorchTrainer made."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    config = kwargs["config"]
    if config is not None and config.device.startswith("cuda"):  # this worker's own GPU as "cuda"
        torch.cuda.set_device(ray.train.torch.get_device())
    rank = context.get_world_rank()
    result = train(rank=rank, world_size=context.get_world_size(), progress=False, **kwargs)
    # Every rank reports. Ray Train keeps reported metrics only beside a checkpoint: rank 0 hands
    # it an empty one (the run dir holds the real checkpoints), and fit() returns rank 0's result.
    with tempfile.TemporaryDirectory() as empty:
        ray.train.report({"result": result}, checkpoint=ray.train.Checkpoint.from_directory(empty) if rank == 0 else None)


def check_workers(store_url: str, run_dir: Path, config: TrainConfig | None, resume: bool, workers: int) -> TrainConfig:
    """Every refusal a replica would make, made here in one line before a worker starts (a
    replica that failed alone would leave the others waiting for it). Returns the run's config."""
    if workers < 1:
        raise UserError(f"--workers must be at least 1, not {workers}")
    check_output_dir(run_dir, "train")
    store, config, _, _, _ = open_run(store_url, run_dir, config, resume, workers, claim=False)
    if workers > store.n_chunks:  # each replica reads its own chunks of every epoch (loader.Plan)
        raise UserError(f"{workers} workers, but the store has only {store.n_chunks} chunks to share out: "
                        "use fewer workers")
    return config


def train_on_workers(store_url: str, run_dir: str | Path, config: TrainConfig | None = None, *, workers: int,
                     address: str | None = None, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """train() by `workers` data-parallel replicas on Ray (a local Ray, or the cluster at `address`).
    Returns rank 0's result. A worker that dies ends the run: `resume` continues it from the last
    checkpoint with as many workers."""
    import ray.train  # here, not at the top: see ray_cluster
    from ray.train.torch import TorchConfig, TorchTrainer

    from zeroseg.pipeline.distributor import ray_cluster

    run_dir = Path(run_dir)
    config = check_workers(store_url, run_dir, config, resume, workers)
    gpu = config.device.startswith("cuda")
    with ray_cluster(address) as (cpus, gpus), tempfile.TemporaryDirectory(prefix="zeroseg-ray-train-") as own:
        if gpu and gpus < workers:
            raise UserError(f"{workers} workers on --device cuda, the Ray cluster has {gpus} GPUs")
        if workers > cpus:
            raise UserError(f"{workers} workers, the Ray cluster has {cpus} CPUs")
        trainer = TorchTrainer(
            replica,
            train_loop_config={"store_url": store_url, "run_dir": str(run_dir), "config": None if resume else config,
                               "resume": resume, "stop_after": stop_after},
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=COLLECTIVE_TIMEOUT_S),
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": 1}),
            # Ray Train's own records (and the empty checkpoint replica() reports: the run dir
            # holds the real ones) in a folder of this call's; no retries: `--resume` continues.
            run_config=ray.train.RunConfig(name="zeroseg-train", storage_path=own,
                                           failure_config=ray.train.FailureConfig(max_failures=0)),
        )
        try:
            return trainer.fit().metrics["result"]
        except ray.train.TrainingFailedError as e:
            raise failed(e, workers) from None


def failed(error: Exception, workers: int) -> Exception:
    """A failed fit as the user should read it: a replica's refusal as it is, a dead replica as the
    line that says how to continue, anything else as it came."""
    failures = getattr(error, "worker_failures", {})
    for rank, failure in sorted(failures.items()):
        cause = failure
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or getattr(cause, "cause", None)
        if isinstance(cause, UserError):
            return UserError(str(cause))
    return died(min(failures), workers) if failures else error


def died(rank: int, workers: int) -> UserError:
    return UserError(f"worker {rank} of {workers} died; `train --resume --workers {workers}` continues "
                     "from the last checkpoint")
