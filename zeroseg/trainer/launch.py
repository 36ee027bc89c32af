"""How `zeroseg train` runs: its options made a TrainConfig, then the train loop (train.py) in this
process alone, or `--workers N` replicas of it as Ray actors, one process each, in one
torch.distributed group (gloo on CPU, NCCL on GPUs); DDP averages their gradients in backward().

What each replica does is train.train(rank=r, world_size=N): its own chunks of every epoch,
batch // N images a step, the global batch's learning-rate schedule and step count; rank 0 alone
writes the run dir, and the logged losses are the replicas' mean. The run dir and the store must
be reachable under the same path or URL from every worker (one machine, or a shared filesystem).

Ray Train's TorchTrainer would start the same processes; the group is made here instead, on the Ray
that zeroseg already uses (pipeline.distributor.ray_cluster), in a few lines, keeping zeroseg's own
run dir, checkpoints and one-line failure report. A single process imports no Ray.
"""

from __future__ import annotations

import dataclasses
import socket
from datetime import timedelta
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
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# How long the driver waits, after a replica failed, for Ray to report which peer died.
DEATH_NOTICE_S = 10


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


class Replica:
    """One worker process: joins the group, then runs the train loop as its rank."""

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the others: this node's address and a free port."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def train(self, master: tuple[str, int], rank: int, world_size: int, backend: str, **kwargs: Any) -> dict[str, Any]:
        torch.distributed.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=rank,
                                             world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
        try:
            return train(rank=rank, world_size=world_size, progress=False, **kwargs)
        finally:
            torch.distributed.destroy_process_group()


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
    import ray  # here, not at the top: see ray_cluster
    from ray.exceptions import RayActorError, RayTaskError

    from zeroseg.pipeline.distributor import ray_cluster

    run_dir = Path(run_dir)
    gpu = check_workers(store_url, run_dir, config, resume, workers).device.startswith("cuda")
    with ray_cluster(address) as (cpus, gpus):
        if gpu and gpus < workers:
            raise UserError(f"{workers} workers on --device cuda, the Ray cluster has {gpus} GPUs")
        if workers > cpus:
            raise UserError(f"{workers} workers, the Ray cluster has {cpus} CPUs")
        actor = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0)(Replica)
        replicas = [actor.remote() for _ in range(workers)]
        try:
            master = ray.get(replicas[0].address.remote())
            runs = {replica.train.remote(master, rank, workers, "nccl" if gpu else "gloo", store_url=store_url,
                                         run_dir=str(run_dir), config=config, resume=resume, stop_after=stop_after): rank
                    for rank, replica in enumerate(replicas)}
            results, pending = {}, list(runs)
            while pending:  # the first failure ends the run: its peers would wait for it in vain
                (done,), pending = ray.wait(pending, num_returns=1)
                try:
                    results[runs[done]] = ray.get(done)
                except RayTaskError as e:
                    if isinstance(e.cause, UserError):
                        raise UserError(str(e.cause)) from None
                    # A worker's death reaches its peers first, as a failed collective: name the dead one.
                    finished, _ = ray.wait(pending, num_returns=len(pending), timeout=DEATH_NOTICE_S)
                    for ref in finished:
                        try:
                            ray.get(ref)
                        except RayActorError:
                            raise died(runs[ref], workers) from None
                        except RayTaskError:
                            pass
                    raise
                except RayActorError:
                    raise died(runs[done], workers) from None
        finally:
            for replica in replicas:
                ray.kill(replica)
    return results[0]


def died(rank: int, workers: int) -> UserError:
    return UserError(f"worker {rank} of {workers} died; `train --resume --workers {workers}` continues "
                     "from the last checkpoint")
