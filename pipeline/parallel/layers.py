"""Megatron-style tensor-parallel layers and the vocab-parallel cross-entropy.

A column-parallel linear holds a slice of the output features (its input is replicated on every TP rank); a
row-parallel linear holds a slice of the input features and sums the partial outputs over the TP group. Two
conjugate autograd functions carry the communication: `copy_to_tp` (identity forward, all-reduce backward) in
front of a column-parallel layer, and `reduce_from_tp` (all-reduce forward, identity backward) after a
row-parallel one. So one attention or MLP block costs one all-reduce forward and one backward.

Sharded parameters carry `tensor_model_parallel = True` (DeepSpeed's marker): ZeRO and gradient clipping then
count them on every TP rank, and the replicated ones (norms, biases after a row-parallel layer, positions) once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, op):
        x = x.clone()
        dist.all_reduce(x, op=op, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


# The collectives run eagerly between compiled regions under train.compile (pipeline/parallel/compile.py).
@torch.compiler.disable
def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group)


@torch.compiler.disable
def reduce_from_tp(x, group, op=dist.ReduceOp.SUM):
    return _ReduceFromTP.apply(x, group, op)


def mark_sharded(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tensor_model_parallel = True
    p.partition_dim = dim
    return p


class ColumnParallelLinear(nn.Module):
    """y_local = x · W_localᵀ + b_local, W_local = rows [tp_rank·out/tp, …) of the full weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.group = group
        self.weight = mark_sharded(nn.Parameter(weight.detach().clone()), 0)
        self.bias = mark_sharded(nn.Parameter(bias.detach().clone()), 0) if bias is not None else None

    def forward(self, x):
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = Σ_tp x_local · W_localᵀ + b, W_local = columns of the full weight; b replicated, added once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.group = group
        self.weight = mark_sharded(nn.Parameter(weight.detach().clone()), 1)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x):
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the padded embedding; other tokens contribute zeros, summed over TP."""

    def __init__(self, weight: torch.Tensor, start: int, group):
        super().__init__()
        self.group, self.start = group, start
        self.weight = mark_sharded(nn.Parameter(weight.detach().clone()), 0)

    def forward(self, tokens):
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)


class VocabParallelHead(nn.Module):
    """Output projection onto this rank's vocabulary rows [vocab_start, vocab_start + rows): logits [..., rows],
    never the full vocabulary. Given labels, the chunked vocab-parallel loss instead (pipeline/loss.py)."""

    def __init__(self, weight: nn.Parameter, group, vocab_start: int = 0, vocab_size: int | None = None):
        super().__init__()
        self.group, self.vocab_start = group, vocab_start
        self.vocab_size = vocab_size if vocab_size is not None else vocab_start + weight.shape[0]
        self.weight = weight  # a fresh sharded Parameter, or the embedding's (tied)
        self.chunk_tokens = 0  # train.loss_chunk_tokens (0 = auto), set by the engine
        self.sp_group = None  # set by sequence parallelism (pipeline/parallel/ulysses.py)

    def forward(self, h, labels=None):
        h = copy_to_tp(h, self.group)  # backward: the partial input gradients of every rank's columns summed
        if labels is None:
            return F.linear(h, self.weight)
        from ..loss import head_loss

        return head_loss(h, self.weight, labels, self.vocab_size, self.vocab_start, self.group, self.chunk_tokens,
                         self.sp_group)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, vocab_size: int,
                                 group, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy from this rank's logit columns [vocab_start, vocab_start + n).

    The unchunked reference (given whole logits): training goes through VocabParallelHead(h, labels).

    Only per-token scalars cross ranks (max, sum of exponentials, target logit): the full-vocabulary logits are
    never materialised. Columns at or past `vocab_size` (padding) are excluded. Computed in fp32; the result is
    the same on every TP rank, and the backward pass gives each rank the gradient of its own columns.
    """
    logits = logits.float()
    n = logits.shape[-1]
    cols = torch.arange(vocab_start, vocab_start + n, device=logits.device)
    if vocab_start + n > vocab_size:
        logits = logits.masked_fill(cols >= vocab_size, float("-inf"))
    # The max is only for stability: no gradient flows through it.
    gmax = reduce_from_tp(logits.detach().amax(dim=-1), group, dist.ReduceOp.MAX)
    shifted = logits - gmax.unsqueeze(-1)
    sum_exp = reduce_from_tp(shifted.exp().sum(dim=-1), group)
    local = labels - vocab_start
    mine = (local >= 0) & (local < n)
    target = shifted.gather(-1, local.clamp(0, n - 1).unsqueeze(-1)).squeeze(-1)
    target = reduce_from_tp(target.masked_fill(~mine, 0.0), group)
    losses = (sum_exp.log() - target).reshape(-1)
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.reshape(-1).float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
