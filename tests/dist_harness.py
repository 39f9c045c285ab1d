"""`run_distributed(fn, world_size)`: run `fn(rank, world_size, *args)` in N fresh processes joined by a gloo
process group, and return each rank's result (for unit-level distributed checks, as OLMo-core's helper does).

`fn` must be a module-level function (it is pickled by reference into spawned processes). A child's exception
is raised here with its traceback; a child that hangs is killed after `timeout` seconds. Each child ends at a
barrier and with os._exit, which avoids gloo's occasional abort at interpreter exit.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world_size: int, port: int, queue, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    # DeepSpeed compiles a communication op once per machine: share scripts/test.sh's cache, never rebuild it
    venv_ops = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "torch_extensions")
    if os.path.isdir(venv_ops):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", venv_ops)
    code = 0
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        queue.put((rank, "ok", fn(rank, world_size, *args)))
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
        code = 1
    queue.close()
    queue.join_thread()  # the queue's feeder thread must have written the result before os._exit ends the process
    os._exit(code)


def run_distributed(fn, world_size: int = 2, *args, timeout: float = 300) -> list:
    """[fn's result on rank 0, on rank 1, ...]."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, queue, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            (results if status == "ok" else errors)[rank] = value
            if errors:
                break
    except Exception as e:  # queue.Empty: a child hung or died without a word
        raise AssertionError(f"run_distributed({fn.__name__}): no result within {timeout:.0f} s "
                             f"(exit codes {[p.exitcode for p in procs]})") from e
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise AssertionError(f"run_distributed({fn.__name__}): rank {rank} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
