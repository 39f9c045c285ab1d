"""The .bin/.idx format, field by field against DESIGN.md, and our reader on what our writer wrote."""
import json
import struct

import numpy as np
import pytest

from preprocess.indexed import IndexedDataset, IndexedWriter, dtype_for_vocab


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_idx_layout_field_by_field(tmp_path, dtype, code):
    docs = [np.array([5, 6, 7], dtype), np.array([1], dtype), np.array([9, 9, 9, 9, 2], dtype)]
    w = IndexedWriter(tmp_path / "s", dtype)
    for d in docs:
        w.add_documents(d, [len(d)])
    w.finalize()
    raw = (tmp_path / "s.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack_from("<Q", raw, 9)
    dcode, = struct.unpack_from("<B", raw, 17)
    n, d = struct.unpack_from("<QQ", raw, 18)
    assert (version, dcode, n, d) == (1, code, 3, 4)
    off = 34
    lengths = np.frombuffer(raw, "<i4", 3, off)
    pointers = np.frombuffer(raw, "<i8", 3, off + 12)
    doc_idx = np.frombuffer(raw, "<i8", 4, off + 36)
    assert lengths.tolist() == [3, 1, 5]
    item = np.dtype(dtype).itemsize
    assert pointers.tolist() == [0, 3 * item, 4 * item]
    assert doc_idx.tolist() == [0, 1, 2, 3]
    assert len(raw) == off + 12 + 24 + 32  # no padding anywhere
    assert (tmp_path / "s.bin").read_bytes() == np.concatenate(docs).tobytes()
    ds = IndexedDataset(tmp_path / "s")
    assert [ds[i].tolist() for i in range(3)] == [x.tolist() for x in docs]


def test_dtype_rule():  # Megatron-core's DType.optimal_dtype: uint16 below 65,500
    assert dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(65500) == dtype_for_vocab(65535) == np.int32


def test_unfinalized_writer_leaves_no_complete_pair(tmp_path):
    w = IndexedWriter(tmp_path / "s", np.uint16)
    w.add_documents(np.arange(10), [10])
    assert not (tmp_path / "s.bin").exists() and not (tmp_path / "s.idx").exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_truncated_bin_is_named(tmp_path):
    w = IndexedWriter(tmp_path / "s", np.uint16)
    w.add_documents(np.arange(100), [60, 40])
    w.finalize()
    with open(tmp_path / "s.bin", "r+b") as f:
        f.truncate(150)
    with pytest.raises(ValueError, match=r"s\.bin.*truncated"):
        IndexedDataset(tmp_path / "s")


def test_bad_magic_is_named(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.idx.*magic"):
        IndexedDataset(tmp_path / "x")


def test_manifest_keys(token_dir, tokenizer_model):
    m = json.loads((token_dir / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["complete"] and m["dtype"] == "uint16"
    assert set(m["tokenizer"]) >= {"path", "sha256", "vocab_size", "eod_id"}
    assert m["tokenizer"]["vocab_size"] == 1024
    assert len(m["shards"]) >= 2  # shard_tokens=100k on a ~300k-token corpus
    total_docs = 0
    for s in m["shards"]:
        ds = IndexedDataset(token_dir / s["name"])
        assert len(ds) == s["documents"] and ds.num_tokens == s["tokens"]
        assert all(int(ds[i][-1]) == m["tokenizer"]["eod_id"] for i in range(len(ds)))
        total_docs += len(ds)
    assert total_docs == sum(i["documents"] for i in m["inputs"])
    assert isinstance(m["skipped"], dict) and "version" in m
