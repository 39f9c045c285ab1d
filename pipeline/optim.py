"""The optimizer and the learning-rate schedule.

The LR is a pure function of the step, `lr_at(step, schedule)`, written into every parameter group before each
optimizer step (`set_lr`). Nothing about the schedule lives in the optimizer or in a torch scheduler object, so
a checkpoint holds no project objects, and a resumed run follows whatever schedule its config gives.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from .ds_compat import full_shape

log = logging.getLogger("pipeline")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Plain data: linear warmup to `lr`, then `decay_style` to `min_lr` at `steps`.

    constant: stays at `lr`; cosine, linear: decay over all steps after warmup; wsd (warmup-stable-decay): stays at
    `lr` until the last `decay_fraction` of the steps, then decays linearly to `min_lr` (extend a run or branch an
    annealing run from any stable-phase checkpoint)."""
    lr: float
    min_lr: float
    warmup_steps: int
    steps: int
    decay_style: str = "cosine"
    decay_fraction: float = 0.1

    @classmethod
    def from_train_config(cls, t) -> "Schedule":
        return cls(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, steps=t.steps, decay_style=t.decay_style,
                   decay_fraction=t.decay_fraction)


def lr_at(step: int, s: Schedule) -> float:
    """The learning rate of the optimizer step that takes the run from `step` to `step + 1` (0-based)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.decay_style == "constant":
        return s.lr
    if s.decay_style == "wsd":
        decay_steps = max(1, round(s.decay_fraction * s.steps))
        start = max(s.warmup_steps, s.steps - decay_steps)
        if step < start:
            return s.lr
        frac = min(1.0, (step - start + 1) / max(1, s.steps - start))
        return s.min_lr + (s.lr - s.min_lr) * (1 - frac)
    frac = min(1.0, (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if s.decay_style == "cosine" else 1 - frac
    return s.min_lr + (s.lr - s.min_lr) * decay


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters (requires_grad) in two groups: weight decay on matrices, none on norms and biases.
    ZeRO-3 partitioned parameters keep their full shape in `ds_shape`."""
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters()}.values():
        if p.requires_grad:
            (no_decay if len(full_shape(p)) < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, t, offload: bool = False):
    """AdamW over `param_groups`, starting at the LR of step 0.

    torch's AdamW (no compiled ops), or with `offload` (ZeRO-Offload: the step runs on the CPU) DeepSpeed's
    CPU Adam, several times faster there (bench/train.py); it compiles once per machine (~40 s) and torch's
    AdamW stands in, with a warning, where it cannot be built."""
    groups = param_groups(model, t.weight_decay)
    lr = lr_at(0, Schedule.from_train_config(t))
    if offload:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=lr, betas=(t.beta1, t.beta2), eps=1e-8, adamw_mode=True)
        except Exception as e:  # noqa: BLE001 - a missing compiler or headers: slower, still correct
            log.warning("DeepSpeed's CPU Adam cannot be built here (%s: %s); the offloaded optimizer step uses "
                        "torch's AdamW, several times slower", type(e).__name__, str(e).splitlines()[0][:200])
    return torch.optim.AdamW(groups, lr=lr, betas=(t.beta1, t.beta2), eps=1e-8)
