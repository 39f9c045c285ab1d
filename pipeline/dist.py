"""Process-group start-up and a clean exit, whatever the launcher (torchrun, deepspeed, mpirun, srun, none)."""
from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

_MPI_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env(default: int | None = 1) -> int | None:
    """The world size the launcher announced, before any process group exists (for preflight checks); `default`
    when no variable says (a plain single process, or a launcher that announces no size)."""
    names = ["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"]
    if "SLURM_STEP_ID" in os.environ:  # inside an srun step (e.g. --mpi=pmix, which exports no size of its own)
        names.append("SLURM_STEP_NUM_TASKS")
    for var in names:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return default


def rank_from_env() -> int:
    """This process's global rank as the launcher announced it, before any process group exists (0 if none)."""
    for var in ("RANK",) + _MPI_VARS + (("SLURM_PROCID",) if "SLURM_STEP_ID" in os.environ else ()):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def init_distributed(timeout_s: int) -> None:
    """Start the default process group through DeepSpeed (gloo on CPU, NCCL on GPU).

    With no launcher at all this becomes a world of one; under mpirun/srun --mpi=pmi2 DeepSpeed discovers the
    ranks through mpi4py.
    """
    import deepspeed

    if "RANK" not in os.environ and not any(v in os.environ for v in _MPI_VARS):
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    # mpi4py discovery (srun --mpi=pmi2, mpirun) would otherwise pick port 29500 whatever MASTER_PORT says.
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s),
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def exit_cleanly(code: int = 0) -> None:
    """Flush, meet every rank at a barrier, and leave with os._exit.

    gloo processes that exit normally sometimes abort in a destructor ("terminate called without an active
    exception"); ending at a barrier then os._exit avoids it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized() and code == 0:
        try:
            dist.barrier()
        except Exception:
            pass
    os._exit(code)
