"""`python -m pipeline.train --config configs/X.yaml [key=value ...]`: pretrain under the DeepSpeed engine.

Launch with torchrun, the deepspeed launcher, mpirun/srun, or plainly for one process. Resumes from
`checkpoint.dir/latest` when it exists. Exit codes: 0 done, 1 error, 85 checkpointed on a signal (requeue me).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import sys
import time
import warnings

EXIT_REQUEUE = 85
log = logging.getLogger("pipeline")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    return p.parse_args(argv)


def data_fingerprint(docs) -> str:
    import hashlib

    return hashlib.sha256("".join(d.fingerprint() for d in docs).encode()).hexdigest()


def prepare(args):
    """Load, fill data-derived values, validate, and pick the checkpoint to resume, before any process group
    starts: every user error surfaces here as one line."""
    from . import checkpoint
    from .config import load_config, validate
    from .data import TokenDocuments
    from .dist import world_size_from_env

    cfg = load_config(args.config, args.overrides)
    docs = [TokenDocuments(d["path"]) for d in cfg.data.datasets]
    tokenizers = {d.tokenizer["sha256"] for d in docs if d.tokenizer}
    if len(tokenizers) > 1:
        raise ValueError("data.datasets were tokenized with different tokenizers; re-tokenize them with one")
    if cfg.model.vocab_size is None:
        if not docs[0].tokenizer:
            raise ValueError("model.vocab_size is unset and the first dataset has no manifest to take it from")
        cfg.model.vocab_size = docs[0].tokenizer["vocab_size"]
    validate(cfg, world_size_from_env())
    if cfg.log.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("log.wandb_project is set but wandb is not installed (pip install wandb)") from None
    from .data import build_datasets

    build_datasets(cfg, docs)  # a split too small for the steps fails here, in one line; run() reuses the cache
    tag = checkpoint.resolve_tag(cfg.checkpoint.dir)
    if tag is not None:
        problem = checkpoint.check_compatible(cfg.checkpoint.dir, tag, cfg.to_dict()["model"], data_fingerprint(docs))
        if problem and not cfg.checkpoint.force:
            raise ValueError(f"cannot resume from {os.path.join(cfg.checkpoint.dir, tag)}: {problem} "
                             f"(use a new checkpoint.dir, or checkpoint.force=true)")
        moved = checkpoint.layout_change(cfg.checkpoint.dir, tag, cfg.to_dict()["parallel"],
                                         world_size_from_env(default=None))
        if moved:
            raise ValueError(f"cannot resume from {os.path.join(cfg.checkpoint.dir, tag)}: {moved}")
        changes = [] if checkpoint.is_weights_only(cfg.checkpoint.dir, tag) else \
            checkpoint.schedule_changes(cfg.checkpoint.dir, tag, cfg.to_dict()["train"])
        if changes and not cfg.train.override_lr_schedule:
            raise ValueError(f"cannot resume from {os.path.join(cfg.checkpoint.dir, tag)}: the LR schedule differs "
                             f"from the checkpoint's: {', '.join(changes)} (set train.override_lr_schedule=true to "
                             f"follow this config's schedule from the resumed step, or restore the values)")
    return cfg, docs, tag


class LRSchedule:
    """Linear warmup to `lr`, then cosine/linear decay to `min_lr` at `steps` (a multiplier for LambdaLR)."""

    def __init__(self, t):
        self.t = t

    def __call__(self, step: int) -> float:
        t = self.t
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.decay_style == "constant":
            return 1.0
        frac = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if t.decay_style == "cosine" else 1 - frac
        return (t.min_lr + (t.lr - t.min_lr) * decay) / t.lr


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nonfinite_action(loss: float, grad_norm: float | None, precision: str, on_nonfinite: str,
                     step_applied: bool) -> str:
    """What a step's outcome means: "ok"; "overflow" (fp16: finite loss, the loss scaler skipped the update, as
    it routinely does while it searches for its scale); "skip" (non-finite loss, train.on_nonfinite=skip); "stop"."""
    finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
    if precision == "fp16" and math.isfinite(loss) and (not finite or not step_applied):
        return "overflow"
    if finite:
        return "ok"
    return "skip" if on_nonfinite == "skip" else "stop"


class StopFlag:
    """Set by SIGUSR1/SIGTERM; agreed across ranks each step so that all stop at the same step."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True

    def agreed(self, device=None) -> bool:
        """Collective. `device`: the engine's (NCCL reduces CUDA tensors only)."""
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if tdist.is_initialized():
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())


