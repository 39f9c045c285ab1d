"""The global sample order: coverage per epoch at every DP size, resume across DP sizes, splits, blends, masks.

Datasets are written with the real writer; their tokens are consecutive integers, unique across a dataset
(and offset per dataset in blends), so every token seen says exactly where it came from.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from pipeline.config import from_dict
from pipeline.data import TokenDocuments, batch_for_rank, build_datasets, build_split, loss_mask, split_ranges
from preprocess.indexed import IndexedWriter

SEQ_LEN = 16


def write_tokens(path, lengths, first_token=0, shards=1, tokenizer_sha="tok-a", manifest=True, dtype=np.int32):
    """Documents of `lengths` holding tokens first_token, first_token + 1, ...; a folder with a manifest
    (split into `shards` shards) or, with manifest=False, a bare Megatron prefix. Returns the path to use."""
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = np.arange(first_token, first_token + lengths.sum(), dtype=np.int64)
    if not manifest:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        w = IndexedWriter(path, dtype)
        w.add_documents(tokens, lengths)
        w.finalize()
        return str(path)
    os.makedirs(path, exist_ok=True)
    entries, doc0, tok0 = [], 0, 0
    for s, part in enumerate(np.array_split(lengths, shards)):
        w = IndexedWriter(os.path.join(path, f"shard_{s:05d}"), dtype)
        n = int(part.sum())
        w.add_documents(tokens[tok0:tok0 + n], part)
        w.finalize()
        entries.append({"name": f"shard_{s:05d}", "documents": len(part), "tokens": n, "sha256": w.sha256})
        doc0, tok0 = doc0 + len(part), tok0 + n
    manifest_obj = {"format_version": 1, "complete": True, "dtype": np.dtype(dtype).name, "shards": entries,
                    "tokenizer": {"path": "none", "sha256": tokenizer_sha, "vocab_size": 1 << 20, "eod_id": 0}}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest_obj, f)
    return str(path)


def random_lengths(n, seed, lo=3, hi=60):
    return np.random.default_rng(seed).integers(lo, hi, n)


def make_cfg(tmp_path, datasets, steps=20, gbs=8, split="90,5,5", seed=1234, eval_interval=0, cache="cache"):
    return from_dict({"model": {"seq_len": SEQ_LEN},
                      "data": {"datasets": datasets, "split": split, "seed": seed,
                               "cache_dir": str(tmp_path / cache)},
                      "train": {"steps": steps, "global_batch_size": gbs, "micro_batch_size": 1,
                                "eval_interval": eval_interval, "eval_iters": 2},
                      "checkpoint": {"dir": str(tmp_path / "ckpt")}})


def build(cfg):
    return build_datasets(cfg, [TokenDocuments(d.path) for d in cfg.data.datasets])


def global_batches(ds, steps, gbs, dp):
    """Each step's global batch, put together from the slices of all dp ranks."""
    return [np.concatenate([batch_for_rank(ds, s, gbs, r, dp) for r in range(dp)]) for s in steps]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    lengths = random_lengths(120, 0)
    return tmp, write_tokens(tmp / "d", lengths, shards=3), lengths


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_every_sample_once_per_epoch_at_any_dp_size(one, dp):
    tmp, path, lengths = one
    cfg = make_cfg(tmp, [{"path": path, "weight": 1}], steps=60)
    train, _ = build(cfg)
    n = train.samples_per_epoch
    lo, hi = split_ranges(len(lengths), cfg.data.split)[0]
    split_tokens = set(range(int(lengths[:lo].sum()), int(lengths[:hi].sum())))
    seen = np.concatenate(global_batches(train, range(cfg.train.steps), cfg.train.global_batch_size, dp))
    assert seen.shape == (60 * 8, SEQ_LEN + 1) and seen.dtype == np.int64
    assert train.num_epochs >= 2 and n * train.num_epochs >= len(seen)
    reference = np.concatenate(global_batches(train, range(cfg.train.steps), 8, 1))
    np.testing.assert_array_equal(seen, reference)  # the order does not depend on the dp size
    for e in range(len(seen) // n):
        inputs = seen[e * n:(e + 1) * n, :-1].ravel()
        assert len(np.unique(inputs)) == len(inputs) == n * SEQ_LEN  # no token twice within an epoch
        assert set(inputs.tolist()) <= split_tokens
        assert len(split_tokens) - len(inputs) <= SEQ_LEN  # and at most one sample's worth left out
    # Packing: wherever consecutive tokens of a sample jump, one document ended and another one began.
    ends = np.cumsum(lengths)
    last_tokens, first_tokens = set((ends - 1).tolist()), set((ends - lengths).tolist())
    rows, cols = np.nonzero(np.diff(seen, axis=1) != 1)
    assert len(rows) > 0
    assert all(seen[r, c] in last_tokens and seen[r, c + 1] in first_tokens for r, c in zip(rows, cols))


def test_epochs_reshuffle_and_seed_matters(one):
    tmp, path, _ = one
    a, _ = build(make_cfg(tmp, [{"path": path, "weight": 1}], steps=60))
    b, _ = build(make_cfg(tmp, [{"path": path, "weight": 1}], steps=60, seed=7))
    n = a.samples_per_epoch
    first = [a[i][0] for i in range(n)]
    second = [a[n + i][0] for i in range(n)]
    assert first != second  # a fresh shuffle each epoch
    assert [b[i][0] for i in range(n)] != first
    again, _ = build(make_cfg(tmp, [{"path": path, "weight": 1}], steps=60, cache="cache2"))
    assert [again[i][0] for i in range(n)] == first


@pytest.mark.parametrize("steps_a,steps_b", [(5, 60), (33, 34), (1, 200)])
def test_order_is_stable_when_steps_change(one, steps_a, steps_b):
    tmp, path, _ = one
    short, _ = build(make_cfg(tmp, [{"path": path, "weight": 1}], steps=steps_a))
    long, _ = build(make_cfg(tmp, [{"path": path, "weight": 1}], steps=steps_b))
    assert len(short) == steps_a * 8 and len(long) == steps_b * 8
    for i in range(len(short)):
        np.testing.assert_array_equal(short[i], long[i])


@pytest.mark.parametrize("dp_before,dp_after", [(1, 4), (2, 1), (4, 2), (2, 4)])
def test_resume_at_consumed_samples_with_another_dp_size(one, dp_before, dp_after):
    tmp, path, _ = one
    cfg = make_cfg(tmp, [{"path": path, "weight": 1}], steps=30)
    reference = global_batches(build(cfg)[0], range(30), 8, 1)
    train, _ = build(cfg)
    k = 11
    global_batches(train, range(k), 8, dp_before)
    state = json.loads(json.dumps({"consumed_samples": k * 8}))  # what a checkpoint carries
    resumed, _ = build(make_cfg(tmp, [{"path": path, "weight": 1}], steps=30))  # a fresh process's view
    step = state["consumed_samples"] // cfg.train.global_batch_size
    after = global_batches(resumed, range(step, 30), 8, dp_after)
    for s, batch in zip(range(step, 30), after):
        np.testing.assert_array_equal(batch, reference[s])


def test_splits_are_disjoint_document_ranges_and_stable(tmp_path):
    lengths = random_lengths(400, 1)
    path = write_tokens(tmp_path / "d", lengths)
    owner = np.repeat(np.arange(len(lengths)), lengths)  # token value -> document
    docs_of = {}
    for steps in (10, 80):
        cfg = make_cfg(tmp_path, [{"path": path, "weight": 1}], steps=steps, split="80,10,10", eval_interval=5)
        train, valid = build(cfg)
        assert (valid.lo, valid.hi, len(valid)) == (320, 360, 16)
        valid = build_split(cfg, [TokenDocuments(path)], "valid", 400)  # several epochs: every document
        test = build_split(cfg, [TokenDocuments(path)], "test", 400)
        for name, ds in (("train", train), ("valid", valid), ("test", test)):
            toks = np.concatenate([ds[i] for i in range(len(ds))])
            docs_of.setdefault(name, set()).update(owner[toks].tolist())
        assert (train.lo, train.hi, valid.lo, valid.hi, test.lo, test.hi) == (0, 320, 320, 360, 360, 400)
    assert not docs_of["train"] & docs_of["valid"] and not docs_of["train"] & docs_of["test"]
    assert not docs_of["valid"] & docs_of["test"]
    assert docs_of["valid"] == set(range(320, 360)) and docs_of["test"] == set(range(360, 400))


@pytest.mark.parametrize("weights", [[1, 1], [0.7, 0.2, 0.1], [5, 3, 1, 1], [30, 20, 10, 5, 3, 2, 1]])
def test_blend_shares_every_prefix(tmp_path, weights):
    paths = [write_tokens(tmp_path / f"d{k}", random_lengths(100 + 50 * k, k), first_token=1_000_000 * k)
             for k in range(len(weights))]
    cfg = make_cfg(tmp_path, [{"path": p, "weight": w} for p, w in zip(paths, weights)], steps=100)
    train, _ = build(cfg)
    origin = np.array([train[i][0] // 1_000_000 for i in range(len(train))])  # from the tokens themselves
    np.testing.assert_array_equal(origin, train.index["dataset"])
    w = np.asarray(weights, float) / sum(weights)
    counts = np.cumsum(np.eye(len(w))[origin], axis=0)
    expected = np.arange(1, len(origin) + 1)[:, None] * w[None, :]
    err = np.abs(counts - expected)
    assert err.max() <= 1 - 1 / (2 * len(w) - 2) + 1e-9, err.max(axis=0)  # within one sample, always
    longer, _ = build(make_cfg(tmp_path, cfg.data.datasets, steps=170))
    for i in range(0, len(train), 7):  # the blend is a prefix of a longer one
        np.testing.assert_array_equal(train[i], longer[i])
    for k, part in enumerate(train.datasets):  # each dataset's samples are its own order's first samples
        mine = np.flatnonzero(origin == k)
        np.testing.assert_array_equal(train.index["sample"][mine], np.arange(len(mine)))


def test_blend_refuses_different_tokenizers_and_bad_weights(tmp_path):
    a = write_tokens(tmp_path / "a", random_lengths(50, 2), tokenizer_sha="one")
    b = write_tokens(tmp_path / "b", random_lengths(50, 3), tokenizer_sha="two")
    with pytest.raises(ValueError, match="different tokenizer") as e:
        build(make_cfg(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 1}]))
    assert str(b) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="weight"):
        build(make_cfg(tmp_path, [{"path": a, "weight": 1}, {"path": a, "weight": 0}]))


