"""Decoder-only transformer in plain PyTorch: GPT-2/3 style (`arch: gpt`) and Llama style (`arch: llama`).

No parallelism, no DeepSpeed, no I/O: tensor parallelism, activation checkpointing and ZeRO are applied from
outside (pipeline/parallel/). Parameter names and layouts follow Hugging Face's conventions closely enough that
conversion is a renaming (GPT-2's Conv1D weights are transposed on export).

Vocabulary padding: `embed_tokens` and `lm_head` have `padded_vocab_size` rows (Megatron's rule: a multiple of
make_vocab_size_divisible_by x tp, so that tensor-parallel shards are equal and matmuls aligned). Padded rows
start at zero and are never seen by the loss: `forward` returns logits over the real vocabulary only.
"""
from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend, doc_mask, document_ids, document_positions, use_flex
from .config import ModelConfig, padded_vocab_size
from .loss import head_loss


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):
    """weight · x / rms(x) over the last dimension, the statistics in fp32 (as transformers' Llama)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = scale_rope(1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), scaling)
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # "rotate half" layout, as Hugging Face's Llama
    return emb.cos(), emb.sin()


def scale_rope(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """RoPE frequencies under model.rope_scaling, as transformers computes them: `linear` divides every frequency
    by `factor` (position interpolation); `llama3` (Llama 3.1+) divides only the low frequencies, keeps the high
    ones and blends the band between."""
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """The tables are fp32 buffers; in bf16/fp16 runs they are rounded to x's dtype first (as transformers does),
    so q and k keep v's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # A context for the attention-dropout RNG: tensor parallelism swaps in one that differs per rank
        # (each rank holds different heads), see pipeline/parallel/random.py.
        self.dropout_rng = contextlib.nullcontext
        self.num_heads, self.kv_heads = cfg.num_heads, cfg.kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        bias = cfg.arch == "gpt"
        qkv_bias = bias or cfg.qkv_bias  # Qwen2: biased q, k, v; unbiased output projection
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.dropout = cfg.dropout
        self.use_rope = cfg.arch == "llama"
        self.qk_norm = cfg.qk_norm  # Qwen3 / OLMo 2: RMSNorm over each head's queries and keys, before RoPE
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)

    def forward(self, x, rope=None, cache=None, mask=None):
        """`mask` None: causal. Else a block-causal mask from pipeline/attention.py's doc_mask (over the cached
        keys too); `rope` then holds per-token tables [batch, 1, seq, head_dim] (positions restart per document)."""
        b, s, _ = x.shape
        # Head counts come from the weights, so a tensor-parallel shard (fewer heads) runs the same code.
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            if cache.get("k") is not None:
                past = cache["k"].shape[2]
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if mask is not None or past == 0:
            out = self.core(q, k, v, mask)
        else:
            mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def core(self, q, k, v, mask=None):
        """Attention of q [batch, heads, q_len, dim] over k, v [batch, kv heads, kv, dim]: causal when `mask` is
        None (q_len = kv), else under `mask`. Sequence parallelism (pipeline/parallel/ulysses.py) wraps it in
        its all-to-alls."""
        # Grouped-query attention: SDPA shares each kv head across its query group without copying it.
        gqa = k.shape[1] != q.shape[1]
        dropout = self.dropout if self.training else 0.0
        with self.dropout_rng():
            if mask is not None:
                return attend(q, k, v, mask, dropout, gqa)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, dropout_p=dropout)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.arch == "llama"
        bias = not self.gated
        if self.gated:  # SwiGLU
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = (lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps)) if cfg.arch == "llama" else \
            (lambda: nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps))
        self.input_norm = norm()
        self.attn = Attention(cfg)
        self.post_attn_norm = norm()
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache=None, mask=None):
        x = x + self.drop(self.attn(self.input_norm(x), rope, cache, mask))
        return x + self.drop(self.mlp(self.post_attn_norm(x)))


