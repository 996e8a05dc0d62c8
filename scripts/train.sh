#!/usr/bin/env bash
# The main job on the built-in CPU default: sets up .venv if needed, prepares the tiny default
# model (cached after the first run) and shows it answering held-out prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m asyncflow.prepare "$@"
