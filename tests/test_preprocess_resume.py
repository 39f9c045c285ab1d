"""kill -9 a tokenize run at several points, run the same command again: same bytes, no complete shard redone."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import PREPROCESS_SPLIT, ROOT, run_cli, shard_bytes


def _args(corpus, tok, out, workers):
    return ["-m", "preprocess", "tokenize", str(corpus), "--tokenizer", str(tok), "--output", str(out),
            "--workers", str(workers), *PREPROCESS_SPLIT]


def _completed_part_inodes(out):
    """inode of each shard file already recorded complete in a unit state, keyed by unit order."""
    inodes = {}
    for parts in out.glob(".parts-*"):
        for state_file in sorted(parts.glob("unit_*.json")):
            unit = int(state_file.stem.split("_")[1])
            for k, sh in enumerate(json.loads(state_file.read_text())["shards"]):
                f = parts / (sh["file"] + ".bin")
                if f.exists():  # else the join already moved it
                    inodes[(unit, k)] = f.stat().st_ino
    return inodes


def _final_inodes(out):
    m = json.loads((out / "manifest.json").read_text())
    return [(out / (s["name"] + ".bin")).stat().st_ino for s in m["shards"]]


@pytest.mark.parametrize("workers,kill_env", [
    (1, {"PREPROCESS_KILL_AFTER_SHARDS": "1"}),
    (2, {"PREPROCESS_KILL_AFTER_SHARDS": "7"}),
    (2, {"PREPROCESS_KILL_IN_JOIN": "4"}),
])
def test_sigkill_at_a_point_then_resume(multi_corpus, tokenizer_model, multi_reference, tmp_path, workers, kill_env):
    out = tmp_path / "o"
    p = run_cli(*_args(multi_corpus, tokenizer_model, out, workers), env=kill_env, check=False)
    assert p.returncode == -signal.SIGKILL
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    before = _completed_part_inodes(out)
    states = [json.loads(f.read_text()) for f in out.glob(".parts-*/unit_*.json")]
    partial = any(st["shards"] and not st["done"] for st in states)
    finished = run_cli(*_args(multi_corpus, tokenizer_model, out, workers))
    assert shard_bytes(out) == shard_bytes(multi_reference)
    if before:  # the shards complete at the kill were kept, not rewritten
        assert ("complete shards" in finished.stderr) == partial
        assert set(before.values()) <= set(_final_inodes(out))


def test_external_kill9_of_the_process_group(multi_corpus, tokenizer_model, multi_reference, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, *_args(multi_corpus, tokenizer_model, out, 2)]
    for wait_for_states in (0, 3):
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if len(list(out.glob(".parts-*/unit_*.json"))) >= wait_for_states and (out / "manifest.json").exists():
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its worker processes
        proc.wait()
    run_cli(*_args(multi_corpus, tokenizer_model, out, 2))
    assert shard_bytes(out) == shard_bytes(multi_reference)
    assert not list(out.glob("**/*.tmp*"))


def test_resume_of_compressed_inputs(multi_corpus, tokenizer_model, tmp_path):
    """Record-mode inputs (read by the parent, resumed by line number), here .jsonl.gz and .parquet."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from preprocess.tokenize import tokenize

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"part{i}.jsonl.gz").write_bytes(gzip.compress((multi_corpus / f"part{i}.jsonl").read_bytes()))
    texts = [json.loads(line)["text"] for line in (multi_corpus / "part3.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({"text": texts}), src / "part3.parquet", row_group_size=8)
    tokenize([str(src)], str(tokenizer_model), str(tmp_path / "ref"), workers=1, shard_tokens=20000,
             unit_bytes=200000)
    out = tmp_path / "o"
    p = run_cli(*_args(src, tokenizer_model, out, 2), env={"PREPROCESS_KILL_AFTER_SHARDS": "9"}, check=False)
    assert p.returncode == -signal.SIGKILL
    run_cli(*_args(src, tokenizer_model, out, 2))
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")
