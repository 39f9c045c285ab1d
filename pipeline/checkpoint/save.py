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
import signal
import time

import numpy as np
import torch

from .. import dist
from ..fs import flush_filesystem, write_atomic
from .commit import commit, prune, tag_for

log = logging.getLogger("pipeline")


def rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers only (the file loads with weights_only=True)."""
    version, key, gauss = random.getstate()
    kind, np_key, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "key": torch.tensor(key, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (or the numpy/tuple form of checkpoints written before it)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["key"].tolist()), py["gauss"])
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{rank:05d}.pt")


def save(engine, ckpt_dir: str, step: int, client_state: dict, run_config: dict, keep: int, sync: bool = True,
         background: bool = False) -> str:
    """Save `global_step{step}`; returns the tag. Collective: every rank must call it.

    Every rank's files go through our checkpoint engine (writer.py). Without `background`, they are written now;
    with `sync`, one process per node flushes the node's dirty pages on the checkpoint's filesystem (syncfs: every
    local rank's files) after all ranks have written, and rank 0 commits. With `background`, the tensors are
    copied to host memory and written (and with `sync`, flushed) in a background thread: the caller commits with
    `finish` once every rank's writer is done (pipeline/loop.py's Saver)."""
    from .writer import attach

    tag = tag_for(step)
    t0 = time.time()
    path = os.path.join(ckpt_dir, tag)
    if dist.rank() == 0 and os.path.isdir(path):  # a half-written leftover of a killed run
        shutil.rmtree(path)
    dist.barrier()
    writer = attach(engine)
    writer.background = background
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
        writer.save(rng_state(), rng_file(ckpt_dir, tag, dist.rank()))
    finally:
        writer.background = False
    if background:
        writer.start(tag, sync)
        if dist.rank() == 0:
            log.info("checkpoint %s copied to host memory in %.2fs; writing it in the background", tag, time.time() - t0)
        return tag
    dist.barrier()
    if sync:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # without LOCAL_RANK: every rank, to be safe
            t1 = time.time()
            flush_filesystem(path)
            log.info("flushed checkpoint %s to storage in %.1fs", tag, time.time() - t1)
        dist.barrier()
    finish(ckpt_dir, step, client_state, run_config, keep, t0)
    dist.barrier()
    return tag


def finish(ckpt_dir: str, step: int, client_state: dict, run_config: dict, keep: int, t0: float) -> None:
    """Rank 0 commits `global_step{step}` (every rank's files must be complete and flushed) and prunes."""
    if dist.rank() != 0:
        return
    tag = tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    from .writer import _hook

    if _hook(tag) == "kill-before-commit":  # test hook (writer.py): every file complete, no marker yet
        os.kill(os.getpid(), signal.SIGKILL)
    write_atomic(os.path.join(path, "run_config.json"), json.dumps(run_config, indent=2))
    commit(ckpt_dir, tag, {"step": step, "world_size": dist.world_size(),
                           "consumed_samples": client_state.get("consumed_samples"),
                           "data_fingerprint": client_state.get("data_fingerprint")})
    prune(ckpt_dir, keep, tag)
    log.info("saved checkpoint %s in %.1fs", path, time.time() - t0)


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Load a committed tag into the engine; returns its client state and restores this rank's RNG.

    Every file is read with weights_only=True and the allow-list of safe.py (through writer.SafeCheckpointEngine)."""
    from .safe import load_file
    from .writer import attach

    attach(engine)
    load_path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if load_path is None:
        raise RuntimeError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load this checkpoint")
    path = rng_file(ckpt_dir, tag, dist.rank())
    if os.path.isfile(path):
        set_rng_state(load_file(path))
    return client_state or {}


def background_done(engine, device, block: bool = False) -> bool:
    """Collective: whether every rank's background writer has finished its save (with `block`, after waiting for
    this rank's). A failed write on any rank raises on every rank (this rank's own error, or a line naming none)."""
    import torch.distributed as tdist

    from .writer import attach

    writer = attach(engine)
    if block:
        writer.join()
    status = torch.tensor([float(writer.status())], device=device)
    if tdist.is_initialized():
        tdist.all_reduce(status, op=tdist.ReduceOp.MAX)
    if status.item() == 2:
        error = writer.error
        writer.reset()
        if error is not None:
            raise error
        raise RuntimeError("another rank failed to write its part of the checkpoint in the background (its log "
                           "says why)")
    if status.item() == 0:
        writer.reset()
        return True
    return False
