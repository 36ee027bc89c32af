"""Student train-step speed per preset, fp32 against bf16 autocast, side by side on this CPU.

    PYTHONPATH=. python benchmarks/presets.py PRESET BATCH THREADS

One step = forward with 60% masking, the `localised` recipe's losses (`zeroseg train`'s default) on
random targets, backward, AdamW.
Each precision is timed twice, alternating (5 steps after 2 warm-up steps each time).
"""

import sys
import time
from dataclasses import replace

import torch

from zeroseg.geometry import grid_boxes
from zeroseg.trainer.config import recipe
from zeroseg.trainer.loader import select_columns
from zeroseg.geometry import box_membership
from zeroseg.trainer.losses import zeroseg_losses
from zeroseg.trainer.model import ZeroSegStudent

name, batch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
config = recipe(preset_name=name)  # the default recipe, as `zeroseg train`
model = ZeroSegStudent(replace(config.model, out_dim=128))
size = model.config.image_size
optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
features = torch.randn(batch, 30, 128)
grids = (1, 2, 3, 4)
columns = select_columns(grid_boxes(grids), grids, grids)  # all 30 crops, as train picks them
local = torch.from_numpy(columns.local)
member = box_membership(columns.boxes, model.config.grid)
rates: dict[str, list[float]] = {}
for precision in ("fp32", "bf16", "fp32", "bf16"):
    for i in range(7):
        if i == 2:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(pixels, 0.6)
        loss, _ = zeroseg_losses(out, features, local, config.losses, member)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rates.setdefault(precision, []).append(5 / (time.perf_counter() - start))
print(name, "batch", batch, "threads", threads, {k: [round(r, 2) for r in v] for k, v in rates.items()}, "steps/s")
