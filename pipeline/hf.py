"""Name and layout mapping between our model and Hugging Face's LlamaForCausalLM / GPT2LMHeadModel."""
from __future__ import annotations

import torch

from .config import ModelConfig, resolve_model_defaults

HF_ARCH = {"llama": "LlamaForCausalLM", "gpt": "GPT2LMHeadModel"}


def hf_config(m: ModelConfig, tok: dict | None):
    """The transformers config object for a model config (special ids from the tokenizer description)."""
    import transformers

    resolve_model_defaults(m)
    ids = {"bos_token_id": (tok or {}).get("bos_id", 1), "eos_token_id": (tok or {}).get("eod_id", 2)}
    if m.arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads,
            max_position_embeddings=m.seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
            tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
            initializer_range=m.init_std, **ids)
    if m.kv_heads != m.num_heads or not m.tie_embeddings:
        raise ValueError("GPT2LMHeadModel needs kv_heads == num_heads and tied embeddings")
    return transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.seq_len, n_embd=m.hidden_size, n_layer=m.num_layers,
        n_head=m.num_heads, n_inner=m.ffn_hidden_size, activation_function="gelu_new",
        layer_norm_epsilon=m.norm_eps, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
        initializer_range=m.init_std, **ids)


def model_config_from_hf(hf) -> ModelConfig:
    """Our ModelConfig for a transformers config (LlamaConfig or GPT2Config)."""
    t = getattr(hf, "model_type", None)
    if t == "llama":
        return ModelConfig(arch="llama", num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
                           num_heads=hf.num_attention_heads, kv_heads=hf.num_key_value_heads,
                           ffn_hidden_size=hf.intermediate_size, vocab_size=hf.vocab_size,
                           seq_len=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
                           rope_theta=float(getattr(hf, "rope_theta", None) or
                                            (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
                           tie_embeddings=bool(hf.tie_word_embeddings), init_std=hf.initializer_range)
    if t == "gpt2":
        return ModelConfig(arch="gpt", num_layers=hf.n_layer, hidden_size=hf.n_embd, num_heads=hf.n_head,
                           kv_heads=hf.n_head, ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, vocab_size=hf.vocab_size,
                           seq_len=hf.n_positions, norm_eps=hf.layer_norm_epsilon, tie_embeddings=True,
                           init_std=hf.initializer_range)
    raise ValueError(f"model type '{t}' is not supported (llama or gpt2)")


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


def to_hf_state_dict(sd: dict, m: ModelConfig) -> dict:
    """Our state dict → the HF model's (GPT-2's Conv1D weights are [in, out], hence the transposes)."""
    out = {}
    if m.arch == "llama":
        out["model.embed_tokens.weight"] = sd["embed_tokens.weight"]
        out["model.norm.weight"] = sd["norm.weight"]
        if not m.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        for i in range(m.num_layers):
            for ours, theirs in _LLAMA_LAYER.items():
                out[f"model.layers.{i}.{theirs}"] = sd[f"layers.{i}.{ours}"]
        return out
    out["transformer.wte.weight"] = sd["embed_tokens.weight"]
    out["transformer.wpe.weight"] = sd["embed_positions.weight"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
    for i in range(m.num_layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in _GPT_LAYER.items():
            w = sd[p + ours]
            out[q + theirs] = w.t() if w.dim() == 2 else w
        out[q + "attn.c_attn.weight"] = torch.cat([sd[p + f"attn.{x}_proj.weight"] for x in "qkv"]).t()
        out[q + "attn.c_attn.bias"] = torch.cat([sd[p + f"attn.{x}_proj.bias"] for x in "qkv"])
    return {k: v.contiguous() for k, v in out.items()}


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
