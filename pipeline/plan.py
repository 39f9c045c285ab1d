"""`python -m pipeline.plan --config configs/X.yaml [--world-size N] [key=value ...]`: preflight a run.

Prints the parallel layout, batch arithmetic, parameter counts, a per-GPU memory estimate, FLOPs per step and
the time the run takes at an assumed MFU; exits 2 with one `error:` line per problem when the run cannot work. Needs no
GPU, no process group and no data (data checks run when the datasets exist). `pipeline.train` runs the same
checks before it starts any process group.

Memory model (bytes per parameter, per rank): weights 2 (bf16/fp16) or 4 (fp32); gradients the same; Adam
states 12 (fp32 master, m, v; DeepSpeed's ZeRO optimizers keep the master copy in fp32 runs too) or 8 in fp32
without ZeRO; ZeRO-1 shards the optimizer states over the
data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights; offload moves them to CPU memory.
Activations per layer and micro batch follow Korthikanti et al. (2022) with fused attention (no s² term):
s·b·h·(10 + 24/t) bytes in 16-bit (twice in fp32), or 2·s·b·h with full activation checkpointing plus one
layer's worth during recomputation; the first pipeline stage holds `pp` micro batches of its L/pp layers in
flight under 1F1B, i.e. L layers' worth. The fused LM head + loss (pipeline/loss.py) holds one chunk of C
tokens' logits at a time: C·V/t·(8 + bytes per activation) (fp32 logits and their exponentials, the 16-bit
matmul output), plus an fp32 gradient accumulator of the head, V/t·h·4, and one fp32 scalar per token.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

from .config import RunConfig, find_problems, load_config, padded_vocab_size, size_problems, split_problem
from .metrics import PEAK_TFLOPS

GiB = 2**30


@dataclass
class ParamCounts:
    total: int
    per_rank: int  # the largest pipeline stage's share on one tensor-parallel rank


def count_params(cfg: RunConfig) -> ParamCounts:
    """From the model's own parameters (meta device) and the tensor-parallel roles table (parallel/roles.py)."""
    from .parallel.roles import param_shapes, split_dim

    m, tp, pp = cfg.model, cfg.parallel.tp, cfg.parallel.pp
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
    """Estimated bytes on one GPU, by kind. `dp`: the ranks ZeRO partitions over (data x sequence parallel).
    Under Ulysses sequence parallelism a rank holds seq_len/sp tokens of every activation, logits included."""
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
    s, b, h, tp = m.seq_len // p.sp, t.micro_batch_size, m.hidden_size, p.tp
    act_scale = 2 if t.precision == "fp32" else 1
    full_layer = s * b * h * (10 + 24 / tp) * act_scale
    layers = m.num_layers  # first stage under 1F1B: pp micro batches x L/pp layers
    acts = layers * (2 * s * b * h * act_scale) + full_layer if checkpointing else layers * full_layer
    from .loss import auto_chunk_tokens

    rows = padded_vocab_size(m, tp) // tp
    chunk = min(s * b, t.loss_chunk_tokens or auto_chunk_tokens(rows))
    logits = chunk * rows * (8 + wbytes) + rows * h * 4 + s * b * 4
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts + logits}


def async_host_copy_bytes(cfg: RunConfig, dp: int) -> float:
    """Host memory that `checkpoint.async_save` holds per rank while a save is written in the background: one copy
    of the rank's checkpoint shard (its weights and optimizer state, as ZeRO partitions them; offloaded or not)."""
    p = cfg.parallel
    n = count_params(cfg).per_rank
    weights = n * (4 if cfg.train.precision == "fp32" else 2) / (dp if p.zero_stage >= 3 else 1)
    optim = n * (8 if (cfg.train.precision == "fp32" and p.zero_stage == 0) else 12) / (dp if p.zero_stage >= 1 else 1)
    return weights + optim


def gpu_peak(gpu: str) -> float | None:
    """Dense bf16 peak TFLOPs of `gpu`: a short name ("H100 PCIe", any case or spacing) or a full device name."""
    def squash(name: str) -> str:
        return "".join(c for c in name.lower() if c.isalnum())
    return next((v for k, v in PEAK_TFLOPS.items() if squash(k) in squash(gpu)), None)


