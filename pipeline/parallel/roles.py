"""One table of parameter roles: how tensor parallelism treats each parameter of pipeline/model.py.

    column  split along dim 0 (output features): q/k/v projections, gate/up projections, and their biases
    row     split along dim 1 (input features): o_proj and down_proj weights (their biases stay whole)
    vocab   split along dim 0 after padding the vocabulary: embed_tokens, lm_head
    replicated  everything else: norms (q_norm/k_norm included), learned positions, row-parallel biases

Tensor-parallel sharding and merging (tp.py), the universal-checkpoint patterns of `convert reshape`, the
pipeline layer tables (pipe.py) and the parameter counts of `plan` all derive from this table and from the
model's own state-dict names (`param_shapes`), so a new parameter needs one line here, if any.
"""
from __future__ import annotations

import re

COLUMN_SUFFIXES = ("attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.k_proj.bias",
                   "attn.v_proj.weight", "attn.v_proj.bias", "mlp.gate_proj.weight", "mlp.gate_proj.bias",
                   "mlp.up_proj.weight", "mlp.up_proj.bias")
ROW_SUFFIXES = ("attn.o_proj.weight", "mlp.down_proj.weight")
VOCAB_NAMES = ("embed_tokens.weight", "lm_head.weight")

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"


def role(name: str) -> str:
    """The tensor-parallel role of a parameter, by its name in our model (a pipeline layer's key works too)."""
    if name in VOCAB_NAMES or name.endswith(tuple("." + v for v in VOCAB_NAMES)):
        return VOCAB
    if name.endswith(COLUMN_SUFFIXES):
        return COLUMN
    if name.endswith(ROW_SUFFIXES):
        return ROW
    return REPLICATED


def split_dim(name: str) -> int | None:
    """The dimension along which tensor parallelism splits this parameter, or None if replicated."""
    return {COLUMN: 0, VOCAB: 0, ROW: 1}.get(role(name))


def param_shapes(model_cfg, tp: int = 1) -> dict[str, tuple]:
    """{name: full shape} of every distinct parameter of the model `model_cfg` describes (vocabulary padded for
    `tp`; a tied lm_head counted once, as embed_tokens), from the model itself on the meta device."""
    import dataclasses

    import torch

    from ..model import Transformer

    with torch.device("meta"):  # one block stands for all: every block has the same parameters
        model = Transformer(dataclasses.replace(model_cfg, num_layers=1), tp=tp)
    out = {}
    for k, p in model.named_parameters():
        if k.startswith("layers.0."):
            out.update({f"layers.{i}.{k[9:]}": tuple(p.shape) for i in range(model_cfg.num_layers)})
        else:
            out[k] = tuple(p.shape)
    return out


def universal_patterns(names, tie_embeddings: bool) -> dict[str, list[str]]:
    """Regex lists for DeepSpeed's universal-checkpoint converter: replicated, row-parallel and vocab parameters,
    matched on any prefix (pipeline checkpoints name parameters by layer: `3.attn.o_proj.weight`)."""
    def suffix_of(n: str) -> str:
        return re.sub(r"^(layers\.\d+\.|\d+\.|tied_modules\.[^.]+\.)", "", n)
    suffixes = {suffix_of(n) for n in names}
    by_role = {r: sorted(s for s in suffixes if role(s) == r) for r in (REPLICATED, ROW, VOCAB)}
    if tie_embeddings:
        by_role[VOCAB] = [s for s in by_role[VOCAB] if s != "lm_head.weight"]
    return {r: [rf"(.*\.)?{re.escape(s)}$" for s in v] for r, v in by_role.items()}
