"""The toy CLIP teacher: a small open_clip model (`zeroseg-toy`) trained contrastively by the
project on synthetic scenes, so that its crop and text embeddings mean something offline.

Training pairs mirror what the teacher sees later:
- grid crops of scene training views (the extraction job's crops, resized to the teacher's input),
  captioned with the objects they show ("red circle and a blue square"), or with the ground when
  they show no object ("grass");
- single-object images (scenes.render_object) captioned with their class ("red circle").
Each caption goes into a random prompt template from segment.text.TEMPLATES, the same frames the
`text` verb averages over. The loss is a symmetric InfoNCE in which every pair in the batch with
the same caption counts as a positive (with 13 classes, in-batch duplicates are the rule, and
plain CLIP loss would push them apart).

The image tower is open_clip's ModifiedResNet at its smallest (layers 1,1,1,1, width 16, 32 px):
side by side on this project's 2-core machine, ViTs of similar cost learned the shapes slower
(patch 8: 0.35 zero-shot accuracy after 300 steps, colour only; patch 4: three times the cost per
step), while this ResNet reached 0.68 after 400 steps; the default config below reaches 0.92 after
500 steps (about 3.5 minutes there, one torch thread).

Everything is a pure function of the config (seeds included); the checkpoint is cached under
$ZEROSEG_CACHE (or ~/.cache/zeroseg) keyed by a hash of the config and the model config file, so
the demo trains it once. The checkpoint is a plain open_clip state dict in safetensors:
`load_teacher("zeroseg-toy", FILE)` (open_clip.create_model(pretrained=FILE)) loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import Progress
from safetensors.torch import save_file

from zeroseg.errors import UserError
from zeroseg.experiments import scenes
from zeroseg.geometry import box_pixels, cut_crops, grid_boxes, training_view
from zeroseg.pipeline.teacher import MODEL_CONFIGS, Teacher, create_model, load_teacher
from zeroseg.segment.datasets import SCENE_CLASSES
from zeroseg.segment.text import TEMPLATES, embed_classes
from zeroseg.stores.schema import TeacherInfo

OBJECT_CLASSES = SCENE_CLASSES[1:]  # what the zero-shot check classifies (background has no look)


@dataclass(frozen=True)
class ToyTeacherConfig:
    arch: str = "zeroseg-toy"
    seed: int = 0
    scene_size: int = 128  # scenes are drawn at this side, then cut to the training view
    view_size: int = 64  # the extraction view the crops are cut from (as `extract --view-size`)
    grids: tuple[int, ...] = (1, 2, 3, 4)
    n_scenes: int = 250  # training scenes; all their grid crops are used
    n_objects: int = 5000  # single-object images (1 in 13 a bare background)
    min_cover: float = 0.06  # an object is named in a crop's caption if it covers this share of
    min_own: float = 0.5  # the crop, or this share of its own visible area lies inside it
    # Also one square crop around each scene object (its box enlarged 1.1-1.6x, captioned like any
    # crop): what a student's segment shows. Off: an earlier one-seed GPU sweep (its code was not
    # committed, docs/results.md) found more steps helped far more than these crops.
    object_crops: bool = False
    steps: int = 500
    batch: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup: int = 50
    heldout_per_class: int = 25  # single objects per class for the reported zero-shot accuracy

    def key(self) -> str:
        """Cache key: this config and the architecture's own config file."""
        arch_cfg = (MODEL_CONFIGS / f"{self.arch}.json").read_text()
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + arch_cfg + str(TEMPLATES)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The presets the demo and the tests use.
PRESETS = {
    "default": ToyTeacherConfig(),
    "tiny": ToyTeacherConfig(scene_size=64, view_size=32, n_scenes=24, n_objects=64, steps=6, batch=64, heldout_per_class=2),
}


def cache_dir() -> Path:
    return Path(os.environ.get("ZEROSEG_CACHE") or Path.home() / ".cache" / "zeroseg")


def checkpoint_path(config: ToyTeacherConfig) -> Path:
    return cache_dir() / "teachers" / f"{config.arch}-{config.key()}.safetensors"


# ---- training data ---------------------------------------------------------------------------


def crop_caption(mask_cell: np.ndarray, object_areas: dict[int, int], background: str, cfg: ToyTeacherConfig) -> str:
    """The caption body of one crop from its mask cell: the objects it shows, largest first, or
    the ground when it shows none."""
    ids, counts = np.unique(mask_cell, return_counts=True)
    shown = [
        (n, c) for c, n in zip(ids.tolist(), counts.tolist())
        if c != 0 and (n >= cfg.min_cover * mask_cell.size or n >= cfg.min_own * object_areas[c])
    ]
    if not shown:
        return background
    names = [SCENE_CLASSES[c] for _, c in sorted(shown, key=lambda t: -t[0])]
    return " and a ".join(names)


