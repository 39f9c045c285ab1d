"""The LM head and cross-entropy fused and chunked: no [tokens, vocabulary] tensor for a whole micro batch.

`head_loss(h, weight, labels)` returns the mean next-token cross-entropy of the logits `h · weightᵀ` and the
mean squared log-partition `mean(logsumexp(logits)²)` (PaLM's z-loss, before its coefficient), without ever
holding more than `chunk_tokens` rows of logits: forward walks the tokens chunk by chunk and keeps only one fp32
scalar per token (its logsumexp); backward recomputes each chunk's logits from `h` and the weight and turns
them straight into the chunk's gradients (the approach of torchtitan's and Liger's chunked losses). The same
code serves the vocab-parallel head: `weight` holds this rank's vocabulary rows [vocab_start, ...), and only
per-token scalars (max, sum of exponentials, target logit) cross the tensor-parallel group, in forward only.

When the whole micro batch fits in one chunk (small vocabularies, short micro batches: the chunk's logits are
within the same budget), forward keeps that chunk's logits and backward does not recompute them.

Labels of IGNORE (-100) are left out of both means. Under sequence parallelism (`sp_group`) each rank holds a
slice of every sequence: the means divide by the token count of the whole sequences, times sp, so that the
average over the sp ranks (DeepSpeed's gradient averaging, the engine's loss) is the mean over all tokens.
Columns at or past `vocab_size` (vocabulary padding) are never part of the softmax. Logits are computed in the weight's dtype and upcast to fp32 for the softmax, as the
unchunked `lm_head` then `.float()` did, so values match it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE = -100  # label of a position excluded from the loss
CHUNK_BUDGET = 2**25  # fp32 logits per chunk when train.loss_chunk_tokens is 0 (auto): 128 MiB


def auto_chunk_tokens(rows: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits over `rows` vocabulary columns stay near 128 MiB."""
    return max(128, CHUNK_BUDGET // max(1, rows))


def _chunk_logits(h, weight, col_limit: int):
    logits = (h @ weight.t()).float()
    if col_limit < logits.shape[-1]:  # vocabulary padding: never in the softmax
        logits[:, col_limit:] = float("-inf")
    return logits


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, vocab_start, vocab_size, group, chunk, sp_group):
        rows = weight.shape[0]
        col_limit = max(0, min(rows, vocab_size - vocab_start))
        mask = (labels != IGNORE).float()
        local = labels - vocab_start
        mine = (local >= 0) & (local < rows) & (labels != IGNORE)
        local = local.clamp(0, rows - 1)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        kept = torch.empty(0, device=h.device)  # the logits, when one chunk covers every token
        for s in range(0, h.shape[0], chunk):
            e = min(s + chunk, h.shape[0])
            logits = _chunk_logits(h[s:e], weight, col_limit)
            m = logits.amax(dim=-1)
            if group is not None:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            sums = torch.stack([(logits - m.unsqueeze(-1)).exp().sum(dim=-1),
                                logits.gather(-1, local[s:e].unsqueeze(-1)).squeeze(-1).masked_fill(~mine[s:e], 0.0)])
            kept = logits if h.shape[0] <= chunk else kept
            del logits
            if group is not None:
                dist.all_reduce(sums, group=group)
            lse[s:e] = sums[0].log() + m
            ce_sum += ((lse[s:e] - sums[1]) * mask[s:e]).sum()
        count = mask.sum()
        if sp_group is not None:  # the whole sequences' tokens, shared out among the sp ranks
            dist.all_reduce(count, group=sp_group)
            count = count.clamp(min=1.0) / dist.get_world_size(sp_group)
        else:
            count = count.clamp(min=1.0)
        ctx.save_for_backward(h, weight, lse, local, mine, mask, kept)
        ctx.info = (col_limit, chunk, count)
        return ce_sum / count, (lse.square() * mask).sum() / count

    @staticmethod
    def backward(ctx, g_ce, g_z):
        h, weight, lse, local, mine, mask, kept = ctx.saved_tensors
        col_limit, chunk, count = ctx.info
        g_ce = g_ce if g_ce is not None else torch.zeros((), device=h.device)
        g_z = g_z if g_z is not None else torch.zeros((), device=h.device)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        scale = mask / count
        for s in range(0, h.shape[0], chunk):
            e = min(s + chunk, h.shape[0])
            logits = kept if kept.numel() else _chunk_logits(h[s:e], weight, col_limit)
            probs = (logits - lse[s:e].unsqueeze(-1)).exp()
            # d ce/d logit = softmax - onehot(target); d lse²/d logit = 2·lse·softmax; both per token, /count.
            probs.mul_((scale[s:e] * (g_ce + 2.0 * g_z * lse[s:e])).unsqueeze(-1))
            rows = torch.arange(e - s, device=h.device)[mine[s:e]]
            probs[rows, local[s:e][mine[s:e]]] -= g_ce * scale[s:e][mine[s:e]]
            d = probs.to(weight.dtype)
            if want_h:
                grad_h[s:e] = d @ weight
            if want_w:
                grad_w += (d.t() @ h[s:e]).float()
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None, None, None, None, None


def head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int, vocab_start: int = 0,
              group=None, chunk_tokens: int = 0, sp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, mean logsumexp²) of the logits h · weightᵀ against `labels`, in fp32, chunked.

    h [..., hidden] (the final norm's output; under tensor parallelism already passed through copy_to_tp),
    weight [rows, hidden] (this rank's vocabulary rows, from `vocab_start`), labels [...] with IGNORE excluded.
    `chunk_tokens` 0 picks `auto_chunk_tokens(rows)`. Both results are the same on every rank of `group`;
    `sp_group`: the sequence-parallel group whose ranks hold the other slices of these sequences."""
    chunk = chunk_tokens if chunk_tokens > 0 else auto_chunk_tokens(weight.shape[0])
    return _HeadLoss.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), vocab_start, vocab_size, group,
                           chunk, sp_group)
