"""Byte-identity of tokenize output across worker counts, Slurm-array parts + join, and MPI ranks."""
import json
import os
import shutil
import subprocess
import sys

from tests.conftest import PREPROCESS_SPLIT, ROOT, run_cli, shard_bytes


def _tokenize(corpus, tok, out, *extra, check=True):
    return run_cli("-m", "preprocess", "tokenize", str(corpus), "--tokenizer", str(tok), "--output", str(out),
                   *PREPROCESS_SPLIT, *extra, check=check)


def test_reference_is_sharded_in_input_order(multi_reference, multi_corpus):
    m = json.loads((multi_reference / "manifest.json").read_text())
    assert m["complete"] and len(m["shards"]) >= 8
    assert [s["name"] for s in m["shards"]] == [f"shard_{i:05d}" for i in range(len(m["shards"]))]
    assert [os.path.basename(i["path"]) for i in m["inputs"]] == [f"part{i}.jsonl" for i in range(4)]
    lines = sum(len((multi_corpus / f"part{i}.jsonl").read_text().splitlines()) for i in range(4))
    assert sum(i["documents"] for i in m["inputs"]) == sum(s["documents"] for s in m["shards"]) == lines
    assert not [p for p in multi_reference.iterdir() if p.name.startswith(".parts")]  # cleaned after the join


def test_two_workers_same_bytes(multi_corpus, tokenizer_model, multi_reference, tmp_path):
    _tokenize(multi_corpus, tokenizer_model, tmp_path / "o", "--workers", "2")
    assert shard_bytes(tmp_path / "o") == shard_bytes(multi_reference)


def test_array_parts_then_join_same_bytes(multi_corpus, tokenizer_model, multi_reference, tmp_path):
    from preprocess.tokenize import tokenize

    out = tmp_path / "o"
    split = {"shard_tokens": int(PREPROCESS_SPLIT[1]), "unit_bytes": int(PREPROCESS_SPLIT[3])}
    for part in (2, 0):  # in this process: quicker, and the CLI path is taken below
        r = tokenize([str(multi_corpus)], str(tokenizer_model), str(out), part=part, num_parts=3, **split)
        assert r["part"] == part and r["units"] >= 2
    early = run_cli("-m", "preprocess", "join", str(out), check=False)
    assert early.returncode != 0 and "not finished" in early.stderr
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    status = run_cli("-m", "preprocess", "inspect", str(out)).stdout
    assert "INCOMPLETE" in status and "units: " in status and " of " in status
    p = _tokenize(multi_corpus, tokenizer_model, out, "--workers", "2", "--part", "1", "--num-parts", "3")
    assert "part 1 of 3 done" in p.stdout
    run_cli("-m", "preprocess", "join", str(out))
    assert shard_bytes(out) == shard_bytes(multi_reference)
    again = run_cli("-m", "preprocess", "join", str(out))
    assert "nothing to do" in again.stderr


def test_mpirun_same_bytes(multi_corpus, tokenizer_model, multi_reference, tmp_path):
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    assert os.path.exists(mpirun), "mpirun comes with the mpich wheel (requirements.txt)"
    cmd = [mpirun, "-n", "3", sys.executable, "-m", "preprocess", "tokenize", str(multi_corpus), "--tokenizer",
           str(tokenizer_model), "--output", str(tmp_path / "o"), "--workers", "1", *PREPROCESS_SPLIT]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tokenize[2/3]" in p.stderr  # three ranks did work
    assert p.stdout.count("shards") == 1  # rank 0 alone reports
    assert shard_bytes(tmp_path / "o") == shard_bytes(multi_reference)


def test_different_arguments_refused_unless_overwrite(multi_corpus, tokenizer_model, multi_reference, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(multi_reference, out)
    p = run_cli("-m", "preprocess", "tokenize", str(multi_corpus), "--tokenizer", str(tokenizer_model),
                "--output", str(out), "--shard-tokens", "50000", check=False)
    assert p.returncode != 0 and "--overwrite" in p.stderr
    assert shard_bytes(out) == shard_bytes(multi_reference)
    run_cli("-m", "preprocess", "tokenize", str(multi_corpus), "--tokenizer", str(tokenizer_model),
            "--output", str(out), "--shard-tokens", "50000", "--overwrite", "--workers", "1")
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and len(list(out.glob("shard_*.bin"))) == len(m["shards"])
    assert len(m["shards"]) < len(shard_bytes(multi_reference)["shards"])


def test_mpirun_strict_error_on_one_rank_stops_all(multi_corpus, tokenizer_model, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(multi_corpus, src)
    with open(src / "part3.jsonl", "a") as f:
        f.write('{"text": 5}\n')
    lines = len((src / "part3.jsonl").read_text().splitlines())
    cmd = [os.path.join(os.path.dirname(sys.executable), "mpirun"), "-n", "2", sys.executable, "-m", "preprocess",
           "tokenize", str(src), "--tokenizer", str(tokenizer_model), "--output", str(tmp_path / "o"),
           "--workers", "1", "--strict", *PREPROCESS_SPLIT]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"part3.jsonl:{lines}: non_string_text" in errors[0], p.stderr
    assert not json.loads((tmp_path / "o" / "manifest.json").read_text())["complete"]
