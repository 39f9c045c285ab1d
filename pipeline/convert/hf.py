"""`convert to-hf` and `convert from-hf`: our checkpoints as Hugging Face folders, and back.

to-hf reads a committed checkpoint of any layout and writes a folder `transformers` loads. from-hf writes a
weights-only step-0 checkpoint:

    CKPT/global_step0/model.safetensors   our full unsharded state dict (our names, vocab unpadded, tied
                                          lm_head stored once as embed_tokens)
    CKPT/global_step0/run_config.json     the run config (--config, or the defaults with checkpoint.dir CKPT: a YAML
                                          file to train with) with the model from the HF config
    CKPT/global_step0/WEIGHTS_ONLY        no optimizer state: the trainer starts a fresh optimizer at step 0
    CKPT/global_step0/COMMITTED, CKPT/latest
    CKPT/hf_source/                       the HF folder's config.json (and generation_config.json), unchanged:
                                          to-hf writes the same model_type and architecture back out
    CKPT/tokenizer/ or CKPT/tokenizer.model   the HF folder's tokenizer files, unchanged (convert/tokenizer.py)

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
from ..config import ModelConfig, RunConfig, find_problems, load_config
from ..fs import flush_filesystem, staging_dir
from .safetensors import DEFAULT_SHARD_BYTES, DTYPES, write_safetensors
from .tokenizer import (HF_TOKENIZER_DIR, SP_MODEL, copy_hf_tokenizer, hf_tokenizer_ids, is_hf_tokenizer_dir,
                        load_hf_tokenizer, save_hf_tokenizer, tokenizer_info)

log = logging.getLogger("pipeline.convert")
HF_SOURCE = "hf_source"  # beside the checkpoints: the config of the HF model a run started from
BESIDE = (HF_SOURCE, HF_TOKENIZER_DIR, SP_MODEL)  # what travels with a checkpoint folder (reshape copies it too)
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def copy_beside(src_ckpt: str, dst_ckpt: str) -> None:
    """Copy what lives beside the checkpoints of `src_ckpt` (tokenizer, HF source config) into `dst_ckpt`."""
    for name in BESIDE:
        path = os.path.join(src_ckpt, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dst_ckpt, name))
        elif os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst_ckpt, name))


def read_checkpoint(ckpt_dir: str, tag: str | None = None) -> tuple[dict, RunConfig, str]:
    """The full fp32 state dict (vocab unpadded), the run config and the tag of a committed checkpoint."""
    sd, cfg, tag, _ = open_checkpoint(ckpt_dir, tag)
    return sd.materialize(), cfg, tag


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def to_hf(ckpt_dir: str, out: str, tag: str | None = None, dtype: str = "fp32", overwrite: bool = False,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads; returns its path.

    A run that started from an HF model (`from-hf`) goes back out as that model's family, with its config's
    other settings and its tokenizer files unchanged; a run with our SentencePiece tokenizer as LlamaForCausalLM
    (Qwen2/Qwen3 when the model has q/k/v bias or qk-norm) or GPT2LMHeadModel, with an exported fast tokenizer."""
    from ..hf import family_for, hf_config_dict, to_hf_plan

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
    source = _read_json(os.path.join(ckpt_dir, HF_SOURCE, "config.json"))
    fam = family_for(m, (source or {}).get("model_type"))
    plan = to_hf_plan(m, fam)
    missing = sorted({n for names, _ in plan.values() for n in names} - set(sd.keys()))
    if missing:
        raise ValueError(f"{os.path.join(ckpt_dir, tag)}: parameters missing for arch {m.arch}: {missing[:4]}")
    hf_tok_dir, sp_path = os.path.join(ckpt_dir, HF_TOKENIZER_DIR), os.path.join(ckpt_dir, SP_MODEL)
    hf_tok = load_hf_tokenizer(hf_tok_dir) if os.path.isdir(hf_tok_dir) else None
    if hf_tok is not None:
        ids = hf_tokenizer_ids(hf_tok)
    elif os.path.isfile(sp_path):
        info = tokenizer_info(sp_path)
        ids = {"bos_token_id": info["bos_id"], "eos_token_id": info["eod_id"], "pad_token_id": info["pad_id"]}
    else:
        ids = {}
    ids = {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}  # SentencePiece says -1 for none
    config = hf_config_dict(m, ids, _DTYPE_NAMES[dtype], source)
    gen_source = _read_json(os.path.join(ckpt_dir, HF_SOURCE, "generation_config.json"))
    generation = gen_source or {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    entries = []
    for hf_name, (names, fn) in plan.items():  # shapes from meta tensors: nothing is read yet
        shape = fn(*(torch.empty(sd.shapes[n], device="meta") for n in names)).shape
        entries.append((hf_name, DTYPES[dtype], tuple(shape)))
    with staging_dir(out, overwrite) as tmp:
        write_safetensors(tmp, entries, lambda k: plan[k][1](*(sd[n] for n in plan[k][0])), max_shard_bytes)
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), generation)
        if hf_tok is not None:
            if os.path.isfile(os.path.join(hf_tok_dir, "tokenizer_config.json")):
                copy_hf_tokenizer(hf_tok_dir, tmp)  # unchanged: the original's files
            else:  # a bare tokenizer.json from the data's manifest: add the config that names its specials
                hf_tok.model_max_length = m.seq_len
                hf_tok.save_pretrained(tmp)
        elif os.path.isfile(sp_path):
            save_hf_tokenizer(sp_path, tmp, model_max_length=m.seq_len)
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    return out


