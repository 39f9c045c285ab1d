"""Shared fixtures: a small real corpus (Python's own docs), a tokenizer and token shards, built once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, check=True, env=None, timeout=600, cwd=ROOT):
    """Run `python -m ...` in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def torchrun(nproc: int, *args, check=True, timeout=600):
    return run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args,
                   check=check, timeout=timeout)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    from preprocess.demo_corpus import write_demo_corpus

    out = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer_model(corpus_dir, tmp_path_factory) -> Path:
    from preprocess.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return Path(train_tokenizer([str(corpus_dir)], str(out), vocab_size=1024))


@pytest.fixture(scope="session")
def token_dir(corpus_dir, tokenizer_model, tmp_path_factory) -> Path:
    from preprocess.tokenize import tokenize

    out = tmp_path_factory.mktemp("tokens")
    tokenize([str(corpus_dir)], str(tokenizer_model), str(out), workers=2, shard_tokens=100_000)
    return out


# ---- preprocessing: a multi-file corpus and its single-process reference output ------------------------------
PREPROCESS_SPLIT = ("--shard-tokens", "20000", "--unit-bytes", "200000")  # ~8 units, ~20 shards on multi_corpus


@pytest.fixture(scope="session")
def multi_corpus(corpus_dir, tmp_path_factory) -> Path:
    """The demo corpus dealt round-robin into 4 jsonl files."""
    out = tmp_path_factory.mktemp("multi_corpus")
    lines = (corpus_dir / "corpus.jsonl").read_text().splitlines()
    for i in range(4):
        (out / f"part{i}.jsonl").write_text("\n".join(lines[i::4]) + "\n")
    return out


@pytest.fixture(scope="session")
def multi_reference(multi_corpus, tokenizer_model, tmp_path_factory) -> Path:
    """multi_corpus tokenized in one process with PREPROCESS_SPLIT: the bytes every other way must give."""
    out = tmp_path_factory.mktemp("multi_reference")
    run_cli("-m", "preprocess", "tokenize", str(multi_corpus), "--tokenizer", str(tokenizer_model),
            "--output", str(out), "--workers", "1", *PREPROCESS_SPLIT)
    return out


def shard_bytes(folder: Path) -> dict:
    """{file name: bytes} of every shard file in a tokenize output folder, and its manifest's shard list."""
    import json

    files = {p.name: p.read_bytes() for p in sorted(folder.glob("shard_*"))}
    return {"files": files, "shards": json.loads((folder / "manifest.json").read_text())["shards"]}
