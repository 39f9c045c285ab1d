"""Hugging Face tokenizers: load a `tokenizer.json` or an `AutoTokenizer` folder, describe it, train a byte-level BPE.

The parent process resolves the tokenizer once, the way `transformers` would, and hands the workers its Rust
`tokenizers` serialization: they encode with `tokenizers` alone (no transformers, no torch in the workers).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

log = logging.getLogger("preprocess")

# Files that make up a tokenizer in a Hugging Face folder (its sha256 is taken over these, not the weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")
# A bare tokenizer.json does not say which token ends a document (nor does a folder whose config names no EOS):
# take the first of these special tokens it has (GPT-2 and Qwen2, Llama 3, SentencePiece conversions, Gemma).
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
BYTE_BPE_EOS = "<|endoftext|>"


def files_sha256(folder: str, names) -> str:
    """sha256 over the named files of `folder` that exist, each framed by its name and length."""
    h = hashlib.sha256()
    for name in sorted(names):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def load_backend(path: str):
    """(backend `tokenizers.Tokenizer`, declared eos/bos/pad token strings, sha256) of a tokenizer.json or folder."""
    from tokenizers import Tokenizer

    if os.path.isfile(path):
        try:
            backend = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise ValueError(f"--tokenizer {path}: not a tokenizer.json ({e})") from None
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        return backend, {}, sha
    import warnings

    # AutoTokenizer applies the folder's tokenizer_config.json (e.g. add_bos_token) to the backend tokenizer,
    # so `tokenizer(text)` and our shards agree. (transformers imports torch here: the parent pays it, once.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # OSError, ValueError, KeyError...: any failure means "not a tokenizer folder"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--tokenizer {path}: transformers.AutoTokenizer cannot load this folder ({first})") \
                from None
        finally:
            hf_logging.set_verbosity(verbosity)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"--tokenizer {path}: AutoTokenizer gives a {type(tok).__name__}, which has no Rust "
                         f"`tokenizers` backend; add a tokenizer.json to the folder")
    special = {k: getattr(tok, f"{k}_token", None) for k in ("eos", "bos", "pad")}
    return backend, special, files_sha256(path, TOKENIZER_FILES)


def _token_id(backend, token: str | None):
    return None if token is None else backend.token_to_id(str(token))


def describe_hf(path: str, eod_token: str | None = None) -> dict:
    """What the manifest records about an HF tokenizer, plus `backend` (its serialization, for the workers)."""
    backend, special, sha = load_backend(path)
    vocab = backend.get_vocab(with_added_tokens=True)
    vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    if eod_token is not None:
        eod = backend.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"--eod-token {eod_token!r} is not a token of {path}")
    else:
        eod_token = special.get("eos")
        if eod_token is None or _token_id(backend, eod_token) is None:
            specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
            eod_token = next((n for n in EOS_NAMES if n in specials), None)
        if eod_token is None:
            raise ValueError(f"--tokenizer {path}: the tokenizer has no end-of-text token (EOS); name the token "
                             f"that ends a document with --eod-token")
        eod = backend.token_to_id(eod_token)
    info = {"kind": "hf", "path": os.path.abspath(path), "sha256": sha, "vocab_size": vocab_size,
            "eod_id": eod, "eod_token": eod_token}
    around = specials_around(backend)
    if special.get("bos") is None and around and len(around[0]) == 1:
        info["bos_id"] = around[0][0]  # a bare tokenizer.json's BOS is the one its post-processor adds
    for k in ("bos", "pad"):
        i = _token_id(backend, special.get(k))
        if i is not None:
            info[f"{k}_id"] = i
    info["backend"] = backend.to_str()
    return info


def specials_around(backend) -> tuple[list[int], list[int]] | None:
    """The ids the post-processor puts before and after a single text (Llama 3: [<|begin_of_text|>], []), found
    by encoding a probe with and without special tokens; None when they are not a plain prefix and suffix."""
    probe = "a"
    bare = backend.encode(probe, add_special_tokens=False).ids
    full = backend.encode(probe, add_special_tokens=True).ids
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return None


def train_byte_bpe(docs: list[str], output: str, vocab_size: int) -> str:
    """Train a GPT-2-style byte-level BPE on `docs` into the folder `output` (tokenizer.json +
    tokenizer_config.json, loadable by AutoTokenizer; EOS `<|endoftext|>`). Returns the folder."""
    from tokenizers import ByteLevelBPETokenizer

    os.makedirs(output, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=output)
    try:
        bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
        bpe.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=[BYTE_BPE_EOS],
                                show_progress=False)
        bpe.save(os.path.join(tmp, "bpe.json"))
        _save_pretrained(os.path.join(tmp, "bpe.json"), os.path.join(tmp, "hf"))
        names = sorted(os.listdir(os.path.join(tmp, "hf")))
        for name in names:
            os.replace(os.path.join(tmp, "hf", name), os.path.join(output, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _save_pretrained(tokenizer_file: str, folder: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast(tokenizer_file=tokenizer_file, bos_token=BYTE_BPE_EOS, eos_token=BYTE_BPE_EOS,
                            unk_token=BYTE_BPE_EOS)
    tok.save_pretrained(folder)
