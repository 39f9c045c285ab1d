#!/usr/bin/env bash
# Create .venv and install everything the project needs (idempotent: re-runs only when requirements change).
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on a GPU cluster install the CUDA build
# first (see README) or set e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.installed
want=$( (cat requirements.txt; echo "$TORCH_SPEC") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "installing into .venv (torch: $TORCH_SPEC) ..." >&2
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" >&2 || true
.venv/bin/python -c "import torch, deepspeed, sentencepiece, transformers, datasets, mpi4py" \
  || { echo "error: installation into .venv failed (see pip output above)" >&2; exit 1; }
echo "$want" > "$stamp"
