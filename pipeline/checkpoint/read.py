"""Read a committed checkpoint of any layout as one full state dict in our parameter names, lazily.

Layouts (detected from the files of the tag folder; the original world size is never needed):
- weights-only (`WEIGHTS_ONLY` marker + `model.safetensors`), written by `convert from-hf`;
- ZeRO-3: `zero_pp_rank_{dp}_mp_rank_{tp}_model_states.pt` + `*zero_pp_rank_{dp}_mp_rank_{tp}_optim_states.pt`
  (the fp32 master weights are cut into equal flat pieces across the data-parallel ranks);
- ZeRO-0/1/2: `mp_rank_{tp}_model_states.pt` holding the whole module of one tensor-parallel rank;
- pipeline: `layer_{ii}[-model_{tp}]-model_states.pt`, one plain state dict per pipeline layer.
Tensor-parallel ranks are merged with `pipeline.parallel`'s `merge_tp_shards`; Megatron-style vocab padding is
cut off. Files are memory-mapped and each tensor is built only when asked for, so exporting a model holds
little more than one copy of its weights.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from collections import OrderedDict
from typing import Callable

import torch

from .. import ds_compat
from ..config import RunConfig, from_dict
from .commit import COMMIT, WEIGHTS_FILE, WEIGHTS_ONLY, resolve_tag
from .safe import load_file

_ZERO_MODEL, _ZERO_OPTIM = ds_compat.ZERO3_MODEL_FILE, ds_compat.ZERO3_OPTIM_FILE
_MP_MODEL, _LAYER = ds_compat.MODEL_FILE, ds_compat.PIPE_LAYER_FILE


def _load(path: str) -> dict:
    """A checkpoint file, memory-mapped, with weights_only=True and DeepSpeed's allow-list (safe.py): a planted
    pickle is refused, not run. ValueError (one line) for a missing, truncated or refused file."""
    try:
        # Unpickling DeepSpeed's files imports deepspeed, whose logger would print to stdout: keep it on stderr.
        with contextlib.redirect_stdout(sys.stderr):
            return load_file(path, mmap=True)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


class LazyStateDict:
    """name → fp32 tensor, built on access; `shapes` known up front."""

    def __init__(self, thunks: "OrderedDict[str, Callable[[], torch.Tensor]]", shapes: dict):
        self.thunks, self.shapes = thunks, shapes

    def keys(self):
        return self.thunks.keys()

    def __contains__(self, name):
        return name in self.thunks

    def __getitem__(self, name) -> torch.Tensor:
        t = self.thunks[name]()
        return t.float() if t.is_floating_point() else t

    def materialize(self) -> dict:
        return {k: self[k] for k in self.keys()}


def _eager(sd: dict) -> LazyStateDict:
    return LazyStateDict(OrderedDict((k, (lambda v=v: v)) for k, v in sd.items()),
                         {k: tuple(v.shape) for k, v in sd.items()})


def _files(tag_dir: str, pattern: re.Pattern) -> dict:
    out = {}
    for name in os.listdir(tag_dir):
        m = pattern.match(name)
        if m:
            out[tuple(int(g) if g is not None else 0 for g in m.groups())] = os.path.join(tag_dir, name)
    return out


def _read_zero3_rank(tag_dir: str, mp: int, model_files: dict, optim_files: dict) -> LazyStateDict:
    """One tensor-parallel rank of a ZeRO-3 checkpoint: zip each parameter's pieces back together."""
    dps = sorted(dp for dp, m in model_files if m == mp)
    states = [_load(model_files[(dp, mp)]) for dp in dps]
    optims = []
    for dp in dps:
        if (dp, mp) not in optim_files:
            raise ValueError(f"{tag_dir}: missing the optimizer file of data-parallel rank {dp}, tensor-parallel rank {mp}")
        optims.append(_load(optim_files[(dp, mp)])[ds_compat.OPTIMIZER_STATE])
    world = optims[0][ds_compat.PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else world
    if world != len(dps) or dps != list(range(world)):
        raise ValueError(f"{tag_dir}: ZeRO-3 checkpoint of {world} data-parallel ranks, found files of ranks {dps} "
                         f"(tensor-parallel rank {mp}); a shard is missing")
    groups = [o[ds_compat.FP32_FLAT_GROUPS] for o in optims]  # [rank][group] flat fp32 tensors (memory-mapped)
    thunks, shapes = OrderedDict(), {}
    for gi, group in enumerate(states[0][ds_compat.PARAM_SHAPES]):
        offset = 0
        for name, shape in group.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)

            def build(gi=gi, o=offset, part=part, numel=numel, shape=tuple(shape)):
                return torch.cat([g[gi].reshape(-1)[o:o + part] for g in groups])[:numel].view(shape)
            thunks[name], shapes[name] = build, tuple(shape)
            offset += part
        if offset != groups[0][gi].numel():
            raise ValueError(f"{tag_dir}: ZeRO-3 partition {gi} holds {groups[0][gi].numel()} values per rank, "
                             f"its parameter shapes need {offset}: the checkpoint is inconsistent")
    for name, shape in (states[0].get(ds_compat.FROZEN_PARAM_SHAPES) or {}).items():
        numel = math.prod(shape)

        def build_frozen(name=name, numel=numel, shape=tuple(shape)):
            return torch.cat([s[ds_compat.FROZEN_PARAM_FRAGMENTS][name].reshape(-1) for s in states])[:numel].view(shape)
        thunks[name], shapes[name] = build_frozen, tuple(shape)
    for alias, target in (states[0].get(ds_compat.SHARED_PARAMS) or {}).items():
        if target in thunks:
            thunks[alias], shapes[alias] = thunks[target], shapes[target]
    return LazyStateDict(thunks, shapes)


