#!/usr/bin/env bash
# Create the environment if needed and run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_slurm.sh  # slurm-wlm + munge for tests/test_slurm.py (apt-get, as root)
# One PATH (the venv's tools first) and a project-local cache for DeepSpeed's compiled ops, so that the op is
# built once and never rebuilt because another ninja or another project's lock got in the way.
export PATH="$PWD/.venv/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
exec .venv/bin/python -m pytest tests "$@"
