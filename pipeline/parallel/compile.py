"""`train.compile: true`: torch.compile each transformer block, the granularity torchtitan uses.

Applied from outside the model, after tensor parallelism and activation checkpointing and before DeepSpeed
wraps it (torchtitan's order). Each block is compiled in place (`nn.Module.compile`), so parameter names, and
with them checkpoints and `to-hf`, are those of the eager model. Every block has the same code and shapes, so
the first block's compilation serves all of them: the first step pays it once per process.

What the compiler does not trace runs eagerly between compiled regions: the tensor-parallel all-reduces
(pipeline/parallel/layers.py marks them), and under ZeRO-3 DeepSpeed's parameter gather and release hooks
(DeepSpeed marks them). The head and loss stay eager: pipeline/loss.py already never holds whole logits.
Pipeline stages are not compiled (config validation refuses `train.compile` with `parallel.pp` > 1).
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("pipeline")


def apply_compile(model) -> None:
    """Compile every transformer block of `model` (a Transformer, tensor-parallel or not) in place."""
    for block in model.layers:
        block.compile()


class CompileTimer:
    """Logs, once, how long the first compiled step took: the compilation is most of it."""

    def __init__(self, enabled: bool, rank: int):
        self.pending, self.rank, self._t0 = enabled, rank, 0.0

    def start(self) -> None:
        if self.pending:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.pending:
            self.pending = False
            if self.rank == 0:
                log.info("train.compile: the first step took %.1f s, compiling the transformer blocks included",
                         time.perf_counter() - self._t0)
