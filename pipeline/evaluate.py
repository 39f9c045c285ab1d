"""`python -m pipeline.evaluate CKPT --config X [key=value ...]`: loss and perplexity of a committed checkpoint.

CKPT is a checkpoint folder (its newest committed tag, or `--tag`) or one tag folder (CKPT/global_stepN), in any
layout. The model runs through the trainer's own engine and evaluation (the same batches, the same loss), so on
the same checkpoint and data it gives the trainer's valid loss. Launch it like the trainer: plainly (one
process) or under torchrun/srun for a model that needs several GPUs; the layout is the config's
(parallel.tp/pp/zero_stage). A checkpoint saved in this very layout loads through DeepSpeed; any other layout
(other tp, pp or data-parallel size, weights-only, universal) is read as one full state dict first, which every
rank holds once in CPU memory.

Data: the validation split of the config's data.datasets (train.eval_iters global batches of
train.global_batch_size sequences; `--iters` to change), or with `--datasets DIR...` every document of those
preprocessed datasets (`preprocess tokenize` outputs).

The result is printed and appended to the run's log.jsonl (log.jsonl of the config) as
`{"split": "valid", "step", "loss", "ppl", "source": "evaluate", "tag"}` (plus `"data"` with --datasets), so that
`pipeline.report` shows old checkpoints' losses beside the trainer's own. Exit codes: 0; 2 bad input (one
`error:` line); 1 runtime failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

log = logging.getLogger("pipeline")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint folder, or one of its global_stepN folders")
    p.add_argument("--config", required=True, help="run config YAML (model, layout, data; see configs/)")
    p.add_argument("--tag", default=None, help="tag to evaluate, e.g. global_step1000 (default: the newest "
                                               "committed one, or the tag folder given as CKPT)")
    p.add_argument("--datasets", nargs="+", default=None, metavar="DIR",
                   help="evaluate on every document of these preprocessed datasets instead of the validation split")
    p.add_argument("--iters", type=int, default=None,
                   help="global batches to evaluate (default: train.eval_iters of the config)")
    p.add_argument("--no-log", action="store_true", help="print only; append nothing to log.jsonl")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.tp=2")
    return p.parse_intermixed_args(argv)  # CKPT, options and overrides in any order


def split_tag(ckpt: str, tag: str | None) -> tuple[str, str | None]:
    """CKPT/global_stepN given as CKPT: (CKPT, global_stepN)."""
    ckpt = os.path.normpath(ckpt)
    base = os.path.basename(ckpt)
    if tag is None and base.startswith("global_step") and os.path.isfile(os.path.join(ckpt, "COMMITTED")):
        return os.path.dirname(ckpt) or ".", base
    return ckpt, tag


def prepare(args):
    """Everything a user can get wrong, checked before any process group starts (ValueError, one line)."""
    from . import checkpoint
    from .checkpoint.read import committed_tag
    from .config import load_config, validate
    from .data import TokenDocuments, build_split
    from .dist import world_size_from_env

    overrides = list(args.overrides)
    if args.datasets:
        entries = [{"path": os.path.abspath(d), "weight": 1.0} for d in args.datasets]
        overrides += [f"data.datasets={json.dumps(entries)}", "data.split=0,1,0"]  # every document: valid
    cfg = load_config(args.config, overrides)
    if args.iters is not None:
        if args.iters < 1:
            raise ValueError(f"--iters must be >= 1, got {args.iters}")
        cfg.train.eval_iters = args.iters
    ckpt_dir, tag = split_tag(args.ckpt, args.tag)
    tag, _ = committed_tag(ckpt_dir, tag)
    cfg.checkpoint.dir = ckpt_dir
    docs = [TokenDocuments(d.path) for d in cfg.data.datasets]
    if cfg.model.vocab_size is None and docs[0].tokenizer:
        cfg.model.vocab_size = docs[0].tokenizer["vocab_size"]
    validate(cfg, world_size_from_env())
    problem = checkpoint.check_compatible(ckpt_dir, tag, cfg.to_dict()["model"], None)
    if problem:
        raise ValueError(f"{os.path.join(ckpt_dir, tag)}: {problem}; evaluate with the config it was trained with")
    if cfg.data.mask_eod_loss and (docs[0].tokenizer or {}).get("eod_id") is None:
        raise ValueError("data.mask_eod_loss needs the EOD id from a dataset manifest")
    valid = build_split(cfg, docs, "valid", cfg.train.eval_iters * cfg.train.global_batch_size)
    if valid is None:
        raise ValueError(f"data.split '{cfg.data.split}' gives no validation documents; set data.split (e.g. "
                         f"98,1,1) or name datasets with --datasets")
    return cfg, docs, tag


def build(cfg, tag: str):
    """The trainer's engine for cfg's layout, holding the weights of `tag`."""
    from . import checkpoint
    from .checkpoint.read import open_checkpoint
    from .dist import world_size
    from .engine import build_engine

    d = cfg.checkpoint.dir
    direct = not checkpoint.is_weights_only(d, tag) and \
        checkpoint.layout_change(d, tag, cfg.to_dict()["parallel"], world_size()) is None
    if direct:  # DeepSpeed loads its own files (and only this rank's part of them)
        engine = build_engine(cfg, load_universal=checkpoint.is_universal(d, tag))
        checkpoint.load(engine.engine, d, tag)
    else:
        weights, _, _, _ = open_checkpoint(d, tag)
        engine = build_engine(cfg, init_state_dict=weights.materialize())
    return engine, "deepspeed" if direct else "full state dict"


def run(cfg, docs, tag) -> dict:
    import torch

    from . import checkpoint, dist
    from .data import build_split
    from .loop import Batches, evaluate

    dist.init_distributed(cfg.train.dist_timeout_s)
    torch.manual_seed(cfg.train.seed)
    engine, how = build(cfg, tag)
    t = cfg.train
    valid = build_split(cfg, docs, "valid", t.eval_iters * t.global_batch_size)
    batches = Batches(cfg, (docs[0].tokenizer or {}).get("eod_id"), engine.dp_rank, engine.dp_size)
    loss = evaluate(engine, batches, valid, t.eval_iters)
    step = int(checkpoint.marker(cfg.checkpoint.dir, tag).get("step", -1))
    record = {"split": "valid", "step": step, "loss": loss, "ppl": math.exp(min(loss, 50)), "source": "evaluate",
              "tag": tag}
    if engine.rank == 0:
        log.info("%s (loaded via %s, world %d): %d batches of %d sequences", tag, how, engine.world, t.eval_iters,
                 t.global_batch_size)
    return record


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        cfg, docs, tag = prepare(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"error: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        sys.exit(2)
    from . import dist

    try:
        record = run(cfg, docs, tag)
    except Exception as e:
        import traceback

        traceback.print_exc()
        print(f"error: rank {dist.rank()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    if args.datasets:
        record["data"] = ",".join(os.path.abspath(d) for d in args.datasets)
    if dist.rank() == 0:
        print(f"{tag}: step {record['step']} | loss {record['loss']:.6f} | ppl {record['ppl']:.4f}", flush=True)
        if cfg.log.jsonl and not args.no_log:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.log.jsonl)), exist_ok=True)
            with open(cfg.log.jsonl, "a") as f:  # one write of one line: appends safely beside a live run
                f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
            print(f"appended to {cfg.log.jsonl}", flush=True)
    dist.exit_cleanly(0)


if __name__ == "__main__":
    main()
