#!/usr/bin/env bash
# The main job: GRPO on the built-in CPU default (tiny 3-digit-addition model, prepared and cached
# on first use), 1 rollout rank + 1 train rank. Any Hydra override may follow, e.g.
#   bash scripts/train.sh pipeline.num_steps=100 trainer.optim.lr=5e-4 placement=colocated
# NPROC=4 bash scripts/train.sh placement=split_2x2   runs on 4 ranks.
# The config is checked once before any rank starts: a mistake is one line and exit code 2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
exec .venv/bin/python -m asyncflow.launch --nproc-per-node="${NPROC:-2}" "$@"
