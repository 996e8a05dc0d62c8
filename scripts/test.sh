#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then pytest (slow and gpu tests are opt-in: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q "$@"