def object_boxes(rng: np.random.Generator, scene: scenes.Scene, size: int) -> np.ndarray:
    """(n, 4) fractional square boxes, one around each object of the scene, its box enlarged by a
    random 1.1-1.6x and kept inside the image."""
    out = []
    for obj in scene.objects:
        x0, y0, x1, y1 = obj["bbox"]
        side = min(size, max(x1 - x0, y1 - y0) * rng.uniform(1.1, 1.6))
        cx = min(max((x0 + x1) / 2, side / 2), size - side / 2)
        cy = min(max((y0 + y1) / 2, side / 2), size - side / 2)
        out.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return np.asarray(out, dtype=np.float32).reshape(-1, 4) / size


def build_pairs(cfg: ToyTeacherConfig, input_size: int) -> tuple[torch.Tensor, list[str]]:
    """All training pairs: images (N, S, S, 3) uint8 at the teacher's input size, caption bodies."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7]))
    boxes = grid_boxes(cfg.grids)
    images, captions = [], []
    for _ in range(cfg.n_scenes):
        scene = scenes.render_scene(rng, cfg.scene_size)
        view = training_view(Image.fromarray(scene.image), cfg.view_size)
        mask = np.asarray(Image.fromarray(scene.mask).resize((cfg.view_size,) * 2, Image.NEAREST))
        areas = {c: max(int((mask == c).sum()), 1) for c in np.unique(mask).tolist()}
        scene_boxes = np.concatenate([boxes, object_boxes(rng, scene, cfg.scene_size)]) if cfg.object_crops else boxes
        crops = cut_crops(torch.from_numpy(view.copy())[None], scene_boxes, input_size)  # (C, 3, S, S) in [0, 1]
        images.append(crops.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1))
        captions += [
            crop_caption(mask[y0:y1, x0:x1], areas, scene.background, cfg)
            for x0, y0, x1, y1 in box_pixels(scene_boxes, cfg.view_size)
        ]
    n_classes = len(SCENE_CLASSES)
    for i in range(cfg.n_objects):
        class_id = i % n_classes  # class 0: a bare background, captioned with its kind
        kind = scenes.BACKGROUNDS[rng.integers(len(scenes.BACKGROUNDS))]
        img = scenes.render_object(rng, class_id, input_size, background=kind)
        images.append(torch.from_numpy(img)[None])
        captions.append(SCENE_CLASSES[class_id] if class_id else kind)
    return torch.cat(images), captions


def heldout_objects(cfg: ToyTeacherConfig, input_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Single objects from a stream training never draws: (N, 3, S, S) float [0, 1], labels
    (N,) as indices into OBJECT_CLASSES."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1_000_003]))
    labels = np.repeat(np.arange(len(OBJECT_CLASSES)), cfg.heldout_per_class)
    imgs = np.stack([scenes.render_object(rng, int(k) + 1, input_size) for k in labels])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255), labels


# ---- training --------------------------------------------------------------------------------


def _multi_positive_loss(img: torch.Tensor, txt: torch.Tensor, caption_ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over unique captions. img (B, D) and txt (U, D) unit-norm; caption_ids
    (B,) in [0, U). Image -> text: cross entropy to its caption. Text -> image: cross entropy
    to the uniform distribution over the images with that caption."""
    logits = scale * img @ txt.T  # (B, U)
    i2t = F.cross_entropy(logits, caption_ids)
    positives = F.one_hot(caption_ids, txt.shape[0]).T.float()  # (U, B)
    t2i = -(positives / positives.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


def train_toy_teacher(
    cfg: ToyTeacherConfig, out: Path, progress: bool = True, threads: int = 0, eval_every: int = 0,
    device: str = "cpu",
) -> dict:
    """Train from scratch and write the safetensors checkpoint to `out` (atomically) with a JSON
    report beside it; returns the report (train time, zero-shot accuracy). threads: torch's
    compute threads, 0 = its default; 1 is several times faster on a machine whose cores are busy
    (spare OpenMP threads spin). Runs are deterministic for a given thread count. eval_every > 0
    records the held-out zero-shot accuracy every so many steps (the report's "curve")."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch).to(device)
    # The 49408-row token table would cost AdamW more than the whole model while only ~30 tokens
    # ever occur; fixed random token vectors are as good an input for the text transformer.
    model.token_embedding.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(cfg.arch)
    pp = model.visual.preprocess_cfg
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    mean = torch.tensor(pp["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"], device=device).view(1, 3, 1, 1)

    images, captions = build_pairs(cfg, size)
    data_time = time.perf_counter() - t0
    vocab = sorted(set(captions))
    caption_index = torch.tensor([vocab.index(c) for c in captions])

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr
    )
    schedule = lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = []
    model.train()
    with Progress(disable=not progress) as bar:
        task = bar.add_task("toy teacher", total=cfg.steps)
        for step in range(cfg.steps):
            idx = torch.randint(len(images), (cfg.batch,), generator=gen)
            x = (images[idx].to(device).permute(0, 3, 1, 2).float().div(255) - mean) / std  # (B, 3, S, S)
            uniq, ids = torch.unique(caption_index[idx], return_inverse=True)  # U captions
            templates = torch.randint(len(TEMPLATES), (len(uniq),), generator=gen).tolist()
            prompts = [TEMPLATES[t].format(vocab[c]) for t, c in zip(templates, uniq.tolist())]
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(prompts).to(device)), dim=-1)
            loss = _multi_positive_loss(img, txt, ids.to(device), model.logit_scale.exp().clamp(max=100))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            bar.update(task, advance=1, description=f"toy teacher  loss {loss.item():.3f}")
            if eval_every and (step + 1) % eval_every == 0:
                curve.append((step + 1, round(_accuracy_now(model, cfg), 4), round(time.perf_counter() - t0, 1)))
                model.train()
                if not progress:
                    print("toy teacher step, accuracy, seconds:", *curve[-1], flush=True)
    train_time = time.perf_counter() - t0

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.safetensors")
    save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    teacher = load_teacher(cfg.arch, str(tmp))  # the checkpoint must load like any other
    accuracy = zero_shot_accuracy(teacher, cfg)
    report = {
        "config": dataclasses.asdict(cfg),
        "train_seconds": round(train_time, 1),
        "data_seconds": round(data_time, 1),
        "n_pairs": len(captions),
        "n_captions": len(vocab),
        "final_loss": round(loss.item(), 4),
        "zero_shot_accuracy": round(accuracy, 4),
        "scene_object_accuracy": round(scene_object_accuracy(teacher, cfg), 4),
        "heldout_images": cfg.heldout_per_class * len(OBJECT_CLASSES),
        "torch_threads": torch.get_num_threads(),
        "curve": curve,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)  # last: the checkpoint appears only when whole, its report beside it
    return report


def zero_shot_accuracy(teacher, cfg: ToyTeacherConfig) -> float:
    """Top-1 accuracy over the 12 object classes on held-out single-object images."""
    images, labels = heldout_objects(cfg, teacher.info.input_size)
    text = torch.from_numpy(embed_classes(teacher.encode_text, OBJECT_CLASSES))  # (K, D)
    img = F.normalize(teacher.encode_images(images), dim=-1).cpu()
    pred = (img @ text.T).argmax(1).numpy()
    return float((pred == labels).mean())


def scene_object_accuracy(teacher, cfg: ToyTeacherConfig) -> float:
    """Top-1 accuracy over the object classes on the objects of 4 * heldout_per_class held-out
    scenes, each cut out of its scene's view by a square box around it (what a good segment shows
    the teacher)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1_000_004]))
    text = torch.from_numpy(embed_classes(teacher.encode_text, OBJECT_CLASSES))  # (K, D)
    right = total = 0
    for _ in range(4 * cfg.heldout_per_class):
        scene = scenes.render_scene(rng, cfg.scene_size)
        view = training_view(Image.fromarray(scene.image), cfg.view_size)
        crops = cut_crops(torch.from_numpy(view.copy())[None], object_boxes(rng, scene, cfg.scene_size), teacher.info.input_size)
        pred = (F.normalize(teacher.encode_images(crops), dim=-1).cpu() @ text.T).argmax(1)
        right += sum(int(p) + 1 == o["class_id"] for p, o in zip(pred, scene.objects))
        total += len(scene.objects)
    return right / total


