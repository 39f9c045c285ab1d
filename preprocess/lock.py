"""Locks that keep two runs from writing one output folder at once.

`folder_lock(folder)` holds FOLDER/.lock for the life of a `with`:
- exclusive for a whole run (one process, or rank 0 under MPI, which waits for every rank) and for `join`;
- shared (`shared=True`) for the `tokenize --part` tasks of a Slurm array, which write disjoint units side by side
  (`unit_locks` then keeps two tasks off the same unit).
The lock is an `flock`: the kernel drops it when its holder dies, however it dies, so it is never stale. The holder
(host, pid, Slurm job, start time) is written into the file, so that a refusal can name it.

Where `flock` is not available (some network filesystems answer ENOLCK), a file created with O_EXCL and holding
the same description stands in. A lock file left by a dead process on this host is taken over (also when its pid
now belongs to a process started later); one from another host cannot be checked from here, so the refusal names
it and the file to delete once that process is gone.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import socket
import time

from pipeline.fs import break_stale_lock, process_start, read_json_object

from .indexed import writing

log = logging.getLogger("preprocess")
LOCK_NAME = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class FolderBusy(ValueError):
    """Another run holds the folder: a user error (one line, exit 2), not a crash."""


def _me(what: str) -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
            "job": f"{job}_{task}" if job and task else job,
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _describe(info: dict | None) -> str:
    if not info:
        return "another run (holder unknown)"
    job = f", Slurm job {info['job']}" if info.get("job") else ""
    return f"{info.get('what', 'another run')} (pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('since')})"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # another user's process, or a pid we cannot read: assume it lives
    return True


def _is_stale(info: dict | None) -> bool:
    """A holder that is provably gone: on this very host, a dead pid, or one now used by a process that started
    at another time. Anything else is taken to be alive."""
    if not info or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    return not _alive(pid) or (info.get("start") is not None and process_start(pid) not in (None, info["start"]))


def _busy(folder: str, info: dict | None, lock_file: str | None = None) -> FolderBusy:
    hint = (f"; if that process is gone, delete {lock_file}" if lock_file and info and
            info.get("host") != socket.gethostname() else "")
    return FolderBusy(f"{folder} is in use by {_describe(info)}; wait for it to finish{hint}")


def _take_over(path: str, info: dict) -> None:
    """Remove a stale lock file, unless another process has already replaced it (pipeline.fs.break_stale_lock)."""
    log.warning("%s: taking over the lock of %s, which is no longer running", path, _describe(info))
    break_stale_lock(path, info)


def _write_new(path: str, info: dict) -> bool:
    """Create `path` holding `info`, only if it does not exist (O_EXCL); False if it does."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return True


def _check_lock_files(folder: str, shared: bool, mine: str | None = None) -> None:
    """Raise FolderBusy if a live holder of the O_EXCL stand-in conflicts: the exclusive owner for anyone, shared
    holders for an exclusive request. Stale files (dead pid, this host) are taken over."""
    base = os.path.join(folder, LOCK_NAME)
    for path in [base + ".owner"] + ([] if shared else sorted(glob.glob(base + ".part-*"))):
        if path == mine or not os.path.exists(path):
            continue
        other = read_json_object(path)
        if _is_stale(other):
            _take_over(path, other)
        else:
            raise _busy(folder, other, path)


@contextlib.contextmanager
def _file_lock(folder: str, shared: bool, info: dict):
    """The O_EXCL stand-in: `.lock.owner` for the exclusive holder, `.lock.part-HOST-PID` for each shared one."""
    base = os.path.join(folder, LOCK_NAME)
    owner = base + ".owner"
    mine = f"{base}.part-{info['host']}-{info['pid']}" if shared else owner
    if shared:
        with open(mine, "w") as f:
            json.dump(info, f)
    else:
        while not _write_new(owner, info):
            other = read_json_object(owner)
            if not _is_stale(other):
                raise _busy(folder, other, owner)
            _take_over(owner, other)
    try:
        # Each side writes its own file first, then looks for the other's: of two racing, at least one sees the other.
        _check_lock_files(folder, shared, mine)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(mine)


@contextlib.contextmanager
def folder_lock(folder: str, what: str, shared: bool = False):
    """Hold `folder` for the life of the `with`, or raise FolderBusy naming the holder. `what` names this run
    in the message another run will get (e.g. "`preprocess tokenize`")."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder (the output is a folder of shards and manifest.json)")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    info = _me(what)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(folder, read_json_object(path)) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            log.warning("%s: flock is not supported here (%s); using an O_EXCL lock file", folder, e.strerror)
            with _file_lock(folder, shared, info):
                yield
            return
        # A process on a client without flock holds the folder by a lock file: respect it (one stat when none).
        _check_lock_files(folder, shared)
        with writing(path):  # shared holders overwrite each other: a refusal then names one of them
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            if not shared:
                os.ftruncate(fd, 0)  # an idle folder holds an empty .lock (never unlinked: see flock(2) races)
    finally:
        os.close(fd)


@contextlib.contextmanager
def unit_locks(parts: str, units: list[int], output: str):
    """Lock the units this `--part` task will write (one byte each of PARTS/units.lock, POSIX record locks, held
    by this process): the same part started twice, or two arrays with other --num-parts, never write one unit."""
    fd = os.open(os.path.join(parts, "units.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        for u in units:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, u)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise FolderBusy(f"{output}: unit {u} is being written by another `tokenize --part` task "
                                     f"(the same part started twice?); wait for it to finish") from None
                if e.errno not in _NO_FLOCK:
                    raise
                log.warning("%s: no record locks here (%s); units are not locked", parts, e.strerror)
                break
        yield
    finally:
        os.close(fd)  # drops every record lock of this process on the file
