"""Cost of block-causal attention (model.attn_mask_type), side by side in one run:
`python bench/attention.py [--seqs 1024 4096] [--tokens 4096] [--reps 5] [--doc-len 512]`.

Forward+backward tokens/s of the same model (the CPU shape of bench/model.py: Llama, 4 layers, h512) on the same
packed samples (documents of geometric lengths, mean --doc-len, each ended by EOD), with `causal` and with
`block_causal`, interleaved repetitions in alternating order; prints block_causal ÷ causal by wall time and by
process CPU time (goal on CPU: >= 0.9 at seq 1024). Then the peak resident memory of one forward+backward each
way, each in a fresh process (the peak is per process). On CUDA the same script times the FlexAttention path.
Run on a shared machine under `flock /tmp/bench.lock`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOD = 2


def build(mask: str, seq: int, device: str):
    import torch

    sys.path.insert(0, ROOT)
    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    cfg = ModelConfig(arch="llama", num_layers=4, hidden_size=512, num_heads=8, kv_heads=4, ffn_hidden_size=1408,
                      vocab_size=8192, seq_len=seq, attn_mask_type=mask, eod_id=EOD)
    return build_model(cfg, seed=0).to(device).train(), torch


def packed_batch(batch: int, seq: int, doc_len: int, device: str):
    """[batch, seq + 1] tokens: documents of geometric lengths (mean doc_len) laid end to end, EOD after each."""
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(EOD + 1, 8192, (batch, seq + 1), generator=g)
    ends = torch.rand(batch, seq + 1, generator=g) < 1.0 / doc_len
    return tokens.masked_fill(ends, EOD).to(device)


def step(model, x) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward+backward."""
    from pipeline.model import lm_loss

    t0, c0 = time.perf_counter(), time.process_time()
    lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
    if x.is_cuda:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def speed(seq: int, tokens: int, reps: int, doc_len: int, device: str) -> dict:
    batch = max(1, tokens // seq)
    x = packed_batch(batch, seq, doc_len, device)
    models = {m: build(m, seq, device)[0] for m in ("causal", "block_causal")}
    times = {m: [] for m in models}  # (wall, cpu) pairs
    for m in models:  # warm-up (and FlexAttention's compile on CUDA)
        step(models[m], x)
    for rep in range(reps):  # ABBA order: load on a shared machine hits both alike
        for m in (list(models) if rep % 2 == 0 else list(models)[::-1]):
            models[m].zero_grad(set_to_none=True)
            times[m].append(step(models[m], x))
    wall = {m: batch * seq / statistics.median(t for t, _ in v) for m, v in times.items()}
    cpu = {m: batch * seq / statistics.median(c for _, c in v) for m, v in times.items()}
    return {"batch": batch, "docs_per_sample": int((x == EOD).sum()) / batch, "wall": wall, "cpu": cpu}


def peak_mb(mask: str, seq: int, tokens: int, doc_len: int) -> float:
    """Peak RSS (MiB) of a fresh process that runs one forward+backward (CPU)."""
    out = subprocess.run([sys.executable, __file__, "--peak", mask, str(seq), str(tokens), str(doc_len)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / seq)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--doc-len", type=int, default=512, help="mean document length in tokens")
    p.add_argument("--peak", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peak:
        mask, seq, tokens, doc_len = args.peak[0], *map(int, args.peak[1:])
        model, _ = build(mask, seq, "cpu")
        step(model, packed_batch(max(1, tokens // seq), seq, doc_len, "cpu"))
        print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seq in args.seqs:
        r = speed(seq, args.tokens, args.reps, args.doc_len, device)
        w, c = r["wall"], r["cpu"]
        line = (f"{device} seq {seq} batch {r['batch']} ({r['docs_per_sample']:.1f} EODs/sample, threads "
                f"{torch.get_num_threads()}): causal {w['causal']:,.0f} tok/s, block_causal {w['block_causal']:,.0f} "
                f"tok/s (wall medians); block_causal/causal {w['block_causal'] / w['causal']:.3f}x wall, "
                f"{c['block_causal'] / c['causal']:.3f}x per CPU-second (the steadier figure on a shared machine)")
        if device == "cpu":
            c, b = (peak_mb(m, seq, args.tokens, args.doc_len) for m in ("causal", "block_causal"))
            line += f"; peak RSS causal {c:,.0f} MiB, block_causal {b:,.0f} MiB ({b / c:.3f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
