"""One training run's whole configuration, saved as config.json in the run dir and in each
checkpoint, so every result says how it was made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from zeroseg.errors import UserError
from zeroseg.trainer.losses import LossConfig
from zeroseg.trainer.model import ModelConfig, preset
from zeroseg.trainer.recipes import DEFAULT_PRESET, DEFAULT_RECIPE, load_recipe

# Fields that older zeroseg wrote and this one no longer has, with the one value they ever held:
# a saved config holding exactly that value still loads (the knob was a no-op there); any other
# value is refused, since this zeroseg cannot train or rebuild that student.
REMOVED_FIELDS = {"model": {"assign_scale": 1.0}, "train": {"min_lr": 0.0}}


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: preset(DEFAULT_PRESET, **load_recipe(DEFAULT_RECIPE)["model"]))
    preset: str = DEFAULT_PRESET
    recipe: str = DEFAULT_RECIPE  # the recipe the model and losses came from (a label: they are below)
    losses: LossConfig = field(default_factory=lambda: LossConfig(**load_recipe(DEFAULT_RECIPE)["losses"]))
    steps: int = 1000  # total optimizer steps (the CLI derives it from --epochs when given)
    batch: int = 32
    # Peak learning rate, absolute. The paper's 1.5e-4 is a base lr for batch 256 (MAE's rule
    # lr = base * batch / 256, batch 4096 -> 2.4e-3); short runs on small batches want more.
    lr: float = 1e-3
    warmup: float = 0.25  # fraction of the steps spent warming up linearly (paper: 20 of 80 epochs)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    mask_ratio: float = 0.6
    grids: tuple[int, ...] = (1, 2, 3, 4)  # the crop scales to distil (a subset of the store's)
    targets: str = "cached"  # "cached" (read the store) | "online" (run the teacher each step)
    targets_dtype: str = "fp16"  # cached targets as stored, or the store's compact "int8" | "pq" ones
    teacher_key: str | None = None  # whose features to distil: a teacher of the store (`store info`); None its first
    # fp32 by default: on this project's 2-core AMD EPYC (AVX2, no native bf16) bf16 autocast made a
    # train step 2.2x (tiny) to 7x (small) slower (benchmarks/presets.py); "bf16" autocasts the
    # student's forward pass, for CPUs with AMX/AVX512-bf16 and for GPUs.
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    buffer_chunks: int = 4  # chunks shuffled together
    prefetch: int = 8  # batches kept ready by the loader thread
    workers: int = 2  # reader / decoder threads
    # torch's compute threads; 0 = torch's default (one per core). On a shared, busy machine 1 is
    # several times faster (idle OpenMP threads spin while waiting for a core).
    threads: int = 0
    device: str = "cpu"  # torch device of the student (and of the online teacher); the loader is CPU

    def __post_init__(self) -> None:
        problems = []
        if self.targets not in ("cached", "online"):
            problems.append(f"targets must be cached or online, not {self.targets!r}")
        if self.targets_dtype not in ("fp16", "int8", "pq"):
            problems.append(f"targets dtype must be fp16, int8 or pq, not {self.targets_dtype!r}")
        elif self.targets == "online" and self.targets_dtype != "fp16":
            problems.append(f"targets dtype {self.targets_dtype} is for cached targets, not online ones")
        if self.precision not in ("fp32", "bf16"):
            problems.append(f"precision must be fp32 or bf16, not {self.precision!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            problems.append(f"mask ratio must be in [0, 1), not {self.mask_ratio}")
        if self.losses.distill > 0 and not self.losses.multiscale and 1 not in self.grids:
            problems.append("single-scale distillation needs the 1x1 crop: add grid 1")
        if self.steps < 1 or self.batch < 1:
            problems.append("steps and batch must be positive")
        if problems:
            raise UserError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A saved config (config.json, a checkpoint, an ablation trial), also one written by an
        older zeroseg: see REMOVED_FIELDS."""
        d = _without_removed(d, REMOVED_FIELDS["train"], "")
        return cls(**{
            **d,
            "model": ModelConfig.from_dict(_without_removed(d["model"], REMOVED_FIELDS["model"], "model.")),
            "losses": LossConfig(**d["losses"]),
            "betas": tuple(d["betas"]),
            "grids": tuple(d["grids"]),
        })


def _without_removed(d: dict[str, Any], removed: dict[str, Any], prefix: str) -> dict[str, Any]:
    for name, value in removed.items():
        if name in d and d[name] != value:
            raise UserError(f"this config sets {prefix}{name} = {d[name]}, a setting this zeroseg no longer has "
                            f"(only {value} is supported): train it again, or use the zeroseg that wrote it")
    return {k: v for k, v in d.items() if k not in removed}


def recipe(name: str = DEFAULT_RECIPE, preset_name: str = DEFAULT_PRESET, **fields: Any) -> TrainConfig:
    """A TrainConfig from a recipe (trainer/recipes/<name>.json) and a student preset; `fields`
    set any other TrainConfig field (over the recipe's own, e.g. its mask_ratio)."""
    r = load_recipe(name)
    return TrainConfig(
        model=preset(preset_name, **r["model"]), preset=preset_name, recipe=name, losses=LossConfig(**r["losses"]),
        **{**r["train"], **fields},
    )
