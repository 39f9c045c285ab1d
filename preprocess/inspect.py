"""`inspect OUT`: the manifest's summary, decoded documents, and (with --verify) a check of every shard."""
from __future__ import annotations

import json
import os

from .indexed import IndexedDataset, sha256_file
from .join import read_manifest
from .plan import load_unit_state, parts_dir


def verify(output: str, manifest: dict) -> list[str]:
    """Problems found by re-reading every shard listed in the manifest (empty when all is well)."""
    problems = []
    for s in manifest["shards"]:
        prefix = os.path.join(output, s["name"])
        try:
            ds = IndexedDataset(prefix)
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        if len(ds) != s["documents"] or ds.num_tokens != s["tokens"]:
            problems.append(f"{prefix}: {len(ds)} documents and {ds.num_tokens} tokens, the manifest says "
                            f"{s['documents']} and {s['tokens']}")
        for ext, key in ((".bin", "sha256"), (".idx", "idx_sha256")):
            if key in s and sha256_file(prefix + ext) != s[key]:  # idx_sha256: outputs since the second wave
                problems.append(f"{prefix}{ext}: sha256 differs from the manifest (the file changed or is corrupt)")
    return problems


def _print_units(output: str, manifest: dict) -> None:
    """Progress of an unfinished run, from the unit states (what a Slurm array has done so far)."""
    parts = parts_dir(output, manifest["args"])
    plan = os.path.join(parts, "plan.json")
    if not os.path.isfile(plan):
        print("units: none started")
        return
    with open(plan) as f:
        n = len(json.load(f)["units"])
    states = [load_unit_state(parts, u) for u in range(n)]
    done = sum(st["done"] for st in states)
    shards = sum(len(st["shards"]) for st in states)
    print(f"units: {done} of {n} done, {shards} shards written so far; re-run the same tokenize command "
          f"(or the missing --part tasks, then `join`) to finish")


def inspect(output: str, docs: int = 0, check: bool = False) -> bool:
    """Print the summary (and `docs` decoded documents); returns False when --verify found a problem."""
    m = read_manifest(output)
    total_docs = sum(s["documents"] for s in m["shards"])
    total_tokens = sum(s["tokens"] for s in m["shards"])
    print(f"{output}: {'complete' if m.get('complete') else 'INCOMPLETE'}, {len(m['shards'])} shards, "
          f"{total_docs:,} documents, {total_tokens:,} tokens, dtype {m['dtype']}")
    if not m.get("complete") and "args" in m:
        _print_units(output, m)
    print(f"tokenizer: {m['tokenizer']['path']} (vocab {m['tokenizer']['vocab_size']}, eod {m['tokenizer']['eod_id']})")
    print(f"inputs: {len(m['inputs'])} files, {sum(i['bytes'] for i in m['inputs']) / 1e6:,.1f} MB")
    for s in m["shards"]:
        print(f"  {s['name']}: {s['documents']:,} documents, {s['tokens']:,} tokens, "
              f"{s['tokens'] / max(s['documents'], 1):,.0f} tokens/document")
    skipped = m["skipped"]
    print("skipped: " + (", ".join(f"{k} {v:,}" for k, v in skipped.items()) if skipped else "none"))
    ok = True
    if check:
        problems = verify(output, m)
        for p in problems:
            print(f"verify: {p}")
        print(f"verify: {len(m['shards']) - len(problems) if not problems else 'FAILED'}"
              f"{' shards OK' if not problems else f' ({len(problems)} problems)'}")
        ok = not problems
    if docs:
        from .tokenizer import decoder

        decode = decoder(m["tokenizer"])
        shown = 0
        for s in m["shards"]:
            ds = IndexedDataset(os.path.join(output, s["name"]))
            for j in range(min(len(ds), docs - shown)):
                print(f"--- document {shown} ({len(ds[j])} tokens)")
                print(decode(ds[j]))
                shown += 1
            if shown >= docs:
                break
    return ok
