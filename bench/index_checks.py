"""What the integrity checks cost: opening a shard with and without the `.idx` checks, and the input fingerprint
of the reuse key, side by side.

    flock /tmp/bench.lock .venv/bin/python bench/index_checks.py [--docs 10000000] [--input-mb 1024]

Writes a shard of --docs documents (1-19 tokens each) and an input file of --input-mb random bytes under /tmp,
then times (best of 5, page cache warm):
  open        IndexedDataset(prefix), which checks sizes, pointers and the document index of the `.idx`
  open bare   the same with the checks switched off (the header and the `.bin` size only)
  fingerprint preprocess.plan.input_fingerprint (size, mtime, sha256 of the first and last MiB)
  sha256      hashlib over the whole input (what a full-content key would cost instead)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from preprocess import indexed  # noqa: E402
from preprocess.plan import input_fingerprint  # noqa: E402


def best(fn, repeat: int = 5) -> float:
    t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10_000_000)
    ap.add_argument("--input-mb", type=int, default=1024)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-index-")
    try:
        prefix = os.path.join(tmp, "shard")
        lengths = np.random.default_rng(0).integers(1, 20, args.docs)
        w = indexed.IndexedWriter(prefix, np.uint16)
        w.add_documents(np.zeros(int(lengths.sum()), np.uint16), lengths)
        w.finalize()
        checked = best(lambda: indexed.IndexedDataset(prefix))
        real, indexed._check_index = indexed._check_index, lambda *a: None
        try:
            bare = best(lambda: indexed.IndexedDataset(prefix))
        finally:
            indexed._check_index = real
        mb = os.path.getsize(prefix + ".idx") / 1e6
        print(f"open a shard of {args.docs:,} documents ({mb:,.0f} MB .idx): {checked * 1e3:,.1f} ms checked, "
              f"{bare * 1e3:,.2f} ms bare ({checked / max(bare, 1e-9):,.0f}x; "
              f"{checked / args.docs * 1e9:.1f} ns per document)")
        path = os.path.join(tmp, "input.jsonl")
        with open(path, "wb") as f:
            for _ in range(args.input_mb):
                f.write(os.urandom(1 << 20))
        fp = best(lambda: input_fingerprint(path))
        full = best(lambda: indexed.sha256_file(path), repeat=1)
        print(f"key of a {args.input_mb:,} MiB input: fingerprint {fp * 1e3:,.1f} ms, full sha256 {full * 1e3:,.0f} ms "
              f"({full / fp:,.0f}x)")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
