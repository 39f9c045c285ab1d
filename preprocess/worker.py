"""The worker side of `tokenize`: read a task's records, parse, validate and encode them.

A task is one of
  ("bytes", tag, path, a, b, aligned): the lines of a plain JSON-lines file that start in [a, b); the worker reads
      the file itself, so the parent process moves no text. `aligned` says `a` is known to be a line start.
  ("items", tag, path, items): records already read by the parent (compressed, parquet, arrow, txt inputs),
      each `(line, kind, payload)` with kind "raw" (JSON bytes), "text" or "bad" (payload is the reason).
The result is `(tag, tokens, lengths, ends, bad)`: the documents' tokens laid end to end (EOD appended),
their lengths, the input position just after each document, and `[(end position, locator, reason)]` for bad
records. Positions are byte offsets in byte mode and line numbers in record mode; a byte-mode locator is the
line's start offset (turned into a line number only when an error is reported).
"""
from __future__ import annotations

import itertools
import os

import numpy as np

from .readers import parse_json_line

# Documents longer than this many characters are encoded piecewise, cut at single spaces between words, which
# gives the same ids as one call (SentencePiece never merges across a word boundary; an HF tokenizer's
# pre-tokenizer splits there, checked at each cut) without building a Python list of tens of millions of ints.
HUGE_CHARS = 1 << 20
_CUT_WINDOW = 256  # characters each side of a cut that are encoded whole and in two to check the cut

_sp = None  # a SentencePieceProcessor, or
_hf = None  # a tokenizers.Tokenizer
_hf_around = None  # the ids its post-processor puts before and after a text (None: not a plain prefix/suffix)
_eod = 0
_add_eos = False
_dtype = np.dtype(np.uint16)
_text_key = "text"


def init_worker(tok: dict, text_key: str, dtype: str) -> None:
    """Load the tokenizer `tok` (describe_tokenizer's dict) in this worker process."""
    global _sp, _hf, _hf_around, _eod, _add_eos, _dtype, _text_key
    _eod, _text_key, _dtype = tok["eod_id"], text_key, np.dtype(dtype)
    if tok.get("kind") == "hf":
        # One thread per worker: --workers is the parallelism (the Rust thread pool would oversubscribe the CPUs).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        from .hf_tokenizer import specials_around

        _sp, _hf = None, Tokenizer.from_str(tok["backend"])
        _hf.no_truncation()  # as `tokenizer(text)` does: a tokenizer.json may carry truncation or padding
        _hf.no_padding()
        _hf_around = specials_around(_hf)
        return
    import sentencepiece as spm

    _hf, _sp = None, spm.SentencePieceProcessor(model_file=tok["path"])
    _add_eos = _sp.eos_id() == _eod


def _word_gap(text: str, lo: int, hi: int) -> int:
    """Index of the first single space in [lo, hi) with non-space characters on both sides, else -1."""
    j = text.find(" ", lo, hi)
    while j >= 0:
        if not text[j - 1].isspace() and not text[j + 1].isspace():
            return j
        j = text.find(" ", j + 1, hi)
    return -1


def _segments(text: str, size: int):
    """Cut `text` into pieces of about `size` characters at word gaps; the space at a cut is dropped, since
    SentencePiece's dummy prefix puts it back. Text with no word gap nearby (no spaces at all) is cut after a
    newline, or anywhere: it has no word boundaries to respect."""
    start, n = 0, len(text)
    while n - start > size:
        cut = _word_gap(text, start + size, min(n - 1, start + 2 * size))
        if cut < 0:
            nl = text.rfind("\n", start + 1, start + size)
            end = nl + 1 if nl >= 0 else start + size
            yield text[start:end]
            start = end
            continue
        yield text[start:cut]
        start = cut + 1
    yield text[start:]


def _hf_cut_ok(text: str, j: int) -> bool:
    """Whether the HF tokenizer gives the same ids for the text around `j` whole and cut at `j`."""
    a, b = text[max(0, j - _CUT_WINDOW):j], text[j:j + _CUT_WINDOW]
    whole = _hf.encode(a + b, add_special_tokens=False).ids
    return whole == _hf.encode(a, add_special_tokens=False).ids + _hf.encode(b, add_special_tokens=False).ids


