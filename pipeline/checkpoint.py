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


def resolve_tag(ckpt_dir: str, tag: str | None = None) -> str | None:
    """The tag to load: the one asked for (must be committed), else `latest` if committed, else the newest committed."""
    if tag is not None:
        if not os.path.isfile(os.path.join(ckpt_dir, tag, COMMIT)):
            raise FileNotFoundError(f"{os.path.join(ckpt_dir, tag)}: no committed checkpoint with this tag")
        return tag
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(latest):
        name = open(latest).read().strip()
        if os.path.isfile(os.path.join(ckpt_dir, name, COMMIT)):
            return name
        log.warning("%s points at %s, which is not committed; looking for an older checkpoint", latest, name)
    tags = committed_tags(ckpt_dir)
    return tags[0] if tags else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: str, step: int, client_state: dict, run_config: dict, keep: int) -> str:
    """Save and commit `global_step{step}`; returns the tag. Collective: every rank must call it."""
    tag = tag_for(step)
    t0 = time.time()
    path = os.path.join(ckpt_dir, tag)
    if dist.rank() == 0 and os.path.isdir(path):  # a half-written leftover of a killed run
        shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(path, f"rng_rank{dist.rank():05d}.pt"))
    dist.barrier()
    if dist.rank() == 0:
        _write_atomic(os.path.join(path, "run_config.json"), json.dumps(run_config, indent=2))
        _write_atomic(os.path.join(path, COMMIT), json.dumps({"step": step, "time": time.time(),
                                                               "world_size": dist.world_size()}))
        _write_atomic(os.path.join(ckpt_dir, "latest"), tag)
        for old in committed_tags(ckpt_dir)[keep:] if keep > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        log.info("saved checkpoint %s in %.1fs", path, time.time() - t0)
    dist.barrier()
    return tag


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Load a committed tag into the engine; returns its client state and restores this rank's RNG."""
    load_path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if load_path is None:
        raise RuntimeError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load this checkpoint")
    rng_file = os.path.join(ckpt_dir, tag, f"rng_rank{dist.rank():05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}
