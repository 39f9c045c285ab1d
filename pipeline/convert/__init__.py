"""Conversion: checkpoints to Hugging Face folders (`to_hf`), back (`from_hf`), and between parallel layouts
(`reshape`); the CLI is `python -m pipeline.convert` (cli.py).

    hf.py           to_hf: any committed layout → config.json, safetensors, tokenizer;
                    from_hf: an HF folder → a weights-only step-0 checkpoint
    reshape.py      weights and optimizer state → another tp/pp layout (DeepSpeed universal checkpoints)
    safetensors.py  the streaming safetensors writer
    tokenizer.py    the tokenizer beside a checkpoint (HF tokenizer files, or our SentencePiece model as an
                    HF tokenizer)
The HF name and config tables (one per family: llama, mistral, qwen2, qwen3, gpt2) live in `pipeline.hf`.
Reading a checkpoint of any layout lives in `pipeline.checkpoint.read`.
"""
from .cli import main

_LAZY = {"to_hf": "hf", "read_checkpoint": "hf", "from_hf": "hf", "reshape": "reshape",
         "write_safetensors": "safetensors", "hf_tokenizer": "tokenizer", "save_hf_tokenizer": "tokenizer",
         "tokenizer_info": "tokenizer"}


def __getattr__(name):  # torch and transformers load only when a conversion runs, so `--help` answers at once
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["main", *_LAZY]
