"""Input discovery and streaming record readers.

Every reader yields `Record`s in file order. A bad record carries a `reason` instead of text, so the caller
counts it (or stops on it under --strict) without the reader deciding policy.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BOM = "\ufeff"
SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".jsonl.gz", ".json.gz", ".json.zst", ".parquet", ".txt")


@dataclass
class Record:
    path: str
    line: int  # 1-based line (or row) number within the file
    text: str | None
    reason: str | None = None  # set when the record is bad; text is then None


def _has_known_suffix(path: str) -> bool:
    return path.endswith(SUFFIXES)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Resolve files, folders and globs into a sorted, de-duplicated list of input paths.

    A folder written by `datasets.Dataset.save_to_disk` counts as one input. Raises FileNotFoundError naming
    the first input that matches nothing.
    """
    found: set[str] = set()
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches or not any(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"{item}: no such file, folder or glob match")
        for m in matches:
            if os.path.isdir(m):
                if is_hf_dataset_dir(m):
                    found.add(os.path.abspath(m))
                    continue
                for root, dirs, files in os.walk(m):
                    dirs.sort()
                    if is_hf_dataset_dir(root):
                        found.add(os.path.abspath(root))
                        dirs[:] = []
                        continue
                    found.update(os.path.abspath(os.path.join(root, f)) for f in files if _has_known_suffix(f))
            elif os.path.isfile(m):
                if not _has_known_suffix(m):
                    raise ValueError(f"{m}: unsupported input type (known: {', '.join(SUFFIXES)}, or a save_to_disk folder)")
                found.add(os.path.abspath(m))
    if not found:
        raise FileNotFoundError(f"{' '.join(inputs)}: no input files found (known types: {', '.join(SUFFIXES)})")
    return sorted(found)


def is_hf_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json")) and os.path.isfile(os.path.join(path, "state.json"))


def get_field(obj, key: str):
    """Look up `key` in a JSON object; a dotted key ("meta.body") reaches into nested objects."""
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _zstd_lines(raw) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd stream; a stream that stops inside a frame raises EOFError, as gzip does."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    d, in_frame, rest = dctx.decompressobj(), False, b""
    with raw:
        while block := raw.read(1 << 20):
            while block:
                in_frame = True
                out = d.decompress(block)
                block = b""
                if d.eof:
                    block, d, in_frame = d.unused_data, dctx.decompressobj(), False
                if out:
                    *lines, rest = (rest + out).split(b"\n")
                    for line in lines:
                        yield line + b"\n"
    if in_frame:
        raise EOFError("zstd stream ends inside a frame")
    if rest:
        yield rest


def _open_text_lines(path: str):
    """An iterable of the lines (bytes) of a plain, gzip or zstd file; opening it raises OSError if unreadable."""
    if path.endswith(".zst"):
        return _zstd_lines(open(path, "rb"))
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def _check_text(text, path: str, line: int) -> Record:
    if text is None:
        return Record(path, line, None, "missing_text_key")
    if not isinstance(text, str):
        return Record(path, line, None, "non_string_text")
    if not text.strip():
        return Record(path, line, None, "empty_document")
    return Record(path, line, text)


def parse_json_line(raw: bytes, text_key: str, path: str, line: int) -> Record:
    """Decode one JSON line into a Record (shared by readers and tokenizer workers). A UTF-8 byte order mark
    before the line is dropped: editors put one at the start of a file, and `cat` of such files mid-file."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Record(path, line, None, "invalid_utf8")
    s = s.removeprefix(BOM)
    try:
        obj = json.loads(s)
    except ValueError:
        return Record(path, line, None, "malformed_json")
    return _check_text(get_field(obj, text_key), path, line)


def iter_raw_lines(path: str) -> Iterator[tuple[int, bytes | None, str | None]]:
    """Yield (line number, raw bytes, None) for each non-blank line of a JSON-lines file.

    A compressed file that ends early yields one final (line, None, "truncated_file"); an unreadable file
    yields (1, None, "unreadable_file").
    """
    try:
        f = _open_text_lines(path)
    except OSError:
        yield 1, None, "unreadable_file"
        return
    n = 0
    try:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield n, raw, None
    except EOFError:  # a .gz/.zst stream that stops early
        yield n + 1, None, "truncated_file"
    except OSError:  # not gzip at all, or a read error
        yield n + 1, None, "unreadable_file" if n == 0 else "truncated_file"
    except Exception as e:  # zstandard.ZstdError: corrupt data
        if type(e).__name__ != "ZstdError":
            raise
        yield n + 1, None, "unreadable_file" if n == 0 else "truncated_file"
    finally:
        f.close()


def iter_records(path: str, text_key: str = "text") -> Iterator[Record]:
    """Stream the documents of one input in file order."""
    if path.endswith(".txt"):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            yield Record(path, 1, None, "unreadable_file")
            return
        try:
            yield _check_text(raw.decode("utf-8-sig"), path, 1)
        except UnicodeDecodeError:
            yield Record(path, 1, None, "invalid_utf8")
        return
    if path.endswith(".parquet") or os.path.isdir(path):
        yield from _iter_arrow(path, text_key)
        return
    for line, raw, reason in iter_raw_lines(path):
        yield Record(path, line, None, reason) if reason else parse_json_line(raw, text_key, path, line)


def _iter_arrow(path: str, text_key: str) -> Iterator[Record]:
    """Parquet files and save_to_disk folders, read in record batches (streaming, constant memory)."""
    import pyarrow.parquet as pq

    top = text_key.split(".")[0]
    if os.path.isdir(path):
        import pyarrow as pa

        state = json.loads(Path(path, "state.json").read_text())
        files = [os.path.join(path, d["filename"]) for d in state.get("_data_files", [])]
        batches = (b for fn in files for b in pa.ipc.open_stream(pa.memory_map(fn)).__iter__())
    else:
        pf = pq.ParquetFile(path)
        if top not in pf.schema_arrow.names:
            yield Record(path, 1, None, "missing_text_key")
            return
        batches = pf.iter_batches(batch_size=1024, columns=[top])
    row = 0
    for batch in batches:
        if top not in batch.schema.names:
            for _ in range(batch.num_rows):
                row += 1
                yield Record(path, row, None, "missing_text_key")
            continue
        for value in batch.column(top).to_pylist():
            row += 1
            text = get_field({top: value}, text_key)
            yield _check_text(text, path, row)
