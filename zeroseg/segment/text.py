"""Class names -> text embeddings in the teacher's space (PAPER.md, "Zero-shot inference").

Each name is put through every prompt template, the teacher's text tower embeds each prompt,
the prompt embeddings are L2-normalised, averaged, and normalised again (CLIP's prompt
ensembling). The result is cached in the feature store under text/<vocab>, so segmenting and
evaluating never load the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from zeroseg.errors import UserError
from zeroseg.stores.features import FeatureStore

# A handful of CLIP-style templates. The toy teacher is trained with these same frames around its
# captions (experiments/toy_teacher.py), so its prompts are in distribution, as CLIP's are for CLIP.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a rendering of a {}.",
)


def parse_classes(spec: str) -> list[str]:
    """`spec` is a file (one class name a line, '#' comments) or a comma-separated list."""
    path = Path(spec)
    if path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        names = [line for line in lines if line]
    elif path.suffix in (".txt", ".csv", ".lst"):
        raise UserError(f"class file {spec} does not exist")
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError(f"no class names in {spec!r}")
    if len(set(names)) != len(names):
        raise UserError(f"class names repeat in {spec!r}")
    return names


def embed_classes(encode_text, names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> np.ndarray:
    """Prompt-ensembled, unit-norm class embeddings (K, D) float32. `encode_text(list[str]) ->
    (N, D) tensor` is the teacher's text tower (Teacher.encode_text)."""
    prompts = [t.format(name) for name in names for t in templates]
    with torch.inference_mode():
        emb = encode_text(prompts).float()  # (K * T, D)
    emb = torch.nn.functional.normalize(emb, dim=-1).view(len(names), len(templates), -1)
    return torch.nn.functional.normalize(emb.mean(1), dim=-1).cpu().numpy()


def cache_vocabulary(
    store_url: str, vocab: str, names: Sequence[str], templates: Sequence[str] = TEMPLATES, teacher: str | None = None
) -> np.ndarray:
    """Embed `names` with the store's teacher `teacher` (None: its first) and write them to that
    teacher's vocabulary `vocab` (text/<vocab>, or teachers/<key>/text/<vocab>).

    The teacher is rebuilt from the store's attributes (arch + pretrained) and must hash to the
    store's sha256: text from any other teacher would live in another embedding space."""
    from zeroseg.pipeline.teacher import load_store_teacher  # open_clip: seconds to import; only embedding needs it

    store = FeatureStore.open(store_url, mode="r+", teacher=teacher)
    teacher = load_store_teacher(store)
    emb = embed_classes(teacher.encode_text, names, templates)
    store.write_text(vocab, list(names), emb, list(templates))
    return emb
