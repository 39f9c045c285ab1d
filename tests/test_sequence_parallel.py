"""Ulysses sequence parallelism (`parallel.sp`) trains exactly like the single-process model, on real DeepSpeed
engines: sp2 alone (ZeRO-1), with ZeRO-3, and with tp2 (4 ranks), for the losses of 3 steps and an evaluation
(the oracle of tests/test_parallel_parity.py: the unsharded model under torch's AdamW), and resumes exactly.
One torchrun launch per world size (this file is its worker)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

LAYOUTS = {  # name: (world, tp, sp, zero_stage, archs)
    "sp2_zero1": (2, 1, 2, 1, ("llama",)),
    "sp2_zero3": (2, 1, 2, 3, ("gpt", "llama")),
    "sp2_tp2_zero3": (4, 2, 2, 3, ("gpt",)),  # llama's 2 kv heads cannot split over tp·sp = 4
}
CASES = [(name, arch) for name, (*_, archs) in LAYOUTS.items() for arch in archs]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.conftest import torchrun

    out = tmp_path_factory.mktemp("sp")
    for world in sorted({w for w, *_ in LAYOUTS.values()}):
        torchrun(world, __file__, str(out), timeout=900)
    return out


@pytest.fixture(scope="module")
def oracles():
    from tests.test_parallel_parity import oracle

    return {arch: oracle(arch)[0] for arch in ("gpt", "llama")}


@pytest.mark.parametrize("layout,arch", CASES)
def test_sequence_parallel_matches_single_process_model(results, oracles, layout, arch):
    got = torch.load(results / f"{arch}_{layout}.pt")
    assert got["seq_per_rank"] == 8  # seq_len 16 over sp 2: each rank really holds half of every sequence
    assert got["losses"][0] == pytest.approx(oracles[arch][0], rel=1e-5)  # the first step
    assert got["losses"] == pytest.approx(oracles[arch], rel=1e-5)  # 3 steps, then eval_loss


EOD = 7


def packed_batch() -> torch.Tensor:
    """Global batch 0 with an EOD every 5 tokens: documents of 5 tokens, some across the sp slices' border."""
    from tests.test_parallel_parity import global_batch

    batch = global_batch(0).clone()
    batch[batch == EOD] = EOD + 1
    batch[:, 4::5] = EOD
    return batch


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_block_causal_first_step_matches_single_process_model(results, arch):
    """model.attn_mask_type block_causal at sp2 + ZeRO-3: documents, positions and the mask come from the whole
    sequence, so the first-step loss is the unsplit model's."""
    from pipeline.model import build_model, lm_loss
    from tests.test_parallel_parity import run_config

    cfg = run_config(arch)
    cfg.model.attn_mask_type, cfg.model.eod_id = "block_causal", EOD
    model = build_model(cfg.model, seed=cfg.train.seed)
    causal = build_model(run_config(arch).model, seed=cfg.train.seed)
    with torch.no_grad():
        micro = packed_batch().split(cfg.train.micro_batch_size)
        want = sum(lm_loss(model(mb[:, :-1]), mb[:, 1:]).item() for mb in micro) / len(micro)
        unpacked = sum(lm_loss(causal(mb[:, :-1]), mb[:, 1:]).item() for mb in micro) / len(micro)
    got = torch.load(results / f"{arch}_block_causal.pt")
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert unpacked != pytest.approx(want, rel=1e-4)  # the documents do change the loss


def test_sequence_parallel_resumes_exactly(results):
    got = torch.load(results / "resume.pt")
    assert got["resumed"] == got["straight"][3:]


