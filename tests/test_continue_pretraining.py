"""The tutorial path of the README ("Continue pretraining a Hugging Face model"), end to end on 2 ranks:

a GPT-2-shaped model made with transformers and a byte-level BPE tokenizer folder made with `tokenizers`
→ convert from-hf (no --config) → preprocess tokenize with that folder → train with train.freeze_layers (ZeRO-3,
2 data-parallel ranks) → convert to-hf → transformers loads it; its tokenizer encodes exactly as the original;
the frozen tensors equal the original's and the others moved; greedy generation equals ours, and the
`generate` CLI on the checkpoint speaks through the same tokenizer."""
from __future__ import annotations

import filecmp
import json

import pytest
import torch

from pipeline import convert
from tests.conftest import run_cli, torchrun

SEQ = 64
FROZEN = 2  # of 3 blocks
TEXTS = ["Hello world", "  leading and trailing spaces  ", "naïve café façade", "数据并行 と テンソル並列",
         "emoji 🚀🔥 done", "x" * 3000, "line\nbreaks\tand tabs", "<|endoftext|> in text"]


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory, corpus_dir):
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    tmp = tmp_path_factory.mktemp("continue")
    hf_dir = tmp / "gpt2-small"
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(corpus_dir / "corpus.jsonl")], vocab_size=1000, min_frequency=2, special_tokens=["<|endoftext|>"])
    hf_dir.mkdir()
    bpe.save(str(tmp / "tokenizer.json"))
    tok = transformers.GPT2TokenizerFast(tokenizer_file=str(tmp / "tokenizer.json"), model_max_length=SEQ)
    tok.save_pretrained(hf_dir)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=3, n_head=4, n_positions=SEQ,
                                  bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hf_dir)

    ckpt, tokens = tmp / "ckpt", tmp / "tokens"
    convert.main(["from-hf", str(hf_dir), str(ckpt)])  # the CLI, in this process
    run_cli("-m", "preprocess", "tokenize", corpus_dir, "--tokenizer", hf_dir, "--output", tokens, "--workers", "2")
    torchrun(2, "-m", "pipeline.train", "--config", ckpt / "global_step0" / "run_config.json",
             f"data.datasets=[{{path: {tokens}, weight: 1}}]", "data.split=98,2,0", "train.steps=4",
             "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=1e-3", "train.warmup_steps=1",
             f"train.freeze_layers={FROZEN}", f"log.jsonl={tmp / 'log.jsonl'}")
    convert.main(["to-hf", str(ckpt), str(tmp / "out")])
    return tmp


def test_the_export_loads_with_the_original_tokenizer_files(tutorial):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tutorial / "out", dtype=torch.float32)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if (tutorial / "gpt2-small" / name).exists():
            assert filecmp.cmp(tutorial / "gpt2-small" / name, tutorial / "out" / name, shallow=False), name
    orig, back = AutoTokenizer.from_pretrained(tutorial / "gpt2-small"), AutoTokenizer.from_pretrained(tutorial / "out")
    for text in TEXTS:
        assert back(text)["input_ids"] == orig(text)["input_ids"], text
    config = json.loads((tutorial / "out" / "config.json").read_text())
    assert config["eos_token_id"] == orig.eos_token_id and config["n_positions"] == SEQ


def test_frozen_tensors_equal_the_original_and_the_rest_trained(tutorial):
    from safetensors.torch import load_file

    before = load_file(tutorial / "gpt2-small" / "model.safetensors")
    after = load_file(tutorial / "out" / "model.safetensors")
    assert set(after) <= set(before)
    for name, t in after.items():
        frozen = name in ("transformer.wte.weight", "transformer.wpe.weight") or \
            any(name.startswith(f"transformer.h.{i}.") for i in range(FROZEN))
        assert torch.equal(t, before[name]) == frozen, name
    losses = [json.loads(line)["loss"] for line in (tutorial / "log.jsonl").read_text().splitlines()
              if "split" not in json.loads(line)]
    assert len(losses) == 4


def test_greedy_generation_equals_ours(tutorial, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generate import generate, load_model, main

    hf = AutoModelForCausalLM.from_pretrained(tutorial / "out", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tutorial / "out")
    prompt = "The import statement"
    ids = tok(prompt)["input_ids"]
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert generate(load_model(str(tutorial / "ckpt")), ids, max_new_tokens=12, eod_id=None) == theirs
    main([str(tutorial / "ckpt"), "--prompt", prompt, "--max-new-tokens", "12"])
    stopped = theirs[:theirs.index(tok.eos_token_id)] if tok.eos_token_id in theirs else theirs
    assert capsys.readouterr().out == tok.decode(ids + stopped, skip_special_tokens=True) + "\n"
