#!/usr/bin/env bash
# Raw text to a trained, exported model on this machine's CPU: corpus, tokenizer, shards, 2-process ZeRO-3
# training of configs/tiny.yaml, Hugging Face export, and a generated sample. Everything lands in runs/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
OUT=runs/quickstart
NPROC=${NPROC:-2}
rm -rf "$OUT/checkpoints" "$OUT/hf" "$OUT/log.jsonl"
mkdir -p "$OUT"
set -x
python -m preprocess demo-corpus --output "$OUT/corpus"
python -m preprocess train-tokenizer "$OUT/corpus" --output "$OUT/tokenizer" --vocab-size 4096
python -m preprocess tokenize "$OUT/corpus" --tokenizer "$OUT/tokenizer/tokenizer.model" --output "$OUT/tokens" \
  --workers 2 --overwrite
torchrun --standalone --nproc_per_node "$NPROC" -m pipeline.train --config configs/tiny.yaml "$@"
python -m pipeline.convert to-hf "$OUT/checkpoints" "$OUT/hf" --overwrite
python -m pipeline.generate "$OUT/hf" --prompt "The import statement" --max-new-tokens 48 --temperature 0.7 --top-k 40
{ set +x; } 2>/dev/null
python - "$OUT/log.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"split"' not in l]
print(f"\ntraining loss: {rows[0]['loss']:.3f} at step {rows[0]['step']} -> {rows[-1]['loss']:.3f} at step {rows[-1]['step']}")
PY
cat <<MSG

Everything this run wrote is under $OUT/:
  corpus/corpus.jsonl        the built-in corpus (Python's own documentation)
  tokenizer/tokenizer.model  the SentencePiece tokenizer
  tokens/                    Megatron .bin/.idx shards + manifest.json   (python -m preprocess inspect $OUT/tokens)
  checkpoints/               DeepSpeed ZeRO-3 checkpoints; 'latest' names the newest committed one
  log.jsonl                  one JSON line per logged step and evaluation
  hf/                        the Hugging Face export (transformers.AutoModelForCausalLM.from_pretrained("$OUT/hf"))
MSG
