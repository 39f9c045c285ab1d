# Shared by the sbatch scripts (sourced, not run): locate the repository and its python, pick the rendezvous
# address, and start one srun step whose tasks go through slurm/task.sh.
#
# Settings read from the environment of `sbatch` (exported to the job by default):
#   PYTHON        interpreter (default: .venv/bin/python in the submit directory, else python3)
#   LAUNCH        env (default: RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/NTASKS/LOCALID)
#                 or pmi2 (srun --mpi=pmi2; DeepSpeed discovers the ranks through mpi4py)
#   MASTER_PORT   rendezvous port (default: derived from the job id, so jobs sharing a node do not collide)

# The batch script runs from a copy in Slurm's spool folder: the repository is where sbatch was called.
REPO=${SLURM_SUBMIT_DIR:?run this through sbatch from the repository root}
cd "$REPO" || exit 1
if [ ! -f slurm/task.sh ]; then
  echo "error: $REPO has no slurm/task.sh: call sbatch from the repository root" >&2
  exit 1
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# Rendezvous on the first host of the allocation, by the address Slurm itself uses for it (NodeAddr).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_ADDR=$(scontrol show node "$first_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export MASTER_ADDR=${MASTER_ADDR:-$first_node}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
export LAUNCH=${LAUNCH:-env}

# launch_step CMD...: start `srun` in the background with one task per (node x ntasks-per-node); sets STEP_PID.
launch_step() {
  local args=(--kill-on-bad-exit=1)
  [ "$LAUNCH" = pmi2 ] && args+=(--mpi=pmi2)
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  srun "${args[@]}" bash slurm/task.sh "$@" &
  STEP_PID=$!
}

# wait_step: wait for the srun step through any number of trapped signals; sets STEP_RC.
wait_step() {
  while kill -0 "$STEP_PID" 2>/dev/null; do
    wait "$STEP_PID"
  done
  wait "$STEP_PID"
  STEP_RC=$?
}

# job_log: the file that gets the job's stderr (by default its one log, shared by srun and this script).
job_log() {
  scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdErr=[^ ]*' | cut -d= -f2
}

# fail RC: end the log with the failure's one-line reason (the last `error:` line, else the last exception
# line of a traceback) and exit RC.
fail() {
  local rc=$1 log reason=""
  log=$(job_log)
  if [ -n "$log" ] && [ -f "$log" ]; then
    reason=$(grep -a '^error: ' "$log" | tail -n1)
    [ -z "$reason" ] && reason=$(grep -aE '^[A-Za-z_.]*(Error|Exception|Interrupt)\b' "$log" | tail -n1)
  fi
  echo "${reason:-error: step exited with code $rc (see above)}" >&2
  exit "$rc"
}