def test_bare_megatron_prefix_and_shards_agree(tmp_path):
    lengths = random_lengths(120, 4)
    folder = write_tokens(tmp_path / "folder", lengths, shards=4, dtype=np.uint16)
    prefix = write_tokens(tmp_path / "bare" / "name", lengths, manifest=False, dtype=np.uint16)
    a, _ = build(make_cfg(tmp_path, [{"path": folder, "weight": 1}], steps=10))
    b, _ = build(make_cfg(tmp_path, [{"path": prefix, "weight": 1}], steps=10))
    np.testing.assert_array_equal(np.stack([a[i] for i in range(80)]), np.stack([b[i] for i in range(80)]))


@pytest.mark.parametrize("tokens,eod,expected", [
    ([5, 0, 7, 8, 0, 9], 0, [1, 0, 1, 1, 0]),
    ([[3, 3, 2], [2, 1, 1]], 2, [[1, 1], [0, 1]]),
    ([4, 5, 6], 9, [1, 1]),
])
def test_loss_mask_zeroes_labels_after_eod(tokens, eod, expected):
    mask = loss_mask(np.array(tokens), eod)
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, np.array(expected, np.float32))


def test_index_files_are_memory_mapped_and_int_sized(one):
    tmp, path, _ = one
    train, _ = build(make_cfg(tmp, [{"path": path, "weight": 1}], steps=60))
    for name, a in train.index.items():
        assert isinstance(a, np.memmap), name
        assert a.dtype in (np.int32, np.int64), name
    digest = hashlib.sha256(np.stack([train[i] for i in range(16)]).tobytes()).hexdigest()
    assert digest == hashlib.sha256(np.stack([build(make_cfg(tmp, [{"path": path, "weight": 1}], steps=60,
                                                             cache="other"))[0][i] for i in range(16)]).tobytes()).hexdigest()


