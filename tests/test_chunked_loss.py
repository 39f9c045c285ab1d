"""The fused, chunked LM head + cross-entropy (pipeline/loss.py) against the plain computation on whole logits.

The oracle: the unsharded model's full logits, `lm_loss` and z · mean(logsumexp(logits)²), in fp32. The chunked
loss must give the same loss, z-loss and gradients (≤ 1e-5) in one process, vocab-parallel at tp2 (one torchrun
launch, this file is its worker), and through the DeepSpeed engine (tp2 + ZeRO-3, pp2 + ZeRO-1), and it must
never hold a [tokens, vocabulary] tensor for the whole micro batch.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

ARCHS = ("gpt", "llama")
VOCAB, Z = 1000, 0.1


def model_config(arch):
    from pipeline.config import ModelConfig

    return ModelConfig(arch=arch, num_layers=2, hidden_size=32, num_heads=4, kv_heads=2 if arch == "llama" else None,
                       ffn_hidden_size=64, vocab_size=VOCAB, seq_len=16, make_vocab_size_divisible_by=64)


def batch():
    """Tokens [3, 17] and labels with IGNORE (-100) positions, as data.mask_eod_loss makes them."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=g)
    labels = tokens[:, 1:].clone()
    labels[0, :5] = -100
    labels[2, 9] = -100
    return tokens[:, :-1], labels


def plain(model, inputs, labels):
    """(loss, z-loss, {name: grad}) from the whole logits: the oracle."""
    from pipeline.model import lm_loss

    model.zero_grad(set_to_none=True)
    logits = model(inputs).float()
    mask = labels != -100
    ce = lm_loss(logits, labels.clamp(min=0), mask)
    z = Z * (torch.logsumexp(logits, -1).square() * mask).sum() / mask.sum()
    (ce + z).backward()
    return ce.item(), z.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def chunked(model, inputs, labels, chunk):
    model.zero_grad(set_to_none=True)
    model.lm_head.chunk_tokens = chunk
    ce, lse_sq = model(inputs, labels=labels)
    (ce + Z * lse_sq).backward()
    return ce.item(), Z * lse_sq.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_same(got, want):
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got[1] == pytest.approx(want[1], rel=1e-5)
    assert set(got[2]) == set(want[2])
    for name, g in want[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [1, 7, 0])  # one token at a time, chunks that do not divide 48 tokens, auto
def test_chunked_equals_plain_in_value_and_gradients(arch, chunk):
    from pipeline.model import build_model

    model = build_model(model_config(arch), seed=3)
    inputs, labels = batch()
    assert_same(chunked(model, inputs, labels, chunk), plain(model, inputs, labels))


