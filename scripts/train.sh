#!/usr/bin/env bash
# The main job: GRPO on the built-in CPU default (tiny 3-digit-addition model, prepared and cached
# on first use), 1 rollout rank + 1 train rank. Any Hydra override may follow, e.g.
#   bash scripts/train.sh pipeline.num_steps=100 trainer.optim.lr=2e-4 placement=colocated
# NPROC=4 bash scripts/train.sh placement=split_2x2   runs on 4 ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
exec .venv/bin/torchrun --nproc_per_node="${NPROC:-2}" --standalone \
  -m asyncflow.train "$@"