# Model keys that fix the shapes or the function of the weights: a run config that sets one of them to a value
# other than the HF config's is refused (the others, such as dropout, are the run's own choice). seq_len counts
# only for a learned position table (gpt): a RoPE model may run at another length.
_SHAPE_KEYS = ("arch", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_hidden_size", "vocab_size",
               "tie_embeddings", "norm_eps", "rope_theta", "rope_scaling", "qkv_bias", "qk_norm")


def read_hf_config(hf_dir: str):
    """The transformers config of an HF folder, after a quick check of its model_type (ValueError otherwise)."""
    import transformers

    from ..hf import FAMILIES

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{hf_dir}: no config.json; not a Hugging Face model folder")
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e})") from None
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type '{model_type}' is not supported; convert one of: {', '.join(FAMILIES)}")
    try:
        return transformers.AutoConfig.from_pretrained(hf_dir)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ValueError(f"{path}: transformers cannot read it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


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


def read_hf_state_dict(hf_dir: str, m: ModelConfig, model_type: str | None = None) -> dict:
    """Our state dict (our names) from the weights of an HF folder whose config gave `m`."""
    from ..hf import family_for, from_hf_state_dict

    fam = family_for(m, model_type)
    hf_sd = read_hf_weights(hf_dir)
    prefix = fam.names[0].theirs.split(".")[0] + "."  # "model." / "transformer.": absent when saved from the bare
    if not any(k.startswith(prefix) for k in hf_sd):  # base model (LlamaModel, GPT2Model)
        hf_sd = {k if k.startswith("lm_head.") else prefix + k: v for k, v in hf_sd.items()}
    try:
        return from_hf_state_dict(hf_sd, m, fam)
    except KeyError as e:
        raise ValueError(f"{hf_dir}: tensor {e} missing from the weights") from None


def _explicit_model_keys(config_path: str) -> dict:
    with open(config_path) as f:
        raw = yaml.safe_load(f) or {}
    return dict(raw.get("model") or {})


def _rope_keys(scaling) -> dict | None:
    """The part of a model.rope_scaling that our model reads."""
    from ..config import ROPE_SCALING_KEYS

    if not isinstance(scaling, dict) or scaling.get("rope_type") not in ROPE_SCALING_KEYS:
        return scaling
    return {k: scaling.get(k) for k in ("rope_type", *ROPE_SCALING_KEYS[scaling["rope_type"]])}


def merged_model_config(hf_model: ModelConfig, run_model: ModelConfig, explicit: dict, config_path: str) -> ModelConfig:
    """The run's model section with the HF shape; refuses keys that the run config sets differently."""
    keys = [k for k in _SHAPE_KEYS + (("seq_len",) if hf_model.arch == "gpt" else ()) if hasattr(hf_model, k)]
    diffs = []
    for key in keys:
        if key in explicit and explicit[key] is not None and getattr(run_model, key) != getattr(hf_model, key):
            ours, theirs = getattr(run_model, key), getattr(hf_model, key)
            if key in ("norm_eps", "rope_theta") and abs(float(ours) - float(theirs)) <= 1e-12 * max(1.0, abs(theirs)):
                continue
            if key == "rope_scaling" and _rope_keys(ours) == _rope_keys(theirs):  # e.g. a copied rope_theta inside
                continue
            diffs.append(f"model.{key}: {ours!r} in {config_path}, {theirs!r} in the HF config")
    if diffs:
        raise ValueError("the run config and the HF model disagree: " + "; ".join(diffs))
    shape = {k: getattr(hf_model, k) for k in keys}
    if "seq_len" not in explicit:  # a RoPE model: the HF length unless the run config sets its own
        shape["seq_len"] = hf_model.seq_len
    return dataclasses.replace(run_model, **shape)


def run_config_for(hf_model: ModelConfig, config_path: str | None, ckpt_dir: str) -> RunConfig:
    """The run config of a from-hf checkpoint: --config (no dataset needed yet) with the HF model, or the defaults
    with the HF model and checkpoint.dir = `ckpt_dir`."""
    if config_path is None:  # a config that continues from this checkpoint: train --config CKPT/TAG/run_config.json
        cfg = RunConfig()
        cfg.model = hf_model
        cfg.checkpoint.dir = os.path.abspath(ckpt_dir)
    else:
        cfg = load_config(config_path, check=False)
        cfg.model = merged_model_config(hf_model, cfg.model, _explicit_model_keys(config_path), config_path)
    problems = [p for p in find_problems(cfg) if not p.startswith("data.datasets")]
    if problems:
        raise ValueError(f"{config_path or 'the HF model'}: " + "; ".join(problems))
    return cfg


def from_hf(hf_dir: str, ckpt_dir: str, config_path: str | None = None, overwrite: bool = False) -> str:
    """Write a weights-only step-0 checkpoint of the HF model in `hf_dir` (see the module docstring)."""
    from safetensors.torch import save_file

    from ..hf import check_sliding_window, model_config_from_hf
    from ..model import Transformer

    if not os.path.isdir(hf_dir):
        raise ValueError(f"{hf_dir}: no such folder")
    if os.path.exists(ckpt_dir) and not overwrite:
        raise FileExistsError(f"{ckpt_dir} already exists; pass --overwrite to replace it")
    hf_cfg = read_hf_config(hf_dir)
    cfg = run_config_for(model_config_from_hf(hf_cfg), config_path, ckpt_dir)
    m = cfg.model
    check_sliding_window(hf_cfg, m.seq_len)
    sd = read_hf_state_dict(hf_dir, m, hf_cfg.model_type)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(m).state_dict().items()}
    for k in ("embed_tokens.weight", "lm_head.weight"):  # the model pads its vocabulary; we store it unpadded
        expected[k] = (m.vocab_size, m.hidden_size)
    if m.tie_embeddings:
        expected.pop("lm_head.weight")
    wrong = [f"{k}: {tuple(v.shape)} != {expected.get(k)}" for k, v in sd.items() if tuple(v.shape) != expected.get(k)]
    if wrong or set(expected) - set(sd):
        raise ValueError(f"{hf_dir}: weights do not match the config: {(wrong or sorted(set(expected) - set(sd)))[:3]}")
    tag = tag_for(0)
    with staging_dir(ckpt_dir, overwrite) as tmp:
        os.makedirs(os.path.join(tmp, tag))
        save_file({k: v.float().contiguous() for k, v in sd.items()}, os.path.join(tmp, tag, WEIGHTS_FILE),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, tag, "run_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        with open(os.path.join(tmp, tag, WEIGHTS_ONLY), "w") as f:
            json.dump({"source": os.path.abspath(hf_dir), "model_type": hf_cfg.model_type}, f)
        os.makedirs(os.path.join(tmp, HF_SOURCE))
        for name in ("config.json", "generation_config.json"):
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, HF_SOURCE, name))
        if is_hf_tokenizer_dir(hf_dir):
            copy_hf_tokenizer(hf_dir, os.path.join(tmp, HF_TOKENIZER_DIR))
        elif os.path.isfile(os.path.join(hf_dir, SP_MODEL)):
            shutil.copyfile(os.path.join(hf_dir, SP_MODEL), os.path.join(tmp, SP_MODEL))
        flush_filesystem(tmp)  # the weights reach storage before the marker that vouches for them
        commit(tmp, tag, {"step": 0, "weights_only": True})
    return ckpt_dir
