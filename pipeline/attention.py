"""Which keys each query attends to: causal, or block-causal over the documents packed into a sample.

`model.attn_mask_type: block_causal` (torchtitan's name; Megatron's reset_attention_mask + reset_position_ids):
a packed sample holds several documents, each ended by the EOD token. Attention restarts after every EOD and
positions restart at 0, so a document is seen exactly as if it stood alone. The EOD belongs to the document it
ends. Everything follows from the tokens: `document_ids` numbers the documents of each sample, and positions and
masks derive from those ids (pipeline stages pass the ids on, a [batch, seq] integer tensor).

Kernels (one mask object per forward, made by `doc_mask`, consumed by `attend`):
    CPU   SDPA with a boolean [batch, 1, q, kv] mask (one per sample, broadcast over heads)
    CUDA  FlexAttention with a BlockMask from the same ids: its kernel skips the blocks masked out. torch 2.13
          has no FlexAttention backward on CPU, so there it is GPU-only (scripts/gpu_check.sh compares it with
          the SDPA mask). With attention dropout, SDPA's mask path runs on the GPU too (flex has no dropout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_compiled_flex = None
CHUNK = 512  # query rows per SDPA call when a long sequence is cut (see _chunked)


def document_ids(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[..., seq] int64: the index of each token's document in its sample (EODs strictly before it)."""
    eod = (tokens == eod_id).to(torch.int64)
    return eod.cumsum(-1) - eod


def document_positions(doc: torch.Tensor) -> torch.Tensor:
    """[..., seq] int64: each token's position inside its document (0 at a document's first token)."""
    idx = torch.arange(doc.shape[-1], device=doc.device).expand_as(doc)
    start = torch.ones_like(doc, dtype=torch.bool)
    start[..., 1:] = doc[..., 1:] != doc[..., :-1]
    return idx - torch.where(start, idx, 0).cummax(-1).values


def use_flex(device: torch.device, dropout: float = 0.0) -> bool:
    """FlexAttention where it trains: CUDA, and no attention dropout."""
    return device.type == "cuda" and dropout == 0.0


def doc_mask(doc: torch.Tensor, q_len: int | None = None, flex: bool = False):
    """The block-causal mask of the last `q_len` queries (default: all) over the keys of `doc` [batch, kv]:
    query i sees key j when j <= i and both lie in the same document. A BlockMask with `flex` (queries = keys),
    else a boolean [batch, 1, q_len, kv] tensor."""
    b, kv = doc.shape
    q_len = kv if q_len is None else q_len
    if flex and q_len == kv:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(batch, head, q, k):
            return (doc[batch, q] == doc[batch, k]) & (q >= k)
        return create_block_mask(same_document, b, None, kv, kv, device=doc.device)
    causal = torch.ones(q_len, kv, dtype=torch.bool, device=doc.device).tril(kv - q_len)
    return (doc[:, -q_len:, None] == doc[:, None, :]).unsqueeze(1) & causal


def attend(q, k, v, mask, dropout_p: float = 0.0, gqa: bool = False) -> torch.Tensor:
    """Attention of q [b, heads, q_len, d] over k, v [b, kv_heads, kv, d] under `mask` (from doc_mask)."""
    if isinstance(mask, torch.Tensor):
        if q.shape[2] == k.shape[2] >= 4 * CHUNK:
            return _chunked(q, k, v, mask, dropout_p, gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    global _compiled_flex
    if _compiled_flex is None:  # compiled once per process; uncompiled flex runs a slow reference version
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=mask, enable_gqa=gqa)


def _chunked(q, k, v, mask, dropout_p: float, gqa: bool) -> torch.Tensor:
    """SDPA's CPU kernel skips masked blocks only for is_causal; under a boolean mask it computes every block. On
    long sequences the queries go in chunks of CHUNK rows, each against the keys from the first one any of its
    rows may see (the start of its earliest document, rounded down to 64) to its last row: what is left is about
    the documents' own triangles, less work than causal attention (bench/attention.py: 4096 tokens). Below four
    chunks the copies cost more than they save."""
    s, out = q.shape[2], []
    for a in range(0, s, CHUNK):
        e = min(a + CHUNK, s)
        rows = mask[..., a:e, :e]
        seen = rows.any(-2).flatten(0, -2).any(0)  # [e]: keys any of these queries sees, in any sample
        lo = int(seen.int().argmax()) // 64 * 64
        out.append(F.scaled_dot_product_attention(q[:, :, a:e], k[:, :, lo:e], v[:, :, lo:e], attn_mask=rows[..., lo:],
                                                  dropout_p=dropout_p, enable_gqa=gqa))
    return torch.cat(out, dim=2)
