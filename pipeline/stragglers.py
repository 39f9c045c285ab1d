"""Per-rank step timing: which rank is slow, on which host, and by how much.

In synchronous data parallelism every rank's step takes the same wall time: the fast ranks wait for the slowest
one inside the gradient reduction (and in the loss average that ends each step). The whole step therefore cannot
name a straggler. What each rank does alone can:

    data     waiting for its batch (reading and slicing the token files), around `Batches.get`;
    forward  its model forward, from hooks on the engine's module (CUDA events on a GPU, so no sync is added).
             Under the pipeline engine, the stage's forward of each micro-batch (train_batch is one call).

Each rank sums these, and its whole train step, over the steps of one `log.interval`; then one all_gather of 5
floats per rank (one small collective per log line, not per step) gives rank 0 every rank's figures. A rank is compared with the median of
the ranks doing the same work (its pipeline stage); its ratio is (data + forward) / that median. The log line
gets `slowest_rank`, `slowest_host`, `straggler_ratio`, the slowest rank's `rank_data_s`/`rank_forward_s` and
the medians `median_data_s`/`median_forward_s`, and the slowest rank's whole train step `rank_step_s` (forward,
backward, optimizer and communication: its part beyond the forward is backward, optimizer and the waits), all in
seconds per step; past `log.straggler_ratio` rank 0 warns.

Limits, stated plainly: the forward holds collectives under ZeRO-3 (parameter all-gathers) and tensor
parallelism (all-reduces in its tensor-parallel group). There a slow rank's peers wait inside their own forward,
which hides it; the timing still names a rank slow at reading data, and any slow rank under ZeRO-0/1/2 and
pipelines without tensor parallelism. Backward and optimizer time are never compared: they end in collectives.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import time

import torch
import torch.distributed as tdist

log = logging.getLogger("pipeline")


class StepTimer:
    """Times this rank's data wait and forward over each log interval; `gather_if_due` compares the ranks."""

    def __init__(self, engine, log_interval: int, total_steps: int, threshold: float):
        self.interval, self.total_steps, self.threshold = max(1, log_interval), total_steps, threshold
        self.world = tdist.get_world_size() if tdist.is_initialized() else 1
        self.rank = tdist.get_rank() if tdist.is_initialized() else 0
        self.device = engine.device
        self.stage = engine.state.coord.pp
        self.cuda = torch.device(self.device).type == "cuda"
        self.hosts = [socket.gethostname()] * self.world
        if self.world > 1:  # once, at start-up
            tdist.all_gather_object(self.hosts, socket.gethostname())
        self.in_step = False
        self.data_s = self.forward_s = self.step_s = 0.0
        self.steps = 0
        self._start = None
        self._events: list = []
        module = engine.engine.module
        module.register_forward_pre_hook(self._forward_start)
        module.register_forward_hook(self._forward_end)

    # ---- timing, every step ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def data(self):
        t0 = time.perf_counter()
        yield
        self.data_s += time.perf_counter() - t0

    @contextlib.contextmanager
    def step(self):
        """Around engine.train_step: forwards inside it count (evaluation forwards do not)."""
        self.in_step = True
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.in_step = False
            self.step_s += time.perf_counter() - t0
            self.steps += 1
            if self._events:  # the step ended with the loss on the host, so its events are complete
                self._events[-1][1].synchronize()
                self.forward_s += sum(a.elapsed_time(b) for a, b in self._events) / 1000
                self._events.clear()

    def _forward_start(self, module, args):
        if self.in_step:
            if self.cuda:
                self._start = torch.cuda.Event(enable_timing=True)
                self._start.record()
            else:
                self._start = time.perf_counter()

    def _forward_end(self, module, args, output):
        if self.in_step and self._start is not None:
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((self._start, end))
            else:
                self.forward_s += time.perf_counter() - self._start
            self._start = None

    # ---- comparing, once per log interval ----------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.total_steps

    def gather_if_due(self, step: int) -> dict:
        """Collective on the log steps (every rank calls it after every step): the straggler fields of the log
        line for `step` (empty on other steps), and rank 0's warning when one rank is past the threshold."""
        if not self.due(step):
            return {}
        n = max(1, self.steps)
        mine = torch.tensor([self.data_s / n, self.forward_s / n, self.step_s / n, float(self.stage),
                             float(self.rank)], dtype=torch.float64, device=self.device)
        self.data_s = self.forward_s = self.step_s = 0.0
        self.steps = 0
        if self.world > 1:
            parts = [torch.empty_like(mine) for _ in range(self.world)]
            tdist.all_gather(parts, mine)
            table = torch.stack(parts).cpu()
        else:
            table = mine.cpu()[None]
        fields = compare(table, self.hosts)
        if self.rank == 0 and self.threshold and fields["straggler_ratio"] > self.threshold:
            log.warning("straggler at step %d: rank %d on %s took %.2fx the median rank's data wait + forward "
                        "(%.1f ms vs %.1f ms per step; data %.1f ms, forward %.1f ms; whole step %.1f ms); "
                        "log.straggler_ratio is %.2f",
                        step, fields["slowest_rank"], fields["slowest_host"], fields["straggler_ratio"],
                        1000 * (fields["rank_data_s"] + fields["rank_forward_s"]),
                        1000 * (fields["median_data_s"] + fields["median_forward_s"]),
                        1000 * fields["rank_data_s"], 1000 * fields["rank_forward_s"], 1000 * fields["rank_step_s"],
                        self.threshold)
        return fields


def compare(table: torch.Tensor, hosts: list[str]) -> dict:
    """`table`: one row per rank of (data, forward, whole step: seconds per step; pipeline stage; rank). Each
    rank's data + forward against the median of its stage's ranks; the fields of the slowest."""
    busy = table[:, 0] + table[:, 1]
    ratio = torch.ones_like(busy)
    for stage in table[:, 3].unique():
        peers = table[:, 3] == stage
        median = busy[peers].median()  # the lower middle for an even count, as torch defines it
        if median > 0:
            ratio[peers] = busy[peers] / median
    slow = int(ratio.argmax())
    peers = table[:, 3] == table[slow, 3]
    return {"slowest_rank": int(table[slow, 4]), "slowest_host": hosts[int(table[slow, 4])],
            "straggler_ratio": round(float(ratio[slow]), 4),
            "rank_data_s": float(table[slow, 0]), "rank_forward_s": float(table[slow, 1]),
            "rank_step_s": float(table[slow, 2]),
            "median_data_s": float(table[peers, 0].median()), "median_forward_s": float(table[peers, 1].median())}
