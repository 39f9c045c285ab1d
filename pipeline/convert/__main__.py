"""`python -m pipeline.convert`: checkpoints to Hugging Face folders, back, and between parallel layouts.

    python -m pipeline.convert to-hf CKPT OUT [--tag global_stepN] [--dtype bf16|fp16|fp32]
    python -m pipeline.convert from-hf HF_DIR CKPT --config configs/X.yaml
    python -m pipeline.convert reshape CKPT OUT --tp T --pp P

to-hf reads any layout the trainer writes (ZeRO-3 partitions, ZeRO-0/1 module files, tensor-parallel shards,
pipeline layer files, and their combinations) on a CPU, without the original world size. from-hf writes a
weights-only step-0 checkpoint that `pipeline.train` starts from in any layout. Every command writes to a
temporary folder and renames it into place, so a failure leaves nothing behind.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile

import torch

from .config import RunConfig
from .convert_read import WEIGHTS_FILE, WEIGHTS_ONLY, open_checkpoint, read_weights_only  # noqa: F401 (API)

log = logging.getLogger("pipeline.convert")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
DEFAULT_SHARD_BYTES = 2 * 1024**3


def read_checkpoint(ckpt_dir: str, tag: str | None = None) -> tuple[dict, RunConfig, str]:
    """The full fp32 state dict (vocab unpadded), the run config and the tag of a committed checkpoint."""
    sd, cfg, tag, _ = open_checkpoint(ckpt_dir, tag)
    return sd.materialize(), cfg, tag


@contextlib.contextmanager
def staging_dir(out: str, overwrite: bool):
    """A temporary folder beside OUT, renamed to OUT on success and removed on any failure."""
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    created = not os.path.isdir(parent)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.removedirs(parent)
        raise


def _st_header(entries: list[tuple[str, torch.dtype, tuple]]) -> bytes:
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        meta[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(out_dir: str, entries: list[tuple[str, torch.dtype, tuple]], get, max_shard_bytes: int,
                      prefix: str = "model") -> list[str]:
    """Stream tensors into safetensors files (sharded above `max_shard_bytes`, with the index file that
    transformers reads): `get(name)` builds one tensor at a time, so only one is held in memory."""
    sizes = [torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in entries]
    shards, cur, cur_size = [], [], 0
    for e, n in zip(entries, sizes):
        if cur and cur_size + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(e)
        cur_size += n
    shards.append(cur)
    names = [f"{prefix}.safetensors"] if len(shards) == 1 else \
        [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(_st_header(shard))
            for name, dtype, shape in shard:
                t = get(name).to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"{name}: built shape {tuple(t.shape)}, planned {tuple(shape)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                del t
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}}
        with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return names


def tokenizer_info(model_path: str) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    return {"bos_id": sp.bos_id(), "eod_id": sp.eos_id(), "pad_id": sp.pad_id(), "unk_id": sp.unk_id()}


def hf_tokenizer(model_path: str):
    """Our SentencePiece model as a transformers fast tokenizer that encodes and decodes exactly as it does.

    transformers' own LlamaTokenizer differs from SentencePiece on text that starts with a space (its Metaspace
    pre-tokenizer skips the dummy prefix there) and on text containing "<s>" (it parses special tokens), so the
    pipeline is built here from the model's own normalizer settings instead."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import Unigram
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        with tempfile.TemporaryDirectory() as d:  # transformers derives the BPE merges from the pieces
            shutil.copyfile(model_path, os.path.join(d, "tokenizer.model"))
            backend = LlamaTokenizer.from_pretrained(d).backend_tokenizer
    elif trainer.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        backend = Tokenizer(Unigram([(p.piece, p.score) for p in proto.pieces], trainer.unk_id,
                                    byte_fallback=trainer.byte_fallback))
    else:
        raise ValueError(f"{model_path}: SentencePiece model type {trainer.model_type} cannot be exported")
    norm = [normalizers.NFKC()] if spec.name.startswith("nmt_nfkc") else []
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(norm)
    backend.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(dec + ([decoders.Strip(content=" ", left=1)] if spec.add_dummy_prefix else []))
    piece = {i: p.piece for i, p in enumerate(proto.pieces)}
    special = {k: piece.get(getattr(trainer, f"{k}_id")) for k in ("bos", "eos", "unk", "pad")}
    return PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True,
                                   **{f"{k}_token": v for k, v in special.items() if v is not None})


def save_hf_tokenizer(model_path: str, out: str) -> None:
    """Write the exported tokenizer (tokenizer.json + config) and the SentencePiece model itself into `out`."""
    hf_tokenizer(model_path).save_pretrained(out)
    shutil.copyfile(model_path, os.path.join(out, "tokenizer.model"))


def to_hf(ckpt_dir: str, out: str, tag: str | None = None, dtype: str = "fp32", overwrite: bool = False,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads; returns its path."""
    import transformers

    from .hf import hf_config, to_hf_plan

    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("to-hf", help="export a checkpoint (any layout) as a Hugging Face model folder")
    h.add_argument("ckpt", metavar="CKPT", help="checkpoint folder (checkpoint.dir of the run)")
    h.add_argument("out", metavar="OUT", help="output folder (written to a temporary name, then renamed)")
    h.add_argument("--tag", default=None, help="e.g. global_step1000 (default: latest committed)")
    h.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    h.add_argument("--max-shard-size", type=float, default=DEFAULT_SHARD_BYTES / 1024**3, metavar="GiB",
                   help="split the weights into safetensors files of at most this size, with an index (default 2)")
    h.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    f = sub.add_parser("from-hf", help="turn a Hugging Face Llama/GPT-2 folder into a step-0 checkpoint")
    f.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json and safetensors (or pytorch_model.bin)")
    f.add_argument("ckpt", metavar="CKPT", help="checkpoint folder to create (the run's checkpoint.dir)")
    f.add_argument("--config", required=True, help="run config YAML; its model keys must agree with the HF config")
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
    try:
        if args.command == "to-hf":
            out = to_hf(args.ckpt, args.out, args.tag, args.dtype, args.overwrite,
                        int(args.max_shard_size * 1024**3))
            print(f"wrote Hugging Face model to {out}")
        elif args.command == "from-hf":
            from .convert_hf import from_hf

            out = from_hf(args.hf_dir, args.ckpt, args.config, args.overwrite)
            print(f"wrote step-0 checkpoint to {out}")
        else:
            from .convert_reshape import reshape

            out = reshape(args.ckpt, args.out, args.tp, args.pp, args.tag, args.overwrite)
            print(f"wrote reshaped checkpoint to {out}")
    except (ValueError, FileNotFoundError, FileExistsError, OSError, ImportError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