def plan(cfg: RunConfig, world_size: int, gpu: str = "H100", mfu: float = 0.4,
         gpu_mem_gib: float | None = None) -> tuple[list[str], list[str]]:
    """(report lines, problems). Problems are one sentence each; no report when its arithmetic cannot be done."""
    from .model import flops_per_token  # torch: not needed for --help

    problems = find_problems(cfg, world_size)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.vocab_size is None:
        problems.append("model.vocab_size is unset: set it, or name a dataset whose manifest gives it")
    if size_problems(cfg, world_size) or m.vocab_size is None:
        return [], problems
    mp = p.tp * p.pp * p.sp
    if problems and (world_size % mp or m.hidden_size % m.num_heads or m.num_heads % m.kv_heads):
        return [], problems
    dp = world_size // mp
    lines = []
    gas = t.global_batch_size // max(1, t.micro_batch_size * dp)
    tokens = t.global_batch_size * m.seq_len
    counts = count_params(cfg)
    lines.append(f"layout       world {world_size} = dp {dp} x tp {p.tp} x pp {p.pp}"
                 f"{f' x sp {p.sp} (Ulysses: seq_len/{p.sp} tokens per rank)' if p.sp > 1 else ''}; ZeRO-{p.zero_stage}"
                 f"{' + optimizer offload' if p.offload_optimizer else ''}{' + param offload' if p.offload_params else ''}; {t.precision}")
    lines.append(f"batch        micro {t.micro_batch_size} x grad accumulation {gas} x dp {dp} = {t.global_batch_size} "
                 f"sequences = {tokens:,} tokens per step (seq_len {m.seq_len})")
    lines.append(f"parameters   {counts.total / 1e9:.3f} B total, {counts.per_rank / 1e9:.3f} B per GPU before ZeRO "
                 f"(vocab {m.vocab_size} padded to {padded_vocab_size(m, p.tp)})")
    for ckpt in (False, True):
        mem = memory_per_gpu(cfg, dp * p.sp, ckpt)  # ZeRO partitions over data x sequence parallel ranks
        total = sum(mem.values())
        chosen = " (configured)" if ckpt == p.activation_checkpointing else ""
        lines.append(f"memory/GPU   {total / GiB:8.1f} GiB {'with' if ckpt else 'without'} activation checkpointing"
                     f"{chosen}: " + ", ".join(f"{k} {v / GiB:.1f}" for k, v in mem.items()))
        if ckpt == p.activation_checkpointing and gpu_mem_gib and total / GiB > gpu_mem_gib:
            problems.append(f"estimated memory {total / GiB:.1f} GiB per GPU exceeds --gpu-mem {gpu_mem_gib:g} GiB "
                            f"(raise tp/pp/ZeRO stage, lower train.micro_batch_size or turn on activation checkpointing)")
    if cfg.checkpoint.async_save:
        lines.append(f"host memory  {async_host_copy_bytes(cfg, dp * p.sp) / GiB:.1f} GiB per rank for the host copy of "
                     f"checkpoint.async_save, while a save is written in the background")
    fpt = flops_per_token(m)
    step_flops = fpt * tokens
    lines.append(f"compute      {fpt / 1e9:.2f} GFLOPs per token, {step_flops / 1e15:.2f} PFLOPs per step")
    peak = cfg.log.peak_tflops or gpu_peak(gpu)
    if not 0 < mfu <= 1:
        problems.append(f"--mfu must be in (0, 1], got {mfu}")
    elif not peak:
        problems.append(f"--gpu {gpu!r}: no peak TFLOPs known (known: {', '.join(PEAK_TFLOPS)}); "
                        f"name one of those or set log.peak_tflops=N")
    else:
        step_s = step_flops / (world_size * peak * 1e12 * mfu)
        total_s = step_s * t.steps
        lines.append(f"time         {step_s:.2f} s/step on {world_size} x {gpu} at {100 * mfu:.0f}% MFU "
                     f"({peak:.0f} TFLOPs peak); {t.steps:,} steps = {total_s / 3600:.1f} h = {total_s / 86400:.1f} days "
                     f"for {t.steps * tokens / 1e9:.1f} B tokens")
    if not split_problem(cfg.data.split):  # else the split is already a problem
        problems += _data_problems(cfg)
    return lines, problems


def _data_problems(cfg: RunConfig) -> list[str]:
    from .data import TokenDocuments, split_ranges

    problems = []
    need = cfg.train.global_batch_size * (cfg.model.seq_len + 1)
    for d in cfg.data.datasets:
        path = d.path
        if not (os.path.exists(path) or os.path.exists(path + ".idx")):
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


def _at_least(low: float, kind=int, below_one: bool = False):
    """An argparse type: a number >= low (> low when low is 0.0), and <= 1 when `below_one`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (value > low if low == 0.0 else value >= low) or (below_one and not value <= 1):
            bound = f"> {low:g}" if low == 0.0 else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}{' and <= 1' if below_one else ''}, got {text}")
        return value
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML (see configs/)")
    ap.add_argument("--world-size", type=_at_least(1), default=None,
                    help="number of GPUs (default: $WORLD_SIZE, else 1)")
    ap.add_argument("--gpu", default="H100",
                    help=f"GPU for the time estimate: {', '.join(PEAK_TFLOPS)} (default %(default)s); "
                         f"log.peak_tflops=N overrides")
    ap.add_argument("--mfu", type=_at_least(0.0, float, below_one=True), default=0.4,
                    help="assumed model FLOPs utilisation, in (0, 1] (default %(default)s)")
    ap.add_argument("--gpu-mem", type=_at_least(0.0, float), default=None, metavar="GiB",
                    help="GPU memory in GiB; refuse plans above it (default: no limit)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.tp=8")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    """Exit codes: 0 the plan works; 2 it cannot (one `error:` line per problem) or the input is bad; 1 a failure."""
    args = parse_args(argv)
    try:
        world = args.world_size if args.world_size is not None else _world_from_env()
        cfg = load_config(args.config, args.overrides, check=False)  # plan lists every problem itself
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = _vocab_from_data(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    lines, problems = plan(cfg, world, args.gpu, args.mfu, args.gpu_mem)
    if args.json:
        print(json.dumps({"report": lines, "problems": problems}, indent=2))
    elif lines:
        print("\n".join(lines))
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    sys.exit(2 if problems else 0)


def _world_from_env() -> int:
    text = os.environ.get("WORLD_SIZE") or "1"
    if not text.strip().isdigit():
        raise ValueError(f"$WORLD_SIZE is {text!r}, not a number of GPUs; give --world-size N")
    return int(text)


def _vocab_from_data(cfg: RunConfig) -> int:
    for d in cfg.data.datasets:
        manifest = os.path.join(d.path, "manifest.json")
        if os.path.isfile(manifest):
            with open(manifest) as f:
                return json.load(f)["tokenizer"]["vocab_size"]
    raise ValueError("model.vocab_size is unset and no dataset manifest exists to take it from; set model.vocab_size")


if __name__ == "__main__":
    main()
