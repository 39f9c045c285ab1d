# Shared by the sbatch scripts (sourced, not run): find the repository and its python, pick the rendezvous
# address, run one srun step whose tasks go through slurm/task.sh, and requeue the job when a signal stopped it.
#
# Read from the environment of `sbatch` (exported to the job by default):
#   PYTHON        interpreter (default: .venv/bin/python in the submit directory, else python3)
#   LAUNCH        env (default): each task gets RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/NTASKS/LOCALID;
#                 pmi2: srun --mpi=pmi2, and DeepSpeed discovers the ranks through mpi4py
#   MASTER_PORT   rendezvous port (default: derived from the job id, so jobs sharing a node do not collide)
#   MAX_REQUEUES  stop requeueing after this many restarts (default 20)
# The caller sets SCRIPT (its name, for log lines) before sourcing.

EXIT_REQUEUE=85                      # "stopped on a signal after saving its state: requeue me"
MAX_REQUEUES=${MAX_REQUEUES:-20}
RESTARTS=${SLURM_RESTART_COUNT:-0}

# The batch script runs from a copy in Slurm's spool folder: the repository is where sbatch was called.
REPO=${SLURM_SUBMIT_DIR:?run this through sbatch from the repository root}
cd "$REPO" || exit 1
if [ ! -f slurm/task.sh ]; then
  echo "error: $REPO has no slurm/task.sh: call sbatch from the repository root" >&2
  exit 2
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# Rendezvous on the first host of the allocation, at the address Slurm itself uses for it (NodeAddr).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_ADDR=$(scontrol show node "$first_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export MASTER_ADDR=${MASTER_ADDR:-$first_node}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
export LAUNCH=${LAUNCH:-env}

# Where this run starts in the job's log (one log across requeues): _fail looks for the reason after it.
JOB_ERR_LOG=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdErr=[^ ]*' | cut -d= -f2)
LOG_START=$(stat -c %s "$JOB_ERR_LOG" 2>/dev/null || echo 0)

# The batch shell alone gets --signal=B:USR1 (time limit) and TERM (preemption); pass USR1 on to the step's
# processes: the trainer checkpoints and exits 85, preprocessing just stops (a re-run resumes it).
SIGNALLED=""
_forward() {
  [ -n "$SIGNALLED" ] && return
  SIGNALLED=$1
  echo "$SCRIPT: caught SIG$1; asking the step to save its state and stop (USR1)"
  scancel --signal=USR1 "$SLURM_JOB_ID"
}
trap '_forward USR1' USR1
trap '_forward TERM' TERM

# run_step CMD...: run CMD once per task (srun, through slurm/task.sh), waiting through trapped signals; then
# exit 0 if it succeeded, requeue the job if it exited 85 or was stopped by a signal (up to MAX_REQUEUES), or
# else end the log with the failure's one-line reason and exit non-zero.
run_step() {
  local args=(--kill-on-bad-exit=1) pid rc state
  [ "$LAUNCH" = pmi2 ] && args+=(--mpi=pmi2)
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  if [ -n "$SIGNALLED" ]; then
    rc=$EXIT_REQUEUE  # signalled before the step started: nothing to stop
  else
    srun "${args[@]}" bash slurm/task.sh "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
      wait "$pid"  # returns early when a trapped signal arrives
    done
    wait "$pid"
    rc=$?
  fi
  if [ "$rc" -eq 0 ]; then
    echo "$SCRIPT: done"
    exit 0
  fi
  if [ "$rc" -eq "$EXIT_REQUEUE" ] || [ -n "$SIGNALLED" ]; then
    if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
      echo "error: stopped after $RESTARTS requeues (MAX_REQUEUES=$MAX_REQUEUES); resubmit the same command to continue" >&2
      exit "$EXIT_REQUEUE"
    fi
    # `scancel` also sends TERM: a cancelled job stays cancelled. Slurm itself requeues preempted jobs in
    # PreemptMode=REQUEUE, which leaves the job no longer RUNNING here.
    state=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    if [ "$state" != RUNNING ]; then
      echo "$SCRIPT: step exited with $rc after a signal; the job is $state, so not requeueing it"
      exit "$rc"
    fi
    echo "$SCRIPT: step exited with $rc after a signal; requeueing (restart $((RESTARTS + 1)) of at most $MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "error: scontrol requeue $SLURM_JOB_ID failed; resubmit the same command to continue" >&2
    exit "$EXIT_REQUEUE"
  fi
  _fail "$rc"
}

# _fail RC: repeat the failure's reason as the log's last line (the last `error:` line, else the last exception
# line of a traceback), then exit RC.
_fail() {
  local reason="" out
  if [ -n "$JOB_ERR_LOG" ] && [ -f "$JOB_ERR_LOG" ]; then
    out=$(tail -c +"$((LOG_START + 1))" "$JOB_ERR_LOG")
    reason=$(grep -a '^error: ' <<< "$out" | tail -n1)
    [ -z "$reason" ] && reason=$(grep -aE '^[A-Za-z_.]*(Error|Exception|Interrupt)\b' <<< "$out" | tail -n1)
  fi
  echo "${reason:-error: the step exited with code $1 (see above)}" >&2
  exit "$1"
}
