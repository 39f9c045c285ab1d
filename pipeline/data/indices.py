"""The index arrays behind the global sample order: pure numpy functions of lengths, seed and weights.

Order of one dataset split (`build_gpt_indices`). Epoch e is self-contained: its documents are permuted with
a generator seeded by (seed, split, e), laid end to end, and cut into n = (T - 1) // seq_len samples of
seq_len + 1 tokens (T: the split's tokens; consecutive samples share one token, the last < seq_len + 1 tokens
of an epoch are not used); the n samples are permuted with the same generator. Sample i of the order is
sample shuffle[i] of epoch i // n. Nothing depends on how many samples are asked for, except how many epochs
are built: the first N samples of a longer order are exactly a shorter order (Megatron's shuffle, drawn once
over all epochs, changes whenever the epoch count does).

Epochs are built on up to 8 threads (numpy releases the GIL in its shuffles, takes and sums); the arrays do
not depend on how many.

Blend (`build_blend_indices`): see `blend.py`. Every prefix of n samples holds c_k samples of dataset k with
|c_k - n w_k| <= 1 - 1/(2K - 2) < 1, and a shorter blend is a prefix of a longer one.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 3  # bump whenever the arrays built here change for the same inputs


def index_dtype(max_value: int) -> np.dtype:
    """int32 when every value fits, else int64: never overflows, halves the cache when it can."""
    return np.dtype(np.int32) if max_value < np.iinfo(np.int32).max else np.dtype(np.int64)


def split_ranges(num_docs: int, split: str) -> list[tuple[int, int]]:
    """"98,1,1" → document ranges for train, valid, test (contiguous, disjoint, covering every document).

    The ranges depend only on the document count and the split string, never on the number of samples.
    """
    try:
        parts = [float(x) for x in str(split).split(",")]
    except ValueError:
        raise ValueError(f"data.split '{split}': expected comma-separated numbers like 98,1,1") from None
    if len(parts) > 3:
        raise ValueError(f"data.split '{split}': at most three parts (train, valid, test)")
    parts = (parts + [0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"data.split '{split}': weights must be non-negative and not all zero")
    bounds = np.round(np.cumsum([0.0] + parts) / sum(parts) * num_docs).astype(np.int64)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


def samples_per_epoch(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


def _epoch_rng(seed: int, split_id: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, split_id, epoch])))


def build_gpt_indices(doc_lengths: np.ndarray, lo: int, hi: int, seq_len: int, seed: int, split_id: int,
                      num_epochs: int) -> dict[str, np.ndarray]:
    """Indices for documents [lo, hi) over `num_epochs` epochs.

    Returns `doc` ([E * D] document ids, epoch after epoch), `sample_doc` / `sample_offset` ([E * n]: where
    each epoch's sample j starts, as a position within that epoch's documents and a token offset into that
    document) and `shuffle` ([E * n]: for order position e * n + k, the epoch-local sample j).
    """
    num_docs = hi - lo
    lengths = np.asarray(doc_lengths[lo:hi], dtype=np.int64)
    n = samples_per_epoch(int(lengths.sum()), seq_len)
    assert n > 0 and num_epochs > 0
    doc_dt, pos_dt = index_dtype(hi), index_dtype(num_docs)
    off_dt, smp_dt = index_dtype(int(lengths.max())), index_dtype(n)
    doc = np.empty(num_epochs * num_docs, doc_dt)
    sample_doc = np.empty(num_epochs * n, pos_dt)
    sample_offset = np.empty(num_epochs * n, off_dt)
    shuffle = np.empty(num_epochs * n, smp_dt)
    positions = np.arange(num_docs, dtype=pos_dt)

    def epoch(e: int) -> None:
        rng = _epoch_rng(seed, split_id, e)
        perm = np.arange(num_docs)
        rng.shuffle(perm)  # what rng.permutation(num_docs) returns
        ends = np.zeros(num_docs + 1, np.int64)
        np.cumsum(lengths[perm], out=ends[1:])
        # Samples starting inside document position p: ceil(end_p / L) - ceil(end_{p-1} / L), n in all;
        # repeating each position that often gives every sample's document.
        due = ends[1:] + (seq_len - 1)
        due //= seq_len
        np.minimum(due, n, out=due)
        pos = np.repeat(positions, np.diff(due, prepend=0))
        np.add(perm, lo, out=doc[e * num_docs:(e + 1) * num_docs], casting="unsafe")
        sample_doc[e * n:(e + 1) * n] = pos
        offset = np.arange(0, n * seq_len, seq_len, dtype=np.int64)  # where each sample starts in the stream
        offset -= ends[pos]
        sample_offset[e * n:(e + 1) * n] = offset
        shuffle[e * n:(e + 1) * n] = rng.permutation(n)

    # Each epoch in flight holds ~48 bytes of temporaries a document and ~32 a sample: at most ~2 GiB at once.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(num_epochs, cpus, 8, (2 << 30) // (48 * num_docs + 32 * n)))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(epoch, range(num_epochs)))
    return {"doc": doc, "sample_doc": sample_doc, "sample_offset": sample_offset, "shuffle": shuffle}


def normalize_weights(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"data.datasets weights {list(weights)}: every weight must be a positive number")
    return w / w.sum()


def build_blend_indices(weights: np.ndarray, num_samples: int) -> dict[str, np.ndarray]:
    """`dataset` ([N] which dataset) and `sample` ([N] the sample of that dataset) for the first N positions."""
    from .blend import blend_order  # numba: imported only by the process that builds a blend

    dataset, sample = blend_order(weights, num_samples, np.int16 if len(weights) < 2**15 else np.int32,
                                  index_dtype(num_samples))
    return {"dataset": dataset, "sample": sample}
