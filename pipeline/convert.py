"""`python -m pipeline.convert`: DeepSpeed checkpoints to Hugging Face folders (and back, and between layouts).

    python -m pipeline.convert to-hf CKPT OUT [--tag global_stepN] [--dtype bf16|fp16|fp32]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile

import torch

from . import checkpoint
from .config import ModelConfig, from_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_checkpoint(ckpt_dir: str, tag: str | None = None) -> tuple[dict, "RunConfig", str]:
    """The full fp32 state dict, the run config and the tag of a committed checkpoint, whatever its ZeRO layout."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint folder")
    tag = checkpoint.resolve_tag(ckpt_dir, tag)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no committed checkpoint found")
    with open(os.path.join(ckpt_dir, tag, "run_config.json")) as f:
        raw = json.load(f)
    cfg = from_dict(raw)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's chatter must not mix with tool output
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    except (FileNotFoundError, ValueError, RuntimeError, EOFError) as e:
        raise ValueError(f"{os.path.join(ckpt_dir, tag)}: cannot read the checkpoint ({e})") from None
    return dict(sd), cfg, tag


def tokenizer_info(model_path: str) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    return {"bos_id": sp.bos_id(), "eod_id": sp.eos_id(), "pad_id": sp.pad_id(), "unk_id": sp.unk_id()}


def save_hf_tokenizer(model_path: str, out: str) -> None:
    """Export our SentencePiece model as a transformers tokenizer that encodes identically (no BOS/EOS added)."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(model_path, os.path.join(d, "tokenizer.model"))
        tok = LlamaTokenizer.from_pretrained(d, add_bos_token=False, add_eos_token=False, pad_token="<pad>")
        tok.save_pretrained(out)
    shutil.copyfile(model_path, os.path.join(out, "tokenizer.model"))


def to_hf(ckpt_dir: str, out: str, tag: str | None = None, dtype: str = "fp32", overwrite: bool = False) -> str:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads; returns its path."""
    import transformers

    from .hf import hf_config, to_hf_state_dict

    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    sd, cfg, tag = read_checkpoint(ckpt_dir, tag)
    tok_path = os.path.join(ckpt_dir, "tokenizer.model")
    tok = tokenizer_info(tok_path) if os.path.isfile(tok_path) else None
    hf_cfg = hf_config(cfg.model, tok)
    hf_cfg.dtype = DTYPES[dtype]
    cls = getattr(transformers, "LlamaForCausalLM" if cfg.model.arch == "llama" else "GPT2LMHeadModel")
    with torch.device("meta"):
        model = cls(hf_cfg)
    hf_sd = {k: v.to(DTYPES[dtype]) for k, v in to_hf_state_dict(sd, cfg.model).items()}
    missing, unexpected = model.load_state_dict(hf_sd, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k == "lm_head.weight")
               and not k.endswith(".attn.bias") and not k.endswith("masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.model.tie_embeddings:
        model.tie_weights()
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".to-hf-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        transformers.GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
                                      pad_token_id=(tok or {}).get("pad_id")).save_pretrained(tmp)
        if tok is not None:
            save_hf_tokenizer(tok_path, tmp)
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("to-hf", help="export a checkpoint as a Hugging Face model folder")
    h.add_argument("ckpt", metavar="CKPT", help="checkpoint folder (checkpoint.dir of the run)")
    h.add_argument("out", metavar="OUT", help="output folder (written to a temporary name, then renamed)")
    h.add_argument("--tag", default=None, help="e.g. global_step1000 (default: latest committed)")
    h.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    h.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        if args.command == "to-hf":
            out = to_hf(args.ckpt, args.out, args.tag, args.dtype, args.overwrite)
            print(f"wrote Hugging Face model to {out}")
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
