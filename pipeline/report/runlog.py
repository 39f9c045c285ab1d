"""Read a `log.jsonl` once into numpy columns, find its restarts and skipped steps, and sum it up.

The file is parsed in one pass by Arrow's JSON reader (C++, several threads): a log of a million steps reads in
about a second, and no Python object is made per line. A log holding `NaN`/`Infinity` (a non-finite loss
written by `json.dumps`) is read with those as missing values; a line Arrow cannot read at all sends the file to
a line-by-line reader whose only job is to name that line.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
from dataclasses import dataclass, field

import numpy as np

# Numeric keys of a training line (pipeline.train) and of an evaluation line; any may be absent (older logs).
NUMERIC = ("step", "loss", "lr", "grad_norm", "consumed_samples", "tokens", "tokens_per_sec", "tflops", "mfu",
           "step_time_s", "mem_mb", "time", "ppl", "straggler_ratio", "slowest_rank", "rank_data_s",
           "rank_forward_s", "rank_step_s", "median_data_s", "median_forward_s", "skipped_steps")
FLAGS = ("start", "skipped")  # true on the first line a process writes; true on a line whose step was skipped
TEXT = ("split", "source", "slowest_host", "data")  # data: pipeline.evaluate on other datasets than the run's


class LogError(ValueError):
    """A log that cannot be read as a pipeline.train log.jsonl; the message names the file (and line)."""


@dataclass
class Restart:
    row: int              # index of the first training line written after the restart
    step: int             # its step
    previous_step: int    # the last step logged before it
    lost_s: float         # wall time lost (the gap beyond the steps it advanced, plus redone steps); NaN: unknown


@dataclass
class RunLog:
    name: str
    path: str
    train: dict                   # column -> array over training lines, in file order
    valid: dict                   # column -> array over evaluation lines ("split": "valid"), in file order
    restarts: list = field(default_factory=list)
    skipped: np.ndarray = None    # steps at which an update was skipped
    warnings: list = field(default_factory=list)

    def segments(self):
        """(start, stop) row ranges of training lines between restarts: each is one process's continuous run."""
        cuts = [0] + [r.row for r in self.restarts] + [len(self.train["step"])]
        return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def resolve_log(path: str) -> str:
    """A log file, a run folder holding `log.jsonl`, or a checkpoint folder whose run config names the log."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise LogError(f"{path}: no such file or folder")
    candidate = os.path.join(path, "log.jsonl")
    if os.path.isfile(candidate):
        return candidate
    tags = sorted((d for d in os.listdir(path) if re.match(r"^global_step\d+$", d)),
                  key=lambda d: int(d[len("global_step"):]), reverse=True)
    for tag in tags:  # a checkpoint folder: the newest tag's run config says where the log went
        try:
            with open(os.path.join(path, tag, "run_config.json")) as f:
                named = json.load(f).get("log", {}).get("jsonl")
        except (OSError, ValueError):
            continue
        if named and os.path.isfile(named):
            return named
    raise LogError(f"{path}: no log.jsonl in this folder (give the file itself, the folder holding it, or the "
                   f"checkpoint folder of a run whose log.jsonl path is still valid)")


def _complete_size(path: str, warnings: list) -> int:
    """Bytes up to the end of the last complete line; a truncated last line (a job killed mid-write) is
    skipped with a warning."""
    size = os.path.getsize(path)
    if size == 0:
        raise LogError(f"{path}: empty log (no line written yet?)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        end = mm.rfind(b"\n") + 1
        if end == size:
            return size
        tail = mm[end:].strip()
        try:
            json.loads(tail)
            return size  # a whole last line, just without its newline
        except ValueError:
            pass
        line = sum(mm[i:min(i + (1 << 24), end)].count(b"\n") for i in range(0, end, 1 << 24)) + 1
    warnings.append(f"{path} line {line}: truncated last line ({len(tail)} bytes, a job killed while writing?); "
                    f"skipped")
    return end


def _read_arrow(path: str, size: int):
    """The first `size` bytes as an Arrow table, or None where Arrow cannot parse them."""
    import pyarrow as pa
    import pyarrow.json as pj

    with pa.memory_map(path) as source:
        buf = source.read_buffer(size)  # zero-copy
        try:
            return pj.read_json(pa.BufferReader(buf))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        raw = buf.to_pybytes()
    if b"NaN" not in raw and b"Infinity" not in raw:
        return None
    # json.dumps writes non-finite floats as bare NaN/Infinity, which is not JSON: read them as missing.
    raw = re.sub(rb"(?<=: )(-?Infinity|NaN)(?=[,}])", b"null", raw)
    try:
        return pj.read_json(pa.BufferReader(pa.py_buffer(raw)))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _columns_from_arrow(table, path: str) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    cols, n = {}, table.num_rows
    names = set(table.column_names)
    for key in NUMERIC:
        if key in names:
            try:
                cols[key] = pc.cast(table.column(key), pa.float64()).to_numpy(zero_copy_only=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise LogError(f"{path}: key '{key}' holds {table.column(key).type}, not a number: is this a "
                               f"pipeline.train log.jsonl?") from None
        else:
            cols[key] = np.full(n, np.nan)
    for key in FLAGS:
        col = table.column(key) if key in names else None
        cols[key] = (np.zeros(n, bool) if col is None else
                     pc.fill_null(pc.equal(pc.cast(col, pa.string()), "true"), False).to_numpy(zero_copy_only=False))
    for key in TEXT:  # through a dictionary: a few distinct strings, not one Python object per line
        cols[key] = np.full(n, None, dtype=object)
        if key in names:
            coded = pc.dictionary_encode(pc.cast(table.column(key), pa.string())).combine_chunks()
            codes = coded.indices.to_numpy(zero_copy_only=False)
            values = np.array(coded.dictionary.to_pylist() + [None], dtype=object)
            cols[key] = values[np.where(np.isfinite(codes), codes, len(values) - 1).astype(np.int64)]
    return cols


def _columns_from_lines(path: str, size: int) -> dict:
    """Line by line (slow): only reached when Arrow refused the file, to name the bad line."""
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f.read(size).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise LogError(f"{path} line {number}: not JSON ({e.msg}): is this a pipeline.train log.jsonl?") from None
            if not isinstance(row, dict):
                raise LogError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)

    def number(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan
    cols = {k: np.array([number(r.get(k)) for r in rows], dtype=float) for k in NUMERIC}
    cols.update({k: np.array([r.get(k) is True for r in rows], dtype=bool) for k in FLAGS})
    cols.update({k: np.array([r.get(k) for r in rows], dtype=object) for k in TEXT})
    return cols


def _restarts(train: dict) -> list[Restart]:
    """A restart is a process that began writing after another (its first line says `start`), or, in logs
    without that flag, a step that does not advance (a resume from an older checkpoint repeats steps)."""
    step, t = train["step"], train["time"]
    n = len(step)
    if n < 2:
        return []
    went_back = np.flatnonzero(step[1:] <= step[:-1]) + 1
    started = np.flatnonzero(train["start"][1:]) + 1
    rows = np.union1d(went_back, started)
    if not len(rows):
        return []
    # Seconds per step from the lines themselves (logging intervals without a restart), else step_time_s.
    ok = np.ones(n - 1, bool)
    ok[rows - 1] = False
    dt, ds = np.diff(t)[ok], np.diff(step)[ok]
    good = np.isfinite(dt) & (ds > 0)
    per_step = float(np.median(dt[good] / ds[good])) if good.any() else float(np.nanmedian(train["step_time_s"])) \
        if np.isfinite(train["step_time_s"]).any() else math.nan
    out = []
    for r in rows:
        gap = t[r] - t[r - 1]
        lost = max(0.0, gap - (step[r] - step[r - 1]) * per_step) if math.isfinite(gap) and math.isfinite(per_step) \
            else math.nan
        out.append(Restart(int(r), int(step[r]), int(step[r - 1]), lost))
    return out


def _skipped(train: dict) -> np.ndarray:
    """Steps whose update was skipped: lines flagged `skipped`, and steps where a `skipped_steps` count rose."""
    steps = [train["step"][train["skipped"]]]
    count = train["skipped_steps"]
    if np.isfinite(count).any():
        c = np.where(np.isfinite(count), count, 0)
        rose = np.flatnonzero(np.diff(c, prepend=0) > 0)
        steps.append(train["step"][rose])
    return np.unique(np.concatenate(steps))


def read_log(path: str, name: str | None = None) -> RunLog:
    """Parse one log (file, run folder or checkpoint folder) into a RunLog. Raises LogError."""
    path = resolve_log(path)
    warnings: list = []
    size = _complete_size(path, warnings)
    if size == 0:
        raise LogError(f"{path}: no complete line (the only line is truncated)")
    table = _read_arrow(path, size)
    cols = _columns_from_arrow(table, path) if table is not None else _columns_from_lines(path, size)
    has_step = np.isfinite(cols["step"])
    if not len(has_step):
        raise LogError(f"{path}: empty log (blank lines only)")
    if not has_step.any():
        raise LogError(f"{path}: no line has a 'step': not a pipeline.train log.jsonl")
    is_valid = (cols["split"] == "valid") & has_step & np.equal(cols["data"], None)  # the run's own valid split
    is_train = np.equal(cols["split"], None) & has_step
    train = {k: v[is_train] for k, v in cols.items()}
    valid = {k: v[is_valid] for k, v in cols.items()}
    if not len(train["step"]) and not len(valid["step"]):
        raise LogError(f"{path}: no training or evaluation line (keys 'step' and 'loss'): not a pipeline.train "
                       f"log.jsonl")
    if name is None:
        base = os.path.basename(path)
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) if base == "log.jsonl" else \
            os.path.splitext(base)[0]
    run = RunLog(name, path, train, valid, warnings=warnings)
    run.restarts = _restarts(train)
    run.skipped = _skipped(train)
    return run


def _last(a: np.ndarray) -> float:
    finite = a[np.isfinite(a)]
    return float(finite[-1]) if len(finite) else math.nan


def summarize(run: RunLog) -> dict:
    """The figures of the summary table (NaN where the log does not say)."""
    tr, va = run.train, run.valid
    t = tr["time"]
    wall = math.nan
    if np.isfinite(t).any():  # spans of each process, the restarts' gaps between them included
        first = np.flatnonzero(np.isfinite(t))[0]
        wall = float(np.nanmax(t) - t[first] + (tr["step_time_s"][first] if np.isfinite(tr["step_time_s"][first])
                                                else 0.0))
    valid_loss, best_ppl, best_step = math.nan, math.nan, math.nan
    if len(va["step"]):
        order = np.lexsort((np.arange(len(va["step"])), va["step"]))  # newest line of the highest step
        valid_loss = float(va["loss"][order[-1]])
        ppl = np.where(np.isfinite(va["ppl"]), va["ppl"], np.exp(np.minimum(va["loss"], 50)))
        if np.isfinite(ppl).any():
            i = int(np.nanargmin(ppl))
            best_ppl, best_step = float(ppl[i]), float(va["step"][i])
    ratio = tr["straggler_ratio"]
    worst = int(np.nanargmax(ratio)) if np.isfinite(ratio).any() else None
    return {
        "steps": float(np.nanmax(tr["step"])) if len(tr["step"]) else math.nan,
        "tokens": float(np.nanmax(tr["tokens"])) if np.isfinite(tr["tokens"]).any() else math.nan,
        "wall_s": wall,
        "train_loss": _last(tr["loss"]),
        "valid_loss": valid_loss,
        "best_ppl": best_ppl, "best_ppl_step": best_step,
        "mean_mfu": float(np.nanmean(tr["mfu"])) if np.isfinite(tr["mfu"]).any() else math.nan,
        "restarts": len(run.restarts),
        "lost_s": float(sum(r.lost_s for r in run.restarts)) if run.restarts else 0.0,
        "skipped": len(run.skipped),
        "straggler_ratio": float(ratio[worst]) if worst is not None else math.nan,
        "straggler_rank": tr["slowest_rank"][worst] if worst is not None else math.nan,
        "straggler_host": tr["slowest_host"][worst] if worst is not None else None,
        "straggler_step": float(tr["step"][worst]) if worst is not None else math.nan,
    }
