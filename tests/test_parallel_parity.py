"""Every parallel layout trains exactly like the single-process model (the oracle), on real DeepSpeed engines.

One torchrun launch per world size runs all of its layouts (this file is also the worker: `__main__` below) and
writes each layout's first losses and gathered parameters; the tests compare them with the plain PyTorch model
trained by torch's AdamW in this process. Tests as data: add a layout to LAYOUTS.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

VOCAB = 1000  # large next to hidden, so a full-vocabulary tensor is unmistakable
STEPS = 3
# name: (world, tp, pp, zero_stage)
LAYOUTS = {
    "dp2_zero3": (2, 1, 1, 3),
    "tp2_zero3": (2, 2, 1, 3),
    "pp2_zero1": (2, 1, 2, 1),
    "tp2_zero1_checkpointing": (2, 2, 1, 1),  # with parallel.activation_checkpointing
    "tp2_dp2_zero3": (4, 2, 1, 3),
    "pp2_tp2_zero1": (4, 2, 2, 1),
    "pp2_dp2_zero1": (4, 1, 2, 1),
}
ARCHS = ("gpt", "llama")


def run_config(arch: str, tp: int = 1, pp: int = 1, zero: int = 3, checkpointing: bool = False):
    from pipeline.config import from_dict

    model = {"arch": arch, "num_layers": 4, "hidden_size": 32, "num_heads": 4, "seq_len": 16, "vocab_size": VOCAB,
             "make_vocab_size_divisible_by": 64, "ffn_hidden_size": 64}
    if arch == "llama":
        model["kv_heads"] = 2
    return from_dict({
        "model": model,
        "parallel": {"tp": tp, "pp": pp, "zero_stage": zero, "activation_checkpointing": checkpointing},
        "data": {"datasets": [{"path": "unused", "weight": 1.0}]},
        "train": {"steps": 10, "global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3, "min_lr": 1e-4,
                  "warmup_steps": 2, "grad_clip": 0.5, "weight_decay": 0.1, "seed": 7},
    })


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (8, 17), generator=g)


def oracle(arch: str):
    """The unsharded model under torch's AdamW: per-step losses and grad norms, final params, then an eval loss."""
    from pipeline.optim import Schedule, build_optimizer, lr_at, set_lr
    from pipeline.model import build_model, lm_loss

    cfg = run_config(arch)
    model = build_model(cfg.model, seed=cfg.train.seed)
    opt = build_optimizer(model, cfg.train)
    schedule = Schedule.from_train_config(cfg.train)
    losses, norms = [], []
    for step in range(STEPS):
        set_lr(opt, lr_at(step, schedule))
        micro = global_batch(step).split(cfg.train.micro_batch_size)
        loss = sum(lm_loss(model(mb[:, :-1]), mb[:, 1:]) for mb in micro) / len(micro)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        model.eval()
        held_out = global_batch(99)
        losses.append(float(lm_loss(model(held_out[:, :-1]), held_out[:, 1:])))
    params = {k: v.detach()[:VOCAB] if k == "embed_tokens.weight" or k == "lm_head.weight" else v.detach()
              for k, v in model.named_parameters()}
    return losses, norms, params


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.conftest import torchrun

    out = tmp_path_factory.mktemp("parity")
    for world in sorted({w for w, *_ in LAYOUTS.values()}):
        torchrun(world, __file__, str(out), timeout=900)
    return out


