"""Check `convert` exports across transformers versions, by hand (it needs the package registry).

    .venv/bin/python scripts/hf_versions.py write OUT          # with the venv's transformers: exports + references
    PYTHONPATH=T .venv/bin/python scripts/hf_versions.py read OUT   # with another version installed under T

`write` converts a small random model of each family (Llama 3.1 llama3 RoPE, Llama 3.2 tied, linear RoPE,
Mistral, Qwen2, GPT-2) from-hf then to-hf, and a llama export with our SentencePiece tokenizer; it stores the
original models' logits and SentencePiece's ids. `read` loads every export with that transformers and prints
one PASS/FAIL line each (logits within 1e-4, tokenizer ids equal). To put another version under T:

    .venv/bin/pip install --target T --no-deps "transformers==4.46.3" "tokenizers==0.20.3" \\
        "huggingface_hub==0.26.5" requests urllib3 idna certifi charset_normalizer

Run `write` under one version and `read` under another, both ways (the exporting side matters too).
"""
from __future__ import annotations

import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["The import statement finds a module.", " lead", "a  b", "naïve café 数据 🚀"]


def write(out: str) -> None:
    import sentencepiece as spm
    import torch

    sys.path.insert(0, ROOT)
    from pipeline import convert
    from preprocess.tokenizer import train_tokenizer
    from tests.test_hf_families import FAMILIES, VOCAB, hf_model

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "corpus"))
    x = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = {}
    for fam in FAMILIES:
        model = hf_model(fam)
        model.save_pretrained(f"{out}/{fam}-src")
        convert.main(["from-hf", f"{out}/{fam}-src", f"{out}/{fam}-ckpt"])
        convert.main(["to-hf", f"{out}/{fam}-ckpt", f"{out}/{fam}-hf"])
        with torch.no_grad():
            ref[fam] = model(x).logits.tolist()
    from pydoc_data.topics import topics

    with open(f"{out}/corpus/c.jsonl", "w") as f:
        for text in topics.values():
            f.write(json.dumps({"text": text}) + "\n")
    sp = train_tokenizer([f"{out}/corpus"], f"{out}/sp", vocab_size=512)
    shutil.copytree(f"{out}/llama3.1-ckpt", f"{out}/sp-ckpt")
    for name in ("tokenizer", "hf_source"):
        shutil.rmtree(f"{out}/sp-ckpt/{name}", ignore_errors=True)
    shutil.copy(sp, f"{out}/sp-ckpt/tokenizer.model")
    convert.main(["to-hf", f"{out}/sp-ckpt", f"{out}/sp-hf"])
    ref["sp"] = ref["llama3.1"]
    ids = [spm.SentencePieceProcessor(model_file=sp).encode(t) for t in TEXTS]
    with open(f"{out}/ref.json", "w") as f:
        json.dump({"x": x.tolist(), "logits": ref, "sp_ids": ids}, f)


def read(out: str) -> int:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(f"{out}/ref.json") as f:
        ref = json.load(f)
    x, v, failed = torch.tensor(ref["x"]), transformers.__version__, 0
    for fam, logits in ref["logits"].items():
        try:
            model = AutoModelForCausalLM.from_pretrained(f"{out}/{fam}-hf", torch_dtype=torch.float32).eval()
            with torch.no_grad():
                d = (model(x).logits - torch.tensor(logits)).abs().max().item()
            ok = d <= 1e-4
            print(f"{'PASS' if ok else 'FAIL'} transformers {v} {fam}: {type(model).__name__}, max |logits diff| {d:.1e}")
        except Exception as e:  # noqa: BLE001 - reported as a FAIL line
            ok = False
            print(f"FAIL transformers {v} {fam}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        failed += not ok
    try:
        tok = AutoTokenizer.from_pretrained(f"{out}/sp-hf")
        ok = [tok.encode(t, add_special_tokens=False) for t in TEXTS] == ref["sp_ids"]
        print(f"{'PASS' if ok else 'FAIL'} transformers {v} SentencePiece export: {type(tok).__name__}, "
              f"model_max_length {tok.model_max_length}, pad id {tok.pad_token_id}")
    except Exception as e:  # noqa: BLE001
        ok = False
        print(f"FAIL transformers {v} SentencePiece export: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return failed + (not ok)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "read"):
        print(__doc__)
        sys.exit(2)
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        sys.exit(1 if read(sys.argv[2]) else 0)
