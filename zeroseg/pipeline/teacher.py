"""The frozen CLIP teacher: any open_clip model, loaded once, embedding crops and class names.

`--pretrained` is an open_clip tag (downloaded by open_clip where there is a network), a local
checkpoint file, or `random` (a deterministic init from a seed, for tests and benchmarks).
The project registers its own configs (model_configs/, e.g. `zeroseg-tiny`) with open_clip, so
they load like any built-in architecture.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch

from zeroseg.errors import UserError
from zeroseg.stores.features import FeatureStore, StoreError
from zeroseg.stores.schema import TeacherInfo

MODEL_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIGS)

RANDOM = "random"
# --precision -> the dtype the teacher's forward autocasts to (None: plain fp32, no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _NoWeightsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_model(arch: str, weights: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """open_clip.create_model. Built without weights (a seeded init, or the toy teacher before it
    is trained) is what was asked for here, so open_clip's root-logger warning that no weights
    were loaded is held back for that call."""
    if weights is not None:
        return open_clip.create_model(arch, pretrained=weights, device=device, weights_only=True)
    quiet = _NoWeightsWarning()
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(arch, device=device)
    finally:
        logging.getLogger().removeFilter(quiet)


class TeacherError(UserError):
    """The teacher cannot be had (unknown arch, missing file, no network for a tag): one line."""


def state_sha256(model: torch.nn.Module) -> str:
    """Hash of the weights themselves (names, shapes, bytes), whatever file they came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Teacher:
    model: torch.nn.Module
    info: TeacherInfo
    device: torch.device

    @torch.inference_mode()
    def encode_images(self, crops: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """crops (B, 3, S, S) float in [0, 1] at the input size -> (B, D) float32 embeddings,
        not normalised (the store keeps what the teacher gives; readers normalise if they want).
        `precision` bf16 | fp16 runs the forward under torch.autocast (fp32: no autocast at all)."""
        if crops.shape[-2:] != (self.info.input_size, self.info.input_size):
            raise ValueError(f"crops are {tuple(crops.shape[-2:])}, the teacher's input size {self.info.input_size}")
        dtype = PRECISIONS[precision]
        pixels = self.normalise(crops)
        if self.device.type == "cuda":
            pixels = pixels.contiguous(memory_format=torch.channels_last)  # the patch conv's fast layout on CUDA
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.model.encode_image(pixels).float()

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> the tower's input, on its device: (x - mean) / std."""
        mean = torch.tensor(self.info.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.info.std, device=self.device).view(1, 3, 1, 1)
        return (pixels.to(self.device, torch.float32) - mean) / std

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """texts -> (K, D) float32 embeddings, not normalised."""
        if not hasattr(self.model, "encode_text"):
            raise TeacherError(f"teacher {self.info.arch} has no text tower")
        tokens = open_clip.get_tokenizer(self.info.arch)(texts).to(self.device)
        return self.model.encode_text(tokens).float()

    def embed_batches(self, crops: torch.Tensor, batch: int) -> np.ndarray:
        """Embed many crops in batches of `batch`: (N, 3, S, S) -> (N, D) float32 numpy."""
        parts = [self.encode_images(crops[i : i + batch]) for i in range(0, len(crops), batch)]
        return torch.cat(parts).cpu().numpy()


def load_teacher(arch: str, pretrained: str = RANDOM, seed: int = 0, device: str = "cpu") -> Teacher:
    """Build `arch` with weights from a tag, a local file, or a seeded random init; eval mode."""
    if arch not in open_clip.list_models():
        raise TeacherError(f"unknown teacher architecture {arch!r} (see open_clip.list_models())")
    if pretrained == RANDOM:
        torch.manual_seed(seed)
        weights = None
    elif Path(pretrained).suffix and not Path(pretrained).is_file():
        raise TeacherError(f"teacher checkpoint {pretrained} does not exist")
    else:
        weights = pretrained
    try:
        model = create_model(arch, weights, device)
    except RuntimeError as e:  # open_clip raises RuntimeError for an unknown tag or a failed download
        raise TeacherError(f"cannot load {arch} weights {pretrained!r}: {str(e).splitlines()[0]}")
    model.eval().requires_grad_(False)
    pp = model.visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    if pretrained == RANDOM:
        label = f"{RANDOM}:{seed}"
    else:
        label = str(Path(pretrained).resolve()) if Path(pretrained).is_file() else pretrained
    info = TeacherInfo(
        arch=arch,
        pretrained=label,
        sha256=state_sha256(model),
        input_size=int(size),
        mean=tuple(float(m) for m in pp["mean"]),
        std=tuple(float(s) for s in pp["std"]),
        embed_dim=int(model.visual.output_dim),
    )
    return Teacher(model=model, info=info, device=torch.device(device))


def load_store_teacher(store: FeatureStore, device: str = "cpu") -> Teacher:
    """The teacher that made a store's features, rebuilt from its recorded TeacherInfo (a
    `random:SEED` label reloads that seed), refusing weights whose sha256 differs from the
    recorded one: anything it embeds would live in another space than the store's features."""
    info = store.config.teacher
    if info.pretrained.startswith(f"{RANDOM}:"):
        teacher = load_teacher(info.arch, RANDOM, seed=int(info.pretrained.split(":", 1)[1]), device=device)
    else:
        teacher = load_teacher(info.arch, info.pretrained, device=device)
    if teacher.info.sha256 != info.sha256:
        raise StoreError(
            f"{info.arch} weights {info.pretrained} hash to {teacher.info.sha256[:12]}, "
            f"the store's features were made by {info.sha256[:12]}: not the same teacher"
        )
    return teacher
