"""The commit protocol: a checkpoint tag exists only once its `COMMITTED` marker does.

Every writer (the trainer's save, `convert from-hf`, `convert reshape`) writes a tag's files first, then calls
`commit()`, which lists every file with its size in `TAG/COMMITTED` and then points `latest` at the tag, each by
write-then-rename. A reader takes the newest committed tag whose files are all present at their committed sizes.
"""
from __future__ import annotations

import logging
import json
import os
import re
import shutil
import time

from ..fs import write_json_atomic, write_atomic

log = logging.getLogger("pipeline")
COMMIT = "COMMITTED"
WEIGHTS_ONLY = "WEIGHTS_ONLY"  # a tag holding only model.safetensors (e.g. from `convert from-hf`): fresh optimizer
UNIVERSAL = "UNIVERSAL"  # a `convert reshape` output: DeepSpeed loads it into any tp, pp and data-parallel size
WEIGHTS_FILE = "model.safetensors"
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def tag_files(tag_dir: str) -> dict[str, int]:
    """{path relative to the tag folder: size} of every file under it."""
    return {os.path.relpath(os.path.join(root, f), tag_dir): os.path.getsize(os.path.join(root, f))
            for root, _, names in os.walk(tag_dir) for f in names if ".tmp-" not in f}


def commit(ckpt_dir: str, tag: str, meta: dict) -> None:
    """Mark `ckpt_dir/tag` complete (its marker lists every file and size, plus `meta`), then point `latest` at
    it. Call once every file of the tag is written (and flushed, where that matters)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    write_json_atomic(os.path.join(tag_dir, COMMIT), {**meta, "time": time.time(), "files": tag_files(tag_dir)})
    write_atomic(os.path.join(ckpt_dir, "latest"), tag)


def committed_tags(ckpt_dir: str) -> list[str]:
    """Committed tags, newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _TAG.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, COMMIT)):
            found.append((int(m.group(1)), name))
    return [name for _, name in sorted(found, reverse=True)]


def verify(ckpt_dir: str, tag: str) -> str | None:
    """Why a committed tag cannot be loaded (a file missing or of another size than at commit), or None."""
    path = os.path.join(ckpt_dir, tag)
    try:
        with open(os.path.join(path, COMMIT)) as f:
            marker = json.load(f)
        files = marker.get("files", {})
        files.items()
    except (OSError, ValueError, AttributeError):
        return f"{path}/{COMMIT} is unreadable"
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes, {size} at commit (truncated?)"
    return None


def marker(ckpt_dir: str, tag: str) -> dict:
    with open(os.path.join(ckpt_dir, tag, COMMIT)) as f:
        return json.load(f)


def _read_latest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(256).decode("utf-8", "replace").strip()
    except OSError:
        return None


def resolve_tag(ckpt_dir: str, tag: str | None = None) -> str | None:
    """The tag to load: the one asked for (must be committed and intact), else the newest committed intact tag
    (`latest` names it unless a save was interrupted). A damaged newest tag, or a `latest` naming no committed
    tag, falls back to the previous intact one with a warning."""
    if tag is not None:
        if not os.path.isfile(os.path.join(ckpt_dir, tag, COMMIT)):
            raise FileNotFoundError(f"{os.path.join(ckpt_dir, tag)}: no committed checkpoint with this tag")
        problem = verify(ckpt_dir, tag)
        if problem:
            raise ValueError(f"checkpoint {tag} is damaged: {problem}")
        return tag
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(latest):
        name = _read_latest(latest)
        if not name or not _TAG.match(name) or not os.path.isfile(os.path.join(ckpt_dir, name, COMMIT)):
            log.warning("%s names %r, which is not a committed checkpoint; taking the newest committed one", latest,
                        (name or "")[:40])
    for name in committed_tags(ckpt_dir):
        problem = verify(ckpt_dir, name)
        if problem is None:
            return name
        log.warning("skipping damaged checkpoint %s: %s", name, problem)
    return None


def prune(ckpt_dir: str, keep: int, current: str | None = None) -> None:
    """After committing `current` (default: the newest committed tag): keep it and the newest `keep` - 1 intact
    committed tags before it (all of them when keep <= 0); drop the rest: older tags, damaged ones (they can never
    be loaded, so they must not count towards `keep`), leftovers of interrupted saves, and any tag past `current`
    (a history this run diverged from when it resumed from an earlier tag)."""
    committed = committed_tags(ckpt_dir)
    if current is None:
        current = committed[0] if committed else None
    if current is None:
        return
    cur = _step(current)
    older = [t for t in committed if _step(t) < cur and verify(ckpt_dir, t) is None]
    kept = {current, *(older if keep <= 0 else older[:keep - 1])}
    for name in os.listdir(ckpt_dir):
        if _TAG.match(name) and name not in kept:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def _step(tag: str) -> int:
    return int(_TAG.match(tag).group(1))


def is_weights_only(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, WEIGHTS_ONLY))


def is_universal(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, UNIVERSAL))
