"""A folder of index arrays keyed by everything that shapes them; built once, then memory-mapped by every rank.

Protocol (needs no process group, works across jobs and across nodes):
- `NAME-KEY.json` is the commit marker, written last. Arrays are `NAME-KEY-ARRAY.npy`; every file is written
  under a unique temporary name (host, pid, random) and renamed into place, so no reader sees a partial file.
- Builders on one filesystem try an exclusive `flock` on `NAME-KEY.lock`: the one that gets it builds; the
  others wait on a shared lock (so that all wake at once), find the marker and map the arrays. The kernel
  releases the lock when a builder dies; its waiters then find no marker and try again.
- Where locks do not work (some network filesystems), or folders are not shared (per-node caches), more than
  one process may build; the arrays are a deterministic function of the key, so whichever rename lands last
  leaves the same bytes, and every reader still sees a complete set.
- Arrays are fsynced (all at once, on threads) before they are renamed and the marker is written. The marker
  also records each array's dtype, shape and a digest of 64 of its elements, checked on every load: a file
  that is short, empty, missing or changed is rebuilt.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import socket
import time
from typing import Callable

import numpy as np

from ..fs import write_files_atomic

log = logging.getLogger("pipeline.data")


RANDOM_ACCESS = {"doc", "sample_doc", "sample_offset", "table"}  # the others are read in order


def cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def _probe(a: np.ndarray) -> str:
    """A digest of 64 evenly spaced elements: catches arrays a crash left short, zero-filled or from another build."""
    flat = a.reshape(-1)
    picks = np.unique(np.linspace(0, max(len(flat) - 1, 0), 64).astype(np.int64)) if len(flat) else []
    return hashlib.sha256(np.ascontiguousarray(flat[picks]).tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def _writes_to(cache_dir: str):
    """Turn "permission denied" or "read-only filesystem" in the cache folder into one line naming it."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise ValueError(f"data.cache_dir {cache_dir}: not writable ({e.strerror}); the index cache is built there "
                         f"once and then read by every rank: set data.cache_dir to a writable folder") from None


@contextlib.contextmanager
def _build_lock(lock_path: str):
    """Yields True to the one process that should build (it holds the exclusive lock), False to each waiter once
    the builder is done. Waiters wait on a shared lock, so that all of them wake together (not one at a time, as
    a thousand ranks queueing for the exclusive lock would) and read the result in parallel."""
    with _writes_to(os.path.dirname(lock_path)):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            builder = True
        except BlockingIOError:  # someone is building
            fcntl.flock(fd, fcntl.LOCK_SH)
            fcntl.flock(fd, fcntl.LOCK_UN)
            builder = False
        except OSError as e:  # e.g. a network filesystem without locks: fall back to build-and-rename
            log.warning("%s: cannot lock (%s); building without a lock", lock_path, e)
            builder = True
        yield builder
    finally:
        os.close(fd)  # releases the exclusive lock


def _load(base: str, description: dict) -> dict[str, np.ndarray] | None:
    """The committed arrays for this key, memory-mapped, or None when absent, incomplete or not ours."""
    try:
        with open(base + ".json") as f:
            meta = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if meta.get("description") != description:
        return None
    arrays = {}
    for name, (dtype, shape, probe) in meta["arrays"].items():
        try:
            a = np.load(f"{base}-{name}.npy", mmap_mode="r")
        except (OSError, EOFError, ValueError):  # missing, unreadable, empty, short
            return None
        if name in RANDOM_ACCESS and getattr(a, "_mmap", None) is not None and hasattr(mmap, "MADV_RANDOM"):
            a._mmap.madvise(mmap.MADV_RANDOM)  # looked up at random: readahead would read the whole file
        if a.dtype != np.dtype(dtype) or list(a.shape) != shape or _probe(a) != probe:
            return None
        arrays[name] = a
    return arrays


def _build_and_save(base: str, name: str, description: dict, build: Callable[[], dict[str, np.ndarray]]) -> None:
    t0 = time.time()
    built = build()
    meta = {"description": description, "built_by": f"{socket.gethostname()}:{os.getpid()}",
            "build_seconds": round(time.time() - t0, 3),
            "arrays": {k: [a.dtype.str, list(a.shape), _probe(a)] for k, a in built.items()}}
    with _writes_to(os.path.dirname(base)):
        write_files_atomic({f"{base}-{key}.npy": lambda f, a=a: np.save(f, np.ascontiguousarray(a))
                       for key, a in built.items()})
        write_files_atomic({base + ".json": lambda f: f.write(json.dumps(meta, indent=1).encode())})  # the commit
    log.info("built %s index %s in %.2fs", name, base, time.time() - t0)


def load_or_build(cache_dir: str, name: str, description: dict,
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays for `description`, from `cache_dir` when they are there, else built by `build()` and saved.

    The result is always memory-mapped from the cache files (read-only), whoever built them.
    """
    base = os.path.join(cache_dir, f"{name}-{cache_key(description)}")
    arrays = _load(base, description)
    if arrays is not None:
        return arrays
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"data.cache_dir {cache_dir}: cannot create it ({e.strerror}); set data.cache_dir "
                         f"to a writable folder") from None
    while True:
        with _build_lock(base + ".lock") as builder:
            arrays = _load(base, description)  # built by whoever held the lock before us
            if arrays is not None:
                return arrays
            if builder:
                _build_and_save(base, name, description, build)
                break
            # the builder ended without committing (killed): try to build ourselves
    arrays = _load(base, description)
    if arrays is None:
        raise RuntimeError(f"{base}.json: index cache written but not readable back; check data.cache_dir {cache_dir}")
    return arrays
