"""`tokenize`: corpus → Megatron `.bin`/`.idx` shards + `manifest.json`; in one process, under MPI, or as parts.

The work is cut into units that depend only on the inputs (see plan.py); each unit writes its own shards and
records its progress, and the join numbers the shards in input order and writes the manifest. So the bytes
never depend on `--workers`, on the number of MPI ranks or Slurm array tasks, or on where a run was killed.

  one process:   all units, then the join
  MPI (mpirun / srun --mpi=pmi2, found from the environment): rank r takes units r, r+K, ...; rank 0 joins
  --part I --num-parts K (a Slurm array task): units I, I+K, ...; no join — run `preprocess join OUT` after

A run holds OUT for its whole life (lock.py): one process or rank 0 exclusively, the parts of an array together
(each also holding its units), so a second run on OUT is refused in one line instead of mixing its shards in.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

from . import __version__
from .indexed import describe_os_error, dtype_for_vocab
from .join import DRAFT, join, read_manifest
from .lock import folder_lock, unit_locks
from .manifest import load_manifest
from .plan import UNIT_BYTES, args_key, build_units, key_difference, parts_dir, write_json_atomic
from .readers import expand_inputs
from .runner import BadRecord, run_units  # noqa: F401  (BadRecord is part of this module's API)
from .tokenizer import describe_tokenizer, manifest_entry

log = logging.getLogger("preprocess")
FORMAT_VERSION = 1
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


def mpi_world():
    """MPI.COMM_WORLD when launched by mpirun/mpiexec or `srun --mpi=pmi2` with more than one rank, else None."""
    if not any(int(os.environ.get(v, "1") or 1) > 1 for v in _MPI_SIZE_VARS):
        if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
            raise ValueError("started by srun with several tasks but without MPI: every task would do all the work; "
                             "use `srun --mpi=pmi2` (or a Slurm array with --part/--num-parts)")
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


def _on_rank0(comm, fn):
    """Run fn on rank 0 (or here, without MPI) and hand its result, or its error, to every rank."""
    if comm is None:
        return fn()
    result = error = None
    if comm.Get_rank() == 0:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error = f"{e}"
    result, error = comm.bcast((result, error), root=0)
    if error:
        raise ValueError(error)
    return result


def _new_draft(key: dict, tok: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "version": __version__, "complete": False,
            "tokenizer": manifest_entry(tok), "dtype": str(dtype_for_vocab(tok["vocab_size"])), "shards": [],
            "inputs": [{"path": p, "bytes": b, "documents": 0} for p, b, *_ in key["inputs"]],
            "skipped": {}, "args": key}


def prepare_output(output: str, key: dict, tok: dict, overwrite: bool) -> dict:
    """The manifest of `output` for these arguments: the complete one, or this run's draft (resumed or new).

    The draft lives in the run's parts folder; it is also written as `output/manifest.json` (complete: false,
    so that `inspect` shows the progress) unless a complete output is there: that one is replaced only by the
    join, once the new run has finished, and only with `--overwrite`. An unfinished run with other arguments
    (one that failed) is no output to protect: its draft is replaced without `--overwrite`.
    """
    os.makedirs(output, exist_ok=True)
    top_path = os.path.join(output, "manifest.json")
    top = None
    if os.path.exists(top_path):
        try:
            top = read_manifest(output)
        except ValueError:
            if not overwrite:
                raise
    if top is not None and top.get("complete"):
        if top.get("args") == key:
            return top
        if not overwrite:
            raise ValueError(f"{output} holds the output of other arguments ({key_difference(top.get('args'), key)}); "
                             f"pass --overwrite to replace it (it is kept until the new run completes)")
        log.info("--overwrite: %s is replaced once this run completes", output)
    elif top is not None and top.get("args") != key:
        log.info("%s: replacing the manifest of an unfinished run with other arguments", output)
    parts = parts_dir(output, key)
    draft_path = os.path.join(parts, DRAFT)
    if os.path.isfile(draft_path):
        draft = load_manifest(draft_path, "")
    else:
        draft = _new_draft(key, tok)
        os.makedirs(parts, exist_ok=True)
        write_json_atomic(draft_path, draft)
    if (top is None or not top.get("complete")) and top != draft:
        write_json_atomic(top_path, draft)
    return draft


def _plan(output: str, key: dict, paths: list[str], unit_bytes: int) -> list:
    parts = parts_dir(output, key)
    os.makedirs(parts, exist_ok=True)
    plan_path = os.path.join(parts, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            return json.load(f)["units"]
    units = build_units(paths, unit_bytes)
    write_json_atomic(plan_path, {"units": units})
    return units


def tokenize(inputs: list[str], tokenizer: str, output: str, text_key: str = "text", workers: int = 1,
             shard_tokens: int = 1 << 30, strict: bool = False, overwrite: bool = False, part: int | None = None,
             num_parts: int | None = None, unit_bytes: int = UNIT_BYTES, log_interval: float = 30.0,
             eod_token: str | None = None) -> dict:
    """Tokenize `inputs` into `output`; returns the manifest (for `part`, a summary of the part).

    Resumes an interrupted run given the same arguments; refuses an output made with others unless `overwrite`.
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if unit_bytes < 1:
        raise ValueError(f"--unit-bytes must be >= 1, got {unit_bytes}")
    if (part is None) != (num_parts is None) or (part is not None and not 0 <= part < num_parts):
        raise ValueError(f"--part I and --num-parts K go together, with 0 <= I < K (got {part}, {num_parts})")
    comm = mpi_world() if part is None else None
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm else (part or 0, num_parts or 1)
    paths = expand_inputs(inputs)
    tok = describe_tokenizer(tokenizer, eod_token)
    key = args_key(paths, tok["sha256"], text_key, shard_tokens, unit_bytes)
    if eod_token is not None:  # another EOD gives other bytes (the key without it stays as older outputs have it)
        key["eod_id"] = tok["eod_id"]
    with contextlib.ExitStack() as held:
        # The folder is held for the whole run: by this process (rank 0 under MPI, which joins only once every
        # rank is done), or shared by the --part tasks of one array, each of which also holds its own units.
        if part is None:
            _on_rank0(comm, lambda: held.enter_context(folder_lock(output, "`preprocess tokenize`")))
        else:
            held.enter_context(folder_lock(output, f"`preprocess tokenize --part {part} --num-parts {num_parts}`",
                                           shared=True))
        manifest = _on_rank0(comm, lambda: prepare_output(output, key, tok, overwrite))
        if manifest["complete"]:
            log.info("%s is already complete for these arguments: nothing to do", output)
            return manifest
        units = _on_rank0(comm, lambda: _plan(output, key, paths, unit_bytes))
        mine = [(u, units[u]) for u in range(rank, len(units), size)]
        if part is not None:
            held.enter_context(unit_locks(parts_dir(output, key), [u for u, _ in mine], output))
        desc = f"tokenize[{rank}/{size}]" if size > 1 else "tokenize"
        log.info("%s: %d of %d units (%d inputs), %d workers", desc, len(mine), len(units), len(paths), workers)
        error = None
        try:
            run_units(mine, paths, parts_dir(output, key), tok, text_key, manifest["dtype"], shard_tokens, strict,
                      workers, desc, log_interval)
        except (ValueError, OSError) as e:
            if comm is None:
                raise
            error = f"rank {rank}: {describe_os_error(e) if isinstance(e, OSError) else e}"
        if part is not None:
            return {"part": part, "num_parts": num_parts, "units": len(mine), "total_units": len(units)}
        if comm is not None:
            errors = [e for e in comm.allgather(error) if e]
            if errors:
                raise ValueError(errors[0])
        return _on_rank0(comm, lambda: join(output, key))
