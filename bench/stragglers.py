"""Cost of the per-rank timing (pipeline/stragglers.py), side by side with a tiny train step on the same ranks.

    .venv/bin/python bench/stragglers.py [--world 2] [--reps 2000]

Spawns `--world` gloo ranks on this machine and times, per call (median of `--reps`):
  - the one collective per log line: all_gather of 5 float64 per rank (StepTimer.gather_if_due);
  - the hooks' work per step: two perf_counter calls in forward hooks (CPU) around a tiny module;
  - a reference: a 2-layer, h64 model's forward+backward+AdamW step on one micro-batch of 4x64 tokens.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

def _median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _worker(rank: int, world: int, port: int, reps: int, out):
    sys.path.insert(0, ROOT)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    mine = torch.zeros(5, dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(world)]
    for _ in range(20):
        tdist.all_gather(parts, mine)
    tdist.barrier()
    gather = _median_us(lambda: tdist.all_gather(parts, mine), reps)

    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    model = build_model(ModelConfig(arch="llama", num_layers=2, hidden_size=64, num_heads=4, vocab_size=1024,
                                    seq_len=64, ffn_hidden_size=160), seed=0)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, 1024, (4, 64))

    def step():
        opt.zero_grad()
        model(x).float().mean().backward()
        opt.step()
    step()
    start, total = [0.0], [0.0]

    def begin(module, args):
        start[0] = time.perf_counter()

    def end(module, args, output):
        total[0] += time.perf_counter() - start[0]
    plain, hooked = [], []
    for i in range(max(40, reps // 25)):  # alternated, so that a busy machine slows both alike
        handles = [model.register_forward_pre_hook(begin), model.register_forward_hook(end)] if i % 2 else []
        t0 = time.perf_counter()
        step()
        (hooked if handles else plain).append(time.perf_counter() - t0)
        for h in handles:
            h.remove()
    train_step, hooked = statistics.median(plain) * 1e6, statistics.median(hooked) * 1e6
    if rank == 0:
        out.put((gather, train_step, hooked))
    tdist.barrier()
    tdist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--reps", type=int, default=2000)
    args = p.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args.reps, out)) for r in range(args.world)]
    for proc in procs:
        proc.start()
    gather, train_step, hooked = out.get(timeout=600)
    for proc in procs:
        proc.join()
    print(f"world {args.world} (gloo, CPU), medians:")
    print(f"  all_gather of 5 float64 per rank (once per log line): {gather:9.1f} us")
    print(f"  tiny train step (2 layers, h64, 4x64 tokens):          {train_step:9.1f} us")
    print(f"  the same step with the two forward timing hooks:      {hooked:9.1f} us "
          f"({hooked / train_step:.3f}x)")
    print(f"  gather / tiny step: {gather / train_step:.3f} (at log.interval 10: {gather / train_step / 10:.4f} "
          f"of the interval's step time)")


if __name__ == "__main__":
    main()
