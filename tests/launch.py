"""Start N training ranks directly (RANK/WORLD_SIZE/... per process, as Slurm's srun does), without torchrun,
so that tests can signal or kill one rank and read each rank's exit code."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(n: int, *args, log_dir) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        out = open(os.path.join(log_dir, f"rank{r}.log"), "a")
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], env=env, cwd=ROOT,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_all(procs, timeout: float) -> list[int | None]:
    """Exit codes (None for a process still running at the deadline, which is then killed)."""
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    return codes


def run_ranks(n: int, *args, log_dir, timeout: float = 300) -> list[int | None]:
    return wait_all(start_ranks(n, *args, log_dir=log_dir), timeout)
