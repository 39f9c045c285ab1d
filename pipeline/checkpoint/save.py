"""Saving and loading the training state through DeepSpeed, under the commit protocol.

Every rank writes its part of `CKPT/global_stepN/` (DeepSpeed's files plus its own RNG state); after a barrier,
one process per node flushes the files to storage, then rank 0 commits (`commit.commit`).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time

import numpy as np
import torch

from .. import dist
from ..fs import flush_filesystem, write_atomic
from .commit import commit, prune, tag_for

log = logging.getLogger("pipeline")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        write_atomic(os.path.join(path, "run_config.json"), json.dumps(run_config, indent=2))
        commit(ckpt_dir, tag, {"step": step, "world_size": dist.world_size(),
                               "consumed_samples": client_state.get("consumed_samples"),
                               "data_fingerprint": client_state.get("data_fingerprint")})
        prune(ckpt_dir, keep)
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

