"""`python -m pipeline.train --config configs/X.yaml [key=value ...]`: pretrain under the DeepSpeed engine.

Launch with torchrun, the deepspeed launcher, mpirun/srun, or plainly for one process. Resumes from
`checkpoint.dir/latest` when it exists. Exit codes: 0 done, 1 runtime failure, 2 bad configuration (one
`error:` line, before any process group starts), 85 checkpointed on a signal (requeue me).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

log = logging.getLogger("pipeline")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    return p.parse_args(argv)


def prepare(args):
    """Load, fill data-derived values, validate, build the data indices and check the checkpoint to resume,
    before any process group starts: every user error surfaces here as one ValueError line."""
    from .config import load_config, validate
    from .data import TokenDocuments, build_datasets
    from .data.documents import check_same_tokenizer
    from .dist import world_size_from_env

    cfg = load_config(args.config, args.overrides)
    docs = [TokenDocuments(d.path) for d in cfg.data.datasets]
    check_same_tokenizer(docs)
    if cfg.model.vocab_size is None:
        if not docs[0].tokenizer:
            raise ValueError("model.vocab_size is unset and the first dataset has no manifest to take it from")
        cfg.model.vocab_size = docs[0].tokenizer["vocab_size"]
    data_vocab = (docs[0].tokenizer or {}).get("vocab_size")
    if data_vocab and data_vocab > cfg.model.vocab_size:  # e.g. a from-hf model fed data of another tokenizer
        raise ValueError(f"{cfg.data.datasets[0].path}: tokenized with a vocabulary of {data_vocab} tokens, more "
                         f"than model.vocab_size {cfg.model.vocab_size}; tokenize with the model's own tokenizer")
    if cfg.model.eod_id is None and cfg.model.attn_mask_type == "block_causal":
        cfg.model.eod_id = (docs[0].tokenizer or {}).get("eod_id")
        if cfg.model.eod_id is None:
            raise ValueError("model.attn_mask_type block_causal needs model.eod_id: set it, or tokenize the data "
                             "with `preprocess tokenize` (its manifest records the EOD id)")
    validate(cfg, world_size_from_env())
    for key, path, is_dir in (("checkpoint.dir", cfg.checkpoint.dir, True), ("log.jsonl", cfg.log.jsonl, False),
                              ("log.tensorboard_dir", cfg.log.tensorboard_dir, True)):
        if path:
            check_writable(key, path, is_dir)
    if cfg.data.mask_eod_loss and (docs[0].tokenizer or {}).get("eod_id") is None:
        raise ValueError("data.mask_eod_loss needs the EOD id from a dataset manifest")
    if cfg.log.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("log.wandb_project is set but wandb is not installed (pip install wandb)") from None
    build_datasets(cfg, docs)  # a split too small for the steps fails here, in one line; run() reuses the cache
    from . import checkpoint  # torch: imported once the config and data have passed (a typo answers at once)

    tag = checkpoint.resolve_tag(cfg.checkpoint.dir)
    if tag is not None:
        checkpoint.check_resumable(cfg, tag, checkpoint.data_fingerprint(docs), world_size_from_env(default=None))
    return cfg, docs, tag


def check_writable(key: str, path: str, is_dir: bool) -> None:
    """Refuse now, in one line, an output the run could not write hours later (at its first log line or save).
    Creates nothing that stays: an existing file is opened for appending, a folder gets a vanishing probe file."""
    import tempfile

    path = os.path.abspath(path)
    try:
        if os.path.exists(path) and not is_dir:
            if os.path.isdir(path):
                raise ValueError(f"{key} {path} is a folder; name a file")
            open(path, "a").close()
            return
        parent = path if is_dir else os.path.dirname(path)
        while not os.path.exists(parent):  # the run creates the missing folders below the nearest existing one
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"{key} {path}: {parent} is a file, not a folder")
        tempfile.TemporaryFile(dir=parent, prefix=".write-test-").close()
    except OSError as e:
        raise ValueError(f"{key} {path} is not writable ({e.strerror or e}): fix its permissions or choose "
                         f"another path") from None


def start(cfg, tag):
    """The engine, with the checkpoint `tag` (or the weights of a weights-only tag) loaded, and the TrainState."""
    from . import checkpoint
    from .checkpoint.read import read_weights_only
    from .engine import build_engine
    from .loop import TrainState

    weights_only = tag is not None and checkpoint.is_weights_only(cfg.checkpoint.dir, tag)
    if weights_only:
        engine = build_engine(cfg, init_state_dict=read_weights_only(cfg.checkpoint.dir, tag))
    else:
        engine = build_engine(cfg, load_universal=tag is not None and checkpoint.is_universal(cfg.checkpoint.dir, tag))
    state = TrainState()
    if tag is not None and not weights_only:
        saved = checkpoint.load(engine.engine, cfg.checkpoint.dir, tag)
        state = TrainState(saved["step"], saved["consumed_samples"], saved.get("spikes") or {})
    if engine.rank == 0:
        from .config import dump

        log.info("effective config:\n%s", dump(cfg))
        log.info("model: %s, %.2fM parameters; world %d (dp %d, tp %d, pp %d); %s", cfg.model.arch,
                 engine.num_params / 1e6, engine.world, engine.dp_size, cfg.parallel.tp, cfg.parallel.pp,
                 cfg.train.precision)
        if weights_only:
            log.info("starting from the weights of %s (fresh optimizer, step 0)", tag)
        elif tag is not None:
            log.info("resumed from %s at step %d (%d samples consumed)", tag, state.step, state.consumed_samples)
    return engine, state


def run(cfg, docs, tag, stop) -> int:
    """The train loop: one optimizer step per global batch, metered, guarded, evaluated and saved when due."""
    import torch

    from . import dist
    from .checkpoint import data_fingerprint
    from .data import build_datasets
    from .loop import Batches, Meter, Saver, SpikeFilter, copy_tokenizer, evaluate, guard_nonfinite
    from .optim import Schedule, lr_at
    from .stragglers import StepTimer

    dist.init_distributed(cfg.train.dist_timeout_s)
    torch.manual_seed(cfg.train.seed)
    engine, state = start(cfg, tag)
    train_ds, valid_ds = build_datasets(cfg, docs)
    batches = Batches(cfg, (docs[0].tokenizer or {}).get("eod_id"), engine.dp_rank, engine.dp_size)
    schedule = Schedule.from_train_config(cfg.train)
    meter = Meter(cfg, engine.world, enabled=engine.rank == 0)
    saver = Saver(cfg, engine, data_fingerprint(docs))
    if engine.rank == 0:
        copy_tokenizer(cfg, docs)
    t = cfg.train
    timer = StepTimer(engine, cfg.log.interval, t.steps, cfg.log.straggler_ratio)  # per-rank times, stragglers
    spikes = SpikeFilter(cfg, state, engine.rank == 0)  # train.skip_spikes: its test, asked before each update
    code = 0
    while state.step < t.steps:
        engine.set_lr(lr_at(state.step, schedule))
        meter.start_step()
        with timer.data():
            batch = batches.get(train_ds, state.step)
        with timer.step():
            loss = engine.train_step(*batch, skip_if=spikes.test)
        meter.end_step()
        guard_nonfinite(loss, engine, cfg, state.step + 1)
        state.advance(t.global_batch_size)
        meter.log_if_due(state, loss, engine, timer.gather_if_due(state.step))
        if valid_ds is not None and t.eval_interval > 0 and state.step % t.eval_interval == 0:
            meter.write_eval(state.step, evaluate(engine, batches, valid_ds, t.eval_iters))
        if stop is not None and stop.agreed(engine.device):
            code = saver.on_signal(state, stop.reason)
            break
        saver.save_if_due(state)
    if code == 0:
        saver.final(state)
    meter.close()
    return code


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    args = parse_args(argv)
    from .checkpoint.lock import hold_checkpoint_dir

    try:
        cfg, docs, tag = prepare(args)
        lock = hold_checkpoint_dir(cfg.checkpoint.dir)  # a second run on checkpoint.dir stops here (lock.py)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"error: {_describe(e)}", file=sys.stderr)  # the user's input or paths: exit 2
        sys.exit(2)
    except OSError as e:  # the machine (a full disk, an I/O error): a runtime failure
        print(f"error: {_describe(e)}", file=sys.stderr)
        sys.exit(1)
    from . import dist
    from .loop import StopFlag

    # Installed before the (slow) start-up, so that a signal during it still ends in a checkpoint at step 1.
    t = cfg.train
    stop = StopFlag(cfg.checkpoint.save_on_signal, t.exit_after_minutes) \
        if cfg.checkpoint.save_on_signal or t.exit_after_minutes else None
    try:
        code = run(cfg, docs, tag, stop)
    except Exception as e:
        import errno
        import traceback

        if not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):  # a full disk: one line
            traceback.print_exc()
        sys.stdout.flush()
        print(f"error: rank {dist.rank()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if lock:
            lock.release()
        os._exit(1)  # no barrier: the other ranks may be gone; their timeout ends them
    if lock:
        lock.release()
    dist.exit_cleanly(code)


def _describe(e: Exception) -> str:
    """One line for an exception: `path: reason` for the OS's errors, else its message."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return (str(e).splitlines() or [type(e).__name__])[0]


if __name__ == "__main__":
    main()
