"""Small filesystem helpers with one owner: atomic writes, staging folders, flushing to storage.

Every output that must never look complete before it is (checkpoint markers, `latest`, manifests, index caches,
exported models) is written under a temporary name in the same folder and renamed into place. Standard library
only: `preprocess` imports this module too.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


def tmp_name(path: str) -> str:
    """A temporary name beside `path`, unique to this process on any node of a shared filesystem."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_atomic(path: str, data: str | bytes, fsync: bool = True) -> None:
    """Write `data` to `path` by write-then-rename: readers see the old file or the whole new one."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj, indent: int | None = 1) -> None:
    write_atomic(path, json.dumps(obj, indent=indent))


def write_files_atomic(items: dict[str, Callable], fsync: bool = True) -> None:
    """Write several files, each through `write(f)` into a temporary name, fsync them all at once (threads: the
    waits overlap), then rename each; on any failure none is renamed and the temporary files are removed."""
    tmps = {}
    try:
        for path, write in items.items():
            tmps[path] = tmp_name(path)
            with open(tmps[path], "wb") as f:
                write(f)
        if fsync:
            with ThreadPoolExecutor(max_workers=min(8, len(tmps) or 1)) as pool:
                list(pool.map(_fsync_path, tmps.values()))
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staging_dir(out: str, overwrite: bool):
    """A temporary folder beside `out`, renamed to `out` on success and removed on any failure.

    With `overwrite`, an existing `out` is replaced only once the new one is complete. The folder gets the mode
    a plain `mkdir` would (the umask's), not mkdtemp's 0700, so that a shared group can read an exported model."""
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    created = []  # the missing ancestors, deepest first: removed again on failure, and nothing that existed
    p = parent
    while not os.path.isdir(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.old-", dir=parent)
            os.replace(out, os.path.join(old, "x"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:
            with contextlib.suppress(OSError):
                os.rmdir(p)
        raise


def flush_filesystem(path: str) -> None:
    """Write back every dirty page of the filesystem holding `path` (Linux syncfs), else of all (os.sync)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), "syncfs failed")
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        os.sync()


def read_json(path: str):
    """The JSON value in `path`, or None when it is missing or not JSON (a lock file being written, say)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_json_object(path: str) -> dict | None:
    """`read_json`, for files that must hold a JSON object (lock holder notes): anything else is None."""
    value = read_json(path)
    return value if isinstance(value, dict) else None


def process_start(pid) -> str | None:
    """When process `pid` started (Linux /proc, clock ticks since boot), or None: tells a reused pid from the
    process that wrote a lock note."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, ValueError, IndexError, TypeError):
        return None


def break_stale_lock(path: str, stale, stale_after_s: float = 30.0) -> None:
    """Remove the O_EXCL lock file `path` if it still holds `stale` (what the caller judged to belong to a dead
    holder). Breakers take turns through `path.break` (O_EXCL), so of two processes that judged the same file stale
    one removes it and the other sees the new holder's file: never both "take over", and never a fresh lock
    removed by mistake. A `.break` left by a breaker that died is cleared after `stale_after_s`. The caller then
    retries its O_EXCL create."""
    brk = path + ".break"
    try:
        fd = os.open(brk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(brk) > stale_after_s:
                os.remove(brk)
        time.sleep(0.05)
        return
    os.close(fd)
    try:
        if read_json(path) == stale:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(brk)