def _hf_segments(text: str, size: int):
    """Cut `text` into pieces of about `size` characters just before the space of a word gap (byte-level BPE
    pre-tokenizers attach the space to the next word), at cuts that pass _hf_cut_ok. A tokenizer where no cut
    passes (no pre-tokenizer, or a normalizer that prepends to every text) gets the rest in one piece."""
    start, n = 0, len(text)
    while n - start > size:
        j, tries = _word_gap(text, start + size, min(n - 1, start + 2 * size)), 0
        while j >= 0 and tries < 16 and not _hf_cut_ok(text, j):
            j, tries = _word_gap(text, j + 1, min(n - 1, start + 2 * size)), tries + 1
        if j < 0 or tries == 16:
            break
        yield text[start:j]
        start = j
    yield text[start:]


def _encode_huge(text: str) -> np.ndarray:
    if _hf is not None:
        if _hf_around is None:  # a post-processor that is not a plain prefix/suffix: encode in one call
            return np.asarray(_hf.encode(text).ids + [_eod], dtype=_dtype)
        parts = [np.asarray(_hf_around[0], dtype=_dtype)]
        parts += [np.asarray(_hf.encode(seg, add_special_tokens=False).ids, dtype=_dtype)
                  for seg in _hf_segments(text, HUGE_CHARS)]
        parts.append(np.asarray(_hf_around[1] + [_eod], dtype=_dtype))
        return np.concatenate(parts)
    parts = [np.asarray(_sp.encode(seg), dtype=_dtype) for seg in _segments(text, HUGE_CHARS)]
    parts.append(np.array([_eod], dtype=_dtype))
    return np.concatenate(parts)


def encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents, EOD appended to each; returns (flat tokens, lengths)."""
    if any(len(t) > HUGE_CHARS for t in texts):
        arrays = []
        for t in texts:
            if len(t) > HUGE_CHARS:
                arrays.append(_encode_huge(t))
            else:
                flat, _ = encode_texts([t])
                arrays.append(flat)
        lengths = np.fromiter((len(a) for a in arrays), np.int64, count=len(arrays))
        return (np.concatenate(arrays) if arrays else np.empty(0, _dtype)), lengths
    if _hf is not None:
        # What `tokenizer(text)["input_ids"]` gives (post-processor specials included), in one Rust call.
        encode = getattr(_hf, "encode_batch_fast", _hf.encode_batch)  # _fast (no offsets) since tokenizers 0.20
        ids = [e.ids for e in encode(texts, add_special_tokens=True)]
        add_eod = True
    else:
        ids = _sp.encode(texts, add_eos=_add_eos, num_threads=1)
        add_eod = not _add_eos
    if add_eod:
        for doc in ids:
            doc.append(_eod)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), _dtype, count=int(lengths.sum()))
    return flat, lengths


def _read_range(path: str, a: int, b: int, aligned: bool):
    """Yield (start, end, line bytes) for the lines of `path` that start in [a, b)."""
    with open(path, "rb") as f:
        if not aligned and a > 0:
            f.seek(a - 1)
            if f.read(1) != b"\n":  # a line in progress belongs to the previous task: skip to the next start
                while True:
                    block = f.read(1 << 16)
                    if not block:
                        return
                    i = block.find(b"\n")
                    if i >= 0:
                        a += i + 1
                        break
                    a += len(block)
                    if a >= b:
                        return  # no line starts in [a, b): one long line spans the whole task
        if a >= b:
            return
        f.seek(a)
        data = f.read(b - a)
        if data and not data.endswith(b"\n"):
            data += f.readline()
    lines = data.split(b"\n")
    del data
    if lines and lines[-1] == b"":
        lines.pop()
    pos = a
    for j, line in enumerate(lines):
        lines[j] = None  # drop our reference as we go: a 100 MB line is held once, not twice
        start, pos = pos, pos + len(line) + 1
        yield start, pos, line


def _parse(records):
    """records: (end, locator, kind, payload) → texts, ends, bad."""
    texts, ends, bad = [], [], []
    for end, loc, kind, payload in records:
        if kind == "bad":
            bad.append((end, loc, payload))
            continue
        if kind == "raw":
            if not payload.strip():
                continue
            rec = parse_json_line(payload, _text_key, "", 0)
            text, reason = rec.text, rec.reason
        else:
            text, reason = payload, None
        if text is None:
            bad.append((end, loc, reason))
        else:
            texts.append(text)
            ends.append(end)
    return texts, ends, bad


def run_task(task):
    kind, tag, path = task[0], task[1], task[2]
    if kind == "bytes":
        _, _, _, a, b, aligned = task
        records = ((end, start, "raw", line) for start, end, line in _read_range(path, a, b, aligned))
    else:
        records = ((line, line, k, payload) for line, k, payload in task[3])
    texts, ends, bad = _parse(records)
    tokens, lengths = encode_texts(texts)
    return tag, tokens, lengths, np.asarray(ends, dtype=np.int64), bad
