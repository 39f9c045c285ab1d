"""The named pieces of the train loop (pipeline/train.py): its state, batches, metering, the non-finite guard,
saving, and the stop flag. Each owns one job, so that the loop itself reads top to bottom."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time

import torch
import torch.distributed as tdist

from . import checkpoint
from .data import batch_for_rank, loss_mask
from .metrics import Metrics, peak_tflops
from .model import flops_per_token

log = logging.getLogger("pipeline")
EXIT_REQUEUE = 85


@dataclasses.dataclass
class TrainState:
    """Where the run is: optimizer steps taken and samples consumed (the data order's cursor); the spike filter's
    rolling statistics (plain lists of floats, checkpointed so that a resume decides as the straight run)."""
    step: int = 0
    consumed_samples: int = 0
    spikes: dict = dataclasses.field(default_factory=dict)

    def advance(self, global_batch_size: int) -> None:
        self.step += 1
        self.consumed_samples += global_batch_size


class Batches:
    """This data-parallel rank's tokens (and loss mask) of global batch `k` of a split."""

    def __init__(self, cfg, eod_id: int | None, dp_rank: int, dp_size: int):
        self.global_batch, self.dp_rank, self.dp_size = cfg.train.global_batch_size, dp_rank, dp_size
        self.eod_id = eod_id if cfg.data.mask_eod_loss else None

    def get(self, dataset, k: int):
        tokens = batch_for_rank(dataset, k, self.global_batch, self.dp_rank, self.dp_size)
        mask = torch.from_numpy(loss_mask(tokens, self.eod_id)) if self.eod_id is not None else None
        return torch.from_numpy(tokens), mask


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set."""
    import resource

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Meter:
    """Times train steps (evaluations and saves between two log lines do not count) and writes one metrics line
    per `log.interval`: loss, LR, gradient norm, tokens/s, TFLOPs, MFU, memory."""

    def __init__(self, cfg, world_size: int, enabled: bool):
        self.cfg, self.world = cfg, world_size
        self.metrics = Metrics(cfg.log.jsonl, cfg.log.tensorboard_dir, enabled=enabled,
                               wandb_project=cfg.log.wandb_project, run_config=cfg.to_dict())
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
        self.flops_per_token = flops_per_token(cfg.model)
        self.peak = cfg.log.peak_tflops or peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        self.step_time, self.steps_timed, self._t0 = 0.0, 0, 0.0

    def start_step(self) -> None:
        self._t0 = time.time()

    def end_step(self) -> None:
        self.step_time += time.time() - self._t0
        self.steps_timed += 1

    def log_if_due(self, state: TrainState, loss: float, engine, extra: dict | None = None) -> None:
        if not (state.step % self.cfg.log.interval == 0 or state.step == self.cfg.train.steps):
            return
        elapsed = self.step_time / max(1, self.steps_timed)
        self.step_time, self.steps_timed = 0.0, 0
        tps = self.tokens_per_step / elapsed
        tflops = self.flops_per_token * tps / self.world / 1e12
        if self.cfg.train.skip_spikes:
            extra = {**(extra or {}), "skipped_steps": state.spikes.get("skipped", 0)}
        if self.cfg.train.z_loss:  # the z-loss term, logged apart from the cross-entropy in `loss`
            extra = {**(extra or {}), "z_loss": engine.last_z_loss}
        self.metrics.write({"step": state.step, "loss": loss, "lr": engine.lr(), "grad_norm": engine.grad_norm(),
                            "consumed_samples": state.consumed_samples,
                            "tokens": state.consumed_samples * self.cfg.model.seq_len, "tokens_per_sec": tps,
                            "tflops": tflops, "mfu": tflops / self.peak if self.peak else None,
                            "step_time_s": elapsed, "mem_mb": peak_memory_mb(), **(extra or {})})

    def write_eval(self, step: int, loss: float) -> None:
        self.metrics.write({"split": "valid", "step": step, "loss": loss, "ppl": math.exp(min(loss, 50))})

    def close(self) -> None:
        self.metrics.close()


def evaluate(engine, batches: Batches, valid_ds, eval_iters: int) -> float:
    """Mean loss over the first `eval_iters` global batches of the validation split."""
    losses = [engine.eval_loss(*batches.get(valid_ds, k)) for k in range(eval_iters)]
    return sum(losses) / len(losses)


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


def guard_nonfinite(loss: float, engine, cfg, step: int) -> None:
    """Log an fp16 overflow or a skipped non-finite step; stop the run (before anything more is saved, so the
    last committed checkpoint stays the last good one) when the loss or gradients are non-finite otherwise."""
    if getattr(engine, "spike_skipped", False):  # SpikeFilter logged it; DeepSpeed's skip is no overflow
        return
    grad_norm = engine.grad_norm()
    action = nonfinite_action(loss, grad_norm, cfg.train.precision, cfg.train.on_nonfinite, engine.step_applied())
    if action == "overflow" and engine.rank == 0:
        log.info("step %d: fp16 gradients overflowed; the loss scaler skipped the update and lowered the scale", step)
    elif action == "skip" and engine.rank == 0:
        log.warning("non-finite loss or gradients at step %d: update skipped by the fp16 loss scaler", step)
    elif action == "stop":
        raise FloatingPointError(f"non-finite loss {loss} or gradient norm {grad_norm} at step {step}; stopping "
                                 f"without saving (last good checkpoint: {checkpoint.resolve_tag(cfg.checkpoint.dir)})")


class SpikeFilter:
    """train.skip_spikes: a step whose loss or gradient norm lies more than spike_sigma standard deviations above
    the mean of the last spike_window applied steps is not applied (OLMo-core's skip-step rule). `test` is the
    engine's `skip_if` (None when off); its verdicts are logged with their figures and counted in the state.

    The window holds applied steps only (a spike must not widen the band that judges the next one) and decides
    nothing until it is full."""

    def __init__(self, cfg, state: TrainState, log_enabled: bool):
        t = cfg.train
        self.window, self.sigma, self.state, self.log_enabled = t.spike_window, t.spike_sigma, state, log_enabled
        self.test = self._test if t.skip_spikes else None
        for key in ("losses", "grad_norms"):
            state.spikes.setdefault(key, [])
        state.spikes.setdefault("skipped", 0)

    def _test(self, loss: float, grad_norm: float) -> bool:
        s, step = self.state.spikes, self.state.step + 1
        figures = {"loss": (loss, s["losses"]), "grad_norm": (grad_norm, s["grad_norms"])}
        outliers = []
        for name, (value, past) in figures.items():
            if len(past) >= self.window:
                mean = sum(past) / len(past)
                std = math.sqrt(sum((x - mean) ** 2 for x in past) / len(past))
                if not value <= mean + self.sigma * std:  # a NaN is an outlier too
                    outliers.append(f"{name} {value:.4g} > mean {mean:.4g} + {self.sigma:g} x std {std:.3g}")
        if outliers:
            s["skipped"] += 1
            if self.log_enabled:
                log.warning("step %d: loss spike, update skipped (%s over the last %d steps); %d skipped so far",
                            step, "; ".join(outliers), self.window, s["skipped"])
            return True
        for value, past in figures.values():
            past.append(float(value))
            del past[:-self.window]
        return False


class Saver:
    """Checkpoints under the commit protocol: when due, on a signal, and at the end.

    With `checkpoint.async_save`, a due save copies the tensors to host memory and returns; the files are written
    in the background, and the save is committed at the first step boundary where every rank reports its writes
    complete (`poll`, one small all-reduce a step while a save is in flight). At most one save is in flight: the
    next save, a signal and the end of training wait for it (`wait`)."""

    def __init__(self, cfg, engine, fingerprint: str):
        self.cfg, self.engine, self.fingerprint = cfg, engine, fingerprint
        self.pending = None  # (step, client state, start time) of the background save in flight

    def save(self, state: TrainState, sync: bool | None = None, background: bool | None = None) -> None:
        c = self.cfg.checkpoint
        self.wait()
        if not self.engine.weights_finite():  # a finite loss can still be followed by a non-finite update
            raise FloatingPointError(f"non-finite weights after step {state.step}; not saving over the last good "
                                     f"checkpoint ({checkpoint.resolve_tag(c.dir)})")
        client = {"step": state.step, "consumed_samples": state.consumed_samples, "spikes": state.spikes,
                  "data_fingerprint": self.fingerprint, "config": self.cfg.to_dict()}
        background = c.async_save if background is None else background
        t0 = time.time()
        checkpoint.save(self.engine.engine, c.dir, state.step, client, self.cfg.to_dict(), c.keep,
                        c.sync if sync is None else sync, background=background)
        if background:
            self.pending = (state.step, client, t0)

    def poll(self, block: bool = False) -> None:
        """Commit the background save once every rank's writes are done (collective while one is in flight)."""
        if self.pending is None or not checkpoint.background_done(self.engine.engine, self.engine.device, block):
            return
        step, client, t0 = self.pending
        self.pending = None
        c = self.cfg.checkpoint
        checkpoint.finish(c.dir, step, client, self.cfg.to_dict(), c.keep, t0)

    def wait(self) -> None:
        self.poll(block=True)

    def save_if_due(self, state: TrainState) -> None:
        self.poll()
        interval = self.cfg.checkpoint.interval
        if interval and state.step % interval == 0 and state.step < self.cfg.train.steps:
            self.save(state)

    def final(self, state: TrainState) -> None:
        self.wait()
        if checkpoint.resolve_tag(self.cfg.checkpoint.dir) != checkpoint.tag_for(state.step):
            self.save(state, background=False)

    def on_signal(self, state: TrainState, reason: str = "a signal") -> int:
        self.wait()  # a background save in flight commits first
        # inside the grace period: commit now; the live node writes its pages back
        self.save(state, sync=False, background=False)
        if self.engine.rank == 0:
            log.info("stopped by %s at step %d; checkpoint committed, exiting with %d", reason, state.step,
                     EXIT_REQUEUE)
        return EXIT_REQUEUE


def copy_tokenizer(cfg, docs) -> None:
    """Keep the data's tokenizer beside the checkpoints, for `to-hf` and `generate`: a SentencePiece model as
    tokenizer.model, a Hugging Face tokenizer (a folder or a tokenizer.json, as the manifest records it) as the
    files of tokenizer/. One already there (from `convert from-hf`, or an earlier run) is kept."""
    from .convert.tokenizer import HF_TOKENIZER_DIR, SP_MODEL, copy_hf_tokenizer

    tok = docs[0].tokenizer or {}
    src = tok.get("path", "")
    os.makedirs(cfg.checkpoint.dir, exist_ok=True)
    hf_dst, sp_dst = os.path.join(cfg.checkpoint.dir, HF_TOKENIZER_DIR), os.path.join(cfg.checkpoint.dir, SP_MODEL)
    if not src or os.path.exists(hf_dst) or os.path.exists(sp_dst):
        return
    if tok.get("kind") == "hf" or os.path.isdir(src) or src.endswith(".json"):
        if not os.path.exists(src):
            log.warning("the data's tokenizer %s is gone; no tokenizer is kept beside the checkpoints", src)
            return
        tmp = f"{hf_dst}.tmp-{os.getpid()}"  # whole or not at all: generate and to-hf read the folder
        shutil.rmtree(tmp, ignore_errors=True)
        copy_hf_tokenizer(src, tmp)
        os.replace(tmp, hf_dst)
    elif os.path.isfile(src):
        shutil.copyfile(src, sp_dst)


class StopFlag:
    """Set by SIGUSR1, SIGTERM or SIGINT (Ctrl-C), or once `exit_after_minutes` have passed since `t0`; agreed
    across ranks each step so that all stop at the same step. `reason` says which, for the log."""

    def __init__(self, signals: bool = True, exit_after_minutes: float = 0.0, t0: float | None = None):
        self.raised, self.reason = False, "a signal"
        self.deadline = (t0 or time.time()) + exit_after_minutes * 60 if exit_after_minutes > 0 else None
        if signals:
            for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised, self.reason = True, f"{signal.Signals(signum).name}"

    def agreed(self, device=None) -> bool:
        """Collective. `device`: the engine's (NCCL reduces CUDA tensors only)."""
        if not self.raised and self.deadline is not None and time.time() > self.deadline:
            self.raised, self.reason = True, "train.exit_after_minutes"
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if tdist.is_initialized():
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if flag.item() and not self.raised:
            self.reason = "another rank's stop request"
        return bool(flag.item())
