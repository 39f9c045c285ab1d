"""Data-path benchmark, side by side in one run: index build, random sample reads, RSS of a rank.

    flock /tmp/bench.lock .venv/bin/python bench/data.py [--tokens 1e9] [--docs 1e6] [--seq-len 2048]
          [--num-samples 1000000] [--reads 20000] [--work /tmp/bench_data] [--megatron /tmp/mcore]

Writes a synthetic corpus (uint16, one shard + manifest) under --work once and reuses it. Baselines:
megatron-core's GPTDataset on the same files when it imports (install it apart from the venv with
`pip install --no-deps --target /tmp/mcore megatron-core packaging`; its C++ helpers ship prebuilt), and
for reads the same byte ranges taken with raw `np.memmap` slices.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data import GPTDataset, TokenDocuments  # noqa: E402
from preprocess.indexed import IndexedWriter  # noqa: E402

SEED = 1234


def make_corpus(folder: str, tokens: int, docs: int) -> str:
    params = {"tokens": tokens, "docs": docs, "seed": SEED}
    marker = os.path.join(folder, "bench.json")
    if os.path.isfile(marker) and json.load(open(marker)) == params:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    rng = np.random.default_rng(SEED)
    lengths = rng.integers(1, 2 * tokens // docs, docs)
    w = IndexedWriter(os.path.join(folder, "shard_00000"), np.uint16)
    t0 = time.time()
    for chunk in np.array_split(lengths, max(1, docs // 10_000)):
        w.add_documents(rng.integers(0, 32000, int(chunk.sum()), dtype=np.uint16), chunk)
    w.finalize()
    manifest = {"format_version": 1, "complete": True, "dtype": "uint16",
                "tokenizer": {"path": "none", "sha256": "bench", "vocab_size": 32000, "eod_id": 0},
                "shards": [{"name": "shard_00000", "documents": docs, "tokens": w.tokens, "sha256": w.sha256}]}
    json.dump(manifest, open(os.path.join(folder, "manifest.json"), "w"))
    json.dump(params, open(marker, "w"))
    print(f"wrote {w.tokens:,} tokens in {docs:,} documents to {folder} in {time.time() - t0:.1f}s")
    return folder


def megatron_dataset(prefix: str, seq_len: int, num_samples: int, cache: str):
    from megatron.core.datasets.gpt_dataset import GPTDataset as MGPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed
    from megatron.core.datasets.utils import Split

    tok = SimpleNamespace(vocab_size=32000, eod=0, pad=-1, unique_identifiers={"class": "bench"})
    cfg = GPTDatasetConfig(random_seed=SEED, sequence_length=seq_len, split="100,0,0", path_to_cache=cache,
                           tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False)
    low = MIndexed(prefix, multimodal=False, mmap=True)
    return MGPTDataset(low, prefix, np.arange(len(low.sequence_lengths), dtype=np.int32), num_samples,
                       Split.train, cfg)


def memmap_reader(docs: TokenDocuments):
    mm = [np.memmap(s.prefix + ".bin", dtype=s.dtype, mode="r") for s in docs.shards]

    def read(pieces, need):
        out = np.empty(need, np.int64)
        filled = 0
        for shard, start, n in pieces:
            out[filled:filled + n] = mm[shard][start:start + n]
            filled += n
        return out
    return read


def share_error(dataset: np.ndarray, weights: np.ndarray) -> float:
    """max over prefixes t and datasets k of |count_k(t) - t w_k|: checked just before and just after each pick."""
    worst = 0.0
    for k, w in enumerate(weights):
        t = np.flatnonzero(dataset == k) + 1.0  # the prefix lengths at which k is picked
        j = np.arange(len(t), dtype=np.float64)
        worst = max(worst, np.abs(j + 1 - t * w).max(initial=0), np.abs(j - (t - 1) * w).max(initial=0),
                    abs(len(t) - len(dataset) * w))
    return worst


def blend_section(a, have_megatron: bool) -> None:
    from pipeline.data.blend import blend_order, bound

    n = int(a.blend_samples)
    print(f"\n== blend indices: {n:,} positions, Dirichlet(1) weights (CPU time; max |count - share| over "
          f"every prefix) ==")
    blend_order(np.array([0.5, 0.5]), 10, np.int16, np.int64)  # numba: compile or load from its cache first
    if have_megatron:
        from megatron.core.datasets import helpers_cpp
    for k in (3, 10, 64):
        w = np.random.default_rng(k).dirichlet(np.ones(k))
        t_ours = t_theirs = np.inf
        for _ in range(2):  # best of 2, interleaved: the first touch of fresh memory costs either side alike
            c0 = time.process_time()
            ours, _ = blend_order(w, n, np.int16, np.int64)
            t_ours = min(t_ours, time.process_time() - c0)
            if have_megatron:
                theirs, theirs_sample = np.zeros(n, np.int16), np.zeros(n, np.int64)
                c0 = time.process_time()
                helpers_cpp.build_blending_indices(theirs, theirs_sample, w, k, n, False)
                t_theirs = min(t_theirs, time.process_time() - c0)
        line = f"K={k:3d}  ours {t_ours:6.2f}s error {share_error(ours, w):.3f} (bound {bound(k):.3f})"
        if have_megatron:
            line += (f" | megatron {t_theirs:6.2f}s error {share_error(theirs, w):.3f}"
                     f" | time megatron/ours {t_theirs / t_ours:.2f}x")
        print(line)


def rss_report(folder, seq_len, num_samples, cache, reads) -> dict:
    """Run in a fresh process: memory of a rank that maps an already built cache and reads samples."""
    def status():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
    before = status()
    ds = GPTDataset(TokenDocuments(folder), seq_len, num_samples, SEED, "100,0,0", cache_dir=cache)
    opened = status()
    for i in np.random.default_rng(1).integers(0, len(ds), reads):
        ds[int(i)]
    after = status()
    index_mb = (sum(a.nbytes for a in ds.index.values()) + ds._table.nbytes) / 2**20
    return {"before": before, "opened": opened, "after_reads": after, "index_mb": index_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--docs", type=float, default=1e6)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-samples", type=int, default=1_000_000)
    p.add_argument("--reads", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=9, help="index builds per side")
    p.add_argument("--blend-samples", type=float, default=1e7)
    p.add_argument("--work", default="/tmp/bench_data")
    p.add_argument("--megatron", default="/tmp/mcore", help="a --target folder holding megatron-core")
    p.add_argument("--rss-child", nargs=2, metavar=("FOLDER", "CACHE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rss_child:
        print(json.dumps(rss_report(a.rss_child[0], a.seq_len, a.num_samples, a.rss_child[1], a.reads)))
        return
    folder = make_corpus(os.path.join(a.work, "corpus"), int(a.tokens), int(a.docs))
    docs = TokenDocuments(folder)
    print(f"corpus: {docs.num_tokens:,} tokens, {len(docs):,} documents; seq_len {a.seq_len}, "
          f"{a.num_samples:,} samples")
    caches = tempfile.mkdtemp(dir=a.work, prefix="caches-")
    try:
        run(a, folder, docs, caches)
    finally:
        shutil.rmtree(caches, ignore_errors=True)


def run(a, folder, docs, caches) -> None:
    sys.path.insert(0, a.megatron)
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
        have_megatron = True
    except Exception as e:  # noqa: BLE001
        print(f"megatron-core not importable from {a.megatron} ({e}); no Megatron baseline")
        have_megatron = False
    fresh = iter(range(100))
    new_cache = lambda: os.path.join(caches, f"c{next(fresh)}")

    print(f"\n== index build: open + build + save to a fresh cache folder (best and median of {a.repeats}, "
          f"interleaved; dirty pages synced before each) ==")
    builders = {"ours": lambda cache: GPTDataset(TokenDocuments(folder), a.seq_len, a.num_samples, SEED, "100,0,0",
                                                 cache_dir=cache)}
    if have_megatron:
        import logging
        logging.disable(logging.WARNING)
        prefix = os.path.join(folder, "shard_00000")
        builders["megatron"] = lambda cache: megatron_dataset(prefix, a.seq_len, a.num_samples, cache)
    walls, cpus, built = {n: [] for n in builders}, {n: [] for n in builders}, {}
    for _ in range(a.repeats):
        for name, fn in builders.items():
            cache = new_cache()
            os.sync()  # the previous build's writeback must not land inside this one's timing
            t0, c0 = time.perf_counter(), time.process_time()
            built[name] = fn(cache)
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
            t0 = time.perf_counter()
            fn(cache)
            built[name + " (cache hit)"] = time.perf_counter() - t0
            if name == "ours":
                ours_cache = cache
    ds, mds = built["ours"], built.get("megatron")
    wall = {n: (min(v), float(np.median(v))) for n, v in walls.items()}
    cpu = {n: (min(v), float(np.median(v))) for n, v in cpus.items()}
    for name in builders:
        print(f"{name:9s} wall best {wall[name][0]:.3f}s median {wall[name][1]:.3f}s  CPU best {cpu[name][0]:.3f}s "
              f"median {cpu[name][1]:.3f}s  load from cache {built[name + ' (cache hit)']:.3f}s")
    print(f"ours: {ds.num_epochs} epochs, {ds.samples_per_epoch:,} samples/epoch, built on "
          f"{min(ds.num_epochs, os.cpu_count() or 1, 8)} threads")
    if mds is not None:
        print(f"ratio build megatron/ours (>1: ours faster): wall best {wall['megatron'][0] / wall['ours'][0]:.2f}x "
              f"median {wall['megatron'][1] / wall['ours'][1]:.2f}x; CPU best {cpu['megatron'][0] / cpu['ours'][0]:.2f}x "
              f"median {cpu['megatron'][1] / cpu['ours'][1]:.2f}x")

    blend_section(a, have_megatron)

    print(f"\n== random sample reads ({a.reads:,} samples of {a.seq_len + 1} tokens; CPU time, interleaved) ==")
    idx = [int(i) for i in np.random.default_rng(0).integers(0, a.num_samples, a.reads)]
    pieces = [ds.token_ranges(i) for i in idx]
    read = memmap_reader(docs)
    need = a.seq_len + 1
    for i, pc in zip(idx[:200], pieces[:200]):  # same bytes, same order: a correctness check
        assert np.array_equal(ds[i], read(pc, need))
    readers = {"ours": lambda lo, hi: [ds[i] for i in idx[lo:hi]],
               "raw np.memmap slices": lambda lo, hi: [read(pc, need) for pc in pieces[lo:hi]]}
    if mds is not None:
        readers["megatron (tokens only)"] = lambda lo, hi: [mds._query_document_sample_shuffle_indices(i)
                                                            for i in idx[lo:hi]]
    for fn in readers.values():  # warm: page cache and each reader's own mappings
        fn(0, a.reads)
    cpu = {name: 0.0 for name in readers}
    chunk, passes = 1000, 3
    for _ in range(passes):  # interleave in chunks so that load from other processes hits all alike
        for lo in range(0, a.reads, chunk):
            for name, fn in readers.items():
                t0 = time.process_time()
                fn(lo, lo + chunk)
                cpu[name] += time.process_time() - t0
    results = {name: passes * a.reads / t for name, t in cpu.items()}
    for name, rate in results.items():
        print(f"{name:24s} {rate:10,.0f} samples per CPU-second")
    print(f"ratio ours / raw np.memmap = {results['ours'] / results['raw np.memmap slices']:.2f} (goal >= 0.8)")
    if mds is not None:
        print(f"ratio ours / megatron = {results['ours'] / results['megatron (tokens only)']:.2f}")
    print(f"pieces per sample: {np.mean([len(p) for p in pieces]):.2f}")

    print("\n== RSS of a fresh rank mapping the built indices ==")
    out = subprocess.run([sys.executable, __file__, "--rss-child", folder, ours_cache, "--seq-len", str(a.seq_len),
                          "--num-samples", str(a.num_samples), "--reads", "2000"],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    d_open = {k: r["opened"][k] - r["before"][k] for k in r["before"]}
    d_read = {k: r["after_reads"][k] - r["before"][k] for k in r["before"]}
    print(f"index arrays (memory-mapped from the cache): {r['index_mb']:.1f} MiB")
    print(f"RSS after opening: +{d_open['VmRSS']:.1f} MiB (anonymous +{d_open['RssAnon']:.1f}, "
          f"file-backed +{d_open['RssFile']:.1f}); after 2,000 reads: +{d_read['VmRSS']:.1f} MiB "
          f"(anonymous +{d_read['RssAnon']:.1f}, file-backed +{d_read['RssFile']:.1f})")


if __name__ == "__main__":
    main()
