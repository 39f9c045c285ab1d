"""Megatron-LM's own IndexedDataset reads our shards, and our reader reads what its IndexedDatasetBuilder writes."""
import json
import warnings

import numpy as np
import pytest
import torch

from preprocess.indexed import IndexedDataset, dtype_for_vocab


@pytest.fixture(scope="module")
def megatron_indexed():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def test_megatron_reads_our_shards(megatron_indexed, multi_reference):
    m = json.loads((multi_reference / "manifest.json").read_text())
    for s in m["shards"]:
        ours = IndexedDataset(multi_reference / s["name"])
        theirs = megatron_indexed.IndexedDataset(str(multi_reference / s["name"]), mmap=True)
        assert theirs.index.dtype == np.uint16 == ours.dtype
        assert len(theirs) == len(ours) == s["documents"]
        assert np.array_equal(theirs.sequence_lengths, ours.sizes)
        assert np.array_equal(theirs.document_indices, np.arange(len(ours) + 1))
        for i in range(len(ours)):
            assert np.array_equal(theirs[i], ours[i])
            assert int(theirs[i][-1]) == m["tokenizer"]["eod_id"]


@pytest.mark.parametrize("vocab_size", [50_000, 200_000])
def test_we_read_megatron_written_files(megatron_indexed, tmp_path, vocab_size):
    dtype = dtype_for_vocab(vocab_size)
    rng = np.random.default_rng(vocab_size)
    docs = [rng.integers(0, vocab_size, size=rng.integers(1, 300)) for _ in range(50)]
    prefix = str(tmp_path / "megatron")
    builder = megatron_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype.type)
    for d in docs[:40]:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.add_document(torch.from_numpy(np.concatenate(docs[40:])), [len(d) for d in docs[40:]])  # 10 seqs, 1 doc
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    assert ours.dtype == dtype and len(ours) == 50
    assert ours.document_indices.tolist() == list(range(41)) + [50]
    assert all(np.array_equal(ours[i], d) for i, d in enumerate(docs))
    assert ours.num_tokens == sum(len(d) for d in docs)


def test_megatron_reads_our_int32_shards(megatron_indexed, tmp_path):
    from preprocess.indexed import IndexedWriter

    dtype = dtype_for_vocab(100_000)
    docs = [np.arange(i, i + 7 * i + 1, dtype=np.int64) * 997 % 100_000 for i in range(20)]
    w = IndexedWriter(tmp_path / "big", dtype)
    w.add_documents(np.concatenate(docs), [len(d) for d in docs])
    w.finalize()
    theirs = megatron_indexed.IndexedDataset(str(tmp_path / "big"))
    assert theirs.index.dtype == np.int32 and len(theirs) == 20
    assert all(np.array_equal(theirs[i], d) for i, d in enumerate(docs))
