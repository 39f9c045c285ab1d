"""Megatron-style tensor parallelism applied from outside the model, and the state-dict rules behind it.

Which parameter is split along which dimension: the one table in roles.py (column-parallel along dim 0,
row-parallel along dim 1, vocab-parallel along dim 0 with padded rows, the rest replicated).

Rank r holds the r-th of tp equal contiguous chunks. Query heads and kv heads split alike, so the query heads of
rank r use exactly the kv heads of rank r under grouped-query attention.

Vocabulary rows are padded to `padded_vocab(cfg, tp)` = a multiple of make_vocab_size_divisible_by x tp; pad
rows are zero at initialisation and never reach the loss. `shard_for_tp` takes a full state dict with the vocab
unpadded or padded for any tp; `merge_tp_shards` returns it padded for the tp it merged (`strip_vocab_padding`
cuts it back to vocab_size). Both are pure tensor functions: no process group, no GPU.

`materialize` allocates a meta-device model's parameters, each one's full initial value (or the value from an
initial state dict) cut to this rank's shard: a rank never holds more than its own part plus one full tensor.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig, padded_vocab_size

from .roles import VOCAB_NAMES as VOCAB, split_dim  # noqa: F401 (the one table of roles)


def padded_vocab(cfg: ModelConfig, tp: int) -> int:
    return padded_vocab_size(cfg, tp)


def pad_vocab(t: torch.Tensor, vocab_size: int, rows: int) -> torch.Tensor:
    """Real rows [0, vocab_size) of `t`, then zero rows up to `rows` (whatever padding `t` had)."""
    if t.shape[0] < vocab_size:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, fewer than model.vocab_size {vocab_size}")
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[:vocab_size] = t[:vocab_size]
    return out


def strip_vocab_padding(sd: dict, cfg: ModelConfig) -> dict:
    """The state dict with embed_tokens/lm_head cut to model.vocab_size rows (for export)."""
    return {k: (v[:cfg.vocab_size] if k in VOCAB else v) for k, v in sd.items()}


def shard_for_tp(full: dict, cfg: ModelConfig, tp_rank: int, tp: int) -> dict:
    """The state dict TP rank `tp_rank` of `tp` holds, from a full one (vocab unpadded or padded)."""
    rows = padded_vocab(cfg, tp)
    out = {}
    for name, t in full.items():
        if name in VOCAB:
            t = pad_vocab(t, cfg.vocab_size, rows)
        dim = split_dim(name)
        if dim is None or tp == 1:
            out[name] = t
            continue
        if t.shape[dim] % tp:
            raise ValueError(f"{name}: dimension {dim} of size {t.shape[dim]} is not divisible by tp {tp}")
        out[name] = t.chunk(tp, dim=dim)[tp_rank].clone()
    return out


def merge_tp_shards(shards: list[dict], cfg: ModelConfig) -> dict:
    """The full state dict from the state dicts of TP ranks 0..tp-1 (vocab padded for that tp)."""
    if not shards:
        raise ValueError("merge_tp_shards: no shards given")
    names = list(shards[0])
    for r, sd in enumerate(shards[1:], 1):
        if set(sd) != set(names):
            raise ValueError(f"merge_tp_shards: TP rank {r} has different parameter names than rank 0")
    out = {}
    for name in names:
        dim = split_dim(name)
        out[name] = shards[0][name] if dim is None or len(shards) == 1 else \
            torch.cat([sd[name] for sd in shards], dim=dim)
    return out


def materialize(model, module=None, prefix: str = "") -> None:
    """Allocate the meta parameters of `module` (named `prefix` in `model`; default the whole model).

    Values: `model.init_source[name]` when the model carries a full initial state dict (see the engine's
    init_state_dict), else `model.init_value(name, full shape)`; sliced for TP rank `model.tp_rank` of
    `model.tp_size` (set by apply_tp). Tied parameters stay tied; requires_grad and TP markers are kept."""
    from torch import nn

    from ..model import rope_tables

    module = model if module is None else module
    tp, rank = getattr(model, "tp_size", 1), getattr(model, "tp_rank", 0)
    source = getattr(model, "init_source", None)
    cfg = model.cfg
    if cfg.arch == "llama" and model.rope_cos.device.type == "meta":
        cos, sin = rope_tables(cfg.hidden_size // cfg.num_heads, cfg.seq_len, cfg.rope_theta, cfg.rope_scaling)
        model._buffers["rope_cos"], model._buffers["rope_sin"] = cos, sin
    done = getattr(model, "_materialized", {})
    model._materialized = done
    for mod_name, mod in module.named_modules(prefix=prefix):
        for pname, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) in done:  # a tied parameter, already allocated under its first name
                mod._parameters[pname] = done[id(p)]
                continue
            name = f"{mod_name}.{pname}" if mod_name else pname
            dim = split_dim(name)
            shape = list(p.shape)
            if dim is not None and tp > 1:
                shape[dim] *= tp
            if source is not None:
                full = source[name] if name in source else source["embed_tokens.weight"]  # tied head
            else:
                full = model.init_value(name, shape)
            value = full.chunk(tp, dim=dim)[rank] if dim is not None and tp > 1 else full
            new = nn.Parameter(value.to(p.dtype).contiguous().clone(), requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)  # tensor_model_parallel, partition_dim
            mod._parameters[pname] = new
            done[id(p)] = new


def apply_tp(model, state) -> None:
    """Shard an unsharded model (built with build_model(cfg, seed, tp)) in place for this rank's TP slice.

    `state` is a ParallelState. Linears become column/row-parallel, the embedding and output projection
    vocab-parallel (forward then returns this rank's logit columns: use vocab_parallel_cross_entropy), and
    attention dropout draws from the per-rank RNG."""
    from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
    from .random import tp_rng_context

    tp, rank, group = state.tp, state.coord.tp, state.tp_group
    model.tp_size, model.tp_rank = tp, rank
    if tp == 1:
        return
    cfg = model.cfg
    if model.padded_vocab_size % tp:
        raise ValueError(f"model built with {model.padded_vocab_size} vocabulary rows, not divisible by tp {tp}: "
                         "build it with build_model(cfg, seed, tp)")
    shards = shard_for_tp({k: v.detach() for k, v in model.state_dict().items()}, cfg, rank, tp)
    rows = model.padded_vocab_size // tp
    model.embed_tokens = VocabParallelEmbedding(shards["embed_tokens.weight"], rank * rows, group)
    if cfg.tie_embeddings:
        model.lm_head = VocabParallelHead(model.embed_tokens.weight, group, rank * rows, model.vocab_size)
    else:
        from .layers import mark_sharded

        model.lm_head = VocabParallelHead(mark_sharded(torch.nn.Parameter(shards["lm_head.weight"]), 0), group,
                                          rank * rows, model.vocab_size)
    model.vocab_parallel = True
    model.vocab_start = rank * rows

    def sub(prefix, name):
        return shards[f"{prefix}.{name}.weight"], shards.get(f"{prefix}.{name}.bias")

    for i, block in enumerate(model.layers):
        p = f"layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(block.attn, name, ColumnParallelLinear(*sub(f"{p}.attn", name), group))
        block.attn.o_proj = RowParallelLinear(*sub(f"{p}.attn", "o_proj"), group)
        if cfg.dropout > 0:
            block.attn.dropout_rng = tp_rng_context(rank)
        names = ("gate_proj", "up_proj") if block.mlp.gated else ("up_proj",)
        for name in names:
            setattr(block.mlp, name, ColumnParallelLinear(*sub(f"{p}.mlp", name), group))
        block.mlp.down_proj = RowParallelLinear(*sub(f"{p}.mlp", "down_proj"), group)
        if block.attn.qk_norm:
            block.attn.q_norm, block.attn.k_norm = HeadNorm(block.attn.q_norm, group), HeadNorm(block.attn.k_norm, group)


class HeadNorm(torch.nn.Module):
    """q_norm/k_norm under TP. The weight is replicated, but each rank normalises only its own heads: its gradient
    is summed over the TP group (copy_to_tp: identity forward, all-reduce backward), so it stays the same on every
    rank and equals the unsharded model's. Same parameter, same name (`attn.q_norm.weight`)."""

    def __init__(self, norm, group):
        super().__init__()
        self.weight, self.eps, self.group = norm.weight, norm.eps, group

    def forward(self, x):
        from ..model import rms_norm
        from .layers import copy_to_tp

        return rms_norm(x, copy_to_tp(self.weight, self.group), self.eps)
