"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is ever unpickled.

A run dir holds one complete checkpoint at a time:

    RUN_DIR/checkpoint-0000400/model.safetensors      the student's weights
                              /optimizer.safetensors  AdamW's per-parameter state
                              /state.json             step, config, store identity, RNG, optimizer
                                                      hyper-parameters, sha256 of model.safetensors,
                                                      world_size of a data-parallel run

state.json is written last (atomically), so a directory without it is an interrupted save and is
ignored; the previous checkpoint is deleted only after the new one is complete.

RNG: every train step reseeds torch from (seed, step) (`step_seed`), so the (seed, step) pair in
state.json is the whole RNG state, and the data order is a pure function of them too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from zeroseg.errors import UserError
from zeroseg.outputs import write_atomic
from zeroseg.stores.features import FeatureStore, StoreError
from zeroseg.stores.schema import TeacherInfo, teacher_key
from zeroseg.trainer.config import TrainConfig
from zeroseg.trainer.model import ZeroSegStudent

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"


class CheckpointError(UserError):
    """No checkpoint where one was asked for, or one that does not fit."""


def step_seed(seed: int, step: int, rank: int | None = None) -> int:
    """The torch seed of one train step: independent streams per (seed, step), and per replica
    `rank` in a data-parallel run (each replica masks its own images)."""
    entropy = [seed, step] if rank is None else [seed, step, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    write_atomic(path, json.dumps(data, indent=2))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's state_dict split into flat tensors (state.<param>.<key>) and JSON param groups."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, sd["param_groups"]


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, i, key = name.split(".", 2)
        state.setdefault(int(i), {})[key] = value
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path, step: int, model: ZeroSegStudent, optimizer: torch.optim.Optimizer,
    config: TrainConfig, store_identity: dict[str, Any], world_size: int = 1,
) -> Path:
    """world_size: the data-parallel replicas that trained it (recorded when > 1: the data order and
    masks depend on it, so a resume must use as many)."""
    ckpt = run_dir / f"checkpoint-{step:07d}"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, ckpt / MODEL_FILE)
    tensors, groups = _optimizer_tensors(optimizer)
    save_file(tensors, ckpt / OPTIMIZER_FILE)
    write_json(ckpt / STATE_FILE, {
        "step": step,
        "config": config.to_dict(),
        "store": store_identity,
        "rng": {"seed": config.seed, "step": step, "scheme": "torch reseeded from (seed, step) every step"},
        "optimizer": {"param_groups": groups},
        "sha256": sha256_file(ckpt / MODEL_FILE),
        **({"world_size": world_size} if world_size > 1 else {}),
    })
    for old in run_dir.glob("checkpoint-*"):
        if old != ckpt:
            shutil.rmtree(old)
    return ckpt


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = sorted(d for d in run_dir.glob("checkpoint-*") if (d / STATE_FILE).is_file())
    return complete[-1] if complete else None


def find_checkpoint(path: str | Path) -> Path:
    """A run dir (its newest complete checkpoint), a checkpoint dir, or a model.safetensors file."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir() and (found := latest_checkpoint(path)) is not None:
        return found
    raise CheckpointError(f"no student checkpoint at {path}")


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_FILE).read_text())


def load_weights(model: ZeroSegStudent, ckpt: Path) -> None:
    """The checkpoint's weights into `model`, after checking them against the sha256 state.json
    recorded when they were saved (a damaged or replaced file is refused, never used)."""
    recorded, actual = read_state(ckpt).get("sha256"), sha256_file(ckpt / MODEL_FILE)
    if recorded != actual:
        raise CheckpointError(f"{ckpt / MODEL_FILE} is damaged or was replaced: its sha256 is {actual[:12]}, "
                              f"state.json recorded {str(recorded)[:12]}; restore it or retrain")
    weights = load_file(ckpt / MODEL_FILE)
    missing, unexpected = set(model.state_dict()) - set(weights), set(weights) - set(model.state_dict())
    if missing or unexpected:  # a checkpoint of another version of the model
        names = ", ".join(sorted(missing | unexpected)[:3])
        raise UserError(f"{ckpt} does not fit this zeroseg's student ({len(missing)} weights missing, "
                        f"{len(unexpected)} unknown: {names}...); retrain it")
    model.load_state_dict(weights)


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path, state: dict[str, Any]) -> None:
    optimizer.load_state_dict(_optimizer_state_dict(load_file(ckpt / OPTIMIZER_FILE), state["optimizer"]["param_groups"]))


def load_student(path: str | Path) -> tuple[ZeroSegStudent, TrainConfig, dict[str, Any]]:
    """The trained student, in eval mode: (model, config, meta) where meta holds "store" (the
    store's identity), "sha256" (of the weights file), "step" and "checkpoint" (its dir)."""
    ckpt = find_checkpoint(path)
    state = read_state(ckpt)
    config = TrainConfig.from_dict(state["config"])
    model = ZeroSegStudent(config.model)
    load_weights(model, ckpt)
    model.eval()
    meta = {"store": state["store"], "sha256": state["sha256"], "step": state["step"], "checkpoint": str(ckpt)}
    return model, config, meta


def load_student_for(path: str | Path, store: FeatureStore) -> tuple[ZeroSegStudent, TrainConfig, dict[str, Any]]:
    """load_student, refused unless the student was trained on features of `store`'s teacher: its
    tokens live in that teacher's space, the only one where the store's features and text apply."""
    model, config, meta = load_student(path)
    trained_on, have = meta["store"].get("teacher", {}), store.config.teacher
    if trained_on.get("sha256") != have.sha256:
        key = student_teacher_key(path, store)
        raise StoreError(
            f"{path} was trained on features of {trained_on.get('arch')}/{trained_on.get('pretrained')} "
            f"({str(trained_on.get('sha256'))[:12]}), the store {store.url} holds features of "
            f"{have.arch}/{have.pretrained} ({have.sha256[:12]})" + (f" by default: pass --teacher-key {key}" if key else "")
        )
    return model, config, meta


def student_teacher_key(path: str | Path, store: FeatureStore) -> str | None:
    """The key in `store` of the teacher whose features the student at `path` was trained on;
    None when the store has no such teacher (load_student_for then refuses, naming both)."""
    trained_on = read_state(find_checkpoint(path))["store"].get("teacher")
    key = teacher_key(TeacherInfo.from_dict(trained_on)) if trained_on else None
    return key if key in store.teacher_keys() else None