def _accuracy_now(model: torch.nn.Module, cfg: ToyTeacherConfig) -> float:
    """zero_shot_accuracy of a model still in training (wrapped as a Teacher, unhashed)."""
    pp = model.visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    info = TeacherInfo(cfg.arch, "training", "", int(size), tuple(pp["mean"]), tuple(pp["std"]), int(model.visual.output_dim))
    return zero_shot_accuracy(Teacher(model.eval(), info, next(model.parameters()).device), cfg)


def ensure_toy_teacher(cfg: ToyTeacherConfig, progress: bool = True) -> tuple[Path, dict]:
    """The cached checkpoint for `cfg`, trained first if absent; (path, report)."""
    path = checkpoint_path(cfg)
    if not path.is_file():
        # One torch thread: measured 3x faster than two on this project's shared 2-core machine.
        train_toy_teacher(cfg, path, progress=progress, threads=1, eval_every=100)
    return path, json.loads(path.with_suffix(".json").read_text())


def export_toy_teacher(preset: str, out: Path | None = None) -> tuple[Path, dict]:
    """`zeroseg teacher train`: the cached checkpoint of a preset, copied to `out` if given."""
    if preset not in PRESETS:
        raise UserError(f"unknown teacher preset {preset!r}: {' | '.join(PRESETS)}")
    path, report = ensure_toy_teacher(PRESETS[preset])
    if out is not None:
        if out.suffix != ".safetensors":
            raise UserError(f"{out}: the checkpoint is safetensors; name it *.safetensors")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        path = out
    return path, report
