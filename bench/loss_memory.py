"""Peak memory of one training step, fused chunked LM head + loss against whole logits, side by side:
`python bench/loss_memory.py [--seq 1024] [--micro 2] [--vocab 128256] [--hidden 128]`.

Each case runs in a fresh process (the peak resident set is per process): a small Llama-style model, one
forward + backward + AdamW step on CPU in fp32, at the large vocabulary and at vocabulary 1,024. Prints the
peaks, the growth each way from the small vocabulary to the large one, and their ratios (goal: the chunked
growth under 20% of the plain one). Run on a shared machine under `flock /tmp/bench.lock`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_step(mode: str, vocab: int, seq: int, micro: int, hidden: int) -> float:
    """Peak RSS (MiB) of a process that builds the model and takes one optimizer step."""
    import torch

    sys.path.insert(0, ROOT)
    from pipeline.config import ModelConfig
    from pipeline.model import build_model, lm_loss

    cfg = ModelConfig(arch="llama", num_layers=2, hidden_size=hidden, num_heads=4, vocab_size=vocab, seq_len=seq)
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (micro, seq + 1))
    if mode == "plain":
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
    else:
        loss = model(x[:, :-1], labels=x[:, 1:])[0]
    loss.backward()
    opt.step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its peak
    args = p.parse_args()
    if args.case:
        mode, vocab = args.case.split(":")
        print(json.dumps(one_step(mode, int(vocab), args.seq, args.micro, args.hidden)))
        return
    peaks = {}
    for mode in ("plain", "chunked"):
        for vocab in (1024, args.vocab):
            out = subprocess.run([sys.executable, __file__, "--case", f"{mode}:{vocab}", "--seq", str(args.seq),
                                  "--micro", str(args.micro), "--hidden", str(args.hidden)],
                                 capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            peaks[mode, vocab] = json.loads(out.stdout.strip().splitlines()[-1])
    grow = {m: peaks[m, args.vocab] - peaks[m, 1024] for m in ("plain", "chunked")}
    print(f"one training step, llama L2 h{args.hidden}, seq {args.seq}, micro batch {args.micro}, fp32, CPU (peak RSS):")
    for mode in ("plain", "chunked"):
        print(f"  {mode:8s} vocab 1,024: {peaks[mode, 1024]:8,.0f} MiB   vocab {args.vocab:,}: "
              f"{peaks[mode, args.vocab]:8,.0f} MiB   growth {grow[mode]:8,.0f} MiB")
    print(f"  chunked / plain at vocab {args.vocab:,}: {peaks['chunked', args.vocab] / peaks['plain', args.vocab]:.3f}; "
          f"growth chunked / plain: {grow['chunked'] / grow['plain']:.3f} (goal < 0.20)")


if __name__ == "__main__":
    main()
