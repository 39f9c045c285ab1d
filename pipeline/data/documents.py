"""The documents of one dataset: a `preprocess tokenize` output folder (manifest + shards) or a Megatron prefix.

Everything stays memory-mapped through `preprocess.indexed.IndexedDataset`; only a dataset of several shards
holds one array in memory (its document lengths, 4 bytes a document).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from preprocess.indexed import IndexedDataset, sha256_file
from preprocess.manifest import load_manifest

SHARD_SHIFT = 40  # doc_table packs a shard number (< 2^23) above a token position within it (< 2^40)


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, "manifest.json")
    m = load_manifest(path, f"is {folder} the output of `preprocess tokenize`?")
    if not m.get("complete", True):
        raise ValueError(f"{path}: tokenization is incomplete; re-run the same `preprocess tokenize` command to finish it")
    return m


class TokenDocuments:
    """All documents of one dataset (every shard of a folder, or one Megatron prefix), in order.

    `doc_lengths[d]` is document d's token count; `tokens[k]` shard k's tokens (a plain ndarray over the map).
    """

    def __init__(self, path: str):
        self.path = str(path)
        if os.path.isdir(self.path):
            self.manifest = read_manifest(self.path)
            self.shards = [IndexedDataset(os.path.join(self.path, s["name"])) for s in self.manifest["shards"]]
            for s, ds in zip(self.manifest["shards"], self.shards):
                if len(ds) != s["documents"]:
                    raise ValueError(f"{ds.prefix}.idx: {len(ds)} documents, the manifest says {s['documents']}; "
                                     f"re-run `preprocess tokenize`")
                if "tokens" in s and ds.num_tokens != s["tokens"]:
                    raise ValueError(f"{ds.prefix}.bin: {ds.num_tokens} tokens, the manifest says {s['tokens']}; "
                                     f"re-run `preprocess tokenize`")
                if ds.dtype != np.dtype(self.manifest["dtype"]):
                    raise ValueError(f"{ds.prefix}.idx: dtype {ds.dtype}, the manifest says {self.manifest['dtype']}; "
                                     f"re-run `preprocess tokenize`")
        else:
            self.manifest = None
            self.shards = [IndexedDataset(self.path)]
        if not self.shards or sum(len(s) for s in self.shards) == 0:
            raise ValueError(f"{self.path}: the dataset holds no documents")
        self.dtype = self.shards[0].dtype
        # Plain ndarray views over the memory maps: slicing them skips np.memmap's Python-level overhead.
        self.tokens = [np.asarray(s.tokens).view(np.ndarray) for s in self.shards]
        counts = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])
        # One shard: the index's own memory-mapped lengths; several: one int32 copy (4 bytes a document).
        self.doc_lengths = self.shards[0].sizes if len(self.shards) == 1 else \
            np.concatenate([s.sizes for s in self.shards]).astype(np.int32, copy=False)
        self.num_tokens = int(sum(s.num_tokens for s in self.shards))
        self._fingerprint = None

    def doc_table(self) -> np.ndarray:
        """int64 [documents, 2]: ((shard << SHARD_SHIFT) | first token within that shard, length) of every document.

        16 bytes a document, cached once per dataset and memory-mapped; one lookup gives a sample's pieces."""
        table = np.empty((len(self), 2), dtype=np.int64)
        for k, s in enumerate(self.shards):
            if s.num_tokens >= 1 << SHARD_SHIFT:
                raise ValueError(f"{s.prefix}.bin: {s.num_tokens} tokens, more than 2^{SHARD_SHIFT} in one shard")
            rows = table[self.shard_starts[k]:self.shard_starts[k + 1]]
            np.right_shift(s.pointers, int(s.dtype.itemsize).bit_length() - 1, out=rows[:, 0])  # bytes -> tokens
            if k:
                rows[:, 0] |= k << SHARD_SHIFT
            rows[:, 1] = s.sizes
        return table

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def document(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.shard_starts, i, side="right") - 1)
        return self.shards[s][i - int(self.shard_starts[s])]

    @property
    def tokenizer(self) -> dict | None:
        return self.manifest["tokenizer"] if self.manifest else None

    def fingerprint(self) -> str:
        """Identifies the data: the manifest's shard checksums (when there is one) and every document length.

        Any re-tokenization that changes what the indices are built from changes this value.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        if self.manifest:
            h.update(json.dumps([s.get("sha256") for s in self.manifest["shards"]]).encode())
        for s in self.shards:
            h.update(np.ascontiguousarray(s.sizes).tobytes())
            h.update(str(s.num_tokens).encode())
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def verify(self) -> None:
        """Check every shard's `.bin` and `.idx` against the manifest's sha256 (reads all the data; on request)."""
        if not self.manifest:
            return  # a bare prefix: its .bin size was checked against the .idx when it was opened
        for s, ds in zip(self.manifest["shards"], self.shards):
            for ext, key in ((".bin", "sha256"), (".idx", "idx_sha256")):
                got = sha256_file(ds.prefix + ext) if s.get(key) else None
                if got and got != s[key]:
                    raise ValueError(f"{ds.prefix}{ext}: sha256 {got[:12]}… differs from the manifest's {s[key][:12]}…; "
                                     f"the shard changed after tokenizing, re-run `preprocess tokenize`")


def check_same_tokenizer(docs: list[TokenDocuments]) -> None:
    """Refuse to blend datasets made with different tokenizers (their manifests' tokenizer sha256 differ)."""
    known = [(d.path, d.tokenizer["sha256"]) for d in docs if d.tokenizer and d.tokenizer.get("sha256")]
    for path, sha in known[1:]:
        if sha != known[0][1]:
            raise ValueError(f"data.datasets: {path} was tokenized with a different tokenizer than {known[0][0]} "
                             f"(sha256 {sha[:12]}… vs {known[0][1][:12]}…); re-tokenize them with one tokenizer")
