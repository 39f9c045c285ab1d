"""`convert reshape CKPT OUT --tp T --pp P`: a checkpoint's weights and optimizer state moved to another layout.

Through DeepSpeed universal checkpoints : every parameter and its Adam moments are written whole, one
folder per parameter, and each rank of the new layout cuts its own piece when it loads, whatever its
data-parallel size. What DeepSpeed cannot know is added here first:
- the tensor-parallel rules of our layers (which parameters are row-parallel, replicated or vocab-padded), as
  the `universal_checkpoint_info` that its converter reads to merge TP shards;
- the names: pipeline checkpoints name parameters by pipeline layer (`3.attn.q_proj.weight`); they are renamed
  to the model's own (`layers.2.attn.q_proj.weight`) with the pipeline module's table, so that a run with
  another number of stages (or none) finds them.
OUT is a checkpoint folder: `OUT/<tag>` with a `UNIVERSAL` marker, from which the trainer knows to load it as a
universal checkpoint. Resume with

    pipeline.train --config X parallel.tp=T parallel.pp=P checkpoint.dir=OUT

Switching between ZeRO-3 and ZeRO-0/1/2 is not possible this way . DeepSpeed's ZeRO-3 loader of
universal checkpoints neither cuts tensor-parallel shards nor pads the vocabulary: ZeRO-3 runs reshape to tp 1
only (vocabulary tensors padded here for it); ZeRO-0/1 runs (pipelines) to any tp and pp.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import torch

from ..checkpoint import UNIVERSAL, commit, marker
from .. import ds_compat
from ..checkpoint.read import committed_tag, detect_layout, read_run_config
from ..checkpoint.safe import load_file, refuse_unsafe_files
from ..config import validate
from ..fs import flush_filesystem, staging_dir
from .hf import copy_beside


def universal_info(cfg) -> dict:
    """Our tensor-parallel roles (pipeline/parallel/roles.py) in the vocabulary of DeepSpeed's converter."""
    from ..parallel.roles import REPLICATED, ROW, VOCAB, param_shapes, universal_patterns

    pats = universal_patterns(param_shapes(cfg.model), cfg.model.tie_embeddings)
    return ds_compat.universal_info(pats[REPLICATED], pats[ROW], pats[VOCAB], cfg.model.vocab_size)


def _pipe_renamer(cfg):
    """Pipeline-module parameter name → the model's name (`{layer}.{key}`, `tied_modules.{tie}.{key}`)."""
    from ..parallel.pipe import pipe_layer_to_names

    table = pipe_layer_to_names(cfg.model)

    def rename(name: str) -> str:
        m = re.match(r"^(\d+)\.(.+)$", name)
        if m and m.group(2) in table.get(int(m.group(1)), {}):
            return table[int(m.group(1))][m.group(2)]
        m = re.match(r"^tied_modules\.[^.]+\.(.+)$", name)
        if m:
            return m.group(1)
        raise ValueError(f"pipeline parameter '{name}' is not in the pipeline layer table")
    return rename


def _prepare_input(src: str, work: str, info: dict) -> None:
    """Copy the DeepSpeed files of a tag, adding the universal info to every model-states file."""
    os.makedirs(work)
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if ds_compat.ZERO3_MODEL_FILE.match(name) or ds_compat.MODEL_FILE.match(name):
            with contextlib.redirect_stdout(sys.stderr):
                sd = load_file(path)
            sd[ds_compat.UNIVERSAL_INFO] = info
            torch.save(sd, os.path.join(work, name))
        elif name.endswith("_optim_states.pt") or ds_compat.PIPE_LAYER_FILE.match(name):
            os.symlink(os.path.abspath(path), os.path.join(work, name))


def _pad_vocab_for_zero3(zero_dir: str, cfg) -> None:
    """ZeRO-3's universal loader takes each tensor as the parameter's exact full value (no vocab padding, unlike
    the ZeRO-1 loader): give the vocabulary tensors the padded rows of the new layout (zero, like fresh ones)."""
    from ..config import padded_vocab_size

    rows = padded_vocab_size(cfg.model, cfg.parallel.tp)
    for name in ("embed_tokens.weight", "lm_head.weight"):
        folder = os.path.join(zero_dir, name)
        if not os.path.isdir(folder):
            continue
        for f in os.listdir(folder):
            path = os.path.join(folder, f)
            state = torch.load(path, map_location="cpu", weights_only=False)
            t = state.get("param") if isinstance(state, dict) else None
            if t is None or t.dim() != 2 or t.shape[0] >= rows:
                continue
            state["param"] = torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])])
            torch.save(state, path)


def reshape(ckpt_dir: str, out: str, tp: int, pp: int, tag: str | None = None, overwrite: bool = False) -> str:

    tag, src = committed_tag(ckpt_dir, tag)
    cfg = read_run_config(src)
    layout = detect_layout(src)
    if layout == "weights-only":
        raise ValueError(f"{src} holds weights only: a run in any layout starts from it as it is")
    new = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=tp, pp=pp))
    if pp > 1 and cfg.parallel.zero_stage >= 2:
        raise ValueError(f"{src} was trained with ZeRO-{cfg.parallel.zero_stage}; pipeline stages need ZeRO-0/1, and "
                         "universal checkpoints cannot switch between ZeRO-3 and ZeRO-1 ")
    if cfg.parallel.zero_stage == 3 and tp > 1:
        raise ValueError(f"{src} was trained with ZeRO-3: DeepSpeed's ZeRO-3 loader of universal checkpoints does not "
                         "cut tensor-parallel shards, so only --tp 1 is possible (any data-parallel size)")
    validate(new)
    refuse_unsafe_files(src)  # before DeepSpeed's converter unpickles them (weights_only=False)
    with staging_dir(out, overwrite) as tmp:
        work = os.path.join(tmp, ".input")
        _prepare_input(src, work, universal_info(cfg))
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", work,
               "--output_folder", os.path.join(tmp, tag), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        if cfg.parallel.zero_stage < 3:
            cmd.append("--inject_missing_state")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
            raise RuntimeError(f"DeepSpeed's universal-checkpoint converter failed on {src}: {last[0]}")
        shutil.rmtree(work)
        dst = os.path.join(tmp, tag)
        if layout == "pipeline":
            rename = _pipe_renamer(cfg)
            zero = os.path.join(dst, "zero")
            for name in os.listdir(zero):
                if os.path.isdir(os.path.join(zero, name)):
                    os.rename(os.path.join(zero, name), os.path.join(zero, f".{rename(name)}"))
            for name in os.listdir(zero):
                if name.startswith("."):
                    os.rename(os.path.join(zero, name), os.path.join(zero, name[1:]))
        if cfg.parallel.zero_stage == 3:
            _pad_vocab_for_zero3(os.path.join(dst, "zero"), new)
        for name in os.listdir(src):
            if name.startswith("rng_rank"):
                shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        with open(os.path.join(dst, "run_config.json"), "w") as f:
            json.dump(new.to_dict(), f, indent=2)
        with open(os.path.join(dst, UNIVERSAL), "w") as f:
            json.dump({"source": os.path.abspath(src), "from": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp},
                       "to": {"tp": tp, "pp": pp}}, f)
        copy_beside(ckpt_dir, tmp)  # the tokenizer and the HF source config travel with the weights
        old = {k: v for k, v in marker(ckpt_dir, tag).items() if k not in ("files", "time")}
        flush_filesystem(tmp)  # the tag's files reach storage before the marker that vouches for them
        commit(tmp, tag, {**old, "reshaped_from": os.path.abspath(src)})
    return out