def _read_pipeline(tag_dir: str, layer_files: dict, cfg: RunConfig) -> list[LazyStateDict]:
    """Pipeline layer files renamed with the pipeline module's own layer → parameter-name table."""
    from ..parallel.pipe import pipe_layer_to_names

    table = pipe_layer_to_names(cfg.model)
    tps = sorted({mp for _, mp in layer_files})
    ranks = []
    for mp in tps:
        thunks, shapes = OrderedDict(), {}
        for i in sorted(table):
            if (i, mp) not in layer_files:
                raise ValueError(f"{tag_dir}: missing pipeline layer file layer_{i:02d} of tensor-parallel rank {mp}")
            layer = _load(layer_files[(i, mp)])
            for key, name in table[i].items():
                if key not in layer:
                    raise ValueError(f"{layer_files[(i, mp)]}: no '{key}' (expected {name})")
                v = layer[key]
                thunks[name], shapes[name] = (lambda v=v: v), tuple(v.shape)
        ranks.append(LazyStateDict(thunks, shapes))
    return ranks


def detect_layout(tag_dir: str) -> str:
    names = os.listdir(tag_dir)
    if WEIGHTS_ONLY in names:
        return "weights-only"
    if any(_LAYER.match(n) for n in names):
        return "pipeline"
    if any(_ZERO_MODEL.match(n) for n in names):
        return "zero3"
    if any(_MP_MODEL.match(n) for n in names):
        return "zero0-2"
    raise ValueError(f"{tag_dir}: no model files found (neither DeepSpeed nor weights-only); is this a checkpoint?")


def read_run_config(tag_dir: str) -> RunConfig:
    path = os.path.join(tag_dir, "run_config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing; the tag was not written by pipeline.train or convert from-hf")
    with open(path) as f:
        raw = json.load(f)
    arch = (raw.get("model") or {}).get("arch")
    if arch not in ("gpt", "llama"):
        raise ValueError(f"{path}: model.arch '{arch}' is not one this tool knows (gpt, llama)")
    cfg = from_dict(raw, check=False)  # a from-hf tag names no dataset yet: only the model must be sound here
    return cfg


