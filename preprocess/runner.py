"""Run a set of units: feed their tasks to worker processes, write each unit's shards in order, record state.

Results come back in task order (a bounded window of tasks in flight, so memory stays constant whatever the
corpus size), and each unit's documents go to its own shards under the parts folder. A shard closes at the
first document boundary at or past `--shard-tokens`; it is renamed into place and only then recorded in the
unit's state file together with the input position just after it, so a killed run resumes each unit after
its last complete shard and writes the same bytes.
"""
from __future__ import annotations

import logging
import os
import signal
from collections import Counter, deque
from multiprocessing import get_context

import numpy as np

from .indexed import IndexedWriter
from .plan import load_unit_state, shard_file, unit_state_path, write_json_atomic
from .progress import Progress
from .readers import iter_raw_lines, iter_records
from .worker import init_worker, run_task

log = logging.getLogger("preprocess")
CHUNK_BYTES = 1 << 20  # bytes of input per task; any value gives the same output
BATCH_RECORDS = 512
_STREAMED_JSONL = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")


class BadRecord(ValueError):
    """A bad record under --strict: the message is `file:line: reason`."""


_events: Counter = Counter()


def kill_point(var: str) -> None:
    """Fault injection for the resume tests: SIGKILL this process at the N-th event of a kind when the
    environment variable `var` is N (PREPROCESS_KILL_AFTER_SHARDS, PREPROCESS_KILL_IN_JOIN)."""
    _events[var] += 1
    if os.environ.get(var) == str(_events[var]):
        os.kill(os.getpid(), signal.SIGKILL)


def line_number(path: str, offset: int) -> int:
    """1-based line number of the line starting at byte `offset` (counted only when an error is reported)."""
    n, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 20, offset - done))
            if not block:
                break
            n += block.count(b"\n")
            done += len(block)
    return n


class UnitWriter:
    """Writes the documents of one unit into its shards and keeps its state file current."""

    def __init__(self, parts, unit, pieces, paths, dtype, shard_tokens, strict):
        self.parts, self.unit, self.pieces, self.paths = parts, unit, pieces, paths
        self.dtype, self.shard_tokens, self.strict = dtype, shard_tokens, strict
        self.state = load_unit_state(parts, unit)
        self.pending_skips: Counter = Counter()
        self.pending_docs: Counter = Counter()
        self.writer = None

    def _locate(self, piece_i: int, locator: int) -> str:
        input_i, _, end = self.pieces[piece_i]
        path = self.paths[input_i]
        return f"{path}:{line_number(path, locator) if end >= 0 else locator}"

    def add(self, piece_i, tokens, lengths, ends, bad) -> None:
        if bad and self.strict:
            _, locator, reason = bad[0]
            raise BadRecord(f"{self._locate(piece_i, locator)}: {reason}")
        input_key = str(self.pieces[piece_i][0])
        bad_ends = np.asarray([b[0] for b in bad], dtype=np.int64)
        cum = np.cumsum(lengths)
        d0 = t0 = b0 = 0
        while d0 < len(lengths):
            if self.writer is None:
                name = shard_file(self.unit, len(self.state["shards"]))
                self.writer = IndexedWriter(os.path.join(self.parts, name), self.dtype)
                self.name = name
            room = self.shard_tokens - self.writer.tokens
            k = int(np.searchsorted(cum, t0 + room, side="left"))  # the document that fills the shard
            k = min(k, len(lengths) - 1)
            t1 = int(cum[k])
            self.writer.add_documents(tokens[t0:t1], lengths[d0:k + 1])
            self.pending_docs[input_key] += k + 1 - d0
            d0, t0 = k + 1, t1
            if self.writer.tokens >= self.shard_tokens:
                end = int(ends[k])
                nb = int(np.searchsorted(bad_ends, end, side="right"))
                self.pending_skips.update(b[2] for b in bad[b0:nb])
                b0 = nb
                self._close([piece_i, end])
        self.pending_skips.update(b[2] for b in bad[b0:])

    def _commit(self, resume) -> None:
        st = self.state
        st["skipped"] = dict(sorted((Counter(st["skipped"]) + self.pending_skips).items()))
        st["documents"] = dict(Counter(st["documents"]) + self.pending_docs)
        st["resume"] = resume
        self.pending_skips.clear()
        self.pending_docs.clear()
        write_json_atomic(unit_state_path(self.parts, self.unit), st)

    def _close(self, resume) -> None:
        w = self.writer
        w.finalize()
        self.state["shards"].append({"file": self.name, "documents": w.documents, "tokens": w.tokens,
                                     "sha256": w.sha256, "idx_sha256": w.idx_sha256})
        self.writer = None
        self._commit(resume)
        kill_point("PREPROCESS_KILL_AFTER_SHARDS")

    def finish(self) -> None:
        if self.writer is not None and self.writer.documents:
            self._close([len(self.pieces), 0])
        elif self.writer is not None:
            self.writer.abort()
            self.writer = None
        self.state["done"] = True
        self._commit([len(self.pieces), 0])

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _record_batches(path: str, text_key: str, after_line: int):
    """Batches of (line, kind, payload) read in this process, for inputs that cannot be cut by byte offset."""
    if path.endswith(_STREAMED_JSONL):
        source = ((n, "bad", why) if why else (n, "raw", raw) for n, raw, why in iter_raw_lines(path))
    else:
        source = ((r.line, "bad", r.reason) if r.text is None else (r.line, "text", r.text)
                  for r in iter_records(path, text_key))
    items, size, last = [], 0, 0
    try:
        for item in source:
            last = item[0]
            if item[0] <= after_line:
                continue
            items.append(item)
            size += len(item[2]) if item[1] != "bad" else 0
            if len(items) >= BATCH_RECORDS or size >= CHUNK_BYTES:
                yield items, size
                items, size = [], 0
    except (OSError, ValueError, EOFError):  # an unreadable or corrupt file (parquet, arrow)
        items.append((last + 1, "bad", "unreadable_file" if last == 0 else "truncated_file"))
    if items:
        yield items, size


