#!/usr/bin/env bash
# Install Slurm (slurmctld, slurmd, client commands) and munge from Debian's packages when they are missing.
# Needed only by the local-cluster tests (tests/test_slurm.py); a no-op when they are installed or when not root.
set -euo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 \
  || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "WARNING: ${need[*]} missing and cannot be installed (needs root and apt-get): the Slurm tests will be SKIPPED" >&2
  exit 0
fi
echo "installing ${need[*]} with apt-get ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >&2
