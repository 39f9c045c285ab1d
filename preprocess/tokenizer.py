"""SentencePiece tokenizer training on a uniform sample of documents drawn across all inputs."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile

from .readers import expand_inputs, iter_raw_lines, iter_records, parse_json_line

log = logging.getLogger("preprocess")

# Ids fixed so that the exported Hugging Face tokenizer and the model agree without a lookup table.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


_JSON_LINES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")


def _candidates(path: str, text_key: str):
    """The documents of one input; JSON lines stay raw bytes (parsed only if sampled: parsing is the slow part)."""
    if path.endswith(_JSON_LINES):
        return (raw for _, raw, _ in iter_raw_lines(path) if raw is not None)
    return (rec.text for rec in iter_records(path, text_key) if rec.text is not None)


def reservoir_sample(inputs: list[str], text_key: str, k: int, seed: int) -> tuple[list[str], int]:
    """A uniform sample of up to k documents over every input (Algorithm R). Returns (sample, candidates seen).

    JSON lines are counted unparsed and parsed once sampled; a sampled record that turns out bad is dropped, so
    the sample is uniform over the good documents and may be a little smaller than k.
    """
    rng = random.Random(seed)
    sample: list = []
    seen = 0
    for path in inputs:
        for doc in _candidates(path, text_key):
            seen += 1
            if len(sample) < k:
                sample.append(doc)
            else:
                j = rng.randrange(seen)
                if j < k:
                    sample[j] = doc
    texts = [d if isinstance(d, str) else parse_json_line(d, text_key, "", 0).text for d in sample]
    return [t for t in texts if t is not None], seen


def _sentences(docs: list[str], max_bytes: int):
    # SentencePiece learns from "sentences": feed paragraphs/lines, cut to its length limit.
    for doc in docs:
        for line in doc.splitlines():
            line = line.strip()
            if line:
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def train_tokenizer(inputs: list[str], output: str, vocab_size: int, model_type: str = "bpe",
                    text_key: str = "text", sample_docs: int = 100_000, seed: int = 1234) -> str:
    """Train a byte-fallback SentencePiece model; returns the path of `tokenizer.model`.

    Normalisation is the identity and whitespace is kept, as in Llama's tokenizer, so that decode(encode(x))
    gives x back and the Hugging Face export encodes identically.
    """
    import sentencepiece as spm

    paths = expand_inputs(inputs)
    docs, seen = reservoir_sample(paths, text_key, sample_docs, seed)
    if not docs:
        raise ValueError(f"no usable documents in {' '.join(inputs)} (text key {text_key!r})")
    log.info("training %s tokenizer (vocab %d) on %d of %d documents from %d files",
             model_type, vocab_size, len(docs), seen, len(paths))
    os.makedirs(output, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=output)
    try:
        max_bytes = 16384
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(docs, max_bytes), model_prefix=os.path.join(tmp, "tokenizer"),
            vocab_size=vocab_size, model_type=model_type, character_coverage=0.9995,
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            max_sentence_length=max_bytes, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
            hard_vocab_limit=False, num_threads=os.cpu_count() or 1, minloglevel=2)
        for name in ("tokenizer.model", "tokenizer.vocab"):
            os.replace(os.path.join(tmp, name), os.path.join(output, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model_path = os.path.join(output, "tokenizer.model")
    info = describe_tokenizer(model_path)
    info.update(model_type=model_type, sample_docs=len(docs), documents_seen=seen, inputs=paths)
    with open(os.path.join(output, "tokenizer.json.tmp"), "w") as f:
        json.dump(info, f, indent=2)
    os.replace(os.path.join(output, "tokenizer.json.tmp"), os.path.join(output, "tokenizer_info.json"))
    return model_path


def describe_tokenizer(model_path: str) -> dict:
    """What a manifest records about a tokenizer: path, sha256, vocab size, special ids."""
    import sentencepiece as spm

    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path}: tokenizer model not found (train one with `preprocess train-tokenizer`)")
    sp = spm.SentencePieceProcessor(model_file=model_path)
    with open(model_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    eod = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
    return {"path": os.path.abspath(model_path), "sha256": sha, "vocab_size": sp.get_piece_size(),
            "eod_id": eod, "bos_id": sp.bos_id(), "pad_id": sp.pad_id(), "unk_id": sp.unk_id()}
