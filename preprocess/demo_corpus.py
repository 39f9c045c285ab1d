"""The built-in corpus: real English text that ships with Python (pydoc topics and standard-library docstrings)."""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
import warnings

# Modules whose import has side effects (opening windows, printing, starting servers) are left out.
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "test", "ensurepip",
         "venv", "pydoc_data", "__main__", "xxsubtype", "msvcrt", "winreg", "winsound", "_winapi"}


def _docstrings():
    seen = set()
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        name = info.name
        if name.startswith("_") or name in _SKIP or name in seen:
            continue
        path = getattr(info.module_finder, "path", "")
        if "site-packages" in str(path) or "dist-packages" in str(path):
            continue  # the standard library only: the corpus is the same on every machine with this Python
        seen.add(name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except BaseException:
            continue
        texts = [mod.__doc__ if isinstance(mod.__doc__, str) else ""]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr, None)
            if getattr(obj, "__module__", None) == name and isinstance(doc := getattr(obj, "__doc__", None), str):
                texts.append(doc)
        text = "\n\n".join(t.strip() for t in texts if t and len(t.strip()) > 40)
        if text:
            yield f"stdlib:{name}", text


def write_demo_corpus(output: str) -> str:
    """Write the corpus as `output/corpus.jsonl` (one document per pydoc topic or module); returns the path."""
    from pydoc_data.topics import topics

    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "corpus.jsonl")
    tmp = path + ".tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for key in sorted(topics):
            f.write(json.dumps({"id": f"pydoc:{key}", "text": topics[key].strip()}) + "\n")
            n += 1
        for ident, text in _docstrings():
            f.write(json.dumps({"id": ident, "text": text}) + "\n")
            n += 1
    os.replace(tmp, path)
    print(f"wrote {n} documents ({os.path.getsize(path) / 1e6:.1f} MB) to {path}", file=sys.stderr)
    return path
