"""`python -m pipeline.plan --config configs/X.yaml [--world-size N] [key=value ...]`: preflight a run.

Prints the parallel layout, batch arithmetic, parameter counts, a per-GPU memory estimate, FLOPs per step and
the time the run takes at an assumed MFU; exits 1 with one line per problem when the run cannot work. Needs no
GPU, no process group and no data (data checks run when the datasets exist). `pipeline.train` runs the same
checks before it starts any process group.

Memory model (bytes per parameter, per rank): weights 2 (bf16/fp16) or 4 (fp32); gradients the same; Adam
states 12 (fp32 master, m, v; DeepSpeed's ZeRO optimizers keep the master copy in fp32 runs too) or 8 in fp32
without ZeRO; ZeRO-1 shards the optimizer states over the
data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights; offload moves them to CPU memory.
Activations per layer and micro batch follow Korthikanti et al. (2022) with fused attention (no s² term):
s·b·h·(10 + 24/t) bytes in 16-bit (twice in fp32), or 2·s·b·h with full activation checkpointing plus one
layer's worth during recomputation; the first pipeline stage holds `pp` micro batches of its L/pp layers in
flight under 1F1B, i.e. L layers' worth. The logits add s·b·V/t·(4 + bytes per activation).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

from .config import RunConfig, find_problems, load_config, padded_vocab_size, resolve_model_defaults
from .metrics import PEAK_TFLOPS
from .model import flops_per_token

GiB = 2**30


@dataclass
class ParamCounts:
    total: int
    per_rank: int  # the largest pipeline stage's share on one tensor-parallel rank


def count_params(cfg: RunConfig) -> ParamCounts:
    """From the model's own parameters (meta device) and the tensor-parallel roles table (parallel/roles.py)."""
    from .parallel.roles import param_shapes, split_dim

    m, tp, pp = cfg.model, cfg.parallel.tp, cfg.parallel.pp
    resolve_model_defaults(m)
    shapes = param_shapes(m, tp)
    numel = {k: math.prod(s) for k, s in shapes.items()}
    on_rank = {k: n // tp if split_dim(k) is not None else n for k, n in numel.items()}
    total = sum(numel.values())
    if pp == 1:
        return ParamCounts(total, sum(on_rank.values()))
    per_stage_layers = -(-m.num_layers // pp)
    block = sum(n for k, n in on_rank.items() if k.startswith("layers.0."))
    first = per_stage_layers * block + sum(n for k, n in on_rank.items() if k.startswith("embed_"))
    last = per_stage_layers * block + sum(n for k, n in on_rank.items() if k.startswith("norm.")) + \
        on_rank.get("lm_head.weight", on_rank["embed_tokens.weight"])  # a tied head: the last stage keeps a copy
    return ParamCounts(total, max(first, last))


def memory_per_gpu(cfg: RunConfig, dp: int, checkpointing: bool) -> dict[str, float]:
    """Estimated bytes on one GPU, by kind."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    n = count_params(cfg).per_rank
    wbytes = 4 if t.precision == "fp32" else 2
    # Adam's m and v in fp32, plus an fp32 master copy of the weights: with 16-bit weights always, and with fp32
    # weights too under ZeRO >= 1 (DeepSpeed's ZeRO optimizers keep their own flat fp32 partition).
    opt_bytes = 8 if (t.precision == "fp32" and p.zero_stage == 0) else 12
    weights, grads, optim = n * wbytes, n * wbytes, n * opt_bytes
    if p.zero_stage >= 1:
        optim /= dp
    if p.zero_stage >= 2:
        grads /= dp
    if p.zero_stage >= 3:
        weights /= dp
    if p.offload_optimizer:
        optim = 0.0
    if p.offload_params:
        weights = 0.0
    s, b, h, tp = m.seq_len, t.micro_batch_size, m.hidden_size, p.tp
    act_scale = 2 if t.precision == "fp32" else 1
    full_layer = s * b * h * (10 + 24 / tp) * act_scale
    layers = m.num_layers  # first stage under 1F1B: pp micro batches x L/pp layers
    acts = layers * (2 * s * b * h * act_scale) + full_layer if checkpointing else layers * full_layer
    logits = s * b * padded_vocab_size(m, tp) / tp * (4 + wbytes)
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts + logits}


def plan(cfg: RunConfig, world_size: int, gpu: str, mfu: float, gpu_mem_gib: float | None) -> tuple[list[str], list[str]]:
    """(report lines, problems). Problems are one sentence each."""
    problems = find_problems(cfg, world_size)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    mp = p.tp * p.pp
    if problems and (world_size % mp or m.hidden_size % m.num_heads or m.num_heads % (m.kv_heads or 1)):
        return [], problems
    dp = world_size // mp
    lines = []
    gas = t.global_batch_size // max(1, t.micro_batch_size * dp)
    tokens = t.global_batch_size * m.seq_len
    counts = count_params(cfg)
    lines.append(f"layout       world {world_size} = dp {dp} x tp {p.tp} x pp {p.pp}; ZeRO-{p.zero_stage}"
                 f"{' + optimizer offload' if p.offload_optimizer else ''}{' + param offload' if p.offload_params else ''}; {t.precision}")
    lines.append(f"batch        micro {t.micro_batch_size} x grad accumulation {gas} x dp {dp} = {t.global_batch_size} "
                 f"sequences = {tokens:,} tokens per step (seq_len {m.seq_len})")
    lines.append(f"parameters   {counts.total / 1e9:.3f} B total, {counts.per_rank / 1e9:.3f} B per GPU before ZeRO "
                 f"(vocab {m.vocab_size} padded to {padded_vocab_size(m, p.tp)})")
    for ckpt in (False, True):
        mem = memory_per_gpu(cfg, dp, ckpt)
        total = sum(mem.values())
        chosen = " (configured)" if ckpt == p.activation_checkpointing else ""
        lines.append(f"memory/GPU   {total / GiB:8.1f} GiB {'with' if ckpt else 'without'} activation checkpointing"
                     f"{chosen}: " + ", ".join(f"{k} {v / GiB:.1f}" for k, v in mem.items()))
        if ckpt == p.activation_checkpointing and gpu_mem_gib and total / GiB > gpu_mem_gib:
            problems.append(f"estimated memory {total / GiB:.1f} GiB per GPU exceeds --gpu-mem {gpu_mem_gib:g} GiB "
                            f"(raise tp/pp/ZeRO stage, lower train.micro_batch_size or turn on activation checkpointing)")
    fpt = flops_per_token(m)
    step_flops = fpt * tokens
    lines.append(f"compute      {fpt / 1e9:.2f} GFLOPs per token, {step_flops / 1e15:.2f} PFLOPs per step")
    peak = PEAK_TFLOPS.get(gpu.upper())
    if peak:
        step_s = step_flops / (world_size * peak * 1e12 * mfu)
        total_s = step_s * t.steps
        lines.append(f"time         {step_s:.2f} s/step on {world_size} x {gpu} at {100 * mfu:.0f}% MFU "
                     f"({peak:.0f} TFLOPs peak); {t.steps:,} steps = {total_s / 3600:.1f} h = {total_s / 86400:.1f} days "
                     f"for {t.steps * tokens / 1e9:.1f} B tokens")
    problems += _data_problems(cfg)
    return lines, problems


def _data_problems(cfg: RunConfig) -> list[str]:
    from .data import TokenDocuments, split_ranges

    problems = []
    need = cfg.train.global_batch_size * (cfg.model.seq_len + 1)
    for d in cfg.data.datasets:
        path = d.get("path") if isinstance(d, dict) else None
        if not path or not (os.path.exists(path) or os.path.exists(str(path) + ".idx")):
            continue  # planning ahead of the data is allowed; pipeline.train checks existence
        try:
            docs = TokenDocuments(path)
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        lo, hi = split_ranges(len(docs), cfg.data.split)[0]
        have = int(docs.doc_lengths[lo:hi].sum())
        if have < need:
            problems.append(f"dataset {path}: its train split has {have:,} tokens, fewer than one global batch "
                            f"({need:,}); add data or lower train.global_batch_size")
    return problems


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--world-size", type=int, default=None, help="number of GPUs (default: $WORLD_SIZE or 1)")
    ap.add_argument("--gpu", default="H100", help=f"GPU for the time estimate: {', '.join(PEAK_TFLOPS)}")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GPU memory in GiB; refuse plans above it")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides, check=False)  # plan lists every problem itself
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = _vocab_from_data(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    lines, problems = plan(cfg, world, args.gpu, args.mfu, args.gpu_mem)
    if args.json:
        print(json.dumps({"report": lines, "problems": problems}, indent=2))
    else:
        print("\n".join(lines))
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


def _vocab_from_data(cfg: RunConfig) -> int:
    for d in cfg.data.datasets:
        manifest = os.path.join(str(d.get("path", "")), "manifest.json") if isinstance(d, dict) else ""
        if os.path.isfile(manifest):
            with open(manifest) as f:
                return json.load(f)["tokenizer"]["vocab_size"]
    raise ValueError("model.vocab_size is unset and no dataset manifest exists to take it from; set model.vocab_size")


if __name__ == "__main__":
    main()
