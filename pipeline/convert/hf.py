"""`convert to-hf` and `convert from-hf`: our checkpoints as Hugging Face folders, and back.

to-hf reads a committed checkpoint of any layout and writes a folder `transformers` loads. from-hf writes a
weights-only step-0 checkpoint:

    CKPT/global_step0/model.safetensors   our full unsharded state dict (our names, vocab unpadded, tied
                                          lm_head stored once as embed_tokens)
    CKPT/global_step0/run_config.json     the run config of --config, with the model shape from the HF config
    CKPT/global_step0/WEIGHTS_ONLY        no optimizer state: the trainer starts a fresh optimizer at step 0
    CKPT/global_step0/COMMITTED, CKPT/latest, and CKPT/tokenizer.model when the HF folder has a SentencePiece one

The trainer reads those weights with `pipeline.checkpoint.read.read_weights_only(ckpt_dir, tag)` and shards them
for whatever layout the run uses, so the same step-0 checkpoint starts a ZeRO-3, TP or pipeline run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import torch
import yaml

from ..checkpoint import WEIGHTS_FILE, WEIGHTS_ONLY, commit, tag_for
from ..checkpoint.read import open_checkpoint
from ..config import ModelConfig, RunConfig, load_config
from ..fs import staging_dir
from .safetensors import DEFAULT_SHARD_BYTES, DTYPES, write_safetensors
from .tokenizer import save_hf_tokenizer, tokenizer_info

log = logging.getLogger("pipeline.convert")


def read_checkpoint(ckpt_dir: str, tag: str | None = None) -> tuple[dict, RunConfig, str]:
    """The full fp32 state dict (vocab unpadded), the run config and the tag of a committed checkpoint."""
    sd, cfg, tag, _ = open_checkpoint(ckpt_dir, tag)
    return sd.materialize(), cfg, tag


def to_hf(ckpt_dir: str, out: str, tag: str | None = None, dtype: str = "fp32", overwrite: bool = False,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads; returns its path."""
    import transformers

    from ..hf import hf_config, to_hf_plan

    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    sd, cfg, tag, layout = open_checkpoint(ckpt_dir, tag)
    if layout in ("zero0-2", "pipeline") and cfg.train.precision in ("bf16", "fp16") and dtype == "fp32":
        log.warning("%s: a %s run in layout %s keeps fp32 master weights only inside its optimizer state; the "
                    "export holds its %s module weights widened to fp32", os.path.join(ckpt_dir, tag),
                    cfg.train.precision, layout, cfg.train.precision)
    m = cfg.model
    plan = to_hf_plan(m)
    missing = sorted({n for names, _ in plan.values() for n in names} - set(sd.keys()))
    if missing:
        raise ValueError(f"{os.path.join(ckpt_dir, tag)}: parameters missing for arch {m.arch}: {missing[:4]}")
    tok_path = os.path.join(ckpt_dir, "tokenizer.model")
    tok = tokenizer_info(tok_path) if os.path.isfile(tok_path) else None
    hf_cfg = hf_config(m, tok)
    hf_cfg.dtype = DTYPES[dtype]
    entries = []
    for hf_name, (names, fn) in plan.items():  # shapes from meta tensors: nothing is read yet
        shape = fn(*(torch.empty(sd.shapes[n], device="meta") for n in names)).shape
        entries.append((hf_name, DTYPES[dtype], tuple(shape)))
    with staging_dir(out, overwrite) as tmp:
        write_safetensors(tmp, entries, lambda k: plan[k][1](*(sd[n] for n in plan[k][0])), max_shard_bytes)
        hf_cfg.save_pretrained(tmp)
        transformers.GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
                                      pad_token_id=(tok or {}).get("pad_id")).save_pretrained(tmp)
        if tok is not None:
            save_hf_tokenizer(tok_path, tmp)
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    return out


# Model keys that fix the shapes or the function of the weights: a run config that sets one of them to a value
# other than the HF config's is refused (the others, such as dropout, are the run's own choice).
_SHAPE_KEYS = ("arch", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_hidden_size", "vocab_size",
               "seq_len", "tie_embeddings", "norm_eps", "rope_theta")


def read_hf_config(hf_dir: str):
    import transformers

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{hf_dir}: no config.json; not a Hugging Face model folder")
    with open(path) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in ("llama", "gpt2"):
        raise ValueError(f"{path}: model_type '{model_type}' is not supported; convert a llama or gpt2 model")
    return transformers.AutoConfig.from_pretrained(hf_dir)


