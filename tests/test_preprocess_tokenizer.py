"""train-tokenizer: the sample is drawn uniformly over all inputs, special tokens are where the exporter expects."""
import json
from collections import Counter

import pytest
import sentencepiece as spm

from preprocess.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, reservoir_sample
from tests.conftest import run_cli

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]


def _inputs(d):
    """Three inputs of 200 documents; only the last one uses the word 'quixoticzephyr'."""
    paths = []
    for f in range(3):
        path = d / f"in{f}.jsonl"
        with open(path, "w") as out:
            for i in range(200):
                words = [WORDS[(i * 7 + j + f) % len(WORDS)] for j in range(30)]
                if f == 2:
                    words[::3] = ["quixoticzephyr"] * len(words[::3])
                out.write(json.dumps({"text": " ".join(words) + f" file {f} doc {i}."}) + "\n")
        paths.append(str(path))
    return paths


def test_reservoir_sample_spans_all_inputs(tmp_path):
    paths = _inputs(tmp_path)
    sample, seen = reservoir_sample(paths, "text", 90, seed=3)
    assert seen == 600 and len(sample) == 90
    per_file = Counter(t.split(" file ")[1].split()[0] for t in sample)
    assert set(per_file) == {"0", "1", "2"}
    assert all(15 <= n <= 45 for n in per_file.values()), per_file  # ~30 each


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_learns_from_the_last_input_too(tmp_path, model_type):
    paths = _inputs(tmp_path)
    run_cli("-m", "preprocess", "train-tokenizer", *paths, "--output", str(tmp_path / "tok"), "--vocab-size", "400",
            "--sample-docs", "60", "--model-type", model_type)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    # q, x and y occur only in the last input: without it in the sample they would be byte-fallback pieces
    pieces = sp.encode("quixoticzephyr", out_type=str)
    assert not any(p.startswith("<0x") for p in pieces), pieces
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    text = "gamma  delta\n\tkappa 123 ünïcödé ✓"
    assert sp.decode(sp.encode(text)) == text  # byte fallback, identity normalisation
    info = json.loads((tmp_path / "tok" / "tokenizer_info.json").read_text())
    assert info["documents_seen"] == 600 and info["sample_docs"] == 60


def test_reservoir_sample_drops_bad_records(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\nnot json\n{"text": 3}\n\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("three")
    sample, seen = reservoir_sample([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], "text", 10, seed=0)
    assert sorted(sample) == ["one", "three", "two"] and seen == 5
