"""The join step: once every unit is done, number their shards in unit order and write the final manifest.

It only renames files (no data is copied) and is idempotent: a join killed half way is finished by running it
again (or by re-running the `tokenize` command).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter

from .plan import load_unit_state, parts_dir, write_json_atomic
from .runner import kill_point

log = logging.getLogger("preprocess")


def read_manifest(output: str) -> dict:
    path = os.path.join(output, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no manifest (is {output} a `preprocess tokenize` output?)")
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError:
            raise ValueError(f"{path}: unreadable manifest; re-run `preprocess tokenize` with --overwrite") from None


def _move(src: str, dst: str) -> None:
    if os.path.exists(src):
        os.replace(src, dst)
    elif not os.path.exists(dst):
        raise FileNotFoundError(f"{src}: shard lost (neither it nor {dst} exists); re-run `preprocess tokenize` "
                                f"with --overwrite")


def join(output: str) -> dict:
    """Write `output/manifest.json` (complete) from the finished units; returns the manifest."""
    manifest = read_manifest(output)
    if manifest.get("complete"):
        log.info("%s is already joined: nothing to do", output)
        return manifest
    parts = parts_dir(output, manifest["args"])
    plan_path = os.path.join(parts, "plan.json")
    if not os.path.isfile(plan_path):
        raise FileNotFoundError(f"{plan_path}: no unit plan; run `preprocess tokenize` on {output} first")
    with open(plan_path) as f:
        units = json.load(f)["units"]
    states = [load_unit_state(parts, u) for u in range(len(units))]
    missing = [u for u, st in enumerate(states) if not st["done"]]
    if missing:
        first = manifest["inputs"][units[missing[0]][0][0]]["path"]
        raise ValueError(f"{output}: {len(missing)} of {len(units)} units are not finished (the first, unit "
                         f"{missing[0]}, reads {first}); run the missing `tokenize --part` tasks, then join again")
    skipped: Counter = Counter()
    docs: Counter = Counter()
    for st in states:
        skipped.update(st["skipped"])
        docs.update(st["documents"])
    if not any(st["shards"] for st in states):
        raise ValueError(f"no usable documents in {len(manifest['inputs'])} inputs (skipped: {dict(skipped) or 'none'}); "
                         f"check --text-key {manifest['args']['text_key']!r}")
    shards = []
    for st in states:
        for sh in st["shards"]:
            name = f"shard_{len(shards):05d}"
            for ext in (".idx", ".bin"):
                _move(os.path.join(parts, sh["file"] + ext), os.path.join(output, name + ext))
            shards.append({"name": name, "documents": sh["documents"], "tokens": sh["tokens"],
                           "sha256": sh["sha256"]})
            kill_point("PREPROCESS_KILL_IN_JOIN")
    for i, entry in enumerate(manifest["inputs"]):
        entry["documents"] = docs.get(str(i), 0)
    manifest.update(shards=shards, skipped=dict(sorted(skipped.items())), complete=True)
    write_json_atomic(os.path.join(output, "manifest.json"), manifest)
    shutil.rmtree(parts, ignore_errors=True)
    return manifest
