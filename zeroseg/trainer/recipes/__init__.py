"""Training recipes as data, as open_clip's model_configs: one JSON file per recipe (`<name>.json`
beside this file) holding every grouping setting of the student and every loss setting. A recipe
says how the student learns; the preset (trainer.model.PRESETS) says how big it is.

Light on purpose (json only, no torch): the CLI lists the recipes for its help text.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from zeroseg.errors import UserError

RECIPE_DIR = Path(__file__).parent
DEFAULT_RECIPE = "localised"  # the one default of TrainConfig, `train`, `ablate` and the demo
DEFAULT_PRESET = "small"  # the student size (trainer.model.PRESETS) a recipe applies to by default
RECIPE_NAMES = tuple(sorted(p.stem for p in RECIPE_DIR.glob("*.json")))


@functools.cache
def load_recipe(name: str) -> dict[str, dict[str, Any]]:
    """{"model": {grouping fields}, "losses": {LossConfig fields}, "train": {other TrainConfig
    fields the recipe sets, e.g. mask_ratio; often none}} of recipe `name`."""
    if name not in RECIPE_NAMES:
        raise UserError(f"unknown recipe {name!r} (have: {', '.join(RECIPE_NAMES)})")
    data = json.loads((RECIPE_DIR / f"{name}.json").read_text())
    return {"model": data["model"], "losses": data["losses"], "train": data.get("train", {})}
