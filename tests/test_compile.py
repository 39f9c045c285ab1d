"""`train.compile`: compiled transformer blocks train like the eager model on real DeepSpeed engines, and resume
exactly. One 2-rank torchrun launch (this file is its worker) compiles once per process (tiny shapes) and runs
every layout eagerly and compiled: ZeRO-0, ZeRO-1, ZeRO-3 over 2 data-parallel ranks, and tp2 with ZeRO-3."""
from __future__ import annotations

import os
import sys

import pytest
import torch

STEPS = 5
LAYOUTS = {"dp2_zero0": (1, 0), "dp2_zero1": (1, 1), "dp2_zero3": (1, 3), "tp2_zero3": (2, 3)}  # name: (tp, zero)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.conftest import torchrun

    out = tmp_path_factory.mktemp("compile")
    torchrun(2, __file__, str(out), timeout=900)
    return torch.load(out / "compile.pt")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_losses_equal_eager(results, layout):
    eager, compiled = results[layout]["eager"], results[layout]["compiled"]
    assert len(compiled) == STEPS and compiled[-1] < compiled[0]  # it trains
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_compiled_run_resumes_exactly(results):
    straight, resumed = results["resume"]["straight"], results["resume"]["resumed"]
    assert resumed == straight[3:]  # bit for bit: steps 4 and 5 after a save at 3 and a fresh engine


def test_blocks_are_compiled_and_keep_their_names(results):
    assert results["compiled_blocks"] == 4
    assert results["names"] == results["eager_names"]  # checkpoints and to-hf see the eager model's names


def test_pipeline_with_compile_is_refused_in_one_line():
    from pipeline.config import from_dict

    with pytest.raises(ValueError, match=r"train.compile with parallel.pp 2"):
        from_dict({"model": {"num_layers": 2, "vocab_size": 100}, "parallel": {"pp": 2, "zero_stage": 1},
                   "train": {"compile": True}, "data": {"datasets": [{"path": "x", "weight": 1}]}})


# ---- the worker: torchrun --nproc_per_node 2 tests/test_compile.py OUT ----

def _train(cfg, steps, engine=None, start=0):
    from pipeline.engine import build_engine
    from pipeline.optim import Schedule, lr_at
    from tests.test_parallel_parity import global_batch

    engine = engine or build_engine(cfg)
    schedule = Schedule.from_train_config(cfg.train)
    per = 8 // engine.dp_size
    losses = []
    for s in range(start, start + steps):
        engine.set_lr(lr_at(s, schedule))
        losses.append(engine.train_step(global_batch(s)[engine.dp_rank * per:(engine.dp_rank + 1) * per]))
    return engine, losses


def _worker(out: str) -> None:
    import gc

    from pipeline import checkpoint, dist
    from pipeline.engine import build_engine
    from tests.test_parallel_parity import run_config

    dist.init_distributed(600)
    # Exact resume, compiled: 3 steps, save, a fresh engine loads it, 2 more steps. Before any tp layout:
    # DeepSpeed keeps the first engine's mpu in a global, which a later engine without one would inherit.
    results = {}
    cfg = run_config("llama", 1, 1, 1)
    cfg.train.compile = True
    ckpt = os.path.join(out, "ckpt")
    straight = _train(cfg, STEPS)[1]
    engine, _ = _train(cfg, 3)
    checkpoint.save(engine.engine, ckpt, 3, {"step": 3}, cfg.to_dict(), keep=2, sync=False)
    del engine
    gc.collect()
    engine = build_engine(cfg)
    checkpoint.load(engine.engine, ckpt, checkpoint.tag_for(3))
    results["resume"] = {"straight": straight, "resumed": _train(cfg, 2, engine, start=3)[1]}
    del engine
    gc.collect()
    for name, (tp, zero) in LAYOUTS.items():
        results[name] = {}
        for mode in ("eager", "compiled"):
            cfg = run_config("llama", tp, 1, zero)
            cfg.train.compile = mode == "compiled"
            engine, losses = _train(cfg, STEPS)
            results[name][mode] = losses
            if name == "dp2_zero1":
                module = engine.engine.module
                results["names" if cfg.train.compile else "eager_names"] = sorted(module.state_dict())
                if cfg.train.compile:
                    results["compiled_blocks"] = sum(b._compiled_call_impl is not None for b in module.layers)
            del engine
            gc.collect()
    if dist.rank() == 0:
        torch.save(results, os.path.join(out, "compile.pt"))
    dist.exit_cleanly(0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch.set_num_threads(1)
    _worker(sys.argv[1])
