"""Reading `manifest.json`: the one place that checks it is a manifest at all, for tokenize, join, inspect and the
training data reader alike (a file holding `[]` or `{}` is refused naming the file, not met as a KeyError)."""
from __future__ import annotations

import json
import os

_FIX = "re-run `preprocess tokenize` with --overwrite"


def _check(m, path: str) -> dict:
    if not isinstance(m, dict):
        raise ValueError(f"{path}: not a `preprocess tokenize` manifest (a JSON {type(m).__name__}, not an object); "
                         f"{_FIX}")
    for key, kind in (("shards", list), ("tokenizer", dict), ("dtype", str)):
        if not isinstance(m.get(key), kind):
            raise ValueError(f"{path}: not a `preprocess tokenize` manifest (key {key!r} is missing or not a "
                             f"{ {list: 'list', dict: 'object', str: 'string'}[kind]}); {_FIX}")
    if m["dtype"] not in ("uint8", "int8", "uint16", "int16", "int32", "int64"):
        raise ValueError(f"{path}: dtype {m['dtype']!r} is not a token dtype of the .bin/.idx format (uint16, int32, "
                         f"...); {_FIX}")
    tok = m["tokenizer"]
    for key, kinds in (("vocab_size", (int,)), ("eod_id", (int, type(None))), ("sha256", (str,))):
        if key in tok and (not isinstance(tok[key], kinds) or isinstance(tok[key], bool)):
            raise ValueError(f"{path}: tokenizer.{key} is {tok[key]!r}, not a {kinds[0].__name__}; {_FIX}")
    if not isinstance(tok.get("vocab_size"), int) or tok["vocab_size"] < 1:
        raise ValueError(f"{path}: tokenizer.vocab_size is missing or below 1; {_FIX}")
    if "sha256" not in tok:
        raise ValueError(f"{path}: tokenizer.sha256 is missing (it tells datasets of different tokenizers apart); "
                         f"{_FIX}")
    for i, s in enumerate(m["shards"]):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("documents"), int)):
            raise ValueError(f"{path}: shards[{i}] lacks a name or a document count; {_FIX}")
    return m


def load_manifest(path: str, missing_hint: str) -> dict:
    """The checked contents of the manifest at `path`; FileNotFoundError (with `missing_hint`) when absent,
    ValueError naming the file when it is not JSON or not a manifest."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no manifest ({missing_hint})")
    with open(path, "rb") as f:
        try:
            m = json.loads(f.read())
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); {_FIX}") from None
    return _check(m, path)
