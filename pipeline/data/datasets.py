"""Packed GPT samples of one dataset split, weighted blends of them, and each rank's slice of a global batch."""
from __future__ import annotations

import math
import os

import numpy as np

from . import indices as ix
from .cache import load_or_build
from .documents import SHARD_SHIFT, TokenDocuments, check_same_tokenizer

TOKEN_MASK = (1 << SHARD_SHIFT) - 1


class GPTDataset:
    """The first `num_samples` samples (seq_len + 1 tokens, int64) of one split of one dataset, in order.

    `docs.path` names the data; the index arrays come memory-mapped from `cache_dir` (built there if absent).
    """

    def __init__(self, docs: TokenDocuments, seq_len: int, num_samples: int, seed: int, split: str = "98,1,1",
                 which: str = "train", cache_dir: str | None = None):
        if which not in ix.SPLITS:
            raise ValueError(f"split name '{which}': expected one of {', '.join(ix.SPLITS)}")
        self.docs, self.seq_len, self.num_samples, self.which = docs, seq_len, int(num_samples), which
        self.split_id = ix.SPLITS.index(which)
        self.lo, self.hi = ix.split_ranges(len(docs), split)[self.split_id]
        self.num_docs = self.hi - self.lo
        self.tokens_per_epoch = int(docs.doc_lengths[self.lo:self.hi].sum(dtype=np.int64))
        self.samples_per_epoch = ix.samples_per_epoch(self.tokens_per_epoch, seq_len)
        if self.samples_per_epoch == 0:
            raise ValueError(f"{docs.path}: the {which} split (data.split '{split}') has {self.num_docs} documents, "
                             f"{self.tokens_per_epoch} tokens, fewer than one sample of {seq_len + 1}; "
                             f"use more data or change data.split")
        self.num_epochs = max(1, math.ceil(self.num_samples / self.samples_per_epoch))
        description = {"kind": "gpt", "format": ix.FORMAT_VERSION, "path": os.path.abspath(docs.path),
                       "fingerprint": docs.fingerprint(), "num_docs": len(docs), "split": str(split),
                       "which": which, "seq_len": seq_len, "seed": seed, "epochs": self.num_epochs}
        build = lambda: ix.build_gpt_indices(docs.doc_lengths, self.lo, self.hi, seq_len, seed, self.split_id,
                                             self.num_epochs)
        if cache_dir is None:
            self.index = build()
        else:
            self.index = load_or_build(cache_dir, f"gpt-{which}", description, build)
        self.description = description
        # Where each document's tokens are: memory-mapped from the cache too, so that ranks share one copy.
        table_key = {"kind": "docs", "format": ix.FORMAT_VERSION, "path": description["path"],
                     "fingerprint": description["fingerprint"]}
        table = lambda: {"table": docs.doc_table()}
        self._table = (table() if cache_dir is None else load_or_build(cache_dir, "docs", table_key, table))["table"]
        self._table = self._table.view(np.ndarray)
        # Plain ndarray views of the maps for the hot path: np.memmap's slicing runs Python code on every call.
        self._doc, self._sample_doc, self._sample_offset, self._shuffle = (
            self.index[k].view(np.ndarray) for k in ("doc", "sample_doc", "sample_offset", "shuffle"))

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, i: int) -> tuple[int, int]:
        """(epoch, epoch-local sample) of position i of the order."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} is outside this {self.which} dataset of {self.num_samples} samples")
        e = i // self.samples_per_epoch
        return e, int(self._shuffle[i])

    def __getitem__(self, i: int) -> np.ndarray:
        e, j = self.locate(i)
        row = e * self.samples_per_epoch + j
        pos = e * self.num_docs + int(self._sample_doc[row])
        offset = int(self._sample_offset[row])
        need, tokens, table = self.seq_len + 1, self.docs.tokens, self._table
        out = np.empty(need, dtype=np.int64)
        filled, look = 0, 4
        while filled < need:
            ids = self._doc[pos:pos + look]
            for packed, length in table[ids].tolist():
                shard, start = packed >> SHARD_SHIFT, packed & TOKEN_MASK
                take = min(length - offset, need - filled)
                if take > 0:
                    out[filled:filled + take] = tokens[shard][start + offset:start + offset + take]
                    filled += take
                    if filled == need:
                        break
                offset = 0
            pos += len(ids)
            look *= 4
        return out

    def token_ranges(self, i: int) -> list[tuple[int, int, int]]:
        """(shard, first token, token count) of each piece of sample i: the bytes it reads, for benchmarks."""
        e, j = self.locate(i)
        row = e * self.samples_per_epoch + j
        pos = e * self.num_docs + int(self._sample_doc[row])
        offset, need, pieces = int(self._sample_offset[row]), self.seq_len + 1, []
        while need > 0:
            packed, length = self._table[int(self._doc[pos])].tolist()
            shard, start = packed >> SHARD_SHIFT, packed & TOKEN_MASK
            take = min(length - offset, need)
            if take > 0:
                pieces.append((shard, start + offset, take))
                need -= take
            pos, offset = pos + 1, 0
        return pieces


class BlendedDataset:
    """The first `num_samples` samples of a weighted blend; position i is sample `sample[i]` of `dataset[i]`."""

    def __init__(self, datasets_for: callable, weights: list[float], num_samples: int, names: list[str],
                 cache_dir: str | None = None, key: dict | None = None):
        """`datasets_for(counts)` builds the component datasets given how many samples each must supply."""
        self.weights = ix.normalize_weights(weights)
        self.num_samples = int(num_samples)
        description = {"kind": "blend", "format": ix.FORMAT_VERSION, "weights": self.weights.tolist(),
                       "num_samples": self.num_samples, "datasets": names, **(key or {})}
        build = lambda: ix.build_blend_indices(self.weights, self.num_samples)
        self.index = build() if cache_dir is None else load_or_build(cache_dir, "blend", description, build)
        self._dataset, self._sample = self.index["dataset"], self.index["sample"]
        counts = np.bincount(self._dataset, minlength=len(self.weights))
        self.counts = counts
        self.datasets = datasets_for([int(c) for c in counts])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} is outside this blend of {self.num_samples} samples")
        return self.datasets[int(self._dataset[i])][int(self._sample[i])]


def batch_for_rank(dataset, step: int, global_batch: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """The [global_batch/dp_size, seq_len+1] int64 slice of global batch `step` that rank `dp_rank` trains on.

    Global batch s is samples [s * global_batch, (s + 1) * global_batch) of the order; rank r of D takes the
    r-th contiguous block of it. The order never depends on D, so resuming at step = consumed / global_batch
    with any D continues exactly where an uninterrupted run would be.
    """
    if global_batch % dp_size or not 0 <= dp_rank < dp_size:
        raise ValueError(f"global batch {global_batch} cannot be split over data-parallel rank {dp_rank} of {dp_size}")
    per_rank = global_batch // dp_size
    first = step * global_batch + dp_rank * per_rank
    return np.stack([dataset[i] for i in range(first, first + per_rank)])


def loss_mask(tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """float32 [..., seq_len] mask for the labels tokens[..., 1:]: 0 where the input token is EOD.

    A label right after an EOD is the first token of an unrelated document (packing put it there), so
    predicting it from the previous document teaches nothing (Megatron's eod_mask_loss).
    """
    tokens = np.asarray(tokens)
    return (tokens[..., :-1] != eod_id).astype(np.float32)


def default_cache_dir(cfg) -> str:
    """data.cache_dir, else `<checkpoint.dir>/data_index` (writable by the run; per node when not shared)."""
    return cfg.data.cache_dir or os.path.join(cfg.checkpoint.dir, "data_index")


def build_split(cfg, docs: list[TokenDocuments], which: str, num_samples: int):
    """The blend of split `which` of every dataset in cfg.data.datasets (None when no dataset has that split)."""
    check_same_tokenizer(docs)
    seq_len, seed, split, cache_dir = cfg.model.seq_len, cfg.data.seed, cfg.data.split, default_cache_dir(cfg)
    weights = [d.weight for d in cfg.data.datasets]
    ix.normalize_weights(weights)
    split_id = ix.SPLITS.index(which)
    present = [k for k, d in enumerate(docs) if np.diff(ix.split_ranges(len(d), split)[split_id])[0] > 0]
    if not present:
        return None
    make = lambda k, n: GPTDataset(docs[k], seq_len, max(1, n), seed, split, which, cache_dir)
    if len(present) == 1 and len(docs) == 1:
        return make(0, num_samples)
    names = [os.path.abspath(docs[k].path) for k in present]
    key = {"fingerprints": [docs[k].fingerprint() for k in present], "split": str(split), "which": which,
           "seq_len": seq_len, "seed": seed}
    return BlendedDataset(lambda counts: [make(k, c) for k, c in zip(present, counts)],
                          [weights[k] for k in present], num_samples, names, cache_dir, key)


def build_datasets(cfg, docs: list[TokenDocuments]):
    """(train, valid or None): the blend of cfg.data.datasets, train sized for train.steps global batches.

    Valid holds train.eval_iters global batches, when train.eval_interval > 0 and some dataset has a valid split.
    """
    t = cfg.train
    if len(docs) != len(cfg.data.datasets):
        raise ValueError(f"build_datasets: {len(docs)} TokenDocuments for {len(cfg.data.datasets)} data.datasets")
    train = build_split(cfg, docs, "train", t.steps * t.global_batch_size)
    if train is None:
        raise ValueError(f"data.split '{cfg.data.split}' leaves no training documents")
    valid = build_split(cfg, docs, "valid", t.eval_iters * t.global_batch_size) if t.eval_interval > 0 else None
    return train, valid
