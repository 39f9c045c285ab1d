"""Parallel, resumable tokenization of a corpus into Megatron `.bin`/`.idx` shards plus `manifest.json`.

One reader walks the inputs in order (files sorted, records in file order) and hands batches of raw records
to worker processes; results come back in order (`imap`), so the shards are byte-identical whatever the
number of workers. A shard closes at the first document boundary past `--shard-tokens`; each closed shard is
renamed into place and only then listed in the manifest together with the input position just after it, so
a killed run restarts from the last closed shard and produces the same bytes.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from multiprocessing import get_context

import numpy as np

from . import __version__
from .indexed import IndexedWriter, dtype_for_vocab
from .readers import expand_inputs, iter_raw_lines, iter_records, parse_json_line
from .tokenizer import describe_tokenizer

log = logging.getLogger("preprocess")
FORMAT_VERSION = 1
BATCH_RECORDS = 256
_JSONL = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")


class BadRecord(ValueError):
    """Raised under --strict with `file:line: reason`."""


# ---- worker side -------------------------------------------------------------------------------------------
_sp = None
_eod = None
_text_key = "text"


def _init_worker(model_path: str, eod_id: int, text_key: str) -> None:
    global _sp, _eod, _text_key
    import sentencepiece as spm

    _sp = spm.SentencePieceProcessor(model_file=model_path)
    _eod, _text_key = eod_id, text_key


def _encode_batch(batch):
    """batch: (file index, path, [(line, kind, payload)]) → (file index, lines, lengths, reasons, tokens).

    kind is "raw" (JSON bytes to parse), "text" (a document) or "bad" (payload is the reason).
    Lengths are -1 for bad records, whose reason is in `reasons` (line → reason).
    """
    file_index, path, items = batch
    texts, lines, reasons = [], [], {}
    for line, kind, payload in items:
        lines.append(line)
        if kind == "raw":
            rec = parse_json_line(payload, _text_key, path, line)
            text, reason = rec.text, rec.reason
        elif kind == "text":
            text, reason = payload, None
        else:
            text, reason = None, payload
        if text is None:
            reasons[line] = reason
        else:
            texts.append(text)
    ids = _sp.encode(texts) if texts else []
    lengths = np.full(len(lines), -1, dtype=np.int64)
    it = iter(ids)
    for i, line in enumerate(lines):
        if line not in reasons:
            lengths[i] = len(next(it)) + 1
    flat = np.fromiter((t for doc in ids for t in (*doc, _eod)), dtype=np.int64,
                       count=int(lengths[lengths > 0].sum()))
    return file_index, np.asarray(lines, dtype=np.int64), lengths, reasons, flat


# ---- reader side -------------------------------------------------------------------------------------------
def _batches(paths, text_key, start_file, start_line):
    """Yield batches of raw records from the input position (start_file, first line >= start_line)."""
    for fi in range(start_file, len(paths)):
        path = paths[fi]
        first = start_line if fi == start_file else 0
        items = []
        if path.endswith(_JSONL):
            source = ((line, "bad", reason) if reason else (line, "raw", raw)
                      for line, raw, reason in iter_raw_lines(path))
        else:
            source = ((r.line, "bad", r.reason) if r.text is None else (r.line, "text", r.text)
                      for r in iter_records(path, text_key))
        for item in source:
            if item[0] < first:
                continue
            items.append(item)
            if len(items) >= BATCH_RECORDS:
                yield fi, path, items
                items = []
        if items:
            yield fi, path, items


def _args_key(paths, tok, text_key, shard_tokens):
    return {"inputs": [[p, os.path.getsize(p) if os.path.isfile(p) else _dir_size(p)] for p in paths],
            "tokenizer_sha256": tok["sha256"], "text_key": text_key, "shard_tokens": shard_tokens}


def _dir_size(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Progress:
    """tqdm on a terminal, a log line every `interval` seconds otherwise."""

    def __init__(self, interval: float = 30.0):
        self.t0 = self.last = time.time()
        self.docs = self.tokens = 0
        self.interval = interval
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", unit_scale=True, desc="tokenize")

    def update(self, docs, tokens):
        self.docs += docs
        self.tokens += tokens
        now = time.time()
        rate = lambda n: n / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{rate(self.docs):,.0f} docs/s {rate(self.tokens):,.0f} tok/s", refresh=False)
        elif now - self.last >= self.interval:
            self.last = now
            log.info("tokenize: %d docs, %d tokens, %.0f docs/s, %.0f tokens/s",
                     self.docs, self.tokens, rate(self.docs), rate(self.tokens))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def tokenize(inputs: list[str], tokenizer: str, output: str, text_key: str = "text", workers: int = 1,
             shard_tokens: int = 1 << 30, strict: bool = False, overwrite: bool = False) -> dict:
    """Tokenize `inputs` into `output`; returns the manifest. Resumes an interrupted run with the same arguments."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    paths = expand_inputs(inputs)
    tok = describe_tokenizer(tokenizer)
    key = _args_key(paths, tok, text_key, shard_tokens)
    os.makedirs(output, exist_ok=True)
    manifest_path = os.path.join(output, "manifest.json")
    manifest = _load_or_start(manifest_path, key, tok, paths, overwrite, output)
    if manifest["complete"]:
        log.info("%s is already complete for these arguments: nothing to do", output)
        return manifest

    dtype = dtype_for_vocab(tok["vocab_size"])
    pos = manifest["resume"]
    skipped = Counter(manifest["skipped"])
    docs_per_input = [i["documents"] for i in manifest["inputs"]]
    pending_skips: Counter = Counter()
    pending_docs = [0] * len(paths)
    if manifest["shards"]:
        log.info("resuming after %d complete shards at %s line %d", len(manifest["shards"]),
                 paths[pos["file"]] if pos["file"] < len(paths) else "<end>", pos["line"])

    def new_writer():
        name = f"shard_{len(manifest['shards']):05d}"
        return name, IndexedWriter(os.path.join(output, name), dtype)

    def close_shard(name, writer, next_file, next_line):
        writer.finalize()
        manifest["shards"].append({"name": name, "documents": writer.documents, "tokens": writer.tokens,
                                   "sha256": writer.sha256})
        skipped.update(pending_skips)
        pending_skips.clear()
        for i, n in enumerate(pending_docs):
            docs_per_input[i] += n
            pending_docs[i] = 0
        manifest["skipped"] = dict(sorted(skipped.items()))
        for i, n in enumerate(docs_per_input):
            manifest["inputs"][i]["documents"] = n
        manifest["resume"] = {"file": next_file, "line": next_line}
        write_json_atomic(manifest_path, manifest)
        log.info("wrote %s: %d documents, %d tokens", name, writer.documents, writer.tokens)

    name, writer = new_writer()
    progress = _Progress()
    ctx = get_context("spawn") if workers > 1 else None
    pool = ctx.Pool(workers, _init_worker, (tok["path"], tok["eod_id"], text_key)) if ctx else None
    if pool is None:
        _init_worker(tok["path"], tok["eod_id"], text_key)
    try:
        batches = _batches(paths, text_key, pos["file"], pos["line"])
        results = pool.imap(_encode_batch, batches, chunksize=1) if pool else map(_encode_batch, batches)
        for fi, lines, lengths, reasons, flat in results:
            offset = 0
            good_docs = 0
            for line, n in zip(lines.tolist(), lengths.tolist()):
                if n < 0:
                    reason = reasons[line]
                    if strict:
                        raise BadRecord(f"{paths[fi]}:{line}: {reason}")
                    pending_skips[reason] += 1
                    continue
                writer.add_documents(flat[offset:offset + n], np.array([n]))
                offset += n
                good_docs += 1
                pending_docs[fi] += 1
                if writer.tokens >= shard_tokens:
                    close_shard(name, writer, fi, line + 1)
                    name, writer = new_writer()
            progress.update(good_docs, offset)
        if writer.documents:
            close_shard(name, writer, len(paths), 0)
        else:
            writer.abort()
            skipped.update(pending_skips)
            manifest["skipped"] = dict(sorted(skipped.items()))
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    if not manifest["shards"]:
        raise ValueError(f"no usable documents in {' '.join(inputs)} (skipped: {dict(skipped) or 'none'}); "
                         f"check --text-key {text_key!r}")
    manifest["complete"] = True
    manifest["resume"] = {"file": len(paths), "line": 0}
    write_json_atomic(manifest_path, manifest)
    return manifest


def _load_or_start(manifest_path, key, tok, paths, overwrite, output):
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            try:
                old = json.load(f)
            except ValueError:
                raise ValueError(f"{manifest_path}: unreadable manifest; pass --overwrite to start again") from None
        if old.get("args") == key and not overwrite:
            return old
        if not overwrite:
            raise ValueError(f"{output} holds output of different arguments (inputs, tokenizer, text key or "
                             f"shard size); pass --overwrite to replace it")
        for shard in old.get("shards", []):
            for ext in (".bin", ".idx"):
                p = os.path.join(output, shard["name"] + ext)
                if os.path.exists(p):
                    os.remove(p)
        os.remove(manifest_path)
    tok_entry = {k: tok[k] for k in ("path", "sha256", "vocab_size", "eod_id")}
    return {"format_version": FORMAT_VERSION, "version": __version__, "complete": False, "tokenizer": tok_entry,
            "dtype": str(dtype_for_vocab(tok["vocab_size"])), "shards": [],
            "inputs": [{"path": p, "bytes": b, "documents": 0} for p, b in key["inputs"]],
            "skipped": {}, "args": key, "resume": {"file": 0, "line": 0}}
