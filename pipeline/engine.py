"""The DeepSpeed engine for a parallel layout, behind one train step and one eval step.

The train loop sees only `TrainEngine`: it hands over this data-parallel rank's slice of a global batch and
gets back the loss averaged over the whole global batch. Layout-specific work (ZeRO-3 data parallelism today;
tensor and pipeline parallelism plug in here) stays out of the loop.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist

from . import dist
from .config import RunConfig
from .ds_config import build_ds_config
from .model import build_model, lm_loss, num_params


def build_optimizer(model, t):
    """AdamW (torch's: no compiled ops) with no weight decay on norms and biases, and the LR schedule."""
    from .train import LRSchedule

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(t))


class TrainEngine:
    def __init__(self, cfg: RunConfig):
        import deepspeed

        self.cfg = cfg
        self.world = dist.world_size()
        self.dp_size = self.world // (cfg.parallel.tp * cfg.parallel.pp)
        self.dp_rank = dist.rank() // (cfg.parallel.tp * cfg.parallel.pp)
        self.dp_group = None  # the default group while there is no model parallelism
        model = build_model(cfg.model, seed=cfg.train.seed)
        model.checkpoint_activations = cfg.parallel.activation_checkpointing
        self.num_params = num_params(model)
        optimizer, self.scheduler = build_optimizer(model, cfg.train)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=self.scheduler,
                                                    config=build_ds_config(cfg, self.dp_size))
        self.device = self.engine.device
        self.micro = cfg.train.micro_batch_size

    def _dp_mean(self, value: torch.Tensor) -> float:
        if self.dp_size > 1:
            tdist.all_reduce(value, group=self.dp_group)
            value = value / self.dp_size
        return value.item()

    def train_step(self, batch: torch.Tensor) -> float:
        """One optimizer step on this rank's [per_rank, seq_len+1] tokens; returns the global-batch mean loss."""
        batch = batch.to(self.device)
        total = torch.zeros((), device=self.device)
        chunks = batch.split(self.micro)
        for mb in chunks:
            loss = lm_loss(self.engine(mb[:, :-1]), mb[:, 1:])
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        return self._dp_mean(total / len(chunks))

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> float:
        self.engine.eval()
        batch = batch.to(self.device)
        losses = [lm_loss(self.engine(mb[:, :-1]), mb[:, 1:]) for mb in batch.split(self.micro)]
        self.engine.train()
        return self._dp_mean(torch.stack(losses).mean())

    def grad_norm(self) -> float | None:
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else None

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def build_engine(cfg: RunConfig) -> TrainEngine:
    return TrainEngine(cfg)
