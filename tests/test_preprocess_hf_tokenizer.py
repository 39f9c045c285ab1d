"""Hugging Face tokenizers in `preprocess tokenize`: shard ids equal transformers' own ids + EOD for every kind of
tokenizer `--tokenizer` takes, on hard text; byte identity and resume hold; the dtype follows Megatron's rule."""
import json
import os
import shutil
import warnings

import numpy as np
import pytest

from preprocess.indexed import IndexedDataset
from tests.conftest import PREPROCESS_SPLIT, run_cli, shard_bytes

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
HARD = [
    "Hello world.", " a leading space", "a trailing space ", "   spaces   around   ", "\ttabs\tand\nnew\n\nlines\n",
    "naïve café résumé Ångström façade Zürich (NFD: cafe\u0301)", "日本語のテキストと中文文本，还有한국어。",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and ✓", "digits 1234567 ４５６ ½ 3.14159", "x",
    "special-looking text: <|endoftext|> </s> <s> <|end_of_text|> inside", "line\r\nwindows\r\n",
]


def _long_document(texts) -> str:
    """About 1.1 M characters (past the workers' piecewise threshold) of prose, CJK runs and emoji."""
    parts, n, i = [], 0, 0
    while n < 1_100_000:
        p = texts[i % len(texts)] + (" 中文没有空格的长句子" * 40 if i % 7 == 0 else "") + (" 🙂 naïve" if i % 5 else "")
        parts.append(p)
        n += len(p) + 2
        i += 1
    return "\n\n".join(parts)


def _auto(folder):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(folder))


def _bare_folder(tokenizer_json, folder):
    """A folder holding only this tokenizer.json: what AutoTokenizer makes of the file alone."""
    folder.mkdir()
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def train_texts(corpus_dir):
    return [json.loads(line)["text"] for line in open(corpus_dir / "corpus.jsonl")] + HARD


