"""The model as DeepSpeed pipeline stages: the same blocks as pipeline/model.py, cut into a PipelineModule.

Pipeline layers, in order (L = model.num_layers); each becomes `layer_XX[-model_YY]-model_states.pt` in a
checkpoint (XX the layer index below, YY the TP rank when tp > 1), holding that layer's state dict:

    0          EmbedPipe   embed_tokens.weight (+ embed_positions.weight for gpt)
    1 … L      BlockPipe   block i-1: the keys of `layers.{i-1}.*` without that prefix
    L+1        NormPipe    norm.weight (+ norm.bias for gpt)
    L+2        HeadPipe    lm_head.weight (llama); for gpt (tied) the head reuses layer 0's embed_tokens.weight
                           through TiedLayerSpec and writes no file of its own. It passes the hidden states on:
                           the pipeline's loss_fn applies the head fused with the chunked loss (`head_loss`),
                           so the last stage never holds a micro batch's whole logits

`pipe_layer_to_names(cfg)` gives this mapping as data; `pipe_state_to_model` renames one layer's state dict.
Stages are balanced by transformer blocks (partition_method "type:BlockPipe"); the embedding sits on the first
stage and the norm and head on the last. DeepSpeed builds only the local stage's layers; each layer allocates
its parameters then (`materialize`), so a rank never holds another stage's weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import doc_mask, document_ids, document_positions, use_flex
from ..model import Block, Transformer
from .tp import materialize


def pipe_layer_to_names(cfg) -> dict[int, dict[str, str]]:
    """{pipeline layer index: {key in that layer's state dict: our model's parameter name}}.

    Only layers that own parameters in a checkpoint appear (gpt's tied head does not)."""
    from .roles import param_shapes

    names, L = param_shapes(cfg), cfg.num_layers
    out = {0: {k: k for k in names if k.startswith("embed_")}}
    for i in range(L):
        out[i + 1] = {k[len(f"layers.{i}."):]: k for k in names if k.startswith(f"layers.{i}.")}
    out[L + 1] = {k: k for k in names if k.startswith("norm.")}
    if "lm_head.weight" in names:  # a tied head is embed_tokens (named once)
        out[L + 2] = {"lm_head.weight": "lm_head.weight"}
    return out


def pipe_state_to_model(layer: int, sd: dict, cfg) -> dict:
    """One pipeline layer's state dict renamed to our model's parameter names."""
    names = pipe_layer_to_names(cfg).get(layer, {})
    unknown = sorted(set(sd) - set(names))
    if unknown:
        raise ValueError(f"pipeline layer {layer}: unexpected keys {unknown}")
    return {names[k]: v for k, v in sd.items()}


class EmbedPipe(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.gpt = model.cfg.arch == "gpt"
        materialize(model, model.embed_tokens, "embed_tokens")
        self.embed_tokens = model.embed_tokens
        if self.gpt:
            materialize(model, model.embed_positions, "embed_positions")
            self.embed_positions = model.embed_positions
        self.drop = model.drop
        self.eod_id = model.cfg.eod_id if model.cfg.attn_mask_type == "block_causal" else None

    def forward(self, tokens):
        """Hidden states; block_causal: (hidden states, document ids), the ids passed from stage to stage."""
        doc = document_ids(tokens, self.eod_id) if self.eod_id is not None else None
        h = self.embed_tokens(tokens)
        if self.gpt:
            positions = torch.arange(tokens.shape[1], device=tokens.device) if doc is None else document_positions(doc)
            h = h + self.embed_positions(positions)
        h = self.drop(h)
        return h if doc is None else (h, doc)


class BlockPipe(Block):
    """A model block (its own submodules, same names) that computes its RoPE tables itself."""

    def __init__(self, block: Block, model: Transformer):
        nn.Module.__init__(self)
        materialize(model, block, f"layers.{list(model.layers).index(block)}")
        for name, child in block.named_children():
            self.add_module(name, child)
        self.checkpoint_activations = model.checkpoint_activations
        self.llama = model.cfg.arch == "llama"
        if self.llama:
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, inputs):
        h, doc = inputs if isinstance(inputs, tuple) else (inputs, None)
        mask = None
        if doc is None:
            rope = (self.rope_cos[:h.shape[1]], self.rope_sin[:h.shape[1]]) if self.llama else None
        else:
            positions, mask = self.documents(doc)
            rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)) if self.llama else None
        if self.checkpoint_activations and self.training:
            h = torch.utils.checkpoint.checkpoint(super().forward, h, rope, None, mask, use_reentrant=False)
        else:
            h = super().forward(h, rope, None, mask)
        return h if doc is None else (h, doc)

    def documents(self, doc):
        """(positions, mask) of a micro batch's document ids: made by the stage's first block, reused by the
        others (the same ids tensor travels through the stage; the memo holds it, so identity is safe)."""
        if _STAGE_DOCS[0] is not doc:
            flex = use_flex(doc.device, self.attn.dropout if self.training else 0.0)
            _STAGE_DOCS[:] = [doc, (document_positions(doc), doc_mask(doc, flex=flex))]
        return _STAGE_DOCS[1]


_STAGE_DOCS: list = [None, None]  # (document ids, (positions, mask)) of the micro batch the stage runs now


class NormPipe(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        materialize(model, model.norm, "norm")
        self.norm = model.norm

    def forward(self, h):
        return self.norm(h[0] if isinstance(h, tuple) else h)  # block_causal: the document ids end here


class HeadPipe(nn.Module):
    """The output projection, owned here and applied by the loss (`head_loss`); for tied embeddings built as the
    last stage's copy of the embedding."""

    def __init__(self, model: Transformer, tied: bool = False):
        super().__init__()
        if tied:  # the parameter lives in embed_tokens; the head module only applies it
            materialize(model, model.embed_tokens, "embed_tokens")
            self.embed_tokens = model.embed_tokens
        materialize(model, model.lm_head, "lm_head")  # tied: the embedding's parameter, allocated above
        if not tied:
            self.lm_head = model.lm_head
        self._head = [model.lm_head]  # a list, so that it is not registered twice

    def forward(self, h):
        return h

    def head_loss(self, h, labels):
        """(mean cross-entropy, mean logsumexp²) of this head's logits on h, in chunks (pipeline/loss.py)."""
        return self._head[0](h, labels)


def _tied_head_forward(module, h):
    return HeadPipe.forward(module, h)


def build_pipeline_module(model: Transformer, state, loss_fn):
    """Cut an (already tensor-parallel) model into DeepSpeed pipeline stages for `state` (a ParallelState).

    Every rank passes the whole model; each stage keeps only its own layers once the caller drops `model`."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    cfg = model.cfg
    tied = bool(cfg.tie_embeddings)
    specs = [TiedLayerSpec("embed", EmbedPipe, model, tied_weight_attr=["embed_tokens.weight"]) if tied
             else LayerSpec(EmbedPipe, model)]
    specs += [LayerSpec(BlockPipe, block, model) for block in model.layers]
    specs.append(LayerSpec(NormPipe, model))
    specs.append(TiedLayerSpec("embed", HeadPipe, model, True, forward_fn=_tied_head_forward,
                               tied_weight_attr=["embed_tokens.weight"]) if tied else LayerSpec(HeadPipe, model))
    return PipelineModule(layers=specs, topology=state.topology(), loss_fn=loss_fn,
                          partition_method="type:BlockPipe")
