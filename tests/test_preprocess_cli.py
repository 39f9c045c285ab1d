"""Preprocessing CLI: a re-run is a no-op, and one-line errors on bad input (worker counts: test_preprocess_parallel)."""
import json

from tests.conftest import run_cli


def test_rerun_is_a_no_op(corpus_dir, tokenizer_model, tmp_path):
    args = ("-m", "preprocess", "tokenize", str(corpus_dir), "--tokenizer", str(tokenizer_model),
            "--output", str(tmp_path / "o"), "--workers", "1")
    run_cli(*args)
    again = run_cli(*args)
    assert "nothing to do" in again.stderr


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(err) == 1, proc.stderr
    for n in needles:
        assert n in err[0], err[0]


def test_missing_input_file(tokenizer_model, tmp_path):
    p = run_cli("-m", "preprocess", "tokenize", str(tmp_path / "nope.jsonl"), "--tokenizer", str(tokenizer_model),
                "--output", str(tmp_path / "o"), check=False)
    _one_line_error(p, "nope.jsonl")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_text_key(tokenizer_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"body": "hello world"}\n{"body": "more text"}\n')
    p = run_cli("-m", "preprocess", "tokenize", str(src), "--tokenizer", str(tokenizer_model),
                "--output", str(tmp_path / "o"), "--text-key", "text", check=False)
    _one_line_error(p, "text", "missing_text_key")
    m = tmp_path / "o" / "manifest.json"
    assert not m.exists() or not json.loads(m.read_text())["complete"]


def test_missing_tokenizer(corpus_dir, tmp_path):
    p = run_cli("-m", "preprocess", "tokenize", str(corpus_dir), "--tokenizer", str(tmp_path / "tok.model"),
                "--output", str(tmp_path / "o"), check=False)
    _one_line_error(p, "tok.model")