def _share_error(dataset, w):
    """max over every prefix t and dataset k of |count_k(t) - t w_k|."""
    counts = np.cumsum(np.eye(len(w))[dataset], axis=0)
    return np.abs(counts - np.arange(1, len(dataset) + 1)[:, None] * w[None, :]).max()


def _reference_order(w, n):
    """The rule of pipeline/data/blend.py, spelled out in plain Python."""
    d = 0.0 if len(w) == 1 else 1 - 1 / (2 * len(w) - 2)
    counts, order = [0] * len(w), []
    for t in range(1, n + 1):
        allowed = [k for k in range(len(w)) if counts[k] + 1 - d <= t * w[k] * (1 + 2**-50)]
        k = min(allowed, key=lambda k: ((counts[k] + d) / w[k], k))
        order.append(k)
        counts[k] += 1
    return order


def test_blend_order_stays_within_one_sample_for_any_weights():
    """Random weights, 1 to 16 datasets, some very skewed: never more than 1 - 1/(2K-2) off any prefix's share,
    and the compiled loop is the plain rule."""
    from pipeline.data.blend import blend_order, bound

    rng = np.random.default_rng(7)
    worst = []
    for trial in range(300):
        k = int(rng.integers(1, 17))
        w = rng.dirichlet(np.full(k, rng.choice([0.05, 0.5, 5.0])))
        w = np.maximum(w, 1e-4)
        w /= w.sum()
        dataset, sample = blend_order(w, 4000, np.int16, np.int64)
        if trial < 20:
            assert dataset.tolist()[:600] == _reference_order(w, 600)
        for j in range(k):  # each dataset's samples are taken in order 0, 1, 2, ...
            np.testing.assert_array_equal(sample[dataset == j], np.arange((dataset == j).sum()))
        worst.append(_share_error(dataset, w) - bound(k))
    assert max(worst) <= 1e-9, max(worst)


