#!/usr/bin/env bash
# Creates .venv with lmctl and everything it needs, from a fresh clone, in about two minutes.
#   bash infra/bootstrap.sh              # CPU or GPU box, picks the right torch build
#   LMCTL_TORCH=... bash infra/bootstrap.sh   # force a torch requirement (e.g. "torch==2.13.0")
# Why torch first: an unpinned `pip install torch` on Linux pulls the multi-GB CUDA build even where
# there is no GPU. Installing the CPU build first (a local wheel where one is cached, else PyTorch's
# CPU index) satisfies the project's `torch>=2.6`, so pip leaves it alone afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LMCTL_VENV:-.venv}
TORCH_VERSION=2.13.0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${LMCTL_TORCH:-}" ]; then
    pip install -q "$LMCTL_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "torch==$TORCH_VERSION"                      # CUDA build from PyPI
  else
    # CPU build: a cached/local wheel if pip's find-links has one, else PyTorch's CPU index.
    pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

# Extras: cloud (SkyPilot) and dev (tests, lint) on a workstation; none on a pod (LMCTL_EXTRAS= , tasks/).
EXTRAS=${LMCTL_EXTRAS-cloud,dev}
pip install -q -e ".${EXTRAS:+[$EXTRAS]}" -c constraints.txt
if [ "${1:-}" = "--refresh-constraints" ]; then
  { grep '^#' constraints.txt; pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$/torch==\1/'; } > constraints.txt.new
  mv constraints.txt.new constraints.txt
fi
pip check
echo "ready: $VENV/bin/lmctl ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
