"""The plain model: shapes, padding, initialisation, checkpointing, FLOPs, and the shipped configs."""
import glob
import math
import os

import pytest
import torch

from pipeline.config import ModelConfig, load_config
from pipeline.model import Transformer, build_model, flops_per_token, lm_loss, num_params
from tests.conftest import ROOT


def cfg_for(arch, **kw):
    base = dict(arch=arch, num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=64, vocab_size=100, seq_len=16,
                make_vocab_size_divisible_by=8)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_padding_never_changes_the_model(arch):
    cfg = cfg_for(arch)
    one, four = build_model(cfg, seed=1), build_model(cfg, seed=1, tp=4)
    assert (one.padded_vocab_size, four.padded_vocab_size) == (104, 128)
    assert four.embed_tokens.weight[100:].abs().max() == 0
    x = torch.randint(0, 100, (2, 16))
    assert one(x).shape == (2, 16, 100)
    assert torch.equal(one(x), four(x))


def test_arch_shapes_gqa_and_tying():
    gpt = build_model(cfg_for("gpt"), seed=0)
    llama = build_model(cfg_for("llama", kv_heads=2), seed=0)
    assert gpt.lm_head.weight is gpt.embed_tokens.weight and hasattr(gpt, "embed_positions")
    assert llama.lm_head.weight is not llama.embed_tokens.weight and not hasattr(llama, "embed_positions")
    assert llama.layers[0].attn.k_proj.weight.shape == (16, 32)  # 2 kv heads of 8
    assert isinstance(gpt.norm, torch.nn.LayerNorm) and type(llama.norm).__name__ == "RMSNorm"
    assert hasattr(llama.layers[0].mlp, "gate_proj") and not hasattr(gpt.layers[0].mlp, "gate_proj")


def test_residual_output_projections_are_scaled_down():
    cfg = cfg_for("llama", num_layers=8, hidden_size=256, ffn_hidden_size=512, num_heads=8)
    m = build_model(cfg, seed=0)
    std_in = m.layers[0].attn.q_proj.weight.std().item()
    std_out = m.layers[0].attn.o_proj.weight.std().item()
    assert std_in == pytest.approx(0.02, rel=0.05)
    assert std_out == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_activation_checkpointing_gives_the_same_gradients(arch):
    x = torch.randint(0, 100, (2, 17))
    grads = []
    for ckpt in (False, True):
        m = build_model(cfg_for(arch, dropout=0.1), seed=0)
        m.checkpoint_activations = ckpt
        torch.manual_seed(3)
        lm_loss(m(x[:, :-1]), x[:, 1:]).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_flops_per_token_matches_its_formula():
    cfg = cfg_for("llama", kv_heads=2)
    m = build_model(cfg, seed=0)
    n_matmul = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and n != "embed_tokens.weight")
    h, L, s = cfg.hidden_size, cfg.num_layers, cfg.seq_len
    n_matmul -= (m.padded_vocab_size - cfg.vocab_size) * h  # padding rows do no useful work
    assert flops_per_token(cfg) == 6 * n_matmul + 12 * L * h * s


EXPECTED_PARAMS = {"gpt3-125m": 125e6, "gpt3-350m": 350e6, "gpt3-1.3b": 1.3e9, "gpt3-6.7b": 6.7e9,
                   "gpt3-13b": 13e9, "gpt3-175b": 175e9, "llama-1b": 1.1e9, "llama-7b": 6.7e9}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_shipped_configs_have_their_named_size(name):
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    with torch.device("meta"):
        m = Transformer(cfg.model, tp=cfg.parallel.tp)
    real = num_params(m) - (m.padded_vocab_size - m.vocab_size) * cfg.model.hidden_size * \
        (1 if cfg.model.tie_embeddings else 2)
    assert real == pytest.approx(EXPECTED_PARAMS[name], rel=0.04)
    assert m.padded_vocab_size % (128 * cfg.parallel.tp) == 0


def test_every_config_loads():
    """Every shipped config loads and validates (load_config raises on a problem), and the glob found them."""
    paths = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
    assert {os.path.basename(p)[:-5] for p in paths} >= set(EXPECTED_PARAMS) | {"tiny"}, paths
    for path in paths:
        cfg = load_config(path)
        assert cfg.model.ffn_hidden_size and cfg.model.kv_heads and cfg.data.datasets, path