def test_sequence_parallel_checkpoint_reads_and_exports_like_any_other(results, tmp_path):
    """The sp2 + ZeRO-3 checkpoint: its weights, read in one process, are the engine's, and `to-hf` loads in
    transformers."""
    import transformers

    from pipeline.checkpoint.read import open_checkpoint
    from tests.conftest import run_cli

    want = torch.load(results / "resume.pt")["weights"]
    got, _, tag, _ = open_checkpoint(str(results / "ckpt"))
    assert tag == "global_step3" and set(got.keys()) >= set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    run_cli("-m", "pipeline.convert", "to-hf", str(results / "ckpt"), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(hf.model.embed_tokens.weight, want["embed_tokens.weight"])


@pytest.mark.parametrize("overrides,message", [
    ({"parallel": {"sp": 2}, "model": {"num_heads": 3, "hidden_size": 48}}, "divisible by parallel.tp x parallel.sp = 2"),
    ({"parallel": {"sp": 2, "tp": 2}, "model": {"num_heads": 4, "kv_heads": 2}}, "divisible by parallel.tp x parallel.sp = 4"),
    ({"parallel": {"sp": 3}, "model": {"num_heads": 6, "hidden_size": 48, "seq_len": 16}}, "model.seq_len 16 is not divisible by parallel.sp 3"),
    ({"parallel": {"sp": 2, "pp": 2, "zero_stage": 1}}, "parallel.sp 2 with parallel.pp 2"),
])
def test_impossible_sequence_parallel_layouts_are_refused(overrides, message):
    from pipeline.config import from_dict

    base = {"model": {"num_layers": 2, "vocab_size": 100, "seq_len": 16}, "data": {"datasets": [{"path": "x"}]}}
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        from_dict(base, overrides)


def test_data_parallel_size_counts_sequence_parallel_ranks():
    from pipeline.config import from_dict, validate

    cfg = from_dict({"model": {"vocab_size": 100, "num_heads": 4, "seq_len": 16}, "parallel": {"sp": 2, "tp": 2},
                     "train": {"global_batch_size": 8, "micro_batch_size": 2}, "data": {"datasets": [{"path": "x"}]}})
    validate(cfg, world_size=8)  # dp = 8 / (tp 2 x sp 2) = 2: 8 = 2 x 2 x 2
    with pytest.raises(ValueError, match="parallel.tp\\*parallel.pp\\*parallel.sp = 4"):
        validate(cfg, world_size=6)


def test_resume_across_sp_follows_the_zero_partitions(tmp_path):
    """ZeRO partitions over data x sequence parallel ranks: changing sp at the same world size loads; the same
    sp on fewer ranks is another layout."""
    import json

    from pipeline.checkpoint import layout_change

    tag = tmp_path / "global_step2"
    tag.mkdir()
    (tag / "run_config.json").write_text(json.dumps({"parallel": {"tp": 1, "pp": 1, "sp": 2, "zero_stage": 3}}))
    (tag / "COMMITTED").write_text(json.dumps({"world_size": 2}))
    sp1 = {"tp": 1, "pp": 1, "sp": 1, "zero_stage": 3}
    assert layout_change(str(tmp_path), tag.name, sp1, 2) is None
    assert "dp 2 -> 1" in layout_change(str(tmp_path), tag.name, sp1, 1)


def test_plan_counts_sequence_parallel_activations_and_refuses_bad_layouts():
    from pipeline.config import from_dict
    from pipeline.plan import memory_per_gpu, plan

    def cfg(sp, heads=8, hidden=1024):
        return from_dict({"model": {"num_layers": 8, "hidden_size": hidden, "num_heads": heads, "vocab_size": 32000,
                                    "seq_len": 4096}, "parallel": {"sp": sp},
                          "train": {"global_batch_size": 8, "micro_batch_size": 1},
                          "data": {"datasets": [{"path": "unused"}]}}, check=False)

    one, two = (memory_per_gpu(cfg(sp), sp, False)["activations"] for sp in (1, 2))
    assert 0.45 < two / one < 0.65  # seq_len/sp tokens per rank (the loss head's fp32 buffers stay)
    lines, problems = plan(cfg(2), world_size=4)
    assert not problems and "dp 2 x tp 1 x pp 1 x sp 2" in lines[0]
    lines, problems = plan(cfg(2, heads=3, hidden=768), world_size=4)
    assert any("divisible by parallel.tp x parallel.sp = 2" in p for p in problems)


# ---- the worker: torchrun --nproc_per_node W tests/test_sequence_parallel.py OUT ----

def _train(engine, cfg, steps, start=0):
    from pipeline.optim import Schedule, lr_at
    from tests.test_parallel_parity import global_batch

    schedule = Schedule.from_train_config(cfg.train)
    per = 8 // engine.dp_size
    losses = []
    for s in range(start, start + steps):
        engine.set_lr(lr_at(s, schedule))
        losses.append(engine.train_step(global_batch(s)[engine.dp_rank * per:(engine.dp_rank + 1) * per]))
    return losses


def _worker(out: str) -> None:
    import gc

    from pipeline import checkpoint, dist
    from pipeline.engine import build_engine
    from pipeline.config import validate
    from tests.test_parallel_parity import global_batch, run_config

    dist.init_distributed(600)
    world, rank = dist.world_size(), dist.rank()
    for layout, (w, tp, sp, zero, archs) in LAYOUTS.items():
        if w != world:
            continue
        for arch in archs:
            cfg = run_config(arch, tp, 1, zero)
            cfg.parallel.sp = sp
            validate(cfg, world)
            engine = build_engine(cfg)
            losses = _train(engine, cfg, 3)
            inputs, _ = next(engine._micro_batches(global_batch(99)))
            losses.append(engine.eval_loss(global_batch(99)[:8 // engine.dp_size]))
            if rank == 0:
                torch.save({"losses": losses, "seq_per_rank": inputs.shape[1]}, os.path.join(out, f"{arch}_{layout}.pt"))
            del engine
            gc.collect()
    if world == 2:  # block_causal at sp2 + ZeRO-3: the first step on packed documents
        for arch in ("gpt", "llama"):
            cfg = run_config(arch, 1, 1, 3)
            cfg.parallel.sp, cfg.model.attn_mask_type, cfg.model.eod_id = 2, "block_causal", EOD
            engine = build_engine(cfg)
            loss = engine.train_step(packed_batch())
            if rank == 0:
                torch.save({"loss": loss}, os.path.join(out, f"{arch}_block_causal.pt"))
            del engine
            gc.collect()
    if world == 2:  # exact resume at sp2 + ZeRO-3: 3 steps, save, a fresh engine loads, 2 more steps
        cfg = run_config("llama", 1, 1, 3)
        cfg.parallel.sp = 2
        ckpt = os.path.join(out, "ckpt")
        engine = build_engine(cfg)
        straight = _train(engine, cfg, 5)
        del engine
        engine = build_engine(cfg)
        _train(engine, cfg, 3)
        checkpoint.save(engine.engine, ckpt, 3, {"step": 3}, cfg.to_dict(), keep=2, sync=False)
        weights = engine.full_state_dict()
        del engine
        gc.collect()
        engine = build_engine(cfg)
        checkpoint.load(engine.engine, ckpt, checkpoint.tag_for(3))
        resumed = _train(engine, cfg, 2, start=3)
        if rank == 0:
            torch.save({"straight": straight, "resumed": resumed, "weights": weights}, os.path.join(out, "resume.pt"))
    dist.exit_cleanly(0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch.set_num_threads(1)
    _worker(sys.argv[1])