@pytest.fixture(scope="module")
def oracles():
    return {arch: oracle(arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process_model(results, oracles, arch, layout):
    want_losses, want_norms, want_params = oracles[arch]
    assert max(want_norms) > 0.5  # gradient clipping is active, so the sharded norm computation is tested too
    got = torch.load(results / f"{arch}_{layout}.pt")
    assert got["losses"][0] == pytest.approx(want_losses[0], rel=1e-5)
    assert got["losses"] == pytest.approx(want_losses, rel=1e-5)  # 3 train steps, then eval_loss afterwards
    assert got["grad_norm"] == pytest.approx(want_norms[-1], rel=1e-5)
    assert set(want_params) <= set(got["params"])
    # atol = 5e-3 x lr: Adam turns fp32 summation noise in gradients that are zero in exact arithmetic (GPT's key
    # bias: softmax ignores a per-query shift) into steps of up to ±lr, whatever the implementation.
    for name, want in want_params.items():
        torch.testing.assert_close(got["params"][name], want, rtol=1e-5, atol=5e-6, msg=lambda m: f"{name}: {m}")


def test_tp_never_materialises_full_vocab_logits(results):
    got = torch.load(results / "llama_vocab_probe.pt")
    assert got["local_logit_cols"] == got["padded_vocab"] // 2
    assert got["largest_vocab_dim"] < VOCAB  # no tensor anywhere in forward, loss or backward spans the vocab


def test_vocab_parallel_cross_entropy_equals_plain_loss(results):
    got = torch.load(results / "vocab_ce.pt")
    logits, labels = got["logits"].requires_grad_(), got["labels"]
    want = torch.nn.functional.cross_entropy(logits[..., :got["vocab"]].reshape(-1, got["vocab"]), labels.reshape(-1))
    want.backward()
    assert got["loss"] == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got["grad"][..., :got["vocab"]], logits.grad[..., :got["vocab"]], rtol=1e-5, atol=1e-7)
    assert got["grad"][..., got["vocab"]:].abs().max() == 0  # padded columns (given huge logits) play no part


def test_init_state_dict_and_frozen_layers(results):
    got = torch.load(results / "init_freeze.pt")
    for name, want in got["init"].items():  # loaded (unpadded input) before tensor-parallel sharding
        torch.testing.assert_close(got["before"][name], want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    frozen = [n for n in got["init"] if n.startswith(("embed_tokens", "layers.0."))]
    trained = [n for n in got["init"] if n not in frozen]
    assert frozen and all(torch.equal(got["after"][n], got["before"][n]) for n in frozen)
    assert all(not torch.equal(got["after"][n], got["before"][n]) for n in trained)


def test_zero3_partitioned_as_built_equals_partitioned_after(results):
    """tp2+ZeRO-3 in bf16: blocks partitioned one at a time as they are allocated (engine.materialize_partitioned,
    what bounds start-up memory) train exactly as the whole model allocated, then partitioned by DeepSpeed."""
    got = torch.load(results / "zero3_both_ways.pt")
    assert got["ours"]["losses"] == got["plain"]["losses"] and all(x == x for x in got["ours"]["losses"])
    assert got["ours"]["dtype"] == got["plain"]["dtype"] == torch.bfloat16
    for name, want in got["plain"]["params"].items():
        assert torch.equal(got["ours"]["params"][name], want), name


# ---- the worker: torchrun --nproc_per_node W tests/test_parallel_parity.py OUT ----

def _vocab_probe(engine, out: str):
    """Record every tensor shape produced during a tp2 forward/loss/backward; keep the largest vocab-like dim."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(t, torch.Tensor):
                    seen.extend(d for d in t.shape if d > 64)  # above hidden/ffn/seq sizes: vocabulary dims
            return result

    batch = global_batch(0)[:2]
    with torch.no_grad():
        logits = engine.engine(batch[:, :-1])
    with Shapes():  # the training path: the head fused with the chunked loss
        loss, _ = engine.engine(batch[:, :-1], labels=batch[:, 1:])
        engine.engine.backward(loss)
    if torch.distributed.get_rank() == 0:
        torch.save({"local_logit_cols": logits.shape[-1], "largest_vocab_dim": max(seen),
                    "padded_vocab": engine.engine.module.padded_vocab_size}, os.path.join(out, "llama_vocab_probe.pt"))


def _vocab_ce(state, out: str):
    """vocab_parallel_cross_entropy on two halves of padded logits whose padding columns are huge."""
    from pipeline.parallel.layers import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(3)
    vocab, padded = 100, 128
    full = torch.randn(4, 8, padded, generator=g) * 3
    full[..., vocab:] = 50.0
    labels = torch.randint(0, vocab, (4, 8), generator=g)
    half = padded // 2
    mine = full[..., state.coord.tp * half:(state.coord.tp + 1) * half].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(mine, labels, state.coord.tp * half, vocab, state.tp_group)
    loss.backward()
    grads = [torch.empty_like(mine) for _ in range(2)]
    torch.distributed.all_gather(grads, mine.grad)
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": full, "labels": labels, "vocab": vocab, "loss": loss.item(),
                    "grad": torch.cat(grads, dim=-1)}, os.path.join(out, "vocab_ce.pt"))


def _init_freeze(out: str):
    """tp2 ZeRO-3 from an unpadded full state dict, bottom block and embeddings frozen, one step."""
    from pipeline.engine import build_engine
    from pipeline.model import build_model

    cfg = run_config("llama", 2, 1, 3)
    cfg.train.freeze_layers = 1
    init = {k: v[:VOCAB].clone() if k in ("embed_tokens.weight", "lm_head.weight") else v
            for k, v in build_model(cfg.model, seed=99).state_dict().items()}
    engine = build_engine(cfg, init_state_dict=init)
    before = engine.full_state_dict()
    engine.train_step(global_batch(0)[:8])
    after = engine.full_state_dict()
    if torch.distributed.get_rank() == 0:
        torch.save({"init": init, "before": before, "after": after}, os.path.join(out, "init_freeze.pt"))


def _zero3_both_ways(out: str) -> None:
    import gc

    import pipeline.engine as engine_mod
    from pipeline.parallel.tp import materialize

    results, ours = {}, engine_mod.materialize_partitioned
    for way in ("ours", "plain"):
        engine_mod.materialize_partitioned = ours if way == "ours" else (lambda model, *a, **k: materialize(model))
        cfg = run_config("llama", 2, 1, 3)
        cfg.train.precision = "bf16"
        engine = engine_mod.build_engine(cfg)
        losses = [engine.train_step(global_batch(s)[engine.dp_rank * 8:(engine.dp_rank + 1) * 8]) for s in range(3)]
        dtype = next(engine.engine.module.parameters()).dtype
        results[way] = {"losses": losses, "params": engine.full_state_dict(), "dtype": dtype}
        del engine
        gc.collect()
    engine_mod.materialize_partitioned = ours
    if torch.distributed.get_rank() == 0:
        torch.save(results, os.path.join(out, "zero3_both_ways.pt"))


def _worker(out: str) -> None:
    import gc

    from pipeline import dist
    from pipeline.engine import build_engine
    from pipeline.optim import Schedule, lr_at

    dist.init_distributed(300)
    world, rank = dist.world_size(), dist.rank()
    for layout, (w, tp, pp, zero) in LAYOUTS.items():
        if w != world:
            continue
        for arch in ARCHS:
            cfg = run_config(arch, tp, pp, zero, checkpointing=layout.endswith("checkpointing"))
            engine = build_engine(cfg)
            per = 8 // engine.dp_size
            mine = slice(engine.dp_rank * per, (engine.dp_rank + 1) * per)
            schedule = Schedule.from_train_config(cfg.train)
            losses = []
            for s in range(STEPS):  # the LR of each step, as the train loop sets it (pipeline/optim.py)
                engine.set_lr(lr_at(s, schedule))
                losses.append(engine.train_step(global_batch(s)[mine]))
            losses.append(engine.eval_loss(global_batch(99)[mine]))
            norm = engine.grad_norm()
            params = engine.full_state_dict()
            if rank == 0:
                torch.save({"losses": losses, "grad_norm": norm, "params": params},
                           os.path.join(out, f"{arch}_{layout}.pt"))
            del engine
            gc.collect()
    if world == 2:
        engine = build_engine(run_config("llama", 2, 1, 0))
        _vocab_probe(engine, out)
        _vocab_ce(engine.state, out)
        del engine
        _init_freeze(out)
        _zero3_both_ways(out)
    dist.exit_cleanly(0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch.set_num_threads(1)
    _worker(sys.argv[1])
