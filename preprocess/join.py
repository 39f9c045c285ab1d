"""The join step: once every unit is done, number their shards in unit order and write the final manifest.

It only renames files (no data is copied) and is idempotent: a join killed half way is finished by running it
again (or by re-running the `tokenize` command). It is also the moment an output made with other arguments
(`--overwrite`) is replaced: until every unit of the new run is done, the old output stays as it was.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
from collections import Counter

from .indexed import sha256_file
from .manifest import load_manifest
from .plan import load_unit_state, parts_dir, write_json_atomic
from .runner import kill_point

log = logging.getLogger("preprocess")
_SHARD_FILE = re.compile(r"shard_\d+\.(bin|idx)$")
DRAFT = "manifest.json"  # in the parts folder: the manifest of a run in progress, until the join
JOINING = "joining"  # in the parts folder: the old output is gone, shards are being moved into place


def read_manifest(output: str) -> dict:
    return load_manifest(os.path.join(output, "manifest.json"),
                         f"is {output} a `preprocess tokenize` output?")


def _move(src: str, dst: str) -> None:
    if os.path.exists(src):
        os.replace(src, dst)
    elif not os.path.exists(dst):
        raise FileNotFoundError(f"{src}: shard lost (neither it nor {dst} exists); re-run `preprocess tokenize` "
                                f"with --overwrite")


def _units(parts: str) -> list:
    plan_path = os.path.join(parts, "plan.json")
    if not os.path.isfile(plan_path):
        raise FileNotFoundError(f"{plan_path}: no unit plan; run `preprocess tokenize` on {os.path.dirname(parts)} first")
    with open(plan_path) as f:
        return json.load(f)["units"]


def _missing(parts: str) -> list[int]:
    return [u for u in range(len(_units(parts))) if not load_unit_state(parts, u)["done"]]


def _find_run(output: str) -> tuple[str, dict] | None:
    """The parts folder and draft manifest that `join OUT` should finish: the run whose units are all done
    (the one the output's own manifest names when several are), else the output's unfinished run, so that its
    missing units are reported. None when there is nothing to join."""
    top_path = os.path.join(output, "manifest.json")
    top = read_manifest(output) if os.path.exists(top_path) else None
    runs = []
    for draft_path in sorted(glob.glob(os.path.join(output, ".parts-*", DRAFT))):
        runs.append((os.path.dirname(draft_path), load_manifest(draft_path, "")))
    if top is not None and not top.get("complete") and "args" in top:
        legacy = parts_dir(output, top["args"])  # a run started before drafts were kept in the parts folder
        if os.path.isdir(legacy) and legacy not in [p for p, _ in runs]:
            runs.append((legacy, top))
    if not runs:
        if top is None:
            raise FileNotFoundError(f"{top_path}: no manifest and no run in progress; run `preprocess tokenize` first")
        return None
    done = [(p, d) for p, d in runs if os.path.isfile(os.path.join(p, "plan.json")) and not _missing(p)]
    ours = [(p, d) for p, d in (done or runs) if top is not None and d.get("args") == top.get("args")]
    if len(done) == 1 or ours:
        return (ours or done)[0]
    if done:
        raise ValueError(f"{output}: {len(done)} finished runs with different arguments ({', '.join(p for p, _ in done)}); "
                         f"re-run the `tokenize` command whose output you want")
    return runs[-1]


def join(output: str, key: dict | None = None) -> dict:
    """Write `output/manifest.json` (complete) from the finished units of the run with arguments `key` (by default
    the one found in `output`); returns the manifest."""
    if key is not None:
        parts = parts_dir(output, key)
        manifest = load_manifest(os.path.join(parts, DRAFT), "the run's draft manifest is gone; re-run tokenize")
    else:
        found = _find_run(output)
        if found is None:
            log.info("%s is already joined: nothing to do", output)
            return read_manifest(output)
        parts, manifest = found
    units = _units(parts)
    missing = _missing(parts)
    if missing:
        first = manifest["inputs"][units[missing[0]][0][0]]["path"]
        raise ValueError(f"{output}: {len(missing)} of {len(units)} units are not finished (the first, unit "
                         f"{missing[0]}, reads {first}); run the missing `tokenize --part` tasks, then join again")
    states = [load_unit_state(parts, u) for u in range(len(units))]
    skipped: Counter = Counter()
    docs: Counter = Counter()
    for st in states:
        skipped.update(st["skipped"])
        docs.update(st["documents"])
    if not any(st["shards"] for st in states):
        raise ValueError(f"no usable documents in {len(manifest['inputs'])} inputs (skipped: {dict(skipped) or 'none'}); "
                         f"check --text-key {manifest['args']['text_key']!r}")
    top_path = os.path.join(output, "manifest.json")
    if not os.path.exists(os.path.join(parts, JOINING)):
        # Every unit is done: only now does the previous output go (first its manifest, so that nothing reads
        # a manifest whose shards are being replaced). The marker keeps a re-run from deleting moved shards.
        write_json_atomic(top_path, manifest)
        for name in os.listdir(output):
            if _SHARD_FILE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(output, name))
        write_json_atomic(os.path.join(parts, JOINING), {})
    shards = []
    for st in states:
        for sh in st["shards"]:
            name = f"shard_{len(shards):05d}"
            for ext in (".idx", ".bin"):
                _move(os.path.join(parts, sh["file"] + ext), os.path.join(output, name + ext))
            idx_sha = sh.get("idx_sha256") or sha256_file(os.path.join(output, name + ".idx"))  # older unit states
            shards.append({"name": name, "documents": sh["documents"], "tokens": sh["tokens"],
                           "sha256": sh["sha256"], "idx_sha256": idx_sha})
            kill_point("PREPROCESS_KILL_IN_JOIN")
    for i, entry in enumerate(manifest["inputs"]):
        entry["documents"] = docs.get(str(i), 0)
    manifest.update(shards=shards, skipped=dict(sorted(skipped.items())), complete=True)
    write_json_atomic(top_path, manifest)
    for stale in glob.glob(os.path.join(output, ".parts-*")):  # ours, and those of runs this one replaced
        shutil.rmtree(stale, ignore_errors=True)
    return manifest
