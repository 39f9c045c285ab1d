"""Per-rank activation memory of one training step with Ulysses sequence parallelism, side by side:
`python bench/sequence_parallel.py [--seq 4096] [--hidden 256] [--layers 2]` (it starts its own 2-rank torchrun).

In one 2-rank launch, the same model and global batch (one sequence per rank and step: micro batch 1) run
under the real engine (ZeRO-3, fp32, CPU or GPU) at sp=1 (dp 2) and at sp=2 (dp 1: both ranks hold half of each
sequence). After a warm-up step (optimizer state allocated) each rank's resident memory is sampled every
millisecond during one more step (on GPU: torch's peak allocation); the activation peak is the rise above
the level before that step. glibc's malloc is pinned to mmap every block over 64 KiB (MALLOC_MMAP_THRESHOLD_),
so freed tensors leave the resident set and the first layout's memory is not reused by the second. Prints the per-rank peaks and the ratio sp2/sp1 (goal <= 0.6). Run on a shared
machine under `flock /tmp/bench.lock`.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_peak(engine, batch) -> float:
    """Bytes above the pre-step level at the step's peak."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.train_step(batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    gc.collect()
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    engine.train_step(batch)
    done.set()
    t.join()
    return max(peak[0], rss_bytes()) - base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    args = p.parse_args()
    if "LOCAL_RANK" not in os.environ:  # the driver: one 2-rank launch with malloc pinned
        import subprocess

        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  __file__, *sys.argv[1:]], env=env))
    from pipeline import dist
    from pipeline.config import from_dict
    from pipeline.engine import build_engine

    dist.init_distributed(1800)
    world, rank = dist.world_size(), dist.rank()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (world, args.seq + 1), generator=gen)
    peaks = {}
    for sp in (1, world):
        cfg = from_dict({
            "model": {"arch": "llama", "num_layers": args.layers, "hidden_size": args.hidden, "num_heads": 8,
                      "vocab_size": args.vocab, "seq_len": args.seq},
            "parallel": {"sp": sp, "zero_stage": 3},
            "data": {"datasets": [{"path": "unused"}]},
            "train": {"global_batch_size": world // sp, "micro_batch_size": 1}})
        engine = build_engine(cfg)
        mine = tokens[engine.dp_rank:engine.dp_rank + 1]  # sp ranks share their sequence
        engine.train_step(mine)  # warm-up: optimizer state, buffers
        peaks[sp] = step_peak(engine, mine)
        del engine
        gc.collect()
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, peaks)
    if rank == 0:
        for r, pk in enumerate(everyone):
            print(f"rank {r}: llama L{args.layers} h{args.hidden} seq {args.seq}, one sequence per rank-step: activation "
                  f"peak sp=1 {pk[1] / 2**20:,.0f} MiB, sp={world} {pk[world] / 2**20:,.0f} MiB, "
                  f"ratio {pk[world] / pk[1]:.3f} (goal <= 0.6)", flush=True)
    dist.exit_cleanly(0)


if __name__ == "__main__":
    main()