def test_indices_past_int32_token_counts():
    """3 * 10^9 tokens in one split (no files): sample starts past 2^31 are exact, dtypes widen only where needed."""
    from pipeline.data.indices import build_gpt_indices, index_dtype

    lengths = np.random.default_rng(3).integers(1_000_000, 3_000_000, 1500).astype(np.int32)
    seq_len = 1_000_003
    ix = build_gpt_indices(lengths, 0, len(lengths), seq_len, seed=5, split_id=0, num_epochs=2)
    n = (int(lengths.sum(dtype=np.int64)) - 1) // seq_len
    assert lengths.sum(dtype=np.int64) > 2**31 and len(ix["shuffle"]) == 2 * n
    for e in range(2):
        perm = ix["doc"][e * len(lengths):(e + 1) * len(lengths)].astype(np.int64)
        ends = np.concatenate([[0], np.cumsum(lengths[perm].astype(np.int64))])
        pos = ix["sample_doc"][e * n:(e + 1) * n].astype(np.int64)
        starts = ends[pos] + ix["sample_offset"][e * n:(e + 1) * n]
        np.testing.assert_array_equal(starts, np.arange(n, dtype=np.int64) * seq_len)  # every start exact
        assert (ix["sample_offset"][e * n:(e + 1) * n] < lengths[perm][pos]).all()
        assert sorted(ix["shuffle"][e * n:(e + 1) * n].tolist()) == list(range(n))
    assert ix["sample_offset"].dtype == np.int32 and index_dtype(2**31) == np.int64 and index_dtype(2**31 - 2) == np.int32
