#!/usr/bin/env bash
# Submit the tokenization of a corpus as a K-task Slurm array plus the join that runs once all tasks succeeded.
#   slurm/submit_preprocess.sh K INPUT... --tokenizer T --output OUT [tokenize options]
# Run from the repository root. Extra sbatch options for both jobs go in SBATCH_ARGS
# (e.g. SBATCH_ARGS="--partition=cpu --cpus-per-task=32"); logs go to LOG_DIR (default: here).
# Prints the two job ids.
set -euo pipefail
usage="usage: slurm/submit_preprocess.sh K INPUT... --tokenizer T --output OUT [tokenize options]"
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "error: $usage" >&2
  exit 2
fi
parts=$1
shift
out=""
prev=""
for arg in "$@"; do
  [ "$prev" = --output ] && out=$arg
  case $arg in --output=*) out=${arg#--output=} ;; esac
  prev=$arg
done
if [ -z "$out" ]; then
  echo "error: --output OUT is required ($usage)" >&2
  exit 2
fi
if [ ! -f slurm/preprocess.sbatch ]; then
  echo "error: run this from the repository root (slurm/preprocess.sbatch not found in $PWD)" >&2
  exit 2
fi
logs=${LOG_DIR:-.}
mkdir -p "$logs"
# shellcheck disable=SC2086
array=$(sbatch --parsable ${SBATCH_ARGS:-} --output="$logs/%x-%A_%a.out" --array="0-$((parts - 1))" slurm/preprocess.sbatch "$@")
array=${array%%;*}
# shellcheck disable=SC2086
join=$(sbatch --parsable ${SBATCH_ARGS:-} --job-name=preprocess-join --output="$logs/%x-%j.out" --dependency="afterok:$array" \
       --kill-on-invalid-dep=yes slurm/preprocess.sbatch join "$out")
join=${join%%;*}
echo "submitted tokenize array job $array ($parts tasks) and join job $join (runs after all of them succeed)"
echo "$array $join"
