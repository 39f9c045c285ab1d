"""Helpers of the checkpoint tests (safety, async saves, the checkpoint-dir lock): a tiny run config, its logged
losses, its committed tags, and waiting for a point in a run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

LAYOUTS = {  # name: (arch, parallel section)
    "zero3": ("llama", {"zero_stage": 3}),
    "zero1": ("gpt", {"zero_stage": 1}),
    "pp2": ("gpt", {"pp": 2, "zero_stage": 1}),
}


def write_config(folder: Path, token_dir, layout: str = "zero3", name: str = "run", **over) -> str:
    """A 2-layer h32 model on the shared token shards; `over` as section__key=value."""
    arch, parallel = LAYOUTS[layout]
    cfg = {
        "model": {"arch": arch, "num_layers": 2, "hidden_size": 32, "num_heads": 4, "kv_heads": 2 if arch == "llama"
                  else 4, "ffn_hidden_size": 64, "seq_len": 32},
        "parallel": dict(parallel),
        "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}]},
        "train": {"steps": 8, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2,
                  "dist_timeout_s": 60},
        "checkpoint": {"dir": str(folder / "ckpt"), "interval": 2, "keep": 10},
        "log": {"interval": 1, "jsonl": str(folder / "log.jsonl")},
    }
    for key, value in over.items():
        section, k = key.split("__")
        cfg[section][k] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def losses(folder: Path) -> dict:
    """{step: loss} of the training lines of folder/log.jsonl (a resumed step's later line wins)."""
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "split" not in r and "loss" in r}


def committed_steps(ckpt: Path) -> list[int]:
    return sorted(int(d.name[len("global_step"):]) for d in ckpt.glob("global_step*") if (d / "COMMITTED").exists())


def wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    """Poll `predicate` until true; fail naming `what` on timeout or when a process of `procs` ended early."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process ended while waiting for {what}: {[p.poll() for p in procs]}")
        time.sleep(0.05)


def log_text(folder: Path, rank: int = 0) -> str:
    path = folder / f"rank{rank}.log"
    return path.read_text() if path.exists() else ""
