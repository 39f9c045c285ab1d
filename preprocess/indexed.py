"""Megatron-LM's MMapIndexedDataset format (`.bin` + `.idx`), byte for byte. numpy only.

`.idx`, little-endian, no padding:
    magic b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 N sequences | u64 D = documents + 1
    | int32[N] sequence lengths | int64[N] byte offsets into .bin | int64[D] document boundaries (0..N)
`.bin`: the tokens of every sequence laid end to end in the index's dtype.

Both preprocess (writer) and pipeline (reader) go through this module, so the format lives in one place.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
          6: np.float64, 7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id (added tokens included) fits below 65,536, else int32 (Megatron's rule)."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


class _Growable:
    """An append-only numpy buffer: lengths and offsets are never held in Python lists."""

    def __init__(self, dtype):
        self.data = np.empty(1024, dtype=dtype)
        self.size = 0

    def append(self, values: np.ndarray) -> None:
        n = len(values)
        if self.size + n > len(self.data):
            self.data = np.resize(self.data, max(2 * len(self.data), self.size + n))
        self.data[self.size:self.size + n] = values
        self.size += n

    def view(self) -> np.ndarray:
        return self.data[:self.size]


class IndexedWriter:
    """Writes `prefix.bin`/`prefix.idx` under temporary names; `finalize()` renames them into place.

    A killed writer therefore never leaves a pair that looks complete.
    """

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        self._tmp = f".tmp.{os.getpid()}"  # per process: two writers of one prefix never mix their bytes
        self._bin_tmp = self.prefix + ".bin" + self._tmp
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = _Growable(np.int32)
        self._sha = hashlib.sha256()
        self.tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths (one sequence each)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError("document lengths do not add up to the token count")
        if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document longer than 2^31-1 tokens cannot be indexed")
        data = tokens.tobytes()
        self._bin.write(data)
        self._sha.update(data)
        self._lengths.append(lengths.astype(np.int32))
        self.tokens += len(tokens)

    @property
    def documents(self) -> int:
        return self._lengths.size

    @property
    def sha256(self) -> str:
        """sha256 of the `.bin` bytes written so far."""
        return self._sha.hexdigest()

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = self._lengths.view()
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:  # int64 arithmetic: no overflow past 2 GiB
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=offsets[1:])
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
        idx_tmp = self.prefix + ".idx" + self._tmp
        with open(idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODES[self.dtype], len(lengths), len(doc_idx)))
            f.write(lengths.astype("<i4").tobytes())
            f.write(offsets.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        for p in (self._bin_tmp, self.prefix + ".idx" + self._tmp):
            if os.path.exists(p):
                os.remove(p)


class IndexedDataset:
    """Read-only, memory-mapped view of a `.bin`/`.idx` pair. Nothing is loaded whole."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p}: no such file (expected a Megatron .bin/.idx pair)")
        idx_size = os.path.getsize(idx_path)
        if idx_size < _HEADER.size:
            raise ValueError(f"{idx_path}: truncated index ({idx_size} bytes); re-run preprocess tokenize")
        self._idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        magic, version, code, n, d = _HEADER.unpack(bytes(self._idx[:_HEADER.size]))
        if magic != MAGIC:
            raise ValueError(f"{idx_path}: not a Megatron MMIDIDX index (bad magic); re-run preprocess tokenize")
        if version != VERSION:
            raise ValueError(f"{idx_path}: index version {version}, this reader knows version {VERSION}")
        if code not in DTYPES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        expected = _HEADER.size + 4 * n + 8 * n + 8 * d
        if idx_size != expected:
            raise ValueError(f"{idx_path}: {idx_size} bytes, the header implies {expected}; the file is truncated or corrupt")
        off = _HEADER.size
        self.sizes = np.frombuffer(self._idx, dtype="<i4", count=n, offset=off)
        self.pointers = np.frombuffer(self._idx, dtype="<i8", count=n, offset=off + 4 * n)
        self.document_indices = np.frombuffer(self._idx, dtype="<i8", count=d, offset=off + 12 * n)
        bin_size = os.path.getsize(bin_path)
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if bin_size != need:
            raise ValueError(f"{bin_path}: {bin_size} bytes, the index needs {need}; the file is truncated or corrupt")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_size else np.empty(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def exists(prefix: str | os.PathLike) -> bool:
    return Path(str(prefix) + ".idx").exists() and Path(str(prefix) + ".bin").exists()
