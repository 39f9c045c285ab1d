"""Our model in Hugging Face's terms: one table per architecture family, read in both directions.

A `Family` (llama, mistral, qwen2, qwen3, gpt2) states, once:
- its config keys (`keys`: our ModelConfig key ↔ theirs) and the values it fixes (`fixed`: activation, biases;
  to-hf writes them, from-hf refuses a config that differs) or implies in our terms (`implied`: Qwen2's q/k/v
  bias, Qwen3's qk-norm, GPT-2's tied head);
- its tensor names (`names`): our name(s) ↔ theirs, with a codec that holds the layout change in both directions
  (GPT-2's Conv1D weights are [in, out], and its c_attn is q, k, v fused).
to-hf (`hf_config_dict`, `to_hf_plan`) and from-hf (`model_config_from_hf`, `from_hf_state_dict`) are both
derived from these tables; nothing is written twice.

Reading goes through `transformers.AutoConfig` (for each class's defaults); the config we write is plain JSON
that transformers 4.46+ and 5.x both read: the RoPE settings appear in the 4.x form (`rope_theta`,
`rope_scaling`) and in the 5.x form (`rope_parameters`), the dtype as `torch_dtype` and `dtype`.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import ModelConfig


# ---- codecs: (ours → HF, HF → ours), the layout change of one table row in both directions ----------------------
def _t(w):
    return w.t() if w.dim() == 2 else w


SAME = (lambda w: w, lambda w: (w,))
T = (_t, lambda w: (_t(w),))  # GPT-2 Conv1D: [in, out]
QKV = (lambda q, k, v: torch.cat([q, k, v]).t(), lambda w: tuple(w.t().chunk(3)))  # fused c_attn weight
CAT = (lambda q, k, v: torch.cat([q, k, v]), lambda b: tuple(b.chunk(3)))  # fused c_attn bias


@dataclasses.dataclass(frozen=True)
class Name:
    ours: tuple           # our parameter name(s); "{i}" = the block index
    theirs: str           # the HF tensor name
    codec: tuple = SAME
    when: str | None = None  # only for models with this property: "untied", "qkv_bias", "qk_norm"


def _llama_names() -> tuple:
    layer = [("input_norm.weight", "input_layernorm.weight"), ("post_attn_norm.weight", "post_attention_layernorm.weight")]
    layer += [(f"attn.{x}_proj.weight", f"self_attn.{x}_proj.weight") for x in "qkvo"]
    layer += [(f"mlp.{x}_proj.weight", f"mlp.{x}_proj.weight") for x in ("gate", "up", "down")]
    rows = [Name(("embed_tokens.weight",), "model.embed_tokens.weight")]
    rows += [Name((f"layers.{{i}}.{a}",), f"model.layers.{{i}}.{b}") for a, b in layer]
    rows += [Name((f"layers.{{i}}.attn.{x}_proj.bias",), f"model.layers.{{i}}.self_attn.{x}_proj.bias", when="qkv_bias")
             for x in "qkv"]
    rows += [Name((f"layers.{{i}}.attn.{x}_norm.weight",), f"model.layers.{{i}}.self_attn.{x}_norm.weight",
                  when="qk_norm") for x in "qk"]
    rows += [Name(("norm.weight",), "model.norm.weight"), Name(("lm_head.weight",), "lm_head.weight", when="untied")]
    return tuple(rows)


def _gpt2_names() -> tuple:
    h = "transformer.h.{i}."
    rows = [Name(("embed_tokens.weight",), "transformer.wte.weight"),
            Name(("embed_positions.weight",), "transformer.wpe.weight")]
    for ours, theirs in [("input_norm", "ln_1"), ("post_attn_norm", "ln_2")]:
        rows += [Name((f"layers.{{i}}.{ours}.{p}",), f"{h}{theirs}.{p}") for p in ("weight", "bias")]
    rows += [Name(tuple(f"layers.{{i}}.attn.{x}_proj.weight" for x in "qkv"), h + "attn.c_attn.weight", QKV),
             Name(tuple(f"layers.{{i}}.attn.{x}_proj.bias" for x in "qkv"), h + "attn.c_attn.bias", CAT)]
    for ours, theirs in [("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")]:
        rows += [Name((f"layers.{{i}}.{ours}.weight",), f"{h}{theirs}.weight", T),
                 Name((f"layers.{{i}}.{ours}.bias",), f"{h}{theirs}.bias")]
    rows += [Name(("norm.weight",), "transformer.ln_f.weight"), Name(("norm.bias",), "transformer.ln_f.bias")]
    return tuple(rows)


_LLAMA_KEYS = (("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"), ("num_heads", "num_attention_heads"),
               ("kv_heads", "num_key_value_heads"), ("ffn_hidden_size", "intermediate_size"), ("vocab_size", "vocab_size"),
               ("seq_len", "max_position_embeddings"), ("norm_eps", "rms_norm_eps"),
               ("tie_embeddings", "tie_word_embeddings"), ("init_std", "initializer_range"))
_GPT2_KEYS = (("num_layers", "n_layer"), ("hidden_size", "n_embd"), ("num_heads", "n_head"), ("ffn_hidden_size", "n_inner"),
              ("vocab_size", "vocab_size"), ("seq_len", "n_positions"), ("norm_eps", "layer_norm_epsilon"),
              ("init_std", "initializer_range"))


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    arch: str                # ours: llama | gpt
    keys: tuple              # (our ModelConfig key, HF config key)
    names: tuple             # Name rows
    fixed: dict              # HF config values the family must have (written by to-hf, checked by from-hf)
    implied: dict = dataclasses.field(default_factory=dict)  # our ModelConfig values the family stands for
    sliding_window_flag: str | None = None  # the HF key that switches the sliding window on (None: on when set)


_NO_WINDOW = {"sliding_window": None}
FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", "llama", _LLAMA_KEYS, _llama_names(),
           {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}),
    Family("mistral", "MistralForCausalLM", "llama", _LLAMA_KEYS, _llama_names(), {"hidden_act": "silu", **_NO_WINDOW}),
    Family("qwen2", "Qwen2ForCausalLM", "llama", _LLAMA_KEYS, _llama_names(),
           {"hidden_act": "silu", "use_sliding_window": False}, {"qkv_bias": True}, "use_sliding_window"),
    Family("qwen3", "Qwen3ForCausalLM", "llama", _LLAMA_KEYS, _llama_names(),
           {"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False}, {"qk_norm": True},
           "use_sliding_window"),
    Family("gpt2", "GPT2LMHeadModel", "gpt", _GPT2_KEYS, _gpt2_names(),
           {"activation_function": "gelu_new", "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "scale_attn_weights": True, "tie_word_embeddings": True},
           {"tie_embeddings": True}),
)}
HF_ARCH = {name: f.architecture for name, f in FAMILIES.items()}


def _has(m: ModelConfig, prop: str | None) -> bool:
    if prop is None:
        return True
    if prop == "untied":
        return not m.tie_embeddings
    return bool(getattr(m, prop, False))


def family_for(m: ModelConfig, model_type: str | None = None) -> Family:
    """The HF family that holds model `m`: `model_type` (the one a from-hf run came from) when it fits, else the
    plain one for its features (gpt → gpt2; llama → llama, qwen2 with q/k/v bias, qwen3 with qk-norm)."""
    fits = [f for f in FAMILIES.values() if f.arch == m.arch and
            all(_has(m, k) == v for k, v in f.implied.items() if k != "tie_embeddings") and
            not (getattr(m, "qkv_bias", False) and "qkv_bias" not in f.implied) and
            not (getattr(m, "qk_norm", False) and "qk_norm" not in f.implied)]
    if not fits:
        raise ValueError(f"no Hugging Face architecture has this model's features (arch {m.arch}, qkv_bias "
                         f"{getattr(m, 'qkv_bias', False)}, qk_norm {getattr(m, 'qk_norm', False)})")
    return next((f for f in fits if f.model_type == model_type), fits[0])


# ---- names -------------------------------------------------------------------------------------------------------
def _rows(m: ModelConfig, fam: Family) -> list:
    """(our names, HF name, codec) for every tensor of model `m`: the rows before the blocks, each block's, then
    the rest."""
    before, layered, after = [], [], []
    for r in fam.names:
        (layered if "{i}" in r.theirs else after if layered else before).append(r)
    out = [(r.ours, r.theirs, r.codec) for r in before if _has(m, r.when)]
    for i in range(m.num_layers):
        out += [(tuple(n.format(i=i) for n in r.ours), r.theirs.format(i=i), r.codec)
                for r in layered if _has(m, r.when)]
    return out + [(r.ours, r.theirs, r.codec) for r in after if _has(m, r.when)]


def to_hf_plan(m: ModelConfig, fam: Family | None = None) -> dict:
    """HF tensor name → (our parameter names, function of those tensors giving the HF tensor), in file order."""
    fam = fam or family_for(m)
    return {theirs: (ours, codec[0]) for ours, theirs, codec in _rows(m, fam)}


def to_hf_state_dict(sd: dict, m: ModelConfig, fam: Family | None = None) -> dict:
    """Our state dict → the HF model's (materialised; `to_hf_plan` is the lazy form)."""
    return {k: fn(*(sd[n] for n in names)).contiguous() for k, (names, fn) in to_hf_plan(m, fam).items()}


