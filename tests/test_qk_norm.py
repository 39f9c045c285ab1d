"""model.qk_norm: a llama trained with per-head q/k RMSNorm under tensor parallelism exports (`convert to-hf`) as
transformers' Qwen3ForCausalLM, whose logits equal ours; the trained norms land on q_norm/k_norm, not swapped."""
import pytest
import torch
import yaml


def test_to_hf_logits_equal_transformers_qwen3(tmp_path, token_dir):
    import transformers

    from pipeline import convert
    from pipeline.generate import load_model
    from tests.launch import run_ranks

    cfg = {"model": {"arch": "llama", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "kv_heads": 2,
                     "seq_len": 32, "qk_norm": True},
           "parallel": {"tp": 2, "zero_stage": 1},
           "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}]},
           "train": {"steps": 4, "global_batch_size": 2, "micro_batch_size": 2, "lr": 2e-2, "warmup_steps": 1},
           "checkpoint": {"dir": str(tmp_path / "ckpt")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    codes = run_ranks(2, "--config", str(tmp_path / "run.yaml"), log_dir=tmp_path)
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    convert.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ours = load_model(str(tmp_path / "ckpt"))
    sd = ours.state_dict()
    for i, layer in enumerate(hf.model.layers):
        for which in ("q_norm", "k_norm"):
            trained = sd[f"layers.{i}.attn.{which}.weight"]
            assert not torch.allclose(trained, torch.ones_like(trained), atol=1e-3)  # training moved them
            assert torch.equal(getattr(layer.self_attn, which).weight, trained), (i, which)
    x = torch.randint(0, ours.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
    with torch.no_grad():  # the norms matter: without them transformers' logits move
        for layer in hf.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
        assert (hf(x).logits - ours(x)).abs().max().item() > 1e-3


def test_qk_norm_is_llama_only():
    from pipeline.config import from_dict

    with pytest.raises(ValueError, match="model.qk_norm needs model.arch llama"):
        from_dict({"data": {"datasets": [{"path": "d", "weight": 1}]}, "model": {"arch": "gpt", "qk_norm": True}})