def _merge_tp(ranks: list[LazyStateDict], cfg: RunConfig, tag_dir: str) -> LazyStateDict:
    if len(ranks) == 1:
        return ranks[0]
    if len(ranks) != cfg.parallel.tp:
        raise ValueError(f"{tag_dir}: run config says parallel.tp={cfg.parallel.tp}, found files of {len(ranks)} "
                         "tensor-parallel ranks; a shard is missing")
    from ..parallel.tp import merge_tp_shards

    return _eager(merge_tp_shards([r.materialize() for r in ranks], cfg.model))


def _unpad_vocab(sd: LazyStateDict, vocab: int) -> LazyStateDict:
    """Cut the rows added to make the vocabulary divisible for tensor parallelism."""
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in sd and sd.shapes[name][0] > vocab:
            inner = sd.thunks[name]
            sd.thunks[name] = lambda inner=inner: inner()[:vocab]
            sd.shapes[name] = (vocab, *sd.shapes[name][1:])
    return sd


def committed_tag(ckpt_dir: str, tag: str | None = None) -> tuple[str, str]:
    """(tag, its folder) of the requested or newest committed, intact checkpoint; ValueError naming the folder."""
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"{ckpt_dir}: no such checkpoint folder")
    try:
        tag = resolve_tag(ckpt_dir, tag)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if tag is None:
        raise ValueError(f"{ckpt_dir}: no committed checkpoint found (no global_stepN folder with a {COMMIT} marker)")
    return tag, os.path.join(ckpt_dir, tag)


def open_checkpoint(ckpt_dir: str, tag: str | None = None) -> tuple[LazyStateDict, RunConfig, str, str]:
    """(lazy full state dict, run config, tag, layout) of a committed checkpoint in any layout."""
    tag, tag_dir = committed_tag(ckpt_dir, tag)
    cfg = read_run_config(tag_dir)
    layout = detect_layout(tag_dir)
    if layout == "weights-only":
        sd = read_weights_only_lazy(tag_dir)
    elif layout == "zero3":
        model_files, optim_files = _files(tag_dir, _ZERO_MODEL), _files(tag_dir, _ZERO_OPTIM)
        mps = sorted({mp for _, mp in model_files})
        sd = _merge_tp([_read_zero3_rank(tag_dir, mp, model_files, optim_files) for mp in mps], cfg, tag_dir)
    elif layout == "zero0-2":
        files = _files(tag_dir, _MP_MODEL)
        ranks = []
        for mp in sorted(files):
            module = _load(files[mp]).get(ds_compat.MODULE)
            if not module:
                raise ValueError(f"{files[mp]}: holds no module weights")
            ranks.append(_eager(module))
        sd = _merge_tp(ranks, cfg, tag_dir)
    else:
        sd = _merge_tp(_read_pipeline(tag_dir, _files(tag_dir, _LAYER), cfg), cfg, tag_dir)
    sd = _unpad_vocab(sd, cfg.model.vocab_size)
    if cfg.model.tie_embeddings and "lm_head.weight" not in sd and "embed_tokens.weight" in sd:
        sd.thunks["lm_head.weight"], sd.shapes["lm_head.weight"] = sd.thunks["embed_tokens.weight"], sd.shapes["embed_tokens.weight"]
    return sd, cfg, tag, layout


def read_weights_only_lazy(tag_dir: str) -> LazyStateDict:
    from safetensors import safe_open

    path = os.path.join(tag_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing (the tag is marked {WEIGHTS_ONLY})")
    try:
        f = safe_open(path, framework="pt")
        names = list(f.keys())
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
    except Exception as e:
        raise ValueError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from None
    return LazyStateDict(OrderedDict((n, (lambda n=n: f.get_tensor(n))) for n in names), shapes)


def read_weights_only(ckpt_dir: str, tag: str) -> dict:
    """Our full unsharded fp32 state dict (our parameter names, vocab unpadded) of a weights-only tag
    written by `convert from-hf`; the trainer passes it to `build_engine(cfg, init_state_dict=...)`."""
    tag_dir = os.path.join(ckpt_dir, tag)
    sd = read_weights_only_lazy(tag_dir).materialize()
    if "lm_head.weight" not in sd and read_run_config(tag_dir).model.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return sd