@pytest.fixture(scope="module")
def kinds(train_texts, corpus_dir, tokenizer_model, tmp_path_factory):
    """{kind: (--tokenizer path, the transformers tokenizer whose ids are the reference, expected EOD token)}."""
    import sentencepiece as spm
    from tokenizers import ByteLevelBPETokenizer, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, \
        trainers

    d = tmp_path_factory.mktemp("hf_tokenizers")
    out = {}
    # byte-level BPE trained by our CLI: an AutoTokenizer folder
    run_cli("-m", "preprocess", "train-tokenizer", str(corpus_dir), "--output", str(d / "byte_bpe"), "--vocab-size",
            "2000", "--model-type", "byte-bpe")
    byte_bpe = _auto(d / "byte_bpe")
    out["hf_folder_byte_bpe"] = (d / "byte_bpe", byte_bpe, "<|endoftext|>")
    # the same tokenizer.json given as a file
    shutil.copyfile(d / "byte_bpe" / "tokenizer.json", d / "gpt2_like.json")
    bare = _auto(_bare_folder(d / "gpt2_like.json", d / "gpt2_like_folder"))
    out["tokenizer_json"] = (d / "gpt2_like.json", bare, "<|endoftext|>")
    # a folder of vocab.json + merges.txt (GPT-2's original layout)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(train_texts, vocab_size=1500, special_tokens=["<|endoftext|>"], show_progress=False)
    (d / "vocab_merges").mkdir()
    bpe.save_model(str(d / "vocab_merges"))
    (d / "vocab_merges" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    vm = _auto(d / "vocab_merges")
    out["vocab_merges_folder"] = (d / "vocab_merges", vm, "<|endoftext|>")
    # Llama 3 style: regex split + byte level, <|begin_of_text|> added by the post-processor, <|end_of_text|> EOS
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(train_texts, trainers.BpeTrainer(vocab_size=1800, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tk.save(str(d / "llama3_like.json"))
    l3 = _auto(_bare_folder(d / "llama3_like.json", d / "llama3_like_folder"))
    out["llama3_tokenizer_json"] = (d / "llama3_like.json", l3, "<|end_of_text|>")
    # our own SentencePiece model: the reference is transformers loading the tokenizer `convert to-hf` exports
    from pipeline.convert.tokenizer import save_hf_tokenizer

    save_hf_tokenizer(str(tokenizer_model), str(d / "sp_export"))
    out["sentencepiece"] = (tokenizer_model, _auto(d / "sp_export"), "</s>")
    return out


def _reference(auto, kind):
    """text -> ids as transformers gives them (our SentencePiece documents carry no BOS, as before)."""
    special = kind != "sentencepiece"
    return lambda text: auto(text, add_special_tokens=special)["input_ids"]


@pytest.fixture(scope="module")
def parity_corpus(train_texts, tmp_path_factory):
    texts = HARD + train_texts[:40] + [_long_document(train_texts[:200])] + HARD[:3]
    d = tmp_path_factory.mktemp("parity_corpus")
    with open(d / "docs.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return d / "docs.jsonl", texts


def _documents(out):
    m = json.loads((out / "manifest.json").read_text())
    docs = []
    for s in m["shards"]:
        ds = IndexedDataset(out / s["name"])
        docs += [ds[i].tolist() for i in range(len(ds))]
    return m, docs


KINDS = ["hf_folder_byte_bpe", "tokenizer_json", "vocab_merges_folder", "llama3_tokenizer_json", "sentencepiece"]


@pytest.mark.parametrize("kind", KINDS)
def test_shard_ids_equal_transformers_ids_plus_eod(kinds, parity_corpus, tmp_path, kind):
    import sentencepiece as spm

    from preprocess.tokenize import tokenize

    path, auto, eod_token = kinds[kind]
    reference = _reference(auto, kind)
    corpus, texts = parity_corpus
    tokenize([str(corpus)], str(path), str(tmp_path / "o"), workers=2 if kind == "llama3_tokenizer_json" else 1)
    m, docs = _documents(tmp_path / "o")
    tok = m["tokenizer"]
    assert tok["kind"] == ("sentencepiece" if kind == "sentencepiece" else "hf")
    assert tok["path"] == os.path.abspath(path) and len(tok["sha256"]) == 64 and "backend" not in tok
    assert len(docs) == len(texts) and not m["skipped"]
    assert tok["eod_id"] == auto.convert_tokens_to_ids(eod_token) and tok["vocab_size"] == len(auto)
    if kind == "sentencepiece":
        sp = spm.SentencePieceProcessor(model_file=str(path))
        assert (tok["eod_id"], tok["bos_id"], tok["pad_id"]) == (sp.eos_id(), sp.bos_id(), sp.pad_id())
    else:
        assert tok["eod_id"] == auto.convert_tokens_to_ids(eod_token) and tok["eod_token"] == eod_token
        if kind == "llama3_tokenizer_json":
            assert tok["bos_id"] == auto.convert_tokens_to_ids("<|begin_of_text|>") == docs[0][0]
    assert m["dtype"] == "uint16"
    for i, (text, ids) in enumerate(zip(texts, docs)):
        assert ids == reference(text) + [tok["eod_id"]], f"document {i}: {text[:60]!r}"
    if kind == "sentencepiece":  # and SentencePiece itself agrees (as Megatron's own preprocess_data encodes)
        assert all(ids == sp.encode(t) + [sp.eos_id()] for t, ids in zip(texts, docs))


@pytest.mark.parametrize("kind", ["hf_folder_byte_bpe", "llama3_tokenizer_json", "sentencepiece"])
def test_documents_cut_into_many_pieces_encode_the_same(kinds, parity_corpus, monkeypatch, kind):
    """Long documents are encoded piecewise (bounded memory): with a tiny threshold, every cut is exercised."""
    from preprocess import worker
    from preprocess.tokenizer import describe_tokenizer

    path, auto, _ = kinds[kind]
    reference = _reference(auto, kind)
    _, texts = parity_corpus
    long = [t[:200_000] for t in texts if len(t) > 100_000]
    tok = describe_tokenizer(str(path))
    monkeypatch.setattr(worker, "HUGE_CHARS", 3000)
    worker.init_worker(tok, "text", "uint16")
    if tok["kind"] == "hf":
        assert len(list(worker._hf_segments(long[0], 3000))) > 50  # it really was cut
    flat, lengths = worker.encode_texts(long + HARD)
    docs = np.split(flat, np.cumsum(lengths)[:-1])
    for text, ids in zip(long + HARD, docs):
        assert ids.tolist() == reference(text) + [tok["eod_id"]]


def test_workers_parts_and_resume_give_the_same_bytes(kinds, multi_corpus, tmp_path, capsys):
    path = str(kinds["hf_folder_byte_bpe"][0])

    from preprocess.inspect import inspect
    from preprocess.join import join
    from preprocess.tokenize import tokenize

    split = {"shard_tokens": int(PREPROCESS_SPLIT[1]), "unit_bytes": int(PREPROCESS_SPLIT[3])}

    def run(out, *extra, env=None, check=True):
        return run_cli("-m", "preprocess", "tokenize", str(multi_corpus), "--tokenizer", path, "--output",
                       str(tmp_path / out), *PREPROCESS_SPLIT, *extra, env=env, check=check)

    tokenize([str(multi_corpus)], path, str(tmp_path / "w1"), workers=1, **split)
    reference = shard_bytes(tmp_path / "w1")
    assert len(reference["shards"]) >= 8
    run("w2", "--workers", "2")
    assert shard_bytes(tmp_path / "w2") == reference
    killed = run("k", "--workers", "2", env={"PREPROCESS_KILL_AFTER_SHARDS": "5"}, check=False)
    assert killed.returncode == -9 and not json.loads((tmp_path / "k" / "manifest.json").read_text())["complete"]
    tokenize([str(multi_corpus)], path, str(tmp_path / "k"), workers=2, **split)
    assert shard_bytes(tmp_path / "k") == reference
    for part in (1, 0):
        tokenize([str(multi_corpus)], path, str(tmp_path / "p"), part=part, num_parts=2, **split)
    join(str(tmp_path / "p"))
    assert shard_bytes(tmp_path / "p") == reference
    capsys.readouterr()
    inspect(str(tmp_path / "p"), docs=1)
    first = json.loads((multi_corpus / "part0.jsonl").read_text().splitlines()[0])["text"]
    assert first[:200] in capsys.readouterr().out  # decoded with the HF tokenizer


@pytest.mark.parametrize("vocab,dtype", [(65_499, "uint16"), (65_500, "int32")])
def test_dtype_follows_megatron_rule_at_the_boundary(kinds, tmp_path, vocab, dtype):
    """Megatron-core's DType.optimal_dtype: uint16 below 65,500 tokens (added tokens count), else int32."""
    from tokenizers import Tokenizer

    from preprocess.tokenize import tokenize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset

    tk = Tokenizer.from_file(str(kinds["tokenizer_json"][0]))
    tk.add_tokens([f"<extra_{i}>" for i in range(vocab - tk.get_vocab_size())])
    assert tk.get_vocab_size() == vocab
    tk.save(str(tmp_path / "big.json"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": f"top id <extra_{vocab - 2001}> and text"}) + "\n")
    tokenize([str(tmp_path / "c.jsonl")], str(tmp_path / "big.json"), str(tmp_path / "o"))
    m, docs = _documents(tmp_path / "o")
    assert m["dtype"] == dtype and m["tokenizer"]["vocab_size"] == vocab
    assert indexed_dataset.DType.optimal_dtype(vocab) == np.dtype(dtype).type
    theirs = indexed_dataset.IndexedDataset(str(tmp_path / "o" / m["shards"][0]["name"]))
    assert theirs.index.dtype == np.dtype(dtype).type and theirs[0].tolist() == docs[0]
    assert vocab - 1 in docs[0]  # the last added token, id 65,498 or 65,499


def test_eod_token_for_a_tokenizer_without_eos(kinds, tmp_path):
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(kinds["llama3_tokenizer_json"][0]))
    data = json.loads(tk.to_str())
    for t in data["added_tokens"]:  # rename the EOS so that nothing says which token ends a document
        t["content"] = t["content"].replace("<|end_of_text|>", "<|reserved_0|>")
    data["model"]["vocab"] = {k.replace("<|end_of_text|>", "<|reserved_0|>"): v for k, v in data["model"]["vocab"].items()}
    (tmp_path / "no_eos.json").write_text(json.dumps(data))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    args = ["-m", "preprocess", "tokenize", str(tmp_path / "c.jsonl"), "--tokenizer", str(tmp_path / "no_eos.json"),
            "--output", str(tmp_path / "o")]
    p = run_cli(*args, check=False)
    assert p.returncode == 2 and "--eod-token" in p.stderr and "no end-of-text token" in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    bad = run_cli(*args, "--eod-token", "<|nope|>", check=False)
    assert bad.returncode == 2 and "--eod-token '<|nope|>' is not a token" in bad.stderr
    run_cli(*args, "--eod-token", "<|eot_id|>")
    m, docs = _documents(tmp_path / "o")
    assert m["tokenizer"]["eod_id"] == tk.token_to_id("<|eot_id|>") == docs[0][-1]
    assert m["tokenizer"]["eod_token"] == "<|eot_id|>"


def test_not_a_tokenizer_is_one_error_line(corpus_dir, tmp_path, capsys):
    from preprocess.cli import main

    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "bad_config").mkdir()
    (tmp_path / "bad_config" / "tokenizer_config.json").write_text("{not json")
    (tmp_path / "not_tokenizer.json").write_text('{"a": 1}')
    (tmp_path / "garbage.model").write_bytes(b"\x00\x01garbage" * 10)
    cases = {  # --tokenizer -> a fragment of the one-line error
        str(corpus_dir / "corpus.jsonl"): "not a SentencePiece model, tokenizer.json or tokenizer folder",
        str(tmp_path / "garbage.model"): "not a SentencePiece model",
        str(tmp_path / "empty_folder"): "a folder with no tokenizer in it",
        str(tmp_path / "bad_config"): "AutoTokenizer cannot load this folder",
        str(tmp_path / "not_tokenizer.json"): "not a tokenizer.json",
        str(tmp_path / "missing"): "no such file or folder",
    }
    for path, fragment in cases.items():
        with pytest.raises(SystemExit) as e:
            main(["tokenize", str(corpus_dir), "--tokenizer", path, "--output", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, (path, err)
        assert err.startswith("error: --tokenizer") and fragment in err and "\n" not in err, (path, err)


def test_byte_bpe_folder_is_gpt2_style(kinds):
    folder = kinds["hf_folder_byte_bpe"][0]
    auto = _auto(folder)
    assert auto.eos_token == "<|endoftext|>" and len(auto) == 2000
    for text in HARD:
        assert auto.decode(auto(text)["input_ids"]) == text  # byte level: lossless, no unknown tokens
    info = json.loads((folder / "tokenizer_info.json").read_text())
    assert info["kind"] == "hf" and info["model_type"] == "byte-bpe" and info["eod_token"] == "<|endoftext|>"


def test_a_train_tokenizer_folder_means_its_sentencepiece_model(tokenizer_model):
    from preprocess.tokenizer import describe_tokenizer

    tok = describe_tokenizer(str(tokenizer_model.parent))
    assert tok["kind"] == "sentencepiece" and tok["path"] == str(tokenizer_model)
    assert tok == describe_tokenizer(str(tokenizer_model))


@pytest.mark.parametrize("model_type,vocab,fragment", [
    ("bpe", "0", "--vocab-size must be at least 1"),
    ("unigram", "-5", "--vocab-size must be at least 1"),
    ("byte-bpe", "100", "--vocab-size must be at least 257 for byte-bpe"),
    ("bpe", "200", "--vocab-size 200: SentencePiece refused it"),
])
def test_train_tokenizer_refuses_impossible_vocab_sizes(corpus_dir, tmp_path, capsys, model_type, vocab, fragment):
    from preprocess.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train-tokenizer", str(corpus_dir), "--output", str(tmp_path / "t"), "--vocab-size", vocab,
              "--model-type", model_type, "--sample-docs", "50"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and fragment in err and "\n" not in err, err


@pytest.mark.parametrize("model_type", ["bpe", "byte-bpe"])
def test_train_tokenizer_warns_when_the_corpus_is_too_small(tmp_path, caplog, model_type):
    from preprocess.tokenizer import train_tokenizer

    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": " ".join(words[(i + j) % 5] for j in range(20))})
                                              + "\n" for i in range(50)))
    train_tokenizer([str(tmp_path / "c.jsonl")], str(tmp_path / "t"), 30000, model_type)
    warning = [r.getMessage() for r in caplog.records if "warning:" in r.getMessage()]
    assert len(warning) == 1 and "not --vocab-size 30000" in warning[0] and "\n" not in warning[0], warning
    got = json.loads((tmp_path / "t" / "tokenizer_info.json").read_text())["vocab_size"]
    assert f"the tokenizer has {got}," in warning[0] and got < 30000
