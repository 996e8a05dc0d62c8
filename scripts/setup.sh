#!/usr/bin/env bash
# Creates .venv idempotently: torch first (pinned CPU wheel unless a CUDA torch is already present),
# then asyncflow with the extras this machine can use. A second run only checks and exits fast.
#   EXTRAS=dev,hf,bench scripts/setup.sh     (default: dev,hf,tasks)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,hf,tasks}
TORCH_VERSION=2.13.0
stamp="$VENV/.asyncflow-setup"
want="$(cat pyproject.toml setup.cfg | sha1sum | cut -c1-12) extras=$EXTRAS"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
py="$VENV/bin/python"
pip_install() {  # quiet, minus the index-location warnings some pip configs print per package
  "$py" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
pip_install --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  # An unpinned torch would pull a multi-GB CUDA build: pin the CPU wheel first.
  pip_install "torch==$TORCH_VERSION"
fi
pip_install -e ".[$EXTRAS]"
echo "$want" > "$stamp"
echo "asyncflow: environment ready in $VENV ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
