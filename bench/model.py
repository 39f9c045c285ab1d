"""Model speed, side by side in one run: `python bench/model.py [--cpu-only] [--gpu-steps N]`.

1. CPU (always): forward+backward tokens/s of our unsharded model, eager and with its blocks compiled
   (train.compile), against transformers' LlamaForCausalLM and GPT2LMHeadModel of the same shape, same batch,
   interleaved repetitions in alternating order, median and best time; prints ours/theirs. Our loss is the
   training path: the head fused with the chunked cross-entropy (pipeline/loss.py).
2. GPU (when CUDA is present; unchanged script): MFU of the ~1B Llama-style model (configs/llama-1b.yaml) in
   bf16 at seq 2048 on one GPU under the DeepSpeed engine (build_engine, ZeRO-1), 6N+12Lhs FLOPs per token
   (pipeline.model.flops_per_token) against the dense bf16 peak of pipeline/metrics.py.
Run on a shared machine under `flock /tmp/bench.lock`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.parallel.compile import apply_compile  # noqa: E402

CPU_SHAPES = {  # arch: model config at a size a CPU does in about a second per step
    "llama": dict(arch="llama", num_layers=4, hidden_size=512, num_heads=8, kv_heads=4, ffn_hidden_size=1408,
                  vocab_size=8192, seq_len=256),
    "gpt": dict(arch="gpt", num_layers=4, hidden_size=512, num_heads=8, ffn_hidden_size=2048, vocab_size=8192,
                seq_len=256),
}


def _hf_model(cfg: ModelConfig):
    import transformers

    from pipeline.hf import hf_config_dict

    d = hf_config_dict(cfg, {}, "float32")
    hf = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    hf._attn_implementation = "sdpa"
    cls = transformers.LlamaForCausalLM if cfg.arch == "llama" else transformers.GPT2LMHeadModel
    torch.manual_seed(0)
    return cls(hf)


def _step(fn, x):
    t0 = time.perf_counter()
    loss = fn(x)
    loss.backward()
    return time.perf_counter() - t0


def bench_cpu(batch: int, reps: int) -> None:
    for arch, shape in CPU_SHAPES.items():
        cfg = ModelConfig(**shape, make_vocab_size_divisible_by=128)
        ours, theirs = build_model(cfg, seed=0).train(), _hf_model(cfg).train()
        compiled = build_model(cfg, seed=0).train()
        apply_compile(compiled)
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1))
        runs = {
            "ours": lambda t: ours(t[:, :-1], labels=t[:, 1:])[0],
            "compiled": lambda t: compiled(t[:, :-1], labels=t[:, 1:])[0],
            "transformers": lambda t: theirs(input_ids=t[:, :-1], labels=t[:, :-1]).loss,
        }
        times = {k: [] for k in runs}
        t0 = time.perf_counter()
        _step(runs["compiled"], x)
        compile_s = time.perf_counter() - t0
        for _ in range(2):  # warm-up
            for fn in runs.values():
                _step(fn, x)
        for rep in range(reps):  # interleaved, order alternating (ABBA), so machine load hits both alike
            for k, fn in (list(runs.items()) if rep % 2 == 0 else list(runs.items())[::-1]):
                for m in (ours, compiled, theirs):
                    m.zero_grad(set_to_none=True)
                times[k].append(_step(fn, x))
        tokens = batch * cfg.seq_len
        tps = {k: tokens / statistics.median(v) for k, v in times.items()}
        best = {k: tokens / min(v) for k, v in times.items()}
        print(f"cpu {arch:5s} L{cfg.num_layers} h{cfg.hidden_size} s{cfg.seq_len} b{batch} threads "
              f"{torch.get_num_threads()}: ours {tps['ours']:,.0f} tok/s, compiled {tps['compiled']:,.0f} tok/s "
              f"(first step {compile_s:.0f} s), transformers {tps['transformers']:,.0f} tok/s (medians)", flush=True)
        for k in ("ours", "compiled"):
            print(f"    ratio {k}/transformers {tps[k] / tps['transformers']:.3f}x median, "
                  f"{best[k] / best['transformers']:.3f}x best-of-{reps}", flush=True)


def bench_gpu(steps: int, micro: int, compile: bool) -> None:
    """MFU of configs/llama-1b.yaml on one GPU through the real TrainEngine, eager or train.compile."""
    from pipeline import dist
    from pipeline.config import load_config
    from pipeline.engine import build_engine
    from pipeline.metrics import peak_tflops
    from pipeline.model import flops_per_token

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "llama-1b.yaml"), [
        "parallel.tp=1", "parallel.pp=1", "parallel.zero_stage=1", "parallel.activation_checkpointing=false",
        f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}", "train.precision=bf16",
        "model.seq_len=2048", f"train.compile={str(compile).lower()}"])
    dist.init_distributed(600)
    engine = build_engine(cfg)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.model.vocab_size, (micro, cfg.model.seq_len + 1), generator=gen)
    for _ in range(3):
        engine.train_step(batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = engine.train_step(batch)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tps = micro * cfg.model.seq_len / dt
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name) or 989.0
    tflops = tps * flops_per_token(cfg.model) / 1e12
    print(f"gpu {name}: llama-1b bf16 {'compiled' if compile else 'eager'} seq {cfg.model.seq_len} micro {micro}: "
          f"{tps:,.0f} tok/s, {tflops:.1f} TFLOPs, "
          f"MFU {tflops / peak:.1%} (peak {peak:.0f}), {engine.num_params / 1e9:.2f}B params, loss {loss:.3f}, "
          f"max mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--batch", type=int, default=4, help="CPU batch (sequences)")
    p.add_argument("--reps", type=int, default=6, help="CPU timed repetitions per model")
    p.add_argument("--gpu-steps", type=int, default=10)
    p.add_argument("--gpu-micro", type=int, default=8)
    args = p.parse_args()
    bench_cpu(args.batch, args.reps)
    if torch.cuda.is_available() and not args.cpu_only:
        import gc

        from pipeline import dist

        for compile in (False, True):
            bench_gpu(args.gpu_steps, args.gpu_micro, compile)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        dist.exit_cleanly(0)
    elif not args.cpu_only:
        print("gpu: no CUDA device here; MFU not measured")


if __name__ == "__main__":
    main()