def test_no_tensor_spans_the_micro_batch_and_the_vocabulary():
    """Every tensor with a vocabulary-sized dimension made in forward + backward is at most one chunk (or the
    weight, whose other dimension is hidden = 32) long in tokens; the 48-token micro batch never appears."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pipeline.model import build_model

    model = build_model(model_config("llama"), seed=3)
    inputs, labels = batch()
    model.lm_head.chunk_tokens = 8
    largest = []

    class Probe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and model.padded_vocab_size in t.shape:
                    largest.append(t.numel() // model.padded_vocab_size)
            return out

    with Probe():
        ce, lse_sq = model(inputs, labels=labels)
        (ce + Z * lse_sq).backward()
    assert largest and max(largest) <= 32 < inputs.numel()


def test_auto_chunk_bounds_the_logits_of_a_large_vocabulary():
    from pipeline.loss import auto_chunk_tokens

    assert auto_chunk_tokens(128_256) * 128_256 * 4 <= 130 * 2**20  # ~128 MiB of fp32 logits per chunk
    assert auto_chunk_tokens(1024) >= 4096  # small vocabularies: one chunk covers a micro batch


def test_z_loss_is_logged_apart_from_the_loss(tmp_path, token_dir):
    """A real run with train.z_loss: every metrics line carries `z_loss`, z · mean(lse²) ≈ z · log(V)² at init."""
    import json
    import math

    import yaml

    from tests.conftest import run_cli

    cfg = {"model": {"arch": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "seq_len": 32},
           "parallel": {"zero_stage": 0},
           "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}]},
           "train": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 2, "z_loss": 1e-3},
           "checkpoint": {"dir": str(tmp_path / "ckpt")},
           "log": {"interval": 1, "jsonl": str(tmp_path / "log.jsonl")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_cli("-m", "pipeline.train", "--config", str(tmp_path / "run.yaml"), timeout=300)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    vocab = json.loads((token_dir / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert r["z_loss"] == pytest.approx(1e-3 * math.log(vocab) ** 2, rel=0.1)
        assert r["loss"] == pytest.approx(math.log(vocab), rel=0.1)  # the cross-entropy alone


# ---- tp2 and the engine, in one torchrun launch ----

@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    from tests.conftest import torchrun

    out = tmp_path_factory.mktemp("chunked_tp2")
    torchrun(2, __file__, str(out), timeout=600)
    return torch.load(out / "tp2.pt")


@pytest.mark.parametrize("arch", ARCHS)
def test_vocab_parallel_chunked_equals_plain_at_tp2(tp2, arch):
    from pipeline.model import build_model

    model = build_model(model_config(arch), seed=3)
    assert_same(tp2[arch], plain(model, *batch()))


@pytest.mark.parametrize("layout", ["tp2_zero3", "pp2_zero1"])
def test_engine_reports_loss_and_z_loss_of_the_formula(tp2, layout):
    """The engine's first step: loss = mean cross-entropy, last_z_loss = z · mean(lse²), micro batch by micro
    batch, as the plain model computes them."""
    from pipeline.model import build_model
    from tests.test_parallel_parity import global_batch, run_config

    arch = "llama" if layout.startswith("tp") else "gpt"
    cfg = run_config(arch)
    model = build_model(cfg.model, seed=cfg.train.seed)
    ces, zs = [], []
    with torch.no_grad():
        for mb in global_batch(0).split(cfg.train.micro_batch_size):
            ce, z, _ = plain_no_grad(model, mb[:, :-1], mb[:, 1:])
            ces.append(ce)
            zs.append(z)
    got = tp2[layout]
    assert got["loss"] == pytest.approx(sum(ces) / len(ces), rel=1e-5)
    assert got["z_loss"] == pytest.approx(sum(zs) / len(zs), rel=1e-5)
    assert got["z_loss"] > 0


def plain_no_grad(model, inputs, labels):
    from pipeline.model import lm_loss

    logits = model(inputs).float()
    return lm_loss(logits, labels).item(), Z * torch.logsumexp(logits, -1).square().mean().item(), None


def _worker(out: str) -> None:
    import gc

    from pipeline import dist
    from pipeline.engine import build_engine
    from pipeline.model import build_model
    from pipeline.parallel.groups import ParallelState
    from pipeline.parallel.tp import apply_tp, merge_tp_shards
    from tests.test_parallel_parity import global_batch, run_config

    dist.init_distributed(300)
    state = ParallelState(2, 1)
    results = {}
    for arch in ARCHS:  # the vocab-parallel head alone, no DeepSpeed: gradients gathered and merged
        cfg = model_config(arch)
        model = build_model(cfg, seed=3, tp=2)
        apply_tp(model, state)
        ce, z, grads = chunked(model, *batch(), chunk=5)
        shards = [None, None]
        torch.distributed.all_gather_object(shards, grads)
        results[arch] = (ce, z, merge_tp_shards(shards, cfg))  # vocabulary padded as at tp1: 1024 rows
    for layout, (arch, tp, pp, zero) in {"tp2_zero3": ("llama", 2, 1, 3), "pp2_zero1": ("gpt", 1, 2, 1)}.items():
        cfg = run_config(arch, tp, pp, zero)
        cfg.train.z_loss, cfg.train.loss_chunk_tokens = Z, 6
        engine = build_engine(cfg)
        per = 8 // engine.dp_size
        loss = engine.train_step(global_batch(0)[engine.dp_rank * per:(engine.dp_rank + 1) * per])
        results[layout] = {"loss": loss, "z_loss": engine.last_z_loss}
        del engine
        gc.collect()
    if dist.rank() == 0:
        torch.save(results, os.path.join(out, "tp2.pt"))
    dist.exit_cleanly(0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch.set_num_threads(1)
    _worker(sys.argv[1])
