#!/usr/bin/env bash
# The checks only a CUDA machine can make, in one short run (~5-8 min on one H100/H200), for a session that is
# lent a GPU: NCCL collectives from the trainer, bf16 and fp16 training (the loss scaler's skipped steps),
# ZeRO-3 and ZeRO-1 on the GPU, export and generation on the GPU, the MFU benchmark, and block-causal attention's
# FlexAttention path (against the SDPA mask, in training, and its cost).
#   bash scripts/gpu_check.sh                      sets up .venv (TORCH_SPEC: the CUDA build of torch, see README)
#   PYTHON=python3 bash scripts/gpu_check.sh       uses an existing Python with CUDA torch; no set-up
# On a lent machine without network (the `device` tool): its python3 has CUDA torch, numba, sentencepiece,
# transformers, safetensors, pyyaml; carry wheels of the rest (deepspeed hjson pydantic pydantic-core
# annotated-types typing-inspection zstandard, for cp312) in an excluded .whl/ folder, install them with
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`, export PYTHONPATH=/tmp/site, then run this
# with PYTHON=python3. Logs go under ${OUT:-runs/gpu_check}; one PASS/FAIL line per check; non-zero on a FAIL.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
rm -rf "$OUT" && mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0} bash scripts/setup.sh || exit 1
  PYTHON="$PWD/.venv/bin/python"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$OUT/torch_extensions}" PYTHONUNBUFFERED=1
python() { "$PYTHON" "$@"; }
torchrun() { "$PYTHON" -m torch.distributed.run "$@"; }
python -c "import torch, sys; print(torch.__version__, torch.cuda.get_device_name()); sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "FAIL: torch sees no CUDA device (install the CUDA build: TORCH_SPEC='torch==2.13.0 --index-url ...')"; exit 1; }
fails=0
check() {  # check NAME CMD...: run CMD, log to $OUT/NAME.log, one PASS/FAIL line
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then echo "PASS $name ($((SECONDS - t0)) s)"
  else echo "FAIL $name ($((SECONDS - t0)) s): $(grep -m1 '^error' "$OUT/$name.log" || tail -n 1 "$OUT/$name.log")"; fails=$((fails + 1)); fi
}
data() {
  python -m preprocess demo-corpus --output "$OUT/corpus" &&
  python -m preprocess train-tokenizer "$OUT/corpus" --output "$OUT/tokenizer" --vocab-size 4096 &&
  python -m preprocess tokenize "$OUT/corpus" --tokenizer "$OUT/tokenizer/tokenizer.model" --output "$OUT/tokens" --workers 4
}
train() {  # train NAME OVERRIDES...: one GPU, NCCL, the tiny config on the demo tokens, 60 steps
  local name=$1; shift
  torchrun --standalone --nproc_per_node 1 -m pipeline.train --config configs/tiny.yaml train.steps=60 \
    "data.datasets=[{path: $OUT/tokens, weight: 1}]" checkpoint.dir="$OUT/$name/ckpt" log.jsonl="$OUT/$name/log.jsonl" "$@" &&
  python - "$OUT/$name/log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"split"' not in l]
print(f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, {rows[-1]['tokens_per_sec']:.0f} tokens/s")
sys.exit(0 if rows[-1]["loss"] < rows[0]["loss"] else 1)
PY
}
resume() {  # a second run on the bf16 ZeRO-3 checkpoint: resumes at step 60 and trains on to 80
  torchrun --standalone --nproc_per_node 1 -m pipeline.train --config configs/tiny.yaml train.steps=80 \
    parallel.zero_stage=3 train.precision=bf16 train.override_lr_schedule=true \
    "data.datasets=[{path: $OUT/tokens, weight: 1}]" \
    checkpoint.dir="$OUT/zero3-bf16/ckpt" log.jsonl="$OUT/zero3-bf16/log.jsonl" && grep -q '"step": 80' "$OUT/zero3-bf16/log.jsonl"
}
async_save() {  # checkpoint.async_save on the GPU (device-to-host copy, background write): tags 20 and 40 commit
  train async-zero3-bf16 parallel.zero_stage=3 train.precision=bf16 checkpoint.async_save=true checkpoint.interval=20 \
    checkpoint.keep=5 && test -f "$OUT/async-zero3-bf16/ckpt/global_step20/COMMITTED" &&
  test -f "$OUT/async-zero3-bf16/ckpt/global_step40/COMMITTED"
}
export_and_generate() {
  python -m pipeline.convert to-hf "$OUT/zero3-bf16/ckpt" "$OUT/hf" --dtype bf16 &&
  python -m pipeline.generate "$OUT/hf" --prompt "The import statement" --max-new-tokens 32
}
see_a_run() {  # per-rank forward timing from CUDA events in the log; evaluate and report on the GPU run's files
  python - "$OUT/zero3-bf16/log.jsonl" <<'PY' &&
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"split"' not in l]
print(f"forward {1000 * rows[-1]['rank_forward_s']:.2f} ms/step (CUDA events), slowest rank {rows[-1]['slowest_rank']}")
sys.exit(0 if all(r.get("rank_forward_s", 0) > 0 and r.get("slowest_rank") == 0 for r in rows) else 1)
PY
  python -m pipeline.evaluate "$OUT/zero3-bf16/ckpt" --config configs/tiny.yaml parallel.zero_stage=3 \
    train.precision=bf16 "data.datasets=[{path: $OUT/tokens, weight: 1}]" log.jsonl="$OUT/zero3-bf16/log.jsonl" &&
  python -m pipeline.report "$OUT"/*/log.jsonl --output "$OUT/report"
}
sequence_parallel() {  # parallel.sp=2 (Ulysses: DeepSpeed's all-to-alls over NCCL) with ZeRO-3 and block_causal, 2 GPUs
  local n=sp2-zero3-bf16
  torchrun --standalone --nproc_per_node 2 -m pipeline.train --config configs/tiny.yaml train.steps=60 \
    parallel.sp=2 parallel.zero_stage=3 train.precision=bf16 model.attn_mask_type=block_causal \
    "data.datasets=[{path: $OUT/tokens, weight: 1}]" checkpoint.dir="$OUT/$n/ckpt" log.jsonl="$OUT/$n/log.jsonl" &&
  python - "$OUT/$n/log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"split"' not in l]
print(f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
sys.exit(0 if rows[-1]["loss"] < rows[0]["loss"] else 1)
PY
}
check data data
check zero3-bf16 train zero3-bf16 parallel.zero_stage=3 train.precision=bf16
check zero1-fp16 train zero1-fp16 parallel.zero_stage=1 train.precision=fp16
check zero3-offload train zero3-offload parallel.zero_stage=3 parallel.offload_optimizer=true parallel.offload_params=true train.precision=bf16
check resume-zero3-bf16 resume
check async-save-zero3-bf16 async_save
check export-generate export_and_generate
check see-a-run see_a_run  # needs matplotlib and pyarrow
check compile-zero3-bf16 train compile-zero3-bf16 parallel.zero_stage=3 train.precision=bf16 train.compile=true
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  check sp2-nccl sequence_parallel
else
  echo "SKIP sp2-nccl (Ulysses over NCCL needs 2 GPUs)"
fi
check mfu-bench python bench/model.py --gpu-steps 10  # llama-1b bf16 seq 2048: eager and train.compile MFU
check block-causal-flex python scripts/gpu_block_causal.py  # FlexAttention BlockMask == SDPA mask, fwd + bwd
check block-causal-train train block-causal model.attn_mask_type=block_causal parallel.zero_stage=3 train.precision=bf16
check block-causal-bench python bench/attention.py --reps 3
grep -h "overflow" "$OUT/zero1-fp16.log" | head -n 3
grep -h -i "mfu" "$OUT/mfu-bench.log" | tail -n 4
grep -h "block_causal/causal" "$OUT/block-causal-bench.log"
exit $((fails > 0))