def from_hf_state_dict(hf_sd: dict, m: ModelConfig, fam: Family | None = None) -> dict:
    """The HF model's state dict → ours (the same rows read backwards; a tied head is stored once, as
    embed_tokens). A missing HF tensor raises KeyError with its name."""
    sd = {}
    for ours, theirs, codec in _rows(m, fam or family_for(m)):
        sd.update(zip(ours, codec[1](hf_sd[theirs])))
    return {k: v.contiguous() for k, v in sd.items()}


# ---- configs -----------------------------------------------------------------------------------------------------
def rope_settings(hf) -> tuple[float, dict | None, str]:
    """(rope_theta, our rope_scaling or None, rope type) of a transformers config, whichever version wrote it."""
    rp = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = rp.get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0
    kind = rp.get("rope_type", rp.get("type")) or "default"
    if kind not in ("llama3", "linear"):
        return float(theta), None, kind
    from .config import ROPE_SCALING_KEYS

    scaling = {"rope_type": kind, **{k: rp.get(k) for k in ROPE_SCALING_KEYS[kind]}}
    if kind == "llama3" and scaling["original_max_position_embeddings"] is None:  # transformers' fallback
        scaling["original_max_position_embeddings"] = getattr(hf, "max_position_embeddings", None)
    return float(theta), scaling, kind


