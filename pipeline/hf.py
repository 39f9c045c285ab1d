"""Name and layout mapping between our model and Hugging Face's LlamaForCausalLM / GPT2LMHeadModel."""
from __future__ import annotations

import torch

from .config import ModelConfig

HF_ARCH = {"llama": "LlamaForCausalLM", "gpt": "GPT2LMHeadModel"}


def hf_config(m: ModelConfig, tok: dict | None):
    """The transformers config object for a model config (special ids from the tokenizer description)."""
    import transformers

    ids = {"bos_token_id": (tok or {}).get("bos_id", 1), "eos_token_id": (tok or {}).get("eod_id", 2)}
    if m.arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads,
            max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
            tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
            initializer_range=m.init_std, **ids)
        cfg.architectures = ["LlamaForCausalLM"]
        return cfg
    if m.kv_heads != m.num_heads or not m.tie_embeddings:
        raise ValueError("GPT2LMHeadModel needs kv_heads == num_heads and tied embeddings")
    cfg = transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.seq_len, n_embd=m.hidden_size, n_layer=m.num_layers,
        n_head=m.num_heads, n_inner=m.ffn_hidden_size, activation_function="gelu_new",
        layer_norm_epsilon=m.norm_eps, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
        initializer_range=m.init_std, **ids)
    cfg.architectures = ["GPT2LMHeadModel"]
    return cfg


def _refuse_unsupported(hf, checks: dict) -> None:
    """Features of the HF config that our model does not implement: refuse rather than convert wrongly."""
    bad = [f"{k}={getattr(hf, k, None)!r} (need {want!r})" for k, want in checks.items()
           if getattr(hf, k, want) != want]
    if bad:
        raise ValueError(f"the Hugging Face config uses features our model lacks: {', '.join(bad)}")


