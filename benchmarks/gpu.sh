#!/usr/bin/env bash
# Every GPU figure the open issues ask for, in one command, on a CUDA machine (benchmarks/README.md):
#   bash benchmarks/gpu.sh 2>&1 | tee gpu.txt
# Issue 13: the extraction job in bf16 vs the bare teacher and vs fp32, the teacher's waiting share,
# the bf16/fp32 cosine, ImageNet's hours (benchmarks/gpu.py, ViT-B-16, 224 px).
# Issue 14: one GPU's student steps/s and data-waiting share, `small` and `base`, on a 20k-image
# store read in random chunk order (benchmarks/data_wait.py, bf16 autocast).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these are GPU figures')"
"$PY" benchmarks/gpu.py
for preset in small base; do
  "$PY" benchmarks/data_wait.py --device cuda --precision bf16 --preset "$preset" --batch 64 --steps 300 \
    --threads 4 --work /tmp/zeroseg-data-wait-gpu
done