def model_config_from_hf(hf) -> ModelConfig:
    """Our ModelConfig for a transformers config of a supported family; refuses (ValueError, one line naming
    them) every feature our model lacks. The sliding window is checked against the final seq_len by
    `check_sliding_window`."""
    t = getattr(hf, "model_type", None)
    if t not in FAMILIES:
        raise ValueError(f"model_type '{t}' is not supported; convert one of: {', '.join(FAMILIES)}")
    fam = FAMILIES[t]
    bad = [f"{k}={getattr(hf, k)!r} (need {want!r})" for k, want in fam.fixed.items()
           if k not in ("sliding_window", fam.sliding_window_flag) and getattr(hf, k, want) != want]
    values = {ours: getattr(hf, theirs) for ours, theirs in fam.keys}
    heads, hidden = values["num_heads"], values["hidden_size"]
    head_dim = getattr(hf, "head_dim", None)
    if head_dim not in (None, hidden // heads) or hidden % heads:
        bad.append(f"head_dim={head_dim!r} (need hidden_size / num_attention_heads = {hidden / heads:g})")
    if fam.arch == "llama":
        theta, scaling, kind = rope_settings(hf)
        if kind not in ("default", "llama3", "linear"):
            bad.append(f"RoPE scaling '{kind}' (supported: llama3, linear)")
        rp = getattr(hf, "rope_parameters", None) or {}
        if float(rp.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
            bad.append("partial_rotary_factor != 1")
        values.update(rope_theta=theta, rope_scaling=scaling)
    if fam.arch == "gpt" and getattr(hf, "n_inner", None) is None:
        values["ffn_hidden_size"] = 4 * hidden
    if bad:
        raise ValueError(f"the Hugging Face {t} config uses features our model lacks: {', '.join(bad)}")
    if fam.arch == "gpt":
        values["kv_heads"] = heads
    return ModelConfig(arch=fam.arch, **values, **fam.implied)


def sliding_window(hf) -> int | None:
    """The attention window an HF config switches on, or None (full causal attention)."""
    fam = FAMILIES.get(getattr(hf, "model_type", None))
    if fam is None or fam.arch != "llama":
        return None
    window = getattr(hf, "sliding_window", None)
    if fam.sliding_window_flag is not None and not getattr(hf, fam.sliding_window_flag, False):
        return None
    return window


def check_sliding_window(hf, seq_len: int) -> None:
    """Our model attends over the whole sequence: that equals a sliding window only when the window covers it."""
    window = sliding_window(hf)
    if window is not None and window < seq_len:
        raise ValueError(f"the Hugging Face {hf.model_type} config uses sliding_window={window}, shorter than "
                         f"model.seq_len {seq_len}; our model lacks sliding-window attention: set model.seq_len "
                         f"<= {window} in --config")


def _rope_fields(theta: float, scaling: dict | None) -> dict:
    """RoPE in both config forms: 4.x reads rope_theta/rope_scaling, 5.x rope_parameters."""
    params = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    return {"rope_theta": theta, "rope_scaling": scaling and dict(scaling), "rope_parameters": params}


def hf_config_dict(m: ModelConfig, ids: dict, dtype: str, source: dict | None = None) -> dict:
    """config.json for model `m`. `ids`: bos/eos/pad token ids. `source`: the config.json a from-hf run came from;
    its family and its other settings (e.g. a longer max_position_embeddings, a list of EOS ids) are kept."""
    fam = family_for(m, (source or {}).get("model_type"))
    if fam.arch == "gpt" and (m.kv_heads != m.num_heads or not m.tie_embeddings):
        raise ValueError("GPT2LMHeadModel needs kv_heads == num_heads and tied embeddings")
    out = {k: v for k, v in (source or {}).items() if k not in ("rope_scaling", "rope_parameters", "rope_theta")}
    out.update({theirs: getattr(m, ours) for ours, theirs in fam.keys})
    out.update({k: v for k, v in fam.fixed.items() if k not in out or k != "sliding_window"})
    if fam.arch == "llama":
        out["head_dim"] = m.hidden_size // m.num_heads
        if source and source.get("max_position_embeddings", 0) > m.seq_len:  # RoPE: the source's reach is kept
            out["max_position_embeddings"] = source["max_position_embeddings"]
        out.update(_rope_fields(float(m.rope_theta), m.rope_scaling))
        if fam.sliding_window_flag:
            out["max_window_layers"] = m.num_layers
            out["layer_types"] = ["full_attention"] * m.num_layers
    else:
        d = m.dropout
        out.update(resid_pdrop=d, embd_pdrop=d, attn_pdrop=d)
    out.update(model_type=fam.model_type, architectures=[fam.architecture], torch_dtype=dtype, dtype=dtype,
               use_cache=True)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the source's own (e.g. Llama 3's EOS list) first
        if out.get(k) is None:
            out[k] = ids.get(k)
    return out
