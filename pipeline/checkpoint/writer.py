"""How checkpoint files are written and read under DeepSpeed's engine: our own `CheckpointEngine`s.

DeepSpeed's engine writes and reads every checkpoint file through `engine.checkpoint_engine`. `attach()` replaces
its torch one with:

- `SafeCheckpointEngine`: loads with `weights_only=True` and the allow-list of `safe.py` (so resuming never
  unpickles arbitrary objects); writes with `torch.save`, turning a full disk into one line naming the file.
- with `background` set (`checkpoint.async_save`), `save` only copies the tensors to host memory (one copy of
  this rank's shard); once DeepSpeed has handed over every file of the tag, `start()` writes them (and flushes
  them, with `checkpoint.sync`) in a background thread while training goes on. The commit protocol does not
  change: the Saver (pipeline/loop.py) commits only once every rank reports its writes complete and flushed.

We write our own background writer rather than DeepSpeed's decoupled/FastPersist engines: those need the compiled
async-I/O op (libaio), and the decoupled one its own process per rank.

Test hook: `PIPELINE_CKPT_TEST_HOOK="kill:TAG:RANK"` SIGKILLs rank RANK's process after it wrote the first file of
TAG (in the background, or in a synchronous save); `"kill-before-commit:TAG:0"` kills rank 0 once every rank's files
of TAG are written and flushed, just before the marker; `"pause:TAG:RANK"` makes that writer create `TAG/.paused-rankRANK` and wait for
`TAG/.resume` (a test signals the run while a background save is in flight, at a set point, not after a sleep).
"""
from __future__ import annotations

import copy
import errno
import logging
import os
import signal
import threading
import time

import torch

from .. import dist
from .safe import load_file

log = logging.getLogger("pipeline")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(path: str) -> bool:
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
        return st.f_bavail * st.f_frsize < 1 << 20
    except OSError:
        return False


def _probe_write(path: str) -> int | None:
    """The errno of appending a little to `path` (and flushing it), or None when that works."""
    try:
        with open(path, "ab") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno
    return None


def write_file(obj, path: str) -> None:
    """torch.save `obj` to `path`. A full disk or quota raises OSError(ENOSPC) with one line naming the file
    (torch's zip writer otherwise reports it as a generic RuntimeError without a path)."""
    try:
        torch.save(obj, path)  # by path: torch's C++ writer, a third faster than through a Python file object
    except Exception as e:  # noqa: BLE001
        chain, err = [], e
        while err is not None:
            chain.append(err)
            err = err.__cause__ or err.__context__
        code = next((x.errno for x in chain if isinstance(x, OSError) and x.errno), None)
        if code is None:  # torch's zip writer reports a failed write without its errno: ask the file itself
            code = _probe_write(path)
        if code in _FULL or "No space left" in str(e) or (code is None and _disk_full(path)):
            raise OSError(errno.ENOSPC, f"no space left on device writing checkpoint file {path}; free space "
                                        f"there, or point checkpoint.dir elsewhere") from None
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write checkpoint file {path}: {e.strerror or e}") from None
        raise


def _to_host(obj, memo: dict, staging: dict, key: list):
    """A deep copy whose tensors are CPU copies (a tensor seen twice is copied once: ties stay ties). The copies go
    into `staging`'s buffers of the previous save, by position, where shapes agree: fresh host memory costs a page
    fault per page, several times the copy itself."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            k = (key[0], len(memo))
            buf = staging.get(k)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype or buf.stride() != obj.stride():
                buf = staging[k] = torch.empty_strided(obj.shape, obj.stride(), dtype=obj.dtype, device="cpu")
            memo[id(obj)] = buf.copy_(obj.detach())
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict else {}
        for k, v in obj.items():
            out[k] = _to_host(v, memo, staging, key)
        return out
    if isinstance(obj, list):
        return [_to_host(v, memo, staging, key) for v in obj]
    if isinstance(obj, tuple):  # plain tuples, torch.Size, named tuples
        items = [_to_host(v, memo, staging, key) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy.deepcopy(obj)


def _hook(tag: str):
    """(action, rank) of PIPELINE_CKPT_TEST_HOOK when it names `tag` and this rank, else None."""
    spec = os.environ.get("PIPELINE_CKPT_TEST_HOOK", "")
    parts = spec.split(":")
    if len(parts) == 3 and parts[1] == tag and parts[2] == str(dist.rank()):
        return parts[0]
    return None


def _base():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return TorchCheckpointEngine


class SafeCheckpointEngine(_base()):
    """DeepSpeed's torch engine, reading with `weights_only=True` + allow-list, writing with `write_file`; the
    commit is ours (commit.py), not DeepSpeed's. With `background` set, `save` only copies to host memory and
    `start` writes what was handed over in a background thread."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "pipeline.SafeCheckpointEngine"
        self.background = False
        self.jobs: list = []
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.staging: dict = {}  # host buffers of the last background save, reused by the next

    def create(self, info) -> None:
        pass

    def load(self, path: str, map_location=None):
        return load_file(path, map_location=map_location)

    def commit(self, info) -> bool:
        return True

    def save(self, state_dict, path: str) -> None:
        if self.background:  # staging buffers by file name (the same across tags); never two saves in flight
            self.jobs.append((path, _to_host(state_dict, {}, self.staging, [os.path.basename(path)])))
        else:
            write_file(state_dict, path)
            if _hook(os.path.basename(os.path.dirname(path))) == "kill":  # test hook: dead in the middle of a save
                os.kill(os.getpid(), signal.SIGKILL)

    def start(self, tag: str, fsync: bool) -> None:
        """Write (and with `fsync`, flush) the files handed over since the last start, in the background."""
        assert self.thread is None, "one background save at a time"
        jobs, self.jobs, self.error = self.jobs, [], None
        self.thread = threading.Thread(target=self._write_all, args=(tag, jobs, fsync), daemon=True,
                                       name=f"checkpoint-writer-{tag}")
        self.thread.start()

    def _write_all(self, tag: str, jobs: list, fsync: bool) -> None:
        try:
            action = _hook(tag)
            for i, (path, obj) in enumerate(jobs):
                write_file(obj, path)
                if i == 0 and action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if i == 0 and action == "pause":
                    folder = os.path.dirname(path)
                    open(os.path.join(folder, f".paused-rank{dist.rank()}"), "w").close()
                    while not os.path.exists(os.path.join(folder, ".resume")):
                        time.sleep(0.05)
            if fsync:
                for path, _ in jobs:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported to every rank by the Saver's next poll
            self.error = e

    def status(self) -> int:
        """0 nothing in flight or written, 1 still writing, 2 failed (see `error`)."""
        if self.thread is None:
            return 0
        if self.thread.is_alive():
            return 1
        return 2 if self.error is not None else 0

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def reset(self) -> None:
        self.thread, self.error = None, None


def attach(ds_engine) -> SafeCheckpointEngine:
    """Put our checkpoint engine into DeepSpeed's engine (once); returns it."""
    current = getattr(ds_engine, "checkpoint_engine", None)
    if isinstance(current, SafeCheckpointEngine):
        return current
    ds_engine.checkpoint_engine = SafeCheckpointEngine(getattr(ds_engine, "_config", None))
    return ds_engine.checkpoint_engine
