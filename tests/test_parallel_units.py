"""Tensor- and pipeline-parallel pieces that need no process group: state-dict rules, the RNG rule, refusals."""
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model import build_model
from pipeline.parallel import (merge_tp_shards, pipe_layer_to_names, pipe_state_to_model, shard_for_tp,
                               strip_vocab_padding)
from pipeline.parallel.random import tp_rng
from tests.conftest import ROOT, run_cli

CASES = [  # (arch, kv_heads, tp)
    ("gpt", None, 2), ("gpt", None, 4), ("llama", 2, 2), ("llama", 4, 4),
]


def cfg_for(arch, kv_heads=None, vocab=100):
    return ModelConfig(arch=arch, num_layers=3, hidden_size=32, num_heads=4, kv_heads=kv_heads, ffn_hidden_size=64,
                       vocab_size=vocab, seq_len=16, make_vocab_size_divisible_by=8)


@pytest.mark.parametrize("arch,kv,tp", CASES)
def test_shard_then_merge_is_identity_for_padded_and_unpadded_inputs(arch, kv, tp):
    cfg = cfg_for(arch, kv)
    full = build_model(cfg, seed=0).state_dict()
    unpadded = strip_vocab_padding(full, cfg)
    for source in (full, unpadded):
        shards = [shard_for_tp(source, cfg, r, tp) for r in range(tp)]
        assert shards[0]["embed_tokens.weight"].shape[0] * tp % (8 * tp) == 0
        merged = strip_vocab_padding(merge_tp_shards(shards, cfg), cfg)
        assert set(merged) == set(unpadded)
        for k, v in unpadded.items():
            assert torch.equal(merged[k], v), k


def test_tp_shards_split_heads_and_keep_replicated_tensors_whole():
    cfg = cfg_for("gpt")
    shard = shard_for_tp(build_model(cfg, seed=0).state_dict(), cfg, 1, 2)
    assert shard["layers.0.attn.q_proj.weight"].shape == (16, 32)
    assert shard["layers.0.attn.o_proj.weight"].shape == (32, 16)
    assert shard["layers.0.attn.o_proj.bias"].shape == (32,)       # after a row-parallel layer: replicated
    assert shard["layers.0.input_norm.weight"].shape == (32,)
    assert shard["embed_positions.weight"].shape == (16, 32)
    assert shard["embed_tokens.weight"].shape == (56, 32)          # 100 → 112 (multiple of 8·2) / 2


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_pipe_layer_map_covers_every_parameter_once(arch):
    cfg = cfg_for(arch, 2 if arch == "llama" else None)
    model = build_model(cfg, seed=0)
    names = [n for layer in pipe_layer_to_names(cfg).values() for n in layer.values()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    block = {k[len("layers.1."):]: v for k, v in model.state_dict().items() if k.startswith("layers.1.")}
    assert set(pipe_state_to_model(2, block, cfg)) == {f"layers.1.{k}" for k in block}
    with pytest.raises(ValueError, match="unexpected keys"):
        pipe_state_to_model(0, {"bogus": torch.zeros(1)}, cfg)


def test_tp_rng_differs_per_rank_replays_and_leaves_the_shared_stream_alike():
    def run(tp_rank):
        torch.manual_seed(5)
        with tp_rng(tp_rank):
            inside = torch.rand(4)
        return inside, torch.rand(4)

    in0, after0 = run(0)
    in1, after1 = run(1)
    again, _ = run(0)
    assert not torch.equal(in0, in1)    # different heads, different dropout masks
    assert torch.equal(in0, again)      # recomputation (checkpointing) replays the same mask
    assert torch.equal(after0, after1)  # the replicated stream stays identical across TP ranks


@pytest.mark.parametrize("overrides,message", [
    (["parallel.zero_stage=3"], "parallel.zero_stage 3 with parallel.pp 2"),
    (["parallel.zero_stage=0", "train.precision=bf16"], "parallel.zero_stage 0 with parallel.pp 2 and train.precision bf16"),
])
def test_pipeline_layouts_deepspeed_cannot_run_are_refused_before_start(tmp_path, overrides, message):
    proc = run_cli("-m", "pipeline.train", "--config", str(ROOT / "configs" / "tiny.yaml"), "parallel.pp=2",
                   *overrides, check=False, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "zero_stage=1" in lines[0]


@pytest.mark.parametrize("arch,kv,tp", CASES + [("gpt", None, 1)])
def test_meta_model_materialises_exactly_this_ranks_shard(arch, kv, tp):
    from types import SimpleNamespace

    from pipeline.parallel.tp import apply_tp, materialize

    cfg = cfg_for(arch, kv)
    eager = build_model(cfg, seed=3, tp=tp).state_dict()
    for rank in range(tp):
        meta = build_model(cfg, seed=3, tp=tp, device="meta")
        apply_tp(meta, SimpleNamespace(tp=tp, coord=SimpleNamespace(tp=rank), tp_group=None))
        materialize(meta)
        got = meta.state_dict()
        want = shard_for_tp(eager, cfg, rank, tp)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        if cfg.tie_embeddings:
            assert meta.lm_head.weight is meta.embed_tokens.weight


def test_frozen_tied_embedding_in_a_pipeline_is_refused():
    from pipeline.engine import build_engine
    from tests.test_parallel_parity import run_config

    cfg = run_config("gpt", tp=1, pp=2, zero=1)
    cfg.train.freeze_layers = 1
    with pytest.raises(ValueError, match="train.freeze_layers with parallel.pp"):
        build_engine(cfg)
