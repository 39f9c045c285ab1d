"""Trainer overheads, side by side in one run (CPU, one process):

1. step time of the trainer's DeepSpeed engine (pipeline.engine.TrainEngine, ZeRO-1 and ZeRO-3) ÷ a plain
   PyTorch loop (same model, same batches, torch AdamW, clipping) — goal ≤ 1.10;
2. checkpoint save throughput (pipeline.checkpoint.save: DeepSpeed files + commit protocol) ÷ a raw write of
   the same number of bytes to the same disk, both followed by os.sync() — goal ≥ 0.5;
3. `pipeline.plan`'s memory estimate ÷ the measured peak (RSS growth from model build to the end of the steps);
4. ZeRO-3 with the optimizer offloaded: step time with DeepSpeed's CPU Adam (what the engine picks) ÷ with
   torch's AdamW;
5. checkpoint.async_save: the time training is blocked per save, background ÷ synchronous (goal <= 0.2). Blocked
   = the save call (host copy) + the commit + what the steps run during the background write lose against the
   median step; synchronous = the whole save (write, flush, commit). Both flush (checkpoint.sync).

    .venv/bin/python bench/train.py [--steps 10] [--hidden 384] [--layers 8] [--only async-save]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_cfg(args, data_dir, ckpt_dir, zero_stage, offload=False):
    from pipeline.config import from_dict

    return from_dict({
        "model": {"arch": "llama", "num_layers": args.layers, "hidden_size": args.hidden, "num_heads": 8,
                  "seq_len": args.seq_len, "vocab_size": 32000},
        "parallel": {"zero_stage": zero_stage, "offload_optimizer": offload},
        "data": {"datasets": [{"path": data_dir, "weight": 1}]},
        "train": {"steps": 1000, "global_batch_size": args.batch, "micro_batch_size": args.batch, "warmup_steps": 5},
        "checkpoint": {"dir": ckpt_dir, "keep": 1},
    })


def batches(args, n):
    rng = np.random.default_rng(0)
    return [torch.from_numpy(rng.integers(0, 32000, (args.batch, args.seq_len + 1))) for _ in range(n)]


def time_plain(cfg, data, warmup):
    from pipeline.optim import build_optimizer
    from pipeline.model import build_model, lm_loss

    model = build_model(cfg.model, seed=1)
    opt = build_optimizer(model, cfg.train)
    times = []
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        loss = lm_loss(model(b[:, :-1]), b[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_engine(cfg, data, warmup):
    from pipeline.engine import build_engine

    before = rss_bytes()
    engine = build_engine(cfg)
    times = []
    for i, b in enumerate(data):
        t0 = time.perf_counter()
        engine.train_step(b)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return float(np.median(times)), engine, peak


def raw_write(path, nbytes):
    buf = os.urandom(1 << 24)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(buf[:min(left, len(buf))])
            left -= len(buf)
    os.sync()
    return time.perf_counter() - t0


def time_async_saves(args, work, data, trials: int = 3):
    """Median seconds a save blocks training, synchronous vs background, for a ZeRO-1 engine: {mode: (total, the
    save call, the commit, what the steps during the background write lose against the median step)}."""
    from pipeline import checkpoint

    cfg = make_cfg(args, work, os.path.join(work, "async"), 1)
    _, engine, _ = time_engine(cfg, data[:args.warmup + 1], args.warmup)
    ds = engine.engine
    times = []
    for b in data[:args.steps]:
        t0 = time.perf_counter()
        engine.train_step(b)
        times.append(time.perf_counter() - t0)
    base = float(np.median(times))
    parts = {False: [], True: []}
    step = 0
    for trial in range(trials):
        for background in (False, True):
            step += 1
            client = {"step": step, "consumed_samples": 0}
            t0 = time.perf_counter()
            checkpoint.save(ds, cfg.checkpoint.dir, step, client, cfg.to_dict(), 1, sync=True, background=background)
            call, slowdown, commit = time.perf_counter() - t0, 0.0, 0.0
            i = 0
            while background and not checkpoint.background_done(ds, engine.device):
                t0 = time.perf_counter()
                engine.train_step(data[i % len(data)])
                slowdown += time.perf_counter() - t0 - base  # noise either way: summed, not clipped per step
                i += 1
            if background:
                t0 = time.perf_counter()
                checkpoint.finish(cfg.checkpoint.dir, step, client, cfg.to_dict(), 1, t0)
                commit = time.perf_counter() - t0
            slowdown = max(0.0, slowdown)
            parts[background].append((call + commit + slowdown, call, commit, slowdown))
    tag_dir = os.path.join(cfg.checkpoint.dir, checkpoint.tag_for(step))
    nbytes = sum(os.path.getsize(os.path.join(tag_dir, f)) for f in os.listdir(tag_dir))
    median = {mode: tuple(float(np.median([p[k] for p in rows])) for k in range(4)) for mode, rows in parts.items()}
    return median, nbytes, base


def report_async(args, work, data):
    median, nbytes, base = time_async_saves(args, work, data)
    print(f"\ncheckpoint.async_save, ZeRO-1, {nbytes / 1e6:.0f} MB of state (median step {base:.2f} s), medians of 3:")
    print(f"{'':20s}{'blocked s':>10s}{'save call':>10s}{'commit':>10s}{'step loss':>10s}")
    for mode, name in ((False, "synchronous save"), (True, "background save")):
        print(f"{name:20s}" + "".join(f"{v:10.2f}" for v in median[mode]))
    print(f"ratio background / synchronous {median[True][0] / median[False][0]:.2f}   (goal <= 0.2)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp folder)")
    ap.add_argument("--only", choices=["async-save"], help="run one comparison only")
    args = ap.parse_args()

    from pipeline import checkpoint, dist
    from pipeline.model import num_params, build_model
    from pipeline.plan import memory_per_gpu

    dist.init_distributed(600)
    work = tempfile.mkdtemp(prefix="bench-train-", dir=args.dir)
    data = batches(args, args.steps + args.warmup)
    cfg1 = make_cfg(args, work, os.path.join(work, "c1"), 1)
    n = num_params(build_model(cfg1.model))
    print(f"model: llama, {n / 1e6:.1f}M parameters, batch {args.batch} x {args.seq_len}, torch threads "
          f"{torch.get_num_threads()}")
    if args.only == "async-save":
        report_async(args, work, data)
        shutil.rmtree(work, ignore_errors=True)
        dist.exit_cleanly(0)

    plain = time_plain(cfg1, data, args.warmup)
    rows = []
    for stage in (1, 0, 3):  # ZeRO-1 first: ru_maxrss is a lifetime peak, so only the first engine's is its own
        cfg = make_cfg(args, work, os.path.join(work, f"c{stage}"), stage)
        step, engine, peak = time_engine(cfg, data, args.warmup)
        rows.append((stage, step, engine, peak, cfg))
    print(f"\n{'':28s}{'s/step':>10s}{'÷ plain':>10s}")
    print(f"{'plain PyTorch loop':28s}{plain:10.3f}{1.0:10.2f}")
    for stage, step, *_ in sorted(rows, key=lambda r: r[0]):
        print(f"{f'TrainEngine ZeRO-{stage}':28s}{step:10.3f}{step / plain:10.2f}   (goal <= 1.10)")

    stage, _, engine, peak, cfg = rows[0]  # ZeRO-1: DeepSpeed's checkpoint files as pipelines write them
    t0 = time.perf_counter()
    checkpoint.save(engine.engine, cfg.checkpoint.dir, 1, {"step": 1, "consumed_samples": 0}, cfg.to_dict(), 1)
    os.sync()
    save_s = time.perf_counter() - t0
    tag_dir = os.path.join(cfg.checkpoint.dir, "global_step1")
    nbytes = sum(os.path.getsize(os.path.join(tag_dir, f)) for f in os.listdir(tag_dir))
    raw_s = raw_write(os.path.join(work, "raw.bin"), nbytes)
    print(f"\ncheckpoint save: {nbytes / 1e6:.0f} MB in {save_s:.2f} s = {nbytes / save_s / 1e6:.0f} MB/s; raw write "
          f"{nbytes / raw_s / 1e6:.0f} MB/s; ratio {raw_s / save_s:.2f}   (goal >= 0.5)")

    # ru_maxrss is a lifetime peak: only the first engine's growth is its own.
    stage, _, _, peak, cfg = rows[0]
    est = sum(memory_per_gpu(cfg, 1, False).values())
    print(f"memory ZeRO-{stage}: plan estimate {est / 2**20:.0f} MiB, measured peak growth {peak / 2**20:.0f} MiB, "
          f"ratio {est / peak:.2f}   (goal within 20%)")

    import pipeline.engine as engine_mod

    offload = {}
    for way in ("DeepSpeed CPU Adam", "torch AdamW"):
        plain_build = engine_mod.build_optimizer
        if way == "torch AdamW":
            engine_mod.build_optimizer = lambda m, t, offload=False: plain_build(m, t, offload=False)
        cfg = make_cfg(args, work, os.path.join(work, "offload"), 3, offload=True)
        offload[way], engine, _ = time_engine(cfg, data, args.warmup)
        engine_mod.build_optimizer = plain_build
        del engine
    ratio = offload["torch AdamW"] / offload["DeepSpeed CPU Adam"]
    print(f"ZeRO-3, optimizer offloaded: {offload['DeepSpeed CPU Adam']:.3f} s/step with DeepSpeed CPU Adam, "
          f"{offload['torch AdamW']:.3f} with torch AdamW; ratio {ratio:.2f}x")
    report_async(args, work, data)
    shutil.rmtree(work, ignore_errors=True)
    dist.exit_cleanly(0)


if __name__ == "__main__":
    main()
