"""One training run per checkpoint folder: `CKPT/LOCK`, held by rank 0 for the life of the run.

Two runs on one `checkpoint.dir` would prune each other's committed tags. Rank 0 takes the lock before any process
group starts (`pipeline.train`'s main) and a second run is refused in one line naming the holder (host, pid, Slurm
job, start time). The lock is an `flock` on `CKPT/LOCK`: the kernel (or the NFS/Lustre lock server) drops it when
its holder dies, however it dies, so a run killed with -9, a node that crashed, or a Slurm job requeued after a
hard kill never leaves a stale lock behind. A lock server may keep a crashed client's lock until its lease runs
out: a run whose Slurm job id is the holder's (a requeue) waits up to REQUEUE_WAIT_S for it.

Where the filesystem has no `flock` (it answers ENOLCK), `CKPT/LOCK.owner`, created with O_EXCL, stands in. Its
holder is taken to be dead, and the file is taken over, when (1) it names this very process, (2) it names the same
Slurm job id (Slurm runs one incarnation of a job at a time, so a requeued job's earlier holder is gone), or (3) it
names a pid on this host that no longer runs (or runs a process started at another time: a reused pid). A holder on
another host with another job id cannot be checked from here: the refusal names the file to delete once it is gone.

The other ranks only check: the lock must be free or held by their own run (same `run_id`), else they are refused
too, so that no rank of a refused job waits for a rendezvous that will never come.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time

from ..fs import break_stale_lock, process_start, read_json_object

LOCK_NAME = "LOCK"
REQUEUE_WAIT_S = 180  # an NFS lock server releases a dead client's locks after its lease (90 s by default)
log = logging.getLogger("pipeline")
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class CheckpointDirBusy(ValueError):
    """Another run holds checkpoint.dir: a user error (one `error:` line, exit 2)."""


def run_id() -> str:
    """The same for every rank of one launch, different across launches and requeues of it."""
    parts = [os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_RESTART_COUNT", ""),
             os.environ.get("TORCHELASTIC_RUN_ID", ""),
             f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"]
    return "|".join(parts) if any(p.strip(":") for p in parts) else f"{socket.gethostname()}:{os.getpid()}"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid()),
            "job": os.environ.get("SLURM_JOB_ID"), "run": run_id(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def describe(info: dict | None) -> str:
    if not info:
        return "another run (holder unknown)"
    job = f", Slurm job {info['job']}" if info.get("job") else ""
    return f"a run with pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('since')}"


def holder_is_gone(info: dict | None) -> bool:
    """The O_EXCL stand-in's takeover rule (see the module docstring)."""
    if not info:
        return True  # an empty or garbled file: its writer died while writing it
    me = _me()
    if info.get("host") == me["host"] and info.get("pid") == me["pid"]:
        return True
    if info.get("job") and info.get("job") == me["job"]:
        return True
    if info.get("host") != me["host"]:
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return info.get("started") is not None and process_start(int(info["pid"])) != info.get("started")


def _busy(ckpt_dir: str, info: dict | None, path: str | None = None) -> CheckpointDirBusy:
    hint = f"; if it is dead, delete {path}" if path else ""
    return CheckpointDirBusy(f"checkpoint.dir {ckpt_dir} is in use by {describe(info)}: two runs on one folder "
                             f"would delete each other's checkpoints. Wait for it, or use another "
                             f"checkpoint.dir{hint}")


class CheckpointLock:
    """Rank 0's hold on `CKPT/LOCK` (see the module docstring); `release()` at the end of the run."""

    def __init__(self, ckpt_dir: str):
        self.dir, self.fd, self.owner_file = ckpt_dir, None, None
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"checkpoint.dir {ckpt_dir}: cannot create it ({e.strerror})") from None
        path = os.path.join(ckpt_dir, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ValueError(f"checkpoint.dir {ckpt_dir}: cannot write {path} ({e.strerror})") from None
        try:
            deadline = time.time() + 2  # other ranks of this run look at the lock with a momentary shared hold
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = read_json_object(path) or {}
                    if holder.get("job") and holder.get("job") == os.environ.get("SLURM_JOB_ID") and \
                            deadline - time.time() < 2:
                        # our own job before a requeue: dead, but a network filesystem's lock server may hold its
                        # lock until the dead client's lease runs out
                        deadline = time.time() + REQUEUE_WAIT_S
                        log.warning("%s is held by this Slurm job's previous run; waiting up to %d s for its "
                                    "lock to lapse", path, REQUEUE_WAIT_S)
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)
        except BlockingIOError:
            os.close(fd)
            raise _busy(ckpt_dir, read_json_object(path)) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            self._take_owner_file(path + ".owner")
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        self.fd = fd

    def _take_owner_file(self, path: str) -> None:
        for _ in range(20):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = read_json_object(path)
                if not holder_is_gone(other):
                    raise _busy(self.dir, other, path) from None
                break_stale_lock(path, other)  # of several takers, one removes it; the others see the new file
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_me(), f)
            self.owner_file = path
            return
        raise _busy(self.dir, read_json_object(path), path)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # never unlinked: an unlink races with a new holder's open
                os.close(self.fd)
            self.fd = None
        if self.owner_file is not None:
            with contextlib.suppress(OSError):
                if (read_json_object(self.owner_file) or {}).get("pid") == os.getpid():
                    os.remove(self.owner_file)
            self.owner_file = None


def check_unlocked(ckpt_dir: str, tries: int = 10, wait_s: float = 0.5) -> None:
    """For ranks other than 0: raise CheckpointDirBusy if another run (not this one) holds `ckpt_dir`. Our own
    rank 0 may be taking the lock right now: a holder whose note is not yet written is asked again."""
    path = os.path.join(ckpt_dir, LOCK_NAME)
    for _ in range(tries):
        if not os.path.exists(path) and not os.path.exists(path + ".owner"):
            return
        info = read_json_object(path + ".owner") if os.path.exists(path + ".owner") else None
        if info is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return  # nobody holds it
            except OSError:
                info = read_json_object(path)
            finally:
                os.close(fd)
        elif holder_is_gone(info):
            return
        if info and info.get("run") == run_id():
            return
        time.sleep(wait_s)
    raise _busy(ckpt_dir, info)


def hold_checkpoint_dir(ckpt_dir: str) -> CheckpointLock | None:
    """Rank 0 (as the launcher announced it, before any process group) takes the lock; other ranks check that no
    other run holds it. CheckpointDirBusy (a ValueError: one line, exit 2) when another run does."""
    from ..dist import rank_from_env

    if rank_from_env() == 0:
        return CheckpointLock(ckpt_dir)
    check_unlocked(ckpt_dir)
    return None
