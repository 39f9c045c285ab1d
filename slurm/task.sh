#!/usr/bin/env bash
# Per-task wrapper that `srun` runs once per GPU: hand DeepSpeed its rank from Slurm's variables, say where the
# task runs, then exec the command. DeepSpeed reads no SLURM_* variable, so plain srun would give every task
# rank 0 of 1. Under LAUNCH=pmi2 the ranks are left to DeepSpeed's mpi4py discovery instead.
set -euo pipefail
if [ "${LAUNCH:-env}" = env ]; then
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
fi
gpu=none
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
  gpu=${visible[$SLURM_LOCALID]:-?}   # pipeline/dist.py selects cuda:LOCAL_RANK among the visible devices
fi
master="${MASTER_ADDR}:${MASTER_PORT}"
[ "${LAUNCH:-env}" = env ] || master="from mpi4py"
echo "launch: node ${SLURMD_NODENAME:-$(hostname)} rank ${SLURM_PROCID}/${SLURM_NTASKS}" \
     "local_rank ${SLURM_LOCALID} gpu ${gpu} master ${master} (${LAUNCH:-env})"
exec "$@"
