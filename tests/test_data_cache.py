"""The index cache under real concurrency and real staleness, data checks, and the inspect CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from pipeline.data import GPTDataset, TokenDocuments
from tests.conftest import ROOT, run_cli
from tests.test_data import SEQ_LEN, build, make_cfg, random_lengths, write_tokens

# Builds one dataset's indices in a fresh process once the wall clock reaches START, then prints what it read.
RACER = """
import hashlib, logging, sys, time
import numpy as np
from pipeline.data import GPTDataset, TokenDocuments
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
path, cache, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
docs = TokenDocuments(path)
while time.time() < start:
    pass
ds = GPTDataset(docs, 16, 200_000, seed=3, split="100,0,0", cache_dir=cache)
print(hashlib.sha256(np.stack([ds[i] for i in range(0, len(ds), 997)]).tobytes()).hexdigest())
"""

# Prepended to RACER: flock fails as it does where the filesystem has no lock support.
NO_LOCKS = """
import errno, fcntl
def _no_lock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = _no_lock
"""


def _race(path, caches, no_locks=False):
    start = time.time() + 2.0
    racer = NO_LOCKS + RACER if no_locks else RACER
    procs = [subprocess.Popen([sys.executable, "-c", racer, path, c, str(start)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in caches]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
    return ([out.strip() for out, _, _ in results], [err.count("built gpt-train index") for _, err, _ in results],
            [err for _, err, _ in results])


def test_four_processes_racing_on_one_cache_build_once(tmp_path):
    path = write_tokens(tmp_path / "d", random_lengths(4000, 5, 3, 200))
    cache = str(tmp_path / "cache")
    digests, builds, _ = _race(path, [cache] * 4)
    assert len(set(digests)) == 1
    assert sorted(builds) == [0, 0, 0, 1]  # one built, the others waited and mapped its files
    assert not [f for f in os.listdir(cache) if ".tmp-" in f]
    expected = GPTDataset(TokenDocuments(path), 16, 200_000, seed=3, split="100,0,0")  # no cache at all
    import hashlib

    assert digests[0] == hashlib.sha256(np.stack([expected[i] for i in range(0, 200_000, 997)]).tobytes()).hexdigest()


# Builds a tiny cache entry with load_or_build; "die" makes the build hang 3 s and kill the process.
BUILDER = """
import os, sys, time, logging
import numpy as np
from pipeline.data.cache import load_or_build
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
cache, mode = sys.argv[1], sys.argv[2]
def build():
    if mode == "die":
        open(os.path.join(cache, "holding"), "w").close()  # the lock is ours: the test starts the waiter now
        time.sleep(3)
        os._exit(9)
    return {"x": np.arange(1000)}