class LMHead(nn.Linear):
    """The output projection. Given labels it returns the loss instead, (mean cross-entropy, mean logsumexp²),
    fused and chunked (pipeline/loss.py): the training path never holds the whole micro batch's logits."""

    def __init__(self, hidden: int, rows: int, vocab_size: int):
        super().__init__(hidden, rows, bias=False)
        self.vocab_size = vocab_size
        self.chunk_tokens = 0  # train.loss_chunk_tokens (0 = auto), set by the engine
        self.sp_group = None  # set by sequence parallelism (pipeline/parallel/ulysses.py)

    def forward(self, h, labels=None):
        if labels is None:
            return super().forward(h)
        return head_loss(h, self.weight, labels, self.vocab_size, chunk_tokens=self.chunk_tokens,
                         sp_group=self.sp_group)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int = 1, init_seed: int | None = None):
        """`tp` only sets the vocabulary padding (a multiple of make_vocab_size_divisible_by x tp).

        Each parameter's initial value is a function of (init_seed, its name) alone (`init_value`): built on the
        meta device, any rank can materialise just its own layers and shards, and get the same numbers as here.
        `init_seed` None draws one from torch's generator."""
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unset (it is normally taken from the data manifest)")
        if cfg.attn_mask_type == "block_causal" and cfg.eod_id is None:
            raise ValueError("model.attn_mask_type block_causal needs model.eod_id (normally from the data manifest)")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg, tp)
        # True once lm_head is vocab-parallel: forward then returns this rank's slice of the padded logits.
        self.vocab_parallel = False
        self.embed_tokens = nn.Embedding(self.padded_vocab_size, cfg.hidden_size)
        if cfg.arch == "gpt":
            self.embed_positions = nn.Embedding(cfg.seq_len, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if cfg.arch == "llama" else \
            nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, self.padded_vocab_size, self.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg.hidden_size // cfg.num_heads, cfg.seq_len, cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_activations = False
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item()) if init_seed is None else init_seed
        self.reset_parameters()

    def init_value(self, name: str, shape) -> torch.Tensor:
        """The initial fp32 value (on CPU) of parameter `name` at its full unsharded `shape`.

        Normal(0, init_std) weights; output projections of each residual branch scaled by 1/sqrt(2·layers);
        norms one, biases zero. Vocabulary rows past vocab_size are zero, and the real rows do not depend on the
        padding, so the weights are the same for every tp."""
        std = self.cfg.init_std
        if len(shape) == 1:
            return torch.ones(shape) if name.endswith("norm.weight") else torch.zeros(shape)
        g = torch.Generator().manual_seed((self.init_seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            std = std / math.sqrt(2 * self.cfg.num_layers)
        if name in ("embed_tokens.weight", "lm_head.weight"):
            out = torch.zeros(shape)
            out[:self.vocab_size] = torch.empty((self.vocab_size,) + tuple(shape[1:])).normal_(0.0, std, generator=g)
            return out
        return torch.empty(shape).normal_(0.0, std, generator=g)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter (not on the meta device) to its `init_value`."""
        for name, p in self.named_parameters():
            if p.device.type != "meta":
                p.copy_(self.init_value(name, p.shape))

    def _rope(self, start: int, length: int):
        if self.cfg.arch != "llama":
            return None
        return self.rope_cos[start:start + length], self.rope_sin[start:start + length]

    def rope_at(self, positions: torch.Tensor):
        """Per-token RoPE tables [batch, 1, seq, head_dim] for positions [batch, seq] (None for gpt)."""
        if self.cfg.arch != "llama":
            return None
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def documents(self, tokens: torch.Tensor, caches: list | None = None):
        """block_causal: (positions [batch, seq] inside each document, the attention mask) for `tokens`, after
        the tokens already in `caches` (generation: kept in the first layer's cache, a few ints per token)."""
        s, seen = tokens.shape[1], None
        if caches is not None:
            seen = caches[0].get("tokens")
            tokens = caches[0]["tokens"] = tokens if seen is None else torch.cat([seen, tokens], dim=1)
        doc = document_ids(tokens, self.cfg.eod_id)
        flex = caches is None and use_flex(tokens.device, self.cfg.dropout if self.training else 0.0)
        return document_positions(doc)[:, -s:], doc_mask(doc, q_len=s, flex=flex)

    def forward(self, tokens: torch.Tensor, caches: list | None = None, start_pos: int = 0,
                labels: torch.Tensor | None = None):
        """tokens [batch, seq] → logits [batch, seq, vocab]. `caches` (one dict per layer) enables KV caching.

        Vocab-parallel (after apply_tp): logits [batch, seq, padded_vocab/tp], this rank's slice, padding included.
        With `labels` [batch, seq] (IGNORE = -100 left out): (mean cross-entropy, mean logsumexp²) instead,
        computed by the head in chunks, never the whole logits."""
        s = tokens.shape[1]
        if start_pos + s > self.cfg.seq_len:
            raise ValueError(f"sequence of {start_pos + s} tokens exceeds model.seq_len {self.cfg.seq_len}")
        mask = None
        if self.cfg.attn_mask_type == "block_causal":  # positions restart at every document
            positions, mask = self.documents(tokens, caches)
            rope = self.rope_at(positions)
        else:
            positions = torch.arange(start_pos, start_pos + s, device=tokens.device)
            rope = self._rope(start_pos, s)
        h = self.embed_tokens(tokens)
        if self.cfg.arch == "gpt":
            h = h + self.embed_positions(positions)
        h = self.drop(h)
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            if self.checkpoint_activations and self.training and cache is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, None, mask, use_reentrant=False)
            else:
                h = layer(h, rope, cache, mask)
        if labels is not None:
            return self.lm_head(self.norm(h), labels)
        logits = self.lm_head(self.norm(h))
        if self.vocab_parallel or logits.shape[-1] == self.vocab_size:
            return logits
        return logits[..., :self.vocab_size]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked positions, computed in fp32."""
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.reshape(-1).float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def build_model(cfg: ModelConfig, seed: int | None = None, tp: int = 1, device: str | None = None) -> Transformer:
    """Build the unsharded model; with `seed` the initial weights are the same in every process.

    `tp` pads the vocabulary for that tensor-parallel size; the real weights are the same for any `tp`.
    `device="meta"` allocates nothing: pipeline/parallel materialises each rank's part (Transformer.init_value)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):  # submodules' own init draws
        return Transformer(cfg, tp, init_seed=seed)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6·N (forward + backward matmuls over the non-embedding parameters N, plus the
    output projection) + 12·L·h·s for attention scores and values (forward 2·2·L·h·s, backward twice that),
    as in the PaLM appendix and torchtitan."""
    h, L, s, f = cfg.hidden_size, cfg.num_layers, cfg.seq_len, cfg.ffn_hidden_size
    head_dim = h // cfg.num_heads
    attn = h * h + 2 * h * cfg.kv_heads * head_dim + h * h
    mlp = (3 if cfg.arch == "llama" else 2) * h * f
    n = L * (attn + mlp) + h * cfg.vocab_size
    return 6.0 * n + 12.0 * L * h * s
