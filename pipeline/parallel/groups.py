"""Process groups for tensor (tp), sequence (sp), pipeline (pp) and data (dp) parallelism, and the `mpu`
DeepSpeed takes.

Rank layout: DeepSpeed's pipeline topology (axes pipe, data, model; model fastest), with the sequence-parallel
axis between data and tensor:
    rank = pp_rank * (dp * sp * tp) + dp_rank * (sp * tp) + sp_rank * tp + tp_rank
so tensor-parallel peers are neighbours (one node, fast links), Ulysses peers next, and with sp = 1 the pipeline
engine's own grid, built from `topology()`, agrees with these groups. Every rank must build the same
`ParallelState` (new_group is collective).

Sequence-parallel ranks hold the same weights and the same samples (each its own seq_len/sp tokens), so for
DeepSpeed they are data-parallel: the `mpu`'s data-parallel group is dp x sp (ZeRO partitions and gradient
averaging span it; the loss is scaled so that this average is the mean over the whole sequence, see
pipeline/loss.py). `dp` and `coord.dp` stay the data-parallel size and rank that pick samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Coord:
    pp: int
    dp: int
    tp: int
    sp: int = 0


def coord_of(rank: int, tp: int, pp: int, world: int, sp: int = 1) -> Coord:
    """This rank's (pp, dp, sp, tp) coordinates; pure arithmetic, no process group needed."""
    dp = world // (tp * pp * sp)
    return Coord(pp=rank // (dp * sp * tp), dp=(rank // (sp * tp)) % dp, tp=rank % tp, sp=(rank // tp) % sp)


class ParallelState:
    """The `mpu`: Megatron's accessor names, which DeepSpeed's engine and ZeRO optimizers call."""

    def __init__(self, tp: int = 1, pp: int = 1, sp: int = 1):
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if self.world % (tp * pp * sp):
            raise ValueError(f"world size {self.world} is not divisible by parallel.tp*parallel.pp*parallel.sp = "
                             f"{tp * pp * sp}")
        self.tp, self.pp, self.sp, self.dp = tp, pp, sp, self.world // (tp * pp * sp)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.coord = coord_of(self.rank, tp, pp, self.world, sp)
        self.tp_group = self.dp_group = self.pp_group = self.mp_group = self.sp_group = self.dp_sp_group = None
        if not dist.is_initialized():
            return
        ranks = [coord_of(r, tp, pp, self.world, sp) for r in range(self.world)]

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

        self.tp_group = groups(lambda c: (c.pp, c.dp, c.sp))
        self.dp_group = groups(lambda c: (c.pp, c.sp, c.tp))
        self.pp_group = groups(lambda c: (c.dp, c.sp, c.tp))
        self.mp_group = groups(lambda c: (c.dp, c.sp))  # pipe x tensor: every rank holding a distinct part of the model
        if sp > 1:
            self.sp_group = groups(lambda c: (c.pp, c.dp, c.tp))
            self.dp_sp_group = groups(lambda c: (c.pp, c.tp))
        else:
            self.dp_sp_group = self.dp_group

    def topology(self):
        """DeepSpeed's topology for PipelineModule, the same layout as these groups (pipelines run with sp = 1)."""
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

    # DeepSpeed's data parallel: every rank with the same weights (data x sequence parallel).
    def get_data_parallel_rank(self):
        return self.coord.dp * self.sp + self.coord.sp

    def get_data_parallel_world_size(self):
        return self.dp * self.sp

    def get_data_parallel_group(self):
        return self.dp_sp_group

    def get_pipeline_model_parallel_rank(self):
        return self.coord.pp

    def get_pipeline_model_parallel_world_size(self):
        return self.pp

    def get_pipeline_model_parallel_group(self):
        return self.pp_group
