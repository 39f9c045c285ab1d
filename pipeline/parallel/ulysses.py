"""DeepSpeed-Ulysses sequence parallelism (`parallel.sp`), applied from outside pipeline/model.py.

Each of the sp ranks of a sequence-parallel group holds the same samples but only seq_len/sp consecutive tokens
of each: embeddings, norms, MLPs and the loss run on that slice alone, so activations shrink by sp. Attention,
which needs the whole sequence, is wrapped in DeepSpeed's own `DistributedAttention`: an all-to-all turns this
rank's [tokens/sp, all heads] queries, keys and values into [all tokens, heads/sp], the model's own attention
runs on them (causal over the whole sequence, exactly as without sp), and a second all-to-all brings the output
back to [tokens/sp, all heads]. So the result equals the unsplit model's; only heads cross ranks. gloo has
all_to_all_single on CPU (torch 2.13), so the CPU path is DeepSpeed's too; on GPUs it runs over NCCL.

The other pieces live where they belong: positions (RoPE or learned) start at this rank's first token (the
engine passes `start_pos`); the loss divides by the token count of the whole sequence (pipeline/loss.py,
`sp_group`); DeepSpeed averages gradients over data x sequence parallel ranks (pipeline/parallel/groups.py).
With `model.attn_mask_type: block_causal` the documents come from the whole sequence: the sp ranks all-gather
their token ids (a few bytes per token), so positions restart per document exactly as without sp and the
block-causal mask covers the whole sequence the attention sees.
Heads (and kv heads) must split over tp·sp, the sequence over sp (config validation).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _HeadsFirst(nn.Module):
    """DistributedAttention's local attention: [batch, seq, heads, dim] in and out, around the model's own
    attention, which takes and returns [batch, heads, seq, dim]."""

    def __init__(self, attend):
        super().__init__()
        self.attend = attend

    def forward(self, q, k, v, *args):
        return self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *args).transpose(1, 2)


class UlyssesAttend:
    """Stands in for `Attention.core` (q, k, v [batch, heads, seq/sp, dim] → [batch, heads, seq/sp, dim]; the
    mask, if any, is the whole sequence's)."""

    def __init__(self, attend, group):
        from deepspeed.sequence.layer import DistributedAttention

        # scatter the heads (dim 2), gather the sequence (dim 1) of [batch, seq, heads, dim]
        self.inner = DistributedAttention(_HeadsFirst(attend), group, scatter_idx=2, gather_idx=1)

    @torch.compiler.disable  # under train.compile the all-to-alls run eagerly between compiled regions
    def __call__(self, q, k, v, *args):
        out = self.inner(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, *args)
        return out.transpose(1, 2)


class WholeDocuments:
    """Stands in for `Transformer.documents` (block_causal): positions of this rank's tokens and the mask of
    the whole sequence, from the documents of the whole sequence."""

    def __init__(self, model, group, sp_rank: int):
        self.model, self.group, self.sp_rank = model, group, sp_rank

    def __call__(self, tokens, caches=None):
        from ..attention import doc_mask, document_ids, document_positions, use_flex

        parts = [torch.empty_like(tokens) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, tokens.contiguous(), group=self.group)
        doc = document_ids(torch.cat(parts, dim=1), self.model.cfg.eod_id)
        s = tokens.shape[1]
        flex = use_flex(tokens.device, self.model.cfg.dropout if self.model.training else 0.0)
        positions = document_positions(doc)[:, self.sp_rank * s:(self.sp_rank + 1) * s]
        return positions, doc_mask(doc, flex=flex)


def apply_sp(model, state) -> None:
    """Make a (tensor-parallel or not) Transformer sequence-parallel over `state.sp_group` (a ParallelState)."""
    if state.sp == 1:
        return
    # Instance attributes (not registered submodules): no parameters, no state-dict entries, no ZeRO hooks.
    for block in model.layers:
        object.__setattr__(block.attn, "core", UlyssesAttend(block.attn.core, state.sp_group))
    object.__setattr__(model, "documents", WholeDocuments(model, state.sp_group, state.coord.sp))
    model.lm_head.sp_group = state.sp_group
