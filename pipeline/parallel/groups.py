"""Process groups for tensor (tp), pipeline (pp) and data (dp) parallelism, and the `mpu` DeepSpeed takes.

Rank layout is DeepSpeed's pipeline topology (axes pipe, data, model; model fastest):
    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
so tensor-parallel peers are neighbours (one node, fast links) and the pipeline engine's own grid, built from
`topology()`, agrees with these groups. Every rank must build the same `ParallelState` (new_group is collective).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Coord:
    pp: int
    dp: int
    tp: int


def coord_of(rank: int, tp: int, pp: int, world: int) -> Coord:
    """This rank's (pp, dp, tp) coordinates; pure arithmetic, no process group needed."""
    dp = world // (tp * pp)
    return Coord(pp=rank // (dp * tp), dp=(rank // tp) % dp, tp=rank % tp)


class ParallelState:
    """The `mpu`: Megatron's accessor names, which DeepSpeed's engine and ZeRO optimizers call."""

    def __init__(self, tp: int = 1, pp: int = 1):
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if self.world % (tp * pp):
            raise ValueError(f"world size {self.world} is not divisible by parallel.tp*parallel.pp = {tp * pp}")
        self.tp, self.pp, self.dp = tp, pp, self.world // (tp * pp)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.coord = coord_of(self.rank, tp, pp, self.world)
        self.tp_group = self.dp_group = self.pp_group = self.mp_group = None
        if not dist.is_initialized():
            return
        ranks = [coord_of(r, tp, pp, self.world) for r in range(self.world)]

        def groups(key):  # one group per value of `key`; every rank creates all of them, in the same order
            buckets: dict = {}
            for r, c in enumerate(ranks):
                buckets.setdefault(key(c), []).append(r)
            mine = None
            for k in sorted(buckets):
                g = dist.new_group(ranks=buckets[k])
                if self.rank in buckets[k]:
                    mine = g
            return mine

        self.tp_group = groups(lambda c: (c.pp, c.dp))
        self.dp_group = groups(lambda c: (c.pp, c.tp))
        self.pp_group = groups(lambda c: (c.dp, c.tp))
        self.mp_group = groups(lambda c: c.dp)  # pipe x tensor: every rank holding a distinct part of the model

    def topology(self):
        """DeepSpeed's topology for PipelineModule, the same layout as these groups."""
        from ..ds_compat import topology

        return topology(self.pp, self.tp, self.dp)

    # Tensor ("model" in old Megatron) parallel: the groups a TP layer reduces over.
    def get_tensor_model_parallel_rank(self):
        return self.coord.tp

    def get_tensor_model_parallel_world_size(self):
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    # DeepSpeed's "model parallel": every rank that holds a different part of the model (for norms, overflow).
    def get_model_parallel_rank(self):
        return self.coord.pp * self.tp + self.coord.tp

    def get_model_parallel_world_size(self):
        return self.tp * self.pp

    def get_model_parallel_group(self):
        return self.mp_group

    def get_data_parallel_rank(self):
        return self.coord.dp

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_pipeline_model_parallel_rank(self):
        return self.coord.pp

    def get_pipeline_model_parallel_world_size(self):
        return self.pp

    def get_pipeline_model_parallel_group(self):
        return self.pp_group