def model_config_from_hf(hf) -> ModelConfig:
    """Our ModelConfig for a transformers config (LlamaConfig or GPT2Config)."""
    t = getattr(hf, "model_type", None)
    if t == "llama":
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        _refuse_unsupported(hf, {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                                 "head_dim": hf.hidden_size // hf.num_attention_heads})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"the Hugging Face config uses RoPE scaling {rope}, which our model lacks")
        return ModelConfig(arch="llama", num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
                           num_heads=hf.num_attention_heads, kv_heads=hf.num_key_value_heads,
                           ffn_hidden_size=hf.intermediate_size, vocab_size=hf.vocab_size,
                           seq_len=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
                           rope_theta=float(getattr(hf, "rope_theta", None) or
                                            (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
                           tie_embeddings=bool(hf.tie_word_embeddings), init_std=hf.initializer_range)
    if t == "gpt2":
        _refuse_unsupported(hf, {"activation_function": "gelu_new", "scale_attn_by_inverse_layer_idx": False,
                                 "reorder_and_upcast_attn": False, "scale_attn_weights": True})
        return ModelConfig(arch="gpt", num_layers=hf.n_layer, hidden_size=hf.n_embd, num_heads=hf.n_head,
                           kv_heads=hf.n_head, ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, vocab_size=hf.vocab_size,
                           seq_len=hf.n_positions, norm_eps=hf.layer_norm_epsilon, tie_embeddings=True,
                           init_std=hf.initializer_range)
    raise ValueError(f"model type '{t}' is not supported: convert a llama or gpt2 model")


_LLAMA_LAYER = {"input_norm.weight": "input_layernorm.weight", "post_attn_norm.weight": "post_attention_layernorm.weight",
                "attn.q_proj.weight": "self_attn.q_proj.weight", "attn.k_proj.weight": "self_attn.k_proj.weight",
                "attn.v_proj.weight": "self_attn.v_proj.weight", "attn.o_proj.weight": "self_attn.o_proj.weight",
                "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.up_proj.weight": "mlp.up_proj.weight",
                "mlp.down_proj.weight": "mlp.down_proj.weight"}
_GPT_LAYER = {"input_norm.weight": "ln_1.weight", "input_norm.bias": "ln_1.bias",
              "post_attn_norm.weight": "ln_2.weight", "post_attn_norm.bias": "ln_2.bias",
              "attn.o_proj.weight": "attn.c_proj.weight", "attn.o_proj.bias": "attn.c_proj.bias",
              "mlp.up_proj.weight": "mlp.c_fc.weight", "mlp.up_proj.bias": "mlp.c_fc.bias",
              "mlp.down_proj.weight": "mlp.c_proj.weight", "mlp.down_proj.bias": "mlp.c_proj.bias"}


def _same(w):
    return w


def _t(w):
    return w.t() if w.dim() == 2 else w


def _qkv(q, k, v):
    return torch.cat([q, k, v]).t()


def _cat(*xs):
    return torch.cat(xs)


def to_hf_plan(m: ModelConfig) -> dict:
    """HF parameter name → (our parameter names, function of those tensors giving the HF tensor), in file order.
    GPT-2's Conv1D weights are [in, out], hence the transposes; its fused c_attn is q, k, v concatenated."""
    plan = {}
    if m.arch == "llama":
        plan["model.embed_tokens.weight"] = (("embed_tokens.weight",), _same)
        for i in range(m.num_layers):
            for ours, theirs in _LLAMA_LAYER.items():
                plan[f"model.layers.{i}.{theirs}"] = ((f"layers.{i}.{ours}",), _same)
        plan["model.norm.weight"] = (("norm.weight",), _same)
        if not m.tie_embeddings:
            plan["lm_head.weight"] = (("lm_head.weight",), _same)
        return plan
    plan["transformer.wte.weight"] = (("embed_tokens.weight",), _same)
    plan["transformer.wpe.weight"] = (("embed_positions.weight",), _same)
    for i in range(m.num_layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in _GPT_LAYER.items():
            plan[q + theirs] = ((p + ours,), _t)
        plan[q + "attn.c_attn.weight"] = (tuple(p + f"attn.{x}_proj.weight" for x in "qkv"), _qkv)
        plan[q + "attn.c_attn.bias"] = (tuple(p + f"attn.{x}_proj.bias" for x in "qkv"), _cat)
    plan["transformer.ln_f.weight"] = (("norm.weight",), _same)
    plan["transformer.ln_f.bias"] = (("norm.bias",), _same)
    return plan


def to_hf_state_dict(sd: dict, m: ModelConfig) -> dict:
    """Our state dict → the HF model's (materialised; `to_hf_plan` is the lazy form)."""
    return {k: fn(*(sd[n] for n in names)).contiguous() for k, (names, fn) in to_hf_plan(m).items()}


def from_hf_state_dict(hf_sd: dict, m: ModelConfig) -> dict:
    """The HF model's state dict → ours (inverse of `to_hf_state_dict`)."""
    sd = {}
    if m.arch == "llama":
        sd["embed_tokens.weight"] = hf_sd["model.embed_tokens.weight"]
        sd["norm.weight"] = hf_sd["model.norm.weight"]
        sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"] if m.tie_embeddings else hf_sd["lm_head.weight"]
        for i in range(m.num_layers):
            for ours, theirs in _LLAMA_LAYER.items():
                sd[f"layers.{i}.{ours}"] = hf_sd[f"model.layers.{i}.{theirs}"]
        return sd
    sd["embed_tokens.weight"] = hf_sd["transformer.wte.weight"]
    sd["lm_head.weight"] = hf_sd["transformer.wte.weight"]
    sd["embed_positions.weight"] = hf_sd["transformer.wpe.weight"]
    sd["norm.weight"], sd["norm.bias"] = hf_sd["transformer.ln_f.weight"], hf_sd["transformer.ln_f.bias"]
    h = m.hidden_size
    for i in range(m.num_layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in _GPT_LAYER.items():
            w = hf_sd[q + theirs]
            sd[p + ours] = w.t() if w.dim() == 2 else w
        w, b = hf_sd[q + "attn.c_attn.weight"].t(), hf_sd[q + "attn.c_attn.bias"]
        for j, x in enumerate("qkv"):
            sd[p + f"attn.{x}_proj.weight"] = w[j * h:(j + 1) * h]
            sd[p + f"attn.{x}_proj.bias"] = b[j * h:(j + 1) * h]
    return {k: v.contiguous() for k, v in sd.items()}
