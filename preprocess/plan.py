"""The units of work of a `tokenize` run, and where each unit keeps its state.

A unit depends only on the inputs (their sorted paths and sizes) and `--unit-bytes`: small inputs are grouped
into one unit, a large plain `.jsonl`/`.json` file is cut into newline-aligned byte ranges of about
`--unit-bytes`, any other large input (compressed, parquet, arrow) is a unit of its own. Every unit writes its
own shards (split by `--shard-tokens`) and the join step numbers them in unit order. So any split of the units
over worker processes, MPI ranks or Slurm array tasks gives the same files, and resuming is per unit.

A piece of a unit is `[input index, start, end]`: byte offsets for a plain JSON-lines file ("byte mode"),
`end == -1` for any other input, read from the start as a stream of records ("record mode").
"""
from __future__ import annotations

import hashlib
import json
import os

from pipeline import fs

from .indexed import writing

UNIT_BYTES = 256 << 20
FINGERPRINT_BYTES = 1 << 20
_PLAIN = (".jsonl", ".json")


def is_plain_jsonl(path: str) -> bool:
    return path.endswith(_PLAIN) and os.path.isfile(path)


def input_size(path: str) -> int:
    """Bytes of an input file or folder (0 when it cannot be read: the readers then count it as unreadable)."""
    try:
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
        return os.path.getsize(path)
    except OSError:
        return 0


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    return [path]


def input_fingerprint(path: str) -> list:
    """[bytes, mtime_ns, hash of the first and last MiB] of an input (of each file of a folder): an input edited in
    place, even to the same size, gets another fingerprint, at the cost of reading 2 MiB per file."""
    h = hashlib.sha256()
    mtime = 0
    for name in _files(path):
        try:
            st = os.stat(name)
            with open(name, "rb") as f:
                head = f.read(FINGERPRINT_BYTES)
                f.seek(max(st.st_size - FINGERPRINT_BYTES, len(head)))
                tail = f.read(FINGERPRINT_BYTES)
        except OSError:  # unreadable: the readers count it as such; its key says so
            h.update(f"{os.path.relpath(name, path)}:unreadable".encode())
            continue
        mtime = max(mtime, st.st_mtime_ns)
        h.update(f"{os.path.relpath(name, path)}:{st.st_size}:".encode())
        h.update(head)
        h.update(tail)
    return [input_size(path), mtime, h.hexdigest()[:32]]


def args_key(paths: list[str], tokenizer_sha256: str, text_key: str, shard_tokens: int, unit_bytes: int) -> dict:
    """Everything that decides the output bytes; a finished output is reused only for the same key. Each input
    is `[path, bytes, mtime_ns, fingerprint]` (see input_fingerprint)."""
    return {"inputs": [[p, *input_fingerprint(p)] for p in paths], "tokenizer_sha256": tokenizer_sha256,
            "text_key": text_key, "shard_tokens": shard_tokens, "unit_bytes": unit_bytes}


def key_difference(old: dict, new: dict) -> str:
    """What differs between two keys, in words (for the refusal message)."""
    if not isinstance(old, dict):
        return "made by an older version"
    old_inputs = {i[0]: i for i in old.get("inputs", [])}
    for inp in new["inputs"]:
        was = old_inputs.get(inp[0])
        if was is not None and was != inp:
            return f"input {inp[0]} has changed since: its size, modification time or content"
    if sorted(old_inputs) != sorted(i[0] for i in new["inputs"]):
        return "other inputs"
    for k, words in (("tokenizer_sha256", "another tokenizer"), ("text_key", "another --text-key"),
                     ("shard_tokens", "another --shard-tokens"), ("unit_bytes", "another --unit-bytes"),
                     ("eod_id", "another --eod-token")):
        if old.get(k) != new.get(k):
            return words
    return "other arguments"


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def parts_dir(output: str, key: dict) -> str:
    """Per-unit shards and state live here until the join renames them; named by the arguments' hash."""
    return os.path.join(output, f".parts-{key_hash(key)}")


def _line_boundary(f, offset: int, size: int) -> int:
    """The first line start at or after `offset` (or `size`)."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    f.seek(offset - 1)
    pos = offset - 1
    while True:
        block = f.read(1 << 16)
        if not block:
            return size
        i = block.find(b"\n")
        if i >= 0:
            return min(pos + i + 1, size)
        pos += len(block)


def build_units(paths: list[str], unit_bytes: int) -> list[list[list[int]]]:
    """Group and cut the inputs into units (lists of pieces), in input order."""
    units: list[list[list[int]]] = []
    group: list[list[int]] = []
    group_bytes = 0

    def flush():
        nonlocal group, group_bytes
        if group:
            units.append(group)
        group, group_bytes = [], 0

    for i, path in enumerate(paths):
        size = input_size(path)
        byte_mode = is_plain_jsonl(path) and os.access(path, os.R_OK)
        if size >= unit_bytes and byte_mode:
            flush()
            with open(path, "rb") as f:
                start = 0
                while start < size:
                    end = _line_boundary(f, start + unit_bytes, size)
                    units.append([[i, start, end]])
                    start = end
        elif size >= unit_bytes:
            flush()
            units.append([[i, 0, -1]])
        else:
            if group and group_bytes + size > unit_bytes:
                flush()
            group.append([i, 0, size if byte_mode else -1])
            group_bytes += size
    flush()
    return units


def unit_state_path(parts: str, unit: int) -> str:
    return os.path.join(parts, f"unit_{unit:05d}.json")


def shard_file(unit: int, k: int) -> str:
    return f"u{unit:05d}_{k:04d}"


def new_unit_state() -> dict:
    return {"done": False, "shards": [], "resume": [0, 0], "skipped": {}, "documents": {}}


def load_unit_state(parts: str, unit: int) -> dict:
    path = unit_state_path(parts, unit)
    if not os.path.exists(path):
        return new_unit_state()
    with open(path) as f:
        return json.load(f)


def write_json_atomic(path: str, obj) -> None:
    """Write-then-rename (pipeline.fs): readers never see half a file, and several processes (array tasks,
    ranks) may write the same content at once. An error names `path` (a full disk says which)."""
    with writing(path):
        fs.write_json_atomic(path, obj, indent=2)
