"""Packed GPT training samples over memory-mapped Megatron shards, in a global order fixed by data and seed.

A dataset is a `preprocess tokenize` output folder (manifest + shards) or a Megatron prefix (`dir/name` for
`name.bin`/`name.idx`). Documents are split into train/valid/test at document granularity; each epoch visits
the split's documents in an order shuffled with the seed; the concatenated token stream is cut into samples of
`seq_len + 1` tokens (overlapping by one) and the samples are shuffled once more. Sample `i` of the global
order never depends on the number of ranks; rank r of D takes its contiguous slice of each global batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from preprocess.indexed import IndexedDataset


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no manifest; is {folder} the output of `preprocess tokenize`?")
    with open(path) as f:
        m = json.load(f)
    if not m.get("complete", True):
        raise ValueError(f"{path}: tokenization is incomplete; re-run the same `preprocess tokenize` command to finish it")
    return m


class TokenDocuments:
    """All documents of one dataset (every shard of a folder, or one Megatron prefix), in order."""

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            self.manifest = read_manifest(path)
            self.shards = [IndexedDataset(os.path.join(path, s["name"])) for s in self.manifest["shards"]]
            for s, ds in zip(self.manifest["shards"], self.shards):
                if len(ds) != s["documents"]:
                    raise ValueError(f"{ds.prefix}.idx: {len(ds)} documents, the manifest says {s['documents']}")
        else:
            self.manifest = None
            self.shards = [IndexedDataset(path)]
        counts = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])
        self.doc_lengths = np.concatenate([s.sizes.astype(np.int64) for s in self.shards]) if self.shards else \
            np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def document(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.shard_starts, i, side="right") - 1)
        return self.shards[s][i - int(self.shard_starts[s])]

    @property
    def tokenizer(self) -> dict | None:
        return self.manifest["tokenizer"] if self.manifest else None

    def fingerprint(self) -> str:
        """Identifies the data: the manifest's shard checksums, or the index bytes of a bare prefix."""
        h = hashlib.sha256()
        if self.manifest:
            h.update(json.dumps([s["sha256"] for s in self.manifest["shards"]]).encode())
        else:
            h.update(np.asarray(self.shards[0].sizes).tobytes())
        return h.hexdigest()


def split_ranges(num_docs: int, split: str) -> list[tuple[int, int]]:
    """"98,1,1" → document ranges for train, valid, test (contiguous, disjoint, covering every document)."""
    try:
        parts = [float(x) for x in str(split).split(",")]
    except ValueError:
        raise ValueError(f"data.split '{split}': expected comma-separated numbers like 98,1,1") from None
    parts = (parts + [0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"data.split '{split}': weights must be non-negative and not all zero")
    bounds = np.round(np.cumsum([0.0] + parts) / sum(parts) * num_docs).astype(np.int64)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


@dataclass
class SampleIndex:
    doc_order: np.ndarray   # document ids, epoch after epoch
    doc_starts: np.ndarray  # token offset of each doc_order entry in the concatenated stream (int64)
    shuffle: np.ndarray     # global sample order


class GPTDataset:
    """`num_samples` packed samples of `seq_len + 1` tokens from one split of one dataset."""

    SPLITS = ("train", "valid", "test")

    def __init__(self, docs: TokenDocuments, seq_len: int, num_samples: int, seed: int, split: str = "98,1,1",
                 which: str = "train"):
        self.docs, self.seq_len, self.num_samples = docs, seq_len, num_samples
        lo, hi = split_ranges(len(docs), split)[self.SPLITS.index(which)]
        ids = np.arange(lo, hi, dtype=np.int64)
        tokens_per_epoch = int(docs.doc_lengths[lo:hi].sum())
        if tokens_per_epoch <= seq_len:
            raise ValueError(f"{docs.path}: the {which} split has {tokens_per_epoch} tokens, fewer than one sample "
                             f"of {seq_len + 1}; use more data or change data.split")
        epochs = 1
        while (epochs * tokens_per_epoch - 1) // seq_len < num_samples:
            epochs += 1
        rng = np.random.default_rng([seed, self.SPLITS.index(which)])
        order = np.concatenate([rng.permutation(ids) for _ in range(epochs)])
        starts = np.concatenate([[0], np.cumsum(docs.doc_lengths[order])]).astype(np.int64)
        available = int((starts[-1] - 1) // seq_len)
        shuffle = rng.permutation(available)[:num_samples] if available > num_samples else rng.permutation(available)
        # Keep the sample order stable when num_samples grows: shuffle within the whole epoch span.
        self.index = SampleIndex(order, starts, shuffle.astype(np.int64))
        self.epochs = epochs

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i of the global order: seq_len + 1 int64 tokens, packed across document boundaries."""
        j = int(self.index.shuffle[i])
        start, need = j * self.seq_len, self.seq_len + 1
        pos = int(np.searchsorted(self.index.doc_starts, start, side="right") - 1)
        out = np.empty(need, dtype=np.int64)
        filled, offset = 0, start - int(self.index.doc_starts[pos])
        while filled < need:
            doc = self.docs.document(int(self.index.doc_order[pos]))
            take = min(len(doc) - offset, need - filled)
            out[filled:filled + take] = doc[offset:offset + take]
            filled += take
            pos += 1
            offset = 0
        return out


def batch_for_rank(dataset, step: int, global_batch: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """The [global_batch/dp_size, seq_len+1] slice of global batch `step` that rank `dp_rank` trains on."""
    per_rank = global_batch // dp_size
    first = step * global_batch + dp_rank * per_rank
    return np.stack([dataset[i % len(dataset)] for i in range(first, first + per_rank)])


def build_datasets(cfg, docs: list[TokenDocuments]) -> tuple[GPTDataset, GPTDataset | None]:
    """The train dataset sized for `train.steps` global batches, and the valid one for evaluation (or None)."""
    t = cfg.train
    train = GPTDataset(docs[0], cfg.model.seq_len, t.steps * t.global_batch_size, cfg.data.seed, cfg.data.split)
    valid = None
    if t.eval_interval > 0:
        valid = GPTDataset(docs[0], cfg.model.seq_len, t.eval_iters * t.global_batch_size, cfg.data.seed,
                           cfg.data.split, "valid")
    return train, valid
