"""Checkpoints with a commit protocol on top of DeepSpeed's save/load.

Every rank writes its part of `CKPT/global_stepN/` (DeepSpeed files plus its own RNG state); after a barrier,
rank 0 writes the commit marker, then points `latest` at the tag by write-then-rename. A tag without a marker
is never loaded; on start the newest committed tag wins.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import torch

from . import dist

log = logging.getLogger("pipeline")
COMMIT = "COMMITTED"
WEIGHTS_ONLY = "WEIGHTS_ONLY"  # a tag holding only model.safetensors (e.g. from `convert from-hf`): fresh optimizer
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def committed_tags(ckpt_dir: str) -> list[str]:
    """Committed tags, newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _TAG.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, COMMIT)):
            found.append((int(m.group(1)), name))
    return [name for _, name in sorted(found, reverse=True)]


def verify(ckpt_dir: str, tag: str) -> str | None:
    """Why a committed tag cannot be loaded (a file missing or of another size than at commit), or None."""
    path = os.path.join(ckpt_dir, tag)
    try:
        with open(os.path.join(path, COMMIT)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return f"{path}/{COMMIT} is unreadable"
    for name, size in marker.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes, {size} at commit (truncated?)"
    return None


def marker(ckpt_dir: str, tag: str) -> dict:
    with open(os.path.join(ckpt_dir, tag, COMMIT)) as f:
        return json.load(f)


def resolve_tag(ckpt_dir: str, tag: str | None = None) -> str | None:
    """The tag to load: the one asked for (must be committed and intact), else the newest committed intact tag
    (`latest` names it unless a save was interrupted). A damaged newest tag falls back to the previous one."""
    if tag is not None:
        if not os.path.isfile(os.path.join(ckpt_dir, tag, COMMIT)):
            raise FileNotFoundError(f"{os.path.join(ckpt_dir, tag)}: no committed checkpoint with this tag")
        problem = verify(ckpt_dir, tag)
        if problem:
            raise ValueError(f"checkpoint {tag} is damaged: {problem}")
        return tag
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(latest):
        name = open(latest).read().strip()
        if not os.path.isfile(os.path.join(ckpt_dir, name, COMMIT)):
            log.warning("%s points at %s, which is not committed; looking for an older checkpoint", latest, name)
    for name in committed_tags(ckpt_dir):
        problem = verify(ckpt_dir, name)
        if problem is None:
            return name
        log.warning("skipping damaged checkpoint %s: %s", name, problem)
    return None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def flush_filesystem(path: str) -> None:
    """Write back every dirty page of the filesystem holding `path` (Linux syncfs), else of all (os.sync)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), "syncfs failed")
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        os.sync()


def save(engine, ckpt_dir: str, step: int, client_state: dict, run_config: dict, keep: int, sync: bool = True) -> str:
    """Save and commit `global_step{step}`; returns the tag. Collective: every rank must call it.

    With `sync`, one process per node flushes the node's dirty pages on the checkpoint's filesystem (syncfs:
    every local rank's files) after all ranks have written and before rank 0 commits."""
    tag = tag_for(step)
    t0 = time.time()
    path = os.path.join(ckpt_dir, tag)
    if dist.rank() == 0 and os.path.isdir(path):  # a half-written leftover of a killed run
        shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(path, f"rng_rank{dist.rank():05d}.pt"))
    dist.barrier()
    if sync:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # without LOCAL_RANK: every rank, to be safe
            t1 = time.time()
            flush_filesystem(path)
            log.info("flushed checkpoint %s to storage in %.1fs", tag, time.time() - t1)
        dist.barrier()
    if dist.rank() == 0:
        _write_atomic(os.path.join(path, "run_config.json"), json.dumps(run_config, indent=2))
        files = {os.path.relpath(os.path.join(root, f), path): os.path.getsize(os.path.join(root, f))
                 for root, _, names in os.walk(path) for f in names}
        _write_atomic(os.path.join(path, COMMIT), json.dumps({
            "step": step, "time": time.time(), "world_size": dist.world_size(),
            "consumed_samples": client_state.get("consumed_samples"),
            "data_fingerprint": client_state.get("data_fingerprint"), "files": files}, indent=1))
        _write_atomic(os.path.join(ckpt_dir, "latest"), tag)
        _prune(ckpt_dir, keep)
        log.info("saved checkpoint %s in %.1fs", path, time.time() - t0)
    dist.barrier()
    return tag


def _prune(ckpt_dir: str, keep: int) -> None:
    """Keep the newest `keep` committed tags; drop older ones and leftovers of interrupted saves."""
    committed = committed_tags(ckpt_dir)
    drop = committed[keep:] if keep > 0 else []
    newest = int(_TAG.match(committed[0]).group(1)) if committed else -1
    for name in os.listdir(ckpt_dir):
        m = _TAG.match(name)
        if m and name not in committed and int(m.group(1)) < newest:
            drop.append(name)
    for name in drop:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def is_weights_only(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, WEIGHTS_ONLY))


