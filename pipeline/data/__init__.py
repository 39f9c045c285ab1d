"""Packed GPT training samples over memory-mapped Megatron shards, in a global order fixed by data and seed.

A dataset is a `preprocess tokenize` output folder (manifest + shards) or a Megatron prefix (`dir/name` for
`name.bin`/`name.idx`). Each is split into train/valid/test at document granularity (`data.split`); each
epoch of a split visits its documents in an order shuffled with `data.seed`, cut into samples of
`seq_len + 1` tokens packed across document boundaries, whose order is shuffled again per epoch. Several
datasets are blended by weight. The index arrays are cached in `data.cache_dir` and memory-mapped by every
rank. Sample i of the global order never depends on the number of ranks, nor on `train.steps`; rank r of D
takes its contiguous slice of each global batch (`batch_for_rank`).

    python -m pipeline.data inspect --config configs/X.yaml [--step S --sample I] [key=value ...]
"""
from .datasets import (BlendedDataset, GPTDataset, batch_for_rank, build_datasets, build_split, default_cache_dir,
                       loss_mask)
from .documents import TokenDocuments, check_same_tokenizer, read_manifest
from .indices import split_ranges

__all__ = ["BlendedDataset", "GPTDataset", "TokenDocuments", "batch_for_rank", "build_datasets", "build_split",
           "check_same_tokenizer", "default_cache_dir", "loss_mask", "read_manifest", "split_ranges"]
