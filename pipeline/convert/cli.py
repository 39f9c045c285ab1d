"""`python -m pipeline.convert`: checkpoints to Hugging Face folders, back, and between parallel layouts.

    python -m pipeline.convert to-hf CKPT OUT [--tag global_stepN] [--dtype bf16|fp16|fp32]
    python -m pipeline.convert from-hf HF_DIR CKPT [--config configs/X.yaml]
    python -m pipeline.convert reshape CKPT OUT --tp T --pp P

to-hf reads any layout the trainer writes (ZeRO-3 partitions, ZeRO-0/1 module files, tensor-parallel shards,
pipeline layer files, and their combinations) on a CPU, without the original world size. from-hf writes a
weights-only step-0 checkpoint that `pipeline.train` starts from in any layout. Every command writes to a
temporary folder and renames it into place, so a failure leaves nothing behind.
"""
from __future__ import annotations

import argparse
import sys

DEFAULT_SHARD_GIB = 2.0
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("to-hf", help="export a checkpoint (any layout) as a Hugging Face model folder")
    h.add_argument("ckpt", metavar="CKPT", help="checkpoint folder (checkpoint.dir of the run)")
    h.add_argument("out", metavar="OUT", help="output folder (written to a temporary name, then renamed)")
    h.add_argument("--tag", default=None, help="e.g. global_step1000 (default: latest committed)")
    h.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="dtype of the saved weights (default fp32)")
    h.add_argument("--max-shard-size", type=float, default=DEFAULT_SHARD_GIB, metavar="GiB",
                   help="split the weights into safetensors files of at most this size, with an index (default 2)")
    h.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    f = sub.add_parser("from-hf", help="turn a Hugging Face Llama 3.x/Mistral/Qwen2/Qwen3/GPT-2 folder into a step-0 "
                                       "checkpoint",
                       description="Features our model lacks (e.g. a sliding window shorter than model.seq_len, "
                                   "YaRN RoPE scaling) are refused in one line. The folder's tokenizer files and "
                                   "config travel with the checkpoint (CKPT/tokenizer/, CKPT/hf_source/).")
    f.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json and safetensors (or pytorch_model.bin)")
    f.add_argument("ckpt", metavar="CKPT", help="checkpoint folder to create (the run's checkpoint.dir)")
    f.add_argument("--config", default=None,
                   help="run config YAML whose model keys must agree with the HF config; it needs no dataset "
                        "(default: none, the model section is derived from the HF config)")
    f.add_argument("--overwrite", action="store_true", help="replace CKPT if it exists")
    r = sub.add_parser("reshape", help="move a checkpoint (weights and optimizer state) to another tp/pp layout",
                       description="Writes OUT as a universal checkpoint; resume with checkpoint.dir=OUT "
                                   "parallel.tp=T parallel.pp=P at any data-parallel size (the trainer sees the "
                                   "UNIVERSAL marker and loads it as such).")
    r.add_argument("ckpt", metavar="CKPT", help="checkpoint folder (checkpoint.dir of the run)")
    r.add_argument("out", metavar="OUT", help="new checkpoint folder (written to a temporary name, then renamed)")
    r.add_argument("--tp", type=int, required=True, help="tensor-parallel size of the new layout")
    r.add_argument("--pp", type=int, required=True, help="pipeline stages of the new layout")
    r.add_argument("--tag", default=None, help="e.g. global_step1000 (default: latest committed)")
    r.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    if args.command == "to-hf" and not args.max_shard_size > 0:
        p.error(f"--max-shard-size must be a positive number of GiB, got {args.max_shard_size}")
    try:
        if args.command == "to-hf":
            from .hf import to_hf

            out = to_hf(args.ckpt, args.out, args.tag, args.dtype, args.overwrite,
                        int(args.max_shard_size * 1024**3))
            print(f"wrote Hugging Face model to {out}")
        elif args.command == "from-hf":
            from .hf import from_hf

            out = from_hf(args.hf_dir, args.ckpt, args.config, args.overwrite)
            print(f"wrote step-0 checkpoint to {out}")
        else:
            from .reshape import reshape

            out = reshape(args.ckpt, args.out, args.tp, args.pp, args.tag, args.overwrite)
            print(f"wrote reshaped checkpoint to {out}")
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
            IsADirectoryError) as e:  # the user's input or paths: exit 2
        print(f"error: {_first_line(e)}", file=sys.stderr)
        sys.exit(2)
    except (OSError, ImportError, RuntimeError) as e:  # the machine (disk full, a missing package, a crash): exit 1
        print(f"error: {_first_line(e)}", file=sys.stderr)
        sys.exit(1)


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, OSError) and e.filename and e.filename not in text:
        text += f": {e.filename}"
    return text