def run(cfg, docs, tag, stop) -> int:
    import torch

    from . import checkpoint, dist
    from .data import batch_for_rank, build_datasets, loss_mask
    from .engine import build_engine
    from .metrics import Metrics, peak_tflops
    from .config import dump
    from .model import flops_per_token

    dist.init_distributed(cfg.train.dist_timeout_s)
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(cfg.train.seed)
    weights_only = tag is not None and checkpoint.is_weights_only(cfg.checkpoint.dir, tag)
    if weights_only:
        engine = build_engine(cfg, init_state_dict=checkpoint.load_weights_only(cfg.checkpoint.dir, tag))
    else:
        engine = build_engine(cfg, load_universal=tag is not None and checkpoint.is_universal(cfg.checkpoint.dir, tag))
    dp_rank, dp = engine.dp_rank, engine.dp_size
    t = cfg.train
    if rank == 0:
        log.info("effective config:\n%s", dump(cfg))
        log.info("model: %s, %.2fM parameters; world %d (dp %d, tp %d, pp %d); %s", cfg.model.arch,
                 engine.num_params / 1e6, world, dp, cfg.parallel.tp, cfg.parallel.pp, t.precision)
    train_ds, valid_ds = build_datasets(cfg, docs)
    fingerprint = data_fingerprint(docs)

    step, consumed = 0, 0
    if weights_only:
        if rank == 0:
            log.info("starting from the weights of %s (fresh optimizer, step 0)", tag)
    elif tag is not None:
        state = checkpoint.load(engine.engine, cfg.checkpoint.dir, tag)
        step, consumed = state["step"], state["consumed_samples"]
        if rank == 0:
            log.info("resumed from %s at step %d (%d samples consumed)", tag, step, consumed)
        if t.override_lr_schedule:
            engine.set_lr_schedule(LRSchedule(t), t.lr)
            if rank == 0:
                log.info("train.override_lr_schedule: this config's LR schedule from step %d on (lr %.3g)", step,
                         engine.lr())
    if rank == 0:
        os.makedirs(cfg.checkpoint.dir, exist_ok=True)
        tok = docs[0].tokenizer
        if tok and not os.path.exists(os.path.join(cfg.checkpoint.dir, "tokenizer.model")):
            shutil.copyfile(tok["path"], os.path.join(cfg.checkpoint.dir, "tokenizer.model"))

    metrics = Metrics(cfg.log.jsonl, cfg.log.tensorboard_dir, enabled=rank == 0,
                      wandb_project=cfg.log.wandb_project, run_config=cfg.to_dict())
    tokens_per_step = t.global_batch_size * cfg.model.seq_len
    fpt = flops_per_token(cfg.model)
    peak = cfg.log.peak_tflops or peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else None)

    def save(sync: bool = cfg.checkpoint.sync):
        if not engine.weights_finite():  # a finite loss can still be followed by a non-finite update
            raise FloatingPointError(f"non-finite weights after step {step}; not saving over the last good "
                                     f"checkpoint ({checkpoint.resolve_tag(cfg.checkpoint.dir)})")
        checkpoint.save(engine.engine, cfg.checkpoint.dir, step,
                        {"step": step, "consumed_samples": consumed, "data_fingerprint": fingerprint,
                         "config": cfg.to_dict()}, cfg.to_dict(), cfg.checkpoint.keep, sync)

    eod = (docs[0].tokenizer or {}).get("eod_id")
    if cfg.data.mask_eod_loss and eod is None:
        raise ValueError("data.mask_eod_loss needs the EOD id from a dataset manifest")

    def batch(ds, k):
        tokens = batch_for_rank(ds, k, t.global_batch_size, dp_rank, dp)
        mask = torch.from_numpy(loss_mask(tokens, eod)) if cfg.data.mask_eod_loss else None
        return torch.from_numpy(tokens), mask

    def evaluate():
        losses = [engine.eval_loss(*batch(valid_ds, k)) for k in range(t.eval_iters)]
        loss = sum(losses) / len(losses)
        metrics.write({"split": "valid", "step": step, "loss": loss, "ppl": math.exp(min(loss, 50))})

    step_time, steps_timed, code = 0.0, 0, 0
    while step < t.steps:
        t_step = time.time()
        loss = engine.train_step(*batch(train_ds, step))
        grad_norm = engine.grad_norm()
        step_time += time.time() - t_step
        action = nonfinite_action(loss, grad_norm, t.precision, t.on_nonfinite, engine.step_applied())
        if action == "overflow":
            if rank == 0:
                log.info("step %d: fp16 gradients overflowed; the loss scaler skipped the update and lowered the "
                         "scale", step + 1)
        elif action == "skip":
            if rank == 0:
                log.warning("non-finite loss or gradients at step %d: update skipped by the fp16 loss scaler", step + 1)
        elif action == "stop":
            # DeepSpeed skips an update with non-finite gradients, but the run has diverged: stop before anything
            # more is saved, so the last committed checkpoint stays the last good one.
            raise FloatingPointError(f"non-finite loss {loss} or gradient norm {grad_norm} at step {step + 1}; "
                                     f"stopping without saving (last good checkpoint: "
                                     f"{checkpoint.resolve_tag(cfg.checkpoint.dir)})")
        step += 1
        consumed += t.global_batch_size
        steps_timed += 1
        if step % cfg.log.interval == 0 or step == t.steps:
            # train steps only: evaluations and checkpoints between two log lines do not count
            elapsed = step_time / steps_timed
            step_time, steps_timed = 0.0, 0
            tps = tokens_per_step / elapsed
            tflops = fpt * tps / world / 1e12
            metrics.write({"step": step, "loss": loss, "lr": engine.lr(), "grad_norm": grad_norm,
                           "consumed_samples": consumed, "tokens": consumed * cfg.model.seq_len,
                           "tokens_per_sec": tps, "tflops": tflops, "mfu": tflops / peak if peak else None,
                           "step_time_s": elapsed,
                           "mem_mb": peak_memory_mb()})
        if valid_ds is not None and t.eval_interval > 0 and step % t.eval_interval == 0:
            evaluate()
        if stop is not None and stop.agreed(engine.device):
            save(sync=False)  # inside the grace period: commit now; the live node writes its pages back anyway
            code = EXIT_REQUEUE
            if rank == 0:
                log.info("stopped by signal at step %d; checkpoint committed, exiting with %d", step, code)
            break
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < t.steps:
            save()
    else:
        if checkpoint.resolve_tag(cfg.checkpoint.dir) != checkpoint.tag_for(step):
            save()
    metrics.close()
    return code


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    args = parse_args(argv)
    try:
        cfg, docs, tag = prepare(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from . import dist

    # Installed before the (slow) start-up, so that a signal during it still ends in a checkpoint at step 1.
    stop = StopFlag() if cfg.checkpoint.save_on_signal else None
    try:
        code = run(cfg, docs, tag, stop)
    except Exception as e:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        print(f"error: rank {dist.rank()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # no barrier: the other ranks may be gone; their timeout ends them
    dist.exit_cleanly(code)


if __name__ == "__main__":
    main()
