"""Preprocessing CLI: a re-run is a no-op, and one-line errors on bad input (worker counts: test_preprocess_parallel)."""
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

from tests.conftest import ROOT, run_cli


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


def _tokenize_cmd(corpus_dir, tokenizer_model, out, *extra):
    return [sys.executable, "-m", "preprocess", "tokenize", str(corpus_dir), "--tokenizer", str(tokenizer_model),
            "--output", str(out), "--workers", "1", *extra]


def test_progress_bar_on_a_terminal(corpus_dir, tokenizer_model, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a real terminal has a size
    proc = subprocess.Popen(_tokenize_cmd(corpus_dir, tokenizer_model, tmp_path / "o"), stdin=slave,
                            stdout=slave, stderr=slave, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "\r" in screen and "B/s" in screen and "docs/s" in screen and "tok/s" in screen, screen[-2000:]


def test_log_lines_when_not_a_terminal(corpus_dir, tokenizer_model, tmp_path):
    p = run_cli(*_tokenize_cmd(corpus_dir, tokenizer_model, tmp_path / "o", "--log-interval", "0")[1:])
    lines = [line for line in p.stderr.splitlines() if "%)" in line and "tokens/s" in line and "MB/s" in line]
    assert lines, p.stderr
    assert "\r" not in p.stderr


def test_inspect_verify_catches_a_changed_shard(multi_reference, tmp_path):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(multi_reference, out)
    ok = run_cli("-m", "preprocess", "inspect", str(out), "--verify", "--docs", "1")
    assert "shards OK" in ok.stdout and "--- document 0" in ok.stdout
    data = bytearray((out / "shard_00003.bin").read_bytes())
    data[10] ^= 1
    (out / "shard_00003.bin").write_bytes(bytes(data))
    bad = run_cli("-m", "preprocess", "inspect", str(out), "--verify", check=False)
    assert bad.returncode != 0 and "shard_00003.bin: sha256 differs" in bad.stdout


def test_srun_without_mpi_is_refused(corpus_dir, tokenizer_model, tmp_path):
    p = run_cli(*_tokenize_cmd(corpus_dir, tokenizer_model, tmp_path / "o")[1:], check=False,
                env={"SLURM_STEP_NUM_TASKS": "2"})
    _one_line_error(p, "srun --mpi=pmi2")
    assert not (tmp_path / "o").exists()