print(int(load_or_build(cache, "t", {"k": 1}, build)["x"].sum()))
"""


def test_a_builder_killed_mid_build_leaves_the_waiter_to_build(tmp_path):
    cache = str(tmp_path / "cache")
    run = lambda mode: subprocess.Popen([sys.executable, "-c", BUILDER, cache, mode], cwd=ROOT, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dying = run("die")
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(cache, "holding")):
        assert time.time() < deadline and dying.poll() is None, dying.communicate()
        time.sleep(0.05)
    waiter = run("build")
    out, err = waiter.communicate(timeout=60)
    assert dying.wait(timeout=60) == 9
    assert waiter.returncode == 0 and out.strip() == str(sum(range(1000))), err
    assert "built t index" in err


def test_racing_without_working_locks_both_build_and_agree(tmp_path):
    """A filesystem where flock fails (some network filesystems): both build, renames leave one whole set."""
    path = write_tokens(tmp_path / "d", random_lengths(4000, 5, 3, 200))
    cache = str(tmp_path / "cache")
    digests, builds, errs = _race(path, [cache, cache], no_locks=True)
    assert all("cannot lock" in err for err in errs)  # both went the lock-less way
    assert digests[0] == digests[1] and 1 <= sum(builds) <= 2
    assert not [f for f in os.listdir(cache) if ".tmp-" in f]
    again = GPTDataset(TokenDocuments(path), 16, 200_000, seed=3, split="100,0,0", cache_dir=cache)
    import hashlib

    assert digests[0] == hashlib.sha256(np.stack([again[i] for i in range(0, 200_000, 997)]).tobytes()).hexdigest()


def test_unshared_caches_on_two_nodes_agree(tmp_path):
    path = write_tokens(tmp_path / "d", random_lengths(4000, 6, 3, 200))
    digests, builds, _ = _race(path, [str(tmp_path / "node1"), str(tmp_path / "node2")])
    assert digests[0] == digests[1] and builds == [1, 1]


@pytest.mark.parametrize("manifest", [True, False])
def test_retokenized_data_never_reuses_stale_indices(tmp_path, manifest):
    path = str(tmp_path / "d") if manifest else str(tmp_path / "p" / "name")
    write_tokens(path, random_lengths(80, 7), manifest=manifest)
    cfg = make_cfg(tmp_path, [{"path": path, "weight": 1}], steps=10)
    old, _ = build(cfg)
    old_samples = np.stack([old[i] for i in range(len(old))])
    # Re-tokenize into the same path: other documents, other lengths.
    write_tokens(path, random_lengths(95, 8), first_token=500_000, manifest=manifest)
    new, _ = build(cfg)
    fresh = GPTDataset(TokenDocuments(path), SEQ_LEN, len(new), cfg.data.seed, cfg.data.split)  # no cache
    new_samples = np.stack([new[i] for i in range(len(new))])
    np.testing.assert_array_equal(new_samples, np.stack([fresh[i] for i in range(len(fresh))]))
    assert new_samples.min() >= 500_000 > old_samples.max()
    markers = [f for f in os.listdir(tmp_path / "cache") if f.startswith("gpt-train") and f.endswith(".json")]
    assert len(markers) == 2


@pytest.mark.parametrize("damage", ["short", "empty", "zero-filled", "missing"])
def test_a_torn_cache_file_is_rebuilt(tmp_path, damage):
    """What a crash or a stray write can leave of a cache file: each is noticed on load and rebuilt."""
    path = write_tokens(tmp_path / "d", random_lengths(80, 9))
    cfg = make_cfg(tmp_path, [{"path": path, "weight": 1}], steps=10)
    before, _ = build(cfg)
    expected = np.stack([before[i] for i in range(len(before))])
    victim = tmp_path / "cache" / [f for f in os.listdir(tmp_path / "cache") if f.endswith("-shuffle.npy")][0]
    if damage in ("short", "empty"):
        os.truncate(victim, 100 if damage == "short" else 0)
    elif damage == "zero-filled":  # same size, a valid header, the data blocks never written
        header = len(victim.read_bytes()) - before.index["shuffle"].nbytes
        with open(victim, "r+b") as f:
            f.seek(header)
            f.write(bytes(before.index["shuffle"].nbytes))
    else:
        os.remove(victim)
    after, _ = build(cfg)
    np.testing.assert_array_equal(np.stack([after[i] for i in range(len(after))]), expected)
    assert np.load(victim).any()  # rewritten whole


def test_truncated_bin_is_refused_with_the_file_named(tmp_path):
    path = write_tokens(tmp_path / "d", random_lengths(60, 10), shards=2)
    bin_path = os.path.join(path, "shard_00001.bin")
    os.truncate(bin_path, os.path.getsize(bin_path) - 8)
    with pytest.raises(ValueError) as e:
        TokenDocuments(path)
    assert bin_path in str(e.value) and "\n" not in str(e.value)


def test_verify_catches_a_changed_shard(tmp_path):
    path = write_tokens(tmp_path / "d", random_lengths(60, 11), shards=2)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {"datasets": [{"path": path, "weight": 1}]}}))
    assert run_cli("-m", "pipeline.data", "verify", "--config", str(cfg_path)).returncode == 0
    bin_path = os.path.join(path, "shard_00000.bin")
    with open(bin_path, "r+b") as f:  # same size, one token changed
        f.seek(12)
        f.write(b"\x7f")
    TokenDocuments(path)  # opening stays cheap: sizes still agree
    proc = run_cli("-m", "pipeline.data", "verify", "--config", str(cfg_path), check=False)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and bin_path in errors[0]


def test_inspect_prints_splits_shares_and_the_sample(tmp_path):
    a = write_tokens(tmp_path / "a", random_lengths(200, 12))
    b = write_tokens(tmp_path / "b", random_lengths(100, 13), first_token=1_000_000)
    cfg = {"model": {"seq_len": SEQ_LEN},
           "data": {"datasets": [{"path": a, "weight": 3}, {"path": b, "weight": 1}], "split": "90,10,0",
                    "cache_dir": str(tmp_path / "cache")},
           "train": {"steps": 50, "global_batch_size": 8, "micro_batch_size": 1}}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = run_cli("-m", "pipeline.data", "inspect", "--config", str(cfg_path), "--step", "7", "--sample", "3",
                  "--show-tokens", "40").stdout
    train, _ = build(make_cfg(tmp_path, cfg["data"]["datasets"], steps=50, split="90,10,0"))
    i = 7 * 8 + 3
    assert f"train: {50 * 8} samples" in out
    assert f"share {train.counts[0] / 400:.4f} ({train.counts[0]} samples)" in out
    assert f"{train.datasets[0].num_epochs} epoch(s)" in out
    assert "ids: " + " ".join(map(str, train[i][:40].tolist())) in out
    assert "test: none" in out


def test_inspect_decodes_real_tokens(tmp_path, token_dir, tokenizer_model):
    import sentencepiece as spm

    cfg = {"model": {"seq_len": 64}, "data": {"datasets": [{"path": str(token_dir), "weight": 1}],
                                               "cache_dir": str(tmp_path / "cache")},
           "train": {"steps": 5, "global_batch_size": 4, "micro_batch_size": 1}}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = run_cli("-m", "pipeline.data", "inspect", "--config", str(cfg_path), "--step", "2", "--sample", "1").stdout
    docs = TokenDocuments(str(token_dir))
    sample = GPTDataset(docs, 64, 20, 1234, "98,1,1", cache_dir=str(tmp_path / "cache"))[2 * 4 + 1]
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    eod = docs.tokenizer["eod_id"]
    first_doc = sample[:np.flatnonzero(sample == eod)[0]] if (sample == eod).any() else sample
    assert sp.decode(first_doc.tolist()) in out
