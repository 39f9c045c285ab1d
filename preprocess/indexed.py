"""Megatron-LM's MMapIndexedDataset format (`.bin` + `.idx`), byte for byte. numpy only.

`.idx`, little-endian, no padding:
    magic b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 N sequences | u64 D = documents + 1
    | int32[N] sequence lengths | int64[N] byte offsets into .bin | int64[D] document boundaries (0..N)
`.bin`: the tokens of every sequence laid end to end in the index's dtype.

Both preprocess (writer) and pipeline (reader) go through this module, so the format lives in one place.
"""
from __future__ import annotations

import contextlib
import errno
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
_CHECK_CHUNK = 1 << 18  # index entries checked per numpy pass on open


@contextlib.contextmanager
def writing(path: str):
    """Name `path` in an OSError raised inside that names no file: a bare write() that fails with ENOSPC says
    only "No space left on device", and the user needs to know which disk."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, os.strerror(e.errno), path) from None
        raise


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def describe_os_error(e: OSError) -> str:
    """One line for an OSError; a full disk is said in words the user can search for."""
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {e.filename or '(unknown file)'}; free space there and re-run"
    return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 for a vocabulary (added tokens included) below 65,500, else int32: Megatron-core's rule
    (`DType.optimal_dtype`), so that its tools and ours pick the same dtype for the same tokenizer."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


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
        with writing(self._bin_tmp):
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
        with writing(self.prefix + ".bin"):
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
        with writing(self.prefix + ".bin"):
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
        lengths = self._lengths.view()
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:  # int64 arithmetic: no overflow past 2 GiB
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=offsets[1:])
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
        idx_tmp = self.prefix + ".idx" + self._tmp
        idx_sha = hashlib.sha256()
        with writing(self.prefix + ".idx"), open(idx_tmp, "wb") as f:
            for part in (_HEADER.pack(MAGIC, VERSION, CODES[self.dtype], len(lengths), len(doc_idx)),
                         lengths.astype("<i4").tobytes(), offsets.astype("<i8").tobytes(),
                         doc_idx.astype("<i8").tobytes()):
                f.write(part)
                idx_sha.update(part)
            f.flush()
            os.fsync(f.fileno())
        self.idx_sha256 = idx_sha.hexdigest()
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # a full disk fails the flush of buffered bytes too
            self._bin.close()
        for p in (self._bin_tmp, self.prefix + ".idx" + self._tmp):
            if os.path.exists(p):
                os.remove(p)


def _check_index(idx_path: str, sizes, pointers, doc_idx, itemsize: int) -> None:
    """What can be checked without the `.bin`'s bytes, in a few numpy passes: sizes >= 0, each pointer the end of
    the sequence before it (so the sizes sum to the `.bin`, checked by the caller), the document index running
    from 0 to N without going back. A changed byte in the header, sizes or pointers always fails here; the document
    index is not read by training (documents are sequences), and `inspect --verify` checks the file's sha256."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{idx_path}: corrupt index ({what}); re-run `preprocess tokenize` to rewrite it")

    n = len(sizes)
    if n and int(pointers[0]) != 0:
        raise bad(f"the first sequence starts at byte {int(pointers[0])}, not 0")
    if n and int(sizes.min()) < 0:
        raise bad(f"sequence {int(np.argmin(sizes))} has a negative length")
    # pointers[i + 1] == pointers[i] + sizes[i] * itemsize, in chunks with reused buffers: whole-array temporaries
    # would cost more in page faults than the arithmetic
    ends = np.empty(min(_CHECK_CHUNK, n), np.int64)
    same = np.empty(len(ends), bool)
    for a in range(0, n - 1, _CHECK_CHUNK):
        k = min(_CHECK_CHUNK, n - 1 - a)
        np.multiply(sizes[a:a + k], itemsize, out=ends[:k], dtype=np.int64)
        ends[:k] += pointers[a:a + k]
        np.equal(ends[:k], pointers[a + 1:a + 1 + k], out=same[:k])
        if not same[:k].all():
            i = a + int(np.argmin(same[:k]))
            raise bad(f"sequence {i + 1} starts at byte {int(pointers[i + 1])}, the one before it ends at "
                      f"{int(pointers[i]) + int(sizes[i]) * itemsize}")
    d = len(doc_idx)
    if d == 0 or int(doc_idx[0]) != 0 or int(doc_idx[-1]) != n:
        raise bad(f"the document index must run from 0 to {n}")
    for a in range(0, d - 1, _CHECK_CHUNK):
        k = min(_CHECK_CHUNK, d - 1 - a)
        back = doc_idx[a + 1:a + 1 + k] < doc_idx[a:a + k]
        if back.any():
            raise bad(f"document {a + int(np.argmax(back)) + 1} starts before the one before it")


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
        _check_index(idx_path, self.sizes, self.pointers, self.document_indices, self.dtype.itemsize)
        need = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if bin_size != need:
            raise ValueError(f"{bin_path}: {bin_size} bytes, its index {idx_path} needs {need}; one of them is "
                             f"truncated or corrupt, re-run `preprocess tokenize`")
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
