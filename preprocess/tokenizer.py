"""Tokenizers: training (SentencePiece, or byte-level BPE) on a uniform sample of documents drawn across all
inputs; and, for any tokenizer `--tokenizer` names, its kind, what the manifest records, and decoding."""
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


MODEL_TYPES = ("bpe", "unigram", "byte-bpe")
_MIN_VOCAB = {"byte-bpe": 257}  # 256 byte symbols + <|endoftext|>


def train_tokenizer(inputs: list[str], output: str, vocab_size: int, model_type: str = "bpe",
                    text_key: str = "text", sample_docs: int = 100_000, seed: int = 1234) -> str:
    """Train a tokenizer on a uniform sample of the inputs; returns what to pass as `tokenize --tokenizer`.

    `bpe`/`unigram`: a byte-fallback SentencePiece model, `OUTPUT/tokenizer.model`. `byte-bpe`: a GPT-2-style
    byte-level BPE trained with `tokenizers`, the folder OUTPUT that `transformers.AutoTokenizer` loads.
    A vocabulary larger than the sample supports is trained as large as it can be, with a warning.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if vocab_size < _MIN_VOCAB.get(model_type, 1):
        raise ValueError(f"--vocab-size must be at least {_MIN_VOCAB.get(model_type, 1)} for {model_type}, "
                         f"got {vocab_size}")
    if sample_docs < 1:
        raise ValueError(f"--sample-docs must be >= 1, got {sample_docs}")
    paths = expand_inputs(inputs)
    docs, seen = reservoir_sample(paths, text_key, sample_docs, seed)
    if not docs:
        raise ValueError(f"no usable documents in {' '.join(inputs)} (text key {text_key!r})")
    log.info("training %s tokenizer (vocab %d) on %d of %d documents from %d files",
             model_type, vocab_size, len(docs), seen, len(paths))
    if model_type == "byte-bpe":
        from .hf_tokenizer import train_byte_bpe

        result = train_byte_bpe(docs, output, vocab_size)
    else:
        result = _train_sentencepiece(docs, output, vocab_size, model_type)
    info = describe_tokenizer(result)
    info.pop("backend", None)
    got = info["vocab_size"]
    if got < vocab_size:
        log.warning("warning: the sample supports only %d tokens, so the tokenizer has %d, not --vocab-size %d "
                    "(sample more documents with --sample-docs, or ask for fewer)", got, got, vocab_size)
    info.update(model_type=model_type, sample_docs=len(docs), documents_seen=seen, inputs=paths)
    with open(os.path.join(output, "tokenizer_info.json.tmp"), "w") as f:
        json.dump(info, f, indent=2)
    os.replace(os.path.join(output, "tokenizer_info.json.tmp"), os.path.join(output, "tokenizer_info.json"))
    return result


def _train_sentencepiece(docs: list[str], output: str, vocab_size: int, model_type: str) -> str:
    """Train a byte-fallback SentencePiece model; returns the path of `tokenizer.model`.

    Normalisation is the identity and whitespace is kept, as in Llama's tokenizer, so that decode(encode(x))
    gives x back and the Hugging Face export encodes identically.
    """
    import sentencepiece as spm

    os.makedirs(output, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=output)
    try:
        max_bytes = 16384
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_sentences(docs, max_bytes), model_prefix=os.path.join(tmp, "tokenizer"),
                vocab_size=vocab_size, model_type=model_type, character_coverage=0.9995,
                byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                max_sentence_length=max_bytes, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
                hard_vocab_limit=False, num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 300 vs 352."
            raise ValueError(f"--vocab-size {vocab_size}: SentencePiece refused it: {str(e).strip()}") from None
        for name in ("tokenizer.model", "tokenizer.vocab"):
            os.replace(os.path.join(tmp, name), os.path.join(output, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(output, "tokenizer.model")


# ---- any tokenizer: which kind, what the manifest records, how to decode ------------------------------------
_HF_FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def resolve_tokenizer(path: str) -> tuple[str, str]:
    """(kind, path) of `--tokenizer PATH`: a SentencePiece model file, a tokenizer.json, a folder that
    AutoTokenizer loads, or a folder written by `train-tokenizer` holding only tokenizer.model."""
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, n)) for n in _HF_FOLDER_FILES):
            return "hf", path
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return "sentencepiece", os.path.join(path, "tokenizer.model")
        raise ValueError(f"--tokenizer {path}: a folder with no tokenizer in it (expected tokenizer.json, "
                         f"tokenizer_config.json, vocab.json + merges.txt, or tokenizer.model)")
    if not os.path.isfile(path):
        raise ValueError(f"--tokenizer {path}: no such file or folder (train one with `preprocess train-tokenizer`)")
    return ("hf" if path.endswith(".json") else "sentencepiece"), path


def describe_tokenizer(path: str, eod_token: str | None = None) -> dict:
    """What a manifest records about a tokenizer: kind (sentencepiece|hf), path, sha256 (over its files),
    vocab_size (added tokens included), eod_id and the other special ids it has. For an HF tokenizer the dict
    also holds `backend`, its `tokenizers` serialization for the workers (not written to the manifest)."""
    kind, path = resolve_tokenizer(path)
    if kind == "hf":
        from .hf_tokenizer import describe_hf

        return describe_hf(path, eod_token)
    return _describe_sentencepiece(path, eod_token)


def _describe_sentencepiece(model_path: str, eod_token: str | None) -> dict:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=model_path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"--tokenizer {model_path}: not a SentencePiece model, tokenizer.json or tokenizer folder "
                         f"({str(e).strip().splitlines()[0]})") from None
    with open(model_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    if eod_token is not None:
        eod = sp.piece_to_id(eod_token)
        if sp.id_to_piece(eod) != eod_token:
            raise ValueError(f"--eod-token {eod_token!r} is not a piece of {model_path}")
    elif sp.eos_id() >= 0:
        eod = sp.eos_id()
    else:
        raise ValueError(f"--tokenizer {model_path}: the model has no end-of-text piece (EOS); name the piece "
                         f"that ends a document with --eod-token")
    info = {"kind": "sentencepiece", "path": os.path.abspath(model_path), "sha256": sha,
            "vocab_size": sp.get_piece_size(), "eod_id": eod}
    for k, i in (("bos_id", sp.bos_id()), ("pad_id", sp.pad_id()), ("unk_id", sp.unk_id())):
        if i >= 0:
            info[k] = i
    return info


def manifest_entry(tok: dict) -> dict:
    """describe_tokenizer's dict as the manifest records it (without the in-memory `backend`)."""
    return {k: v for k, v in tok.items() if k != "backend"}


def decoder(tok: dict):
    """ids -> text, for the manifest's tokenizer entry (inspect --docs)."""
    kind, path = resolve_tokenizer(tok["path"])
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=path)
        return lambda ids: sp.decode([int(t) for t in ids])
    from .hf_tokenizer import load_backend

    backend = load_backend(path)[0]
    return lambda ids: backend.decode([int(t) for t in ids], skip_special_tokens=False)