def _tasks(units, states, paths, text_key):
    for u, pieces in units:
        rp, rpos = states[u]["resume"]
        for pi in range(rp, len(pieces)):
            input_i, start, end = pieces[pi]
            path = paths[input_i]
            pos = rpos if pi == rp else 0
            if end >= 0:  # byte mode: the worker reads the range itself
                a0 = max(start, pos)
                for a in range(a0, end, CHUNK_BYTES):
                    b = min(a + CHUNK_BYTES, end)
                    yield ("bytes", (u, pi, b - a), path, a, b, a == a0)
            else:
                for items, size in _record_batches(path, text_key, pos):
                    yield ("items", (u, pi, size), path, items)


def _ordered(pool, tasks, depth):
    """Apply run_task over `tasks` in the pool with at most `depth` in flight; results in task order."""
    pending = deque()
    for t in tasks:
        pending.append(pool.apply_async(run_task, (t,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def run_units(units, paths, parts, tok, text_key, dtype, shard_tokens, strict, workers, desc="tokenize",
              log_interval=30.0):
    """Tokenize `units` ([(unit index, pieces)]), skipping those already done. Returns units done now."""
    states = {u: load_unit_state(parts, u) for u, _ in units}
    todo = [(u, pieces) for u, pieces in units if not states[u]["done"]]
    for u, _ in todo:
        if states[u]["shards"]:
            log.info("resuming unit %d after its %d complete shards", u, len(states[u]["shards"]))
    if not todo:
        return 0
    total = sum((e if e >= 0 else os.path.getsize(paths[i]) if os.path.isfile(paths[i]) else 0) - s
                for _, pieces in todo for i, s, e in pieces)
    progress = Progress(total, desc, log_interval)
    init_args = (tok, text_key, np.dtype(dtype).str)
    pool = get_context("spawn").Pool(workers, init_worker, init_args) if workers > 1 else None
    if pool is None:
        init_worker(*init_args)
    remaining = iter(todo)
    cur = None

    def advance(u):
        nonlocal cur
        while cur is None or cur.unit != u:
            if cur is not None:
                cur.finish()
            nu, pieces = next(remaining)
            cur = UnitWriter(parts, nu, pieces, paths, dtype, shard_tokens, strict)

    try:
        tasks = _tasks(todo, states, paths, text_key)
        results = _ordered(pool, tasks, 8 * workers) if pool else map(run_task, tasks)
        for (u, pi, nbytes), tokens, lengths, ends, bad in results:
            advance(u)
            cur.add(pi, tokens, lengths, ends, bad)
            progress.update(len(lengths), len(tokens), nbytes)
        for u, _ in todo[[t[0] for t in todo].index(cur.unit) + 1 if cur else 0:]:
            advance(u)
        cur.finish()
    except BaseException:
        if cur is not None:
            cur.abort()
        raise
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    return len(todo)
