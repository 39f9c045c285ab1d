#!/usr/bin/env bash
# Create the environment if needed and run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_slurm.sh  # slurm-wlm + munge for tests/test_slurm.py (apt-get, as root)
exec .venv/bin/python -m pytest tests "$@"