def load_weights_only(ckpt_dir: str, tag: str) -> dict:
    """The full model state dict of a weights-only tag (`model.safetensors`, our parameter names)."""
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt_dir, tag, "model.safetensors"))


def is_universal(ckpt_dir: str, tag: str) -> bool:
    """A `convert reshape` output: DeepSpeed loads it into any tp, pp and data-parallel size."""
    return os.path.isfile(os.path.join(ckpt_dir, tag, "UNIVERSAL"))


def layout_change(ckpt_dir: str, tag: str, parallel_cfg: dict, world_size: int | None) -> str | None:
    """Why DeepSpeed could not load `tag` into this layout (tensor/pipeline/data-parallel sizes, ZeRO stage), or
    None. Weights-only tags load anywhere; universal ones into any sizes, but not across ZeRO-3 and ZeRO-0/1/2.
    `world_size` None (unknown before start-up): the data-parallel size is not compared."""
    path = os.path.join(ckpt_dir, tag)
    if is_weights_only(ckpt_dir, tag):
        return None
    try:
        with open(os.path.join(path, "run_config.json")) as f:
            old = json.load(f).get("parallel", {})
        old_world = int(marker(ckpt_dir, tag)["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an older or unreadable tag: check_compatible and DeepSpeed speak for it

    def sizes(p: dict, world: int | None) -> dict:
        tp, pp = int(p.get("tp", 1)), int(p.get("pp", 1))
        return {"tp": tp, "pp": pp, "dp": world // (tp * pp) if world else None, "zero_stage": int(p.get("zero_stage", 0))}
    a, b = sizes(old, old_world), sizes(parallel_cfg, world_size)
    if (a["zero_stage"] == 3) != (b["zero_stage"] == 3):
        return (f"it was saved with ZeRO-{a['zero_stage']} and this run uses ZeRO-{b['zero_stage']}; DeepSpeed "
                f"cannot move optimizer state between ZeRO-3 and ZeRO-0/1/2: keep parallel.zero_stage="
                f"{a['zero_stage']}, or start from the weights alone (convert to-hf, then convert from-hf)")
    if is_universal(ckpt_dir, tag):
        return None
    keys = ["tp", "pp", "zero_stage"] + (["dp"] if b["zero_stage"] > 0 and b["dp"] is not None else [])
    diff = [f"{k} {a[k]} -> {b[k]}" for k in keys if a[k] != b[k]]
    if not diff:
        return None
    return (f"it was saved in another layout ({', '.join(diff)}), which DeepSpeed cannot load directly; convert it: "
            f"python -m pipeline.convert reshape {ckpt_dir} OUT --tp {b['tp']} --pp {b['pp']}, then run with "
            f"checkpoint.dir=OUT")


SCHEDULE_KEYS = ("lr", "min_lr", "warmup_steps", "decay_style", "steps")


def schedule_changes(ckpt_dir: str, tag: str, train_cfg: dict) -> list[str]:
    """The LR-schedule settings of `train_cfg` that differ from the ones `tag` was trained with ("train.lr a -> b").

    `steps` counts only where it shapes the schedule (a decay that ends at train.steps)."""
    try:
        with open(os.path.join(ckpt_dir, tag, "run_config.json")) as f:
            old = json.load(f).get("train", {})
    except (OSError, ValueError):
        return []  # check_compatible reports an unreadable run_config.json
    keys = [k for k in SCHEDULE_KEYS if k != "steps" or "constant" not in (old.get("decay_style"), train_cfg.get("decay_style"))]
    return [f"train.{k} {old.get(k)} -> {train_cfg.get(k)}" for k in keys if k in old and old.get(k) != train_cfg.get(k)]


def check_compatible(ckpt_dir: str, tag: str, model_cfg: dict, fingerprint: str | None) -> str | None:
    """Why resuming `tag` with this model shape and data would be wrong, or None."""
    try:
        with open(os.path.join(ckpt_dir, tag, "run_config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return f"{os.path.join(ckpt_dir, tag)}/run_config.json is missing or unreadable"
    shape_keys = ("arch", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_hidden_size", "vocab_size",
                  "tie_embeddings")
    old = saved.get("model", {})
    diff = [f"model.{k} {old.get(k)} -> {model_cfg.get(k)}" for k in shape_keys if old.get(k) != model_cfg.get(k)]
    if diff:
        return "the model shape differs from the checkpoint's: " + ", ".join(diff)
    saved_fp = marker(ckpt_dir, tag).get("data_fingerprint")
    if fingerprint and saved_fp and saved_fp != fingerprint and not is_weights_only(ckpt_dir, tag):
        return "the datasets differ from the checkpoint's (data fingerprint changed)"
    return None


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Load a committed tag into the engine; returns its client state and restores this rank's RNG."""
    load_path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if load_path is None:
        raise RuntimeError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load this checkpoint")
    rng_file = os.path.join(ckpt_dir, tag, f"rng_rank{dist.rank():05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