def read_hf_weights(hf_dir: str) -> dict:
    """All tensors of an HF folder: sharded or single safetensors, else pytorch_model.bin."""
    from safetensors.torch import load_file

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin")):
        return torch.load(os.path.join(hf_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{hf_dir}: no model.safetensors, safetensors index or pytorch_model.bin")
    sd = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing weight shard (listed in the index)")
        try:
            sd.update(load_file(path))
        except Exception as e:
            raise ValueError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from None
    return sd


def read_hf_state_dict(hf_dir: str, m: ModelConfig) -> dict:
    """Our state dict (our names) from the weights of an HF folder whose config gave `m`."""
    from ..hf import from_hf_state_dict

    hf_sd = read_hf_weights(hf_dir)
    if m.arch == "gpt":  # GPT-2 folders saved from GPT2Model name their tensors without the prefix
        hf_sd = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in hf_sd.items()}
    try:
        return from_hf_state_dict(hf_sd, m)
    except KeyError as e:
        raise ValueError(f"{hf_dir}: tensor {e} missing from the weights") from None


def _explicit_model_keys(config_path: str) -> dict:
    with open(config_path) as f:
        raw = yaml.safe_load(f) or {}
    return dict(raw.get("model") or {})


def merged_model_config(hf_model: ModelConfig, run_model: ModelConfig, explicit: dict, config_path: str) -> ModelConfig:
    """The run's model section with the HF shape; refuses keys that the run config sets differently."""
    diffs = []
    for key in _SHAPE_KEYS:
        if key in explicit and explicit[key] is not None and getattr(run_model, key) != getattr(hf_model, key):
            ours, theirs = getattr(run_model, key), getattr(hf_model, key)
            if key in ("norm_eps", "rope_theta") and abs(float(ours) - float(theirs)) <= 1e-12 * max(1.0, abs(theirs)):
                continue
            diffs.append(f"model.{key}: {ours!r} in {config_path}, {theirs!r} in the HF config")
    if diffs:
        raise ValueError("the run config and the HF model disagree: " + "; ".join(diffs))
    shape = {k: getattr(hf_model, k) for k in _SHAPE_KEYS}
    return dataclasses.replace(run_model, **shape)


def from_hf(hf_dir: str, ckpt_dir: str, config_path: str, overwrite: bool = False) -> str:
    from ..hf import model_config_from_hf
    from ..model import Transformer
    from safetensors.torch import save_file

    if not os.path.isdir(hf_dir):
        raise ValueError(f"{hf_dir}: no such folder")
    hf_cfg = read_hf_config(hf_dir)
    hf_model = model_config_from_hf(hf_cfg)
    cfg = load_config(config_path)
    cfg.model = merged_model_config(hf_model, cfg.model, _explicit_model_keys(config_path), config_path)
    m = cfg.model
    sd = read_hf_state_dict(hf_dir, m)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(m).state_dict().items()}
    for k in ("embed_tokens.weight", "lm_head.weight"):  # the model pads its vocabulary; we store it unpadded
        expected[k] = (m.vocab_size, m.hidden_size)
    wrong = [f"{k}: {tuple(v.shape)} != {expected.get(k)}" for k, v in sd.items() if tuple(v.shape) != expected.get(k)]
    if wrong or set(expected) - set(sd):
        raise ValueError(f"{hf_dir}: weights do not match the config: {(wrong or sorted(set(expected) - set(sd)))[:3]}")
    if m.tie_embeddings:
        sd.pop("lm_head.weight")
    tag = tag_for(0)
    with staging_dir(ckpt_dir, overwrite) as tmp:
        os.makedirs(os.path.join(tmp, tag))
        save_file({k: v.float().contiguous() for k, v in sd.items()}, os.path.join(tmp, tag, WEIGHTS_FILE),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, tag, "run_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        with open(os.path.join(tmp, tag, WEIGHTS_ONLY), "w") as f:
            json.dump({"source": os.path.abspath(hf_dir), "model_type": hf_cfg.model_type}, f)
        if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
            shutil.copyfile(os.path.join(hf_dir, "tokenizer.model"), os.path.join(tmp, "tokenizer.model"))
        commit(tmp, tag, {"step": 0, "weights_only": True})
    return ckpt_dir
