"""pipeline.report: plots and report.html from a real 2-rank log with a resume, a synthetic million-step log,
two runs overlaid, and bad inputs refused in one line."""
import base64
import json
import re
import struct
import sys
import time

import numpy as np
import pytest

from pipeline.report.__main__ import main
from tests.conftest import run_cli
from tests.helpers import assert_one_error, run_main
from tests.tiny_runs import STEPS, resumed_run

ONE_PANEL, TWO_PANELS = (1000, 420), (1000, 650)  # pixels: 10 x 4.2 and 10 x 6.5 inches at 100 dpi
SIZES = {"loss.png": ONE_PANEL, "lr.png": ONE_PANEL, "grad_norm.png": ONE_PANEL, "memory.png": ONE_PANEL,
         "timeline.png": ONE_PANEL, "throughput.png": TWO_PANELS, "stragglers.png": TWO_PANELS}


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and first chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run(tmp_path_factory, token_dir):
    return resumed_run(tmp_path_factory, token_dir)


def test_report_of_a_resumed_two_rank_run(run, tmp_path, capsys):
    result = run_main(main, [run / "log.jsonl", "--output", tmp_path / "out"], capsys)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    for name, size in SIZES.items():  # every plot of a log that has every kind of figure
        assert png_size((out / name).read_bytes()) == size, name
    html = (out / "report.html").read_text()
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(embedded) == len(SIZES)
    assert sorted(png_size(base64.b64decode(b)) for b in embedded) == sorted(SIZES.values())
    # The resume from global_step3 after step 6 is one restart, named with the steps around it.
    assert re.search(r"^restarts\s+1$", result.stdout, re.M), result.stdout
    assert f"restart after step {STEPS}, next logged step 4 (steps repeated from a checkpoint)" in result.stdout
    assert re.search(rf"^steps\s+{STEPS}$", result.stdout, re.M)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    last_valid = [r for r in rows if r.get("split") == "valid"][-1]
    assert re.search(rf"^final valid loss\s+{last_valid['loss']:.4f}", result.stdout, re.M)
    assert "<table>" in html and "restart after step 6" in html


def test_summary_prints_the_table_only(run, tmp_path, capsys):
    result = run_main(main, [run, "--summary"], capsys)  # the run folder, not the file
    assert result.returncode == 0
    assert "final train loss" in result.stdout and "worst straggler" in result.stdout
    assert not list(tmp_path.iterdir())


def test_two_runs_overlaid(run, tmp_path, capsys):
    other = tmp_path / "other" / "log.jsonl"
    other.parent.mkdir()
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    other.write_text("".join(json.dumps({**r, "loss": r["loss"] + 0.5}) + "\n" for r in rows if "split" not in r))
    assert run_main(main, [run / "log.jsonl", "--output", tmp_path / "one"], capsys).returncode == 0
    result = run_main(main, [run / "log.jsonl", other, "--output", tmp_path / "two", "--names", "base,shifted"],
                      capsys)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ["run", "base", "shifted"]
    html = (tmp_path / "two" / "report.html").read_text()
    assert "<th>base</th><th>shifted</th>" in html
    one, two = (tmp_path / "one" / "loss.png").read_bytes(), (tmp_path / "two" / "loss.png").read_bytes()
    assert png_size(two) == ONE_PANEL and one != two


def write_synthetic(path, steps: int) -> None:
    """A log of `steps` training lines and an evaluation every 1000 steps, with a restart at 60% (steps going
    back 500) and a skipped step every 100k; written by numpy, not line by line in Python."""
    s = np.arange(1, steps + 1, dtype=np.float64)
    back = int(steps * 0.6)
    s = np.concatenate([s[:back], s[back - 500:]])
    n = len(s)
    t = 1.7e9 + np.arange(n) * 0.5 + np.where(np.arange(n) >= back, 3600.0, 0.0)
    rng = np.random.default_rng(0)
    cols = np.stack([s, 2 + 8 * np.exp(-s / 1e5) + rng.normal(0, 0.05, n), 3e-4 * np.ones(n), 1 + rng.random(n),
                     s * 8, 4e5 + rng.normal(0, 1e3, n), 0.4 + rng.normal(0, 0.01, n), 4e4 + s * 1e-3, t,
                     (s // 100_000).astype(float)], 1)
    fmt = ('{"step": %d, "loss": %.5f, "lr": %.3e, "grad_norm": %.4f, "consumed_samples": %d, '
           '"tokens_per_sec": %.1f, "mfu": %.4f, "mem_mb": %.1f, "time": %.3f, "skipped_steps": %d}')
    with open(path, "w") as f:
        np.savetxt(f, cols, fmt=fmt)
        valid = s[(s % 1000 == 0)][:: 1]
        np.savetxt(f, np.stack([valid, 2.1 + 8 * np.exp(-valid / 1e5)], 1), fmt='{"split": "valid", "step": %d, '
                   '"loss": %.5f}')


def test_a_million_steps(tmp_path, capsys):
    log = tmp_path / "big" / "log.jsonl"
    log.parent.mkdir()
    write_synthetic(log, 1_000_000)
    t0 = time.perf_counter()
    result = run_main(main, [log, "--output", tmp_path / "out"], capsys)
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nreport of a 1,000,000-step log ({log.stat().st_size / 2**20:.0f} MiB): {seconds:.1f} s")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^steps\s+1,000,000$", result.stdout, re.M)
    assert re.search(r"^restarts\s+1$", result.stdout, re.M)
    assert re.search(r"^skipped steps\s+10$", result.stdout, re.M)
    assert "restart after step 600000, next logged step 599501" in result.stdout
    assert png_size((tmp_path / "out" / "loss.png").read_bytes()) == ONE_PANEL


BAD = [  # (file content or None for a missing file, exit code, fragment of the one error line)
    (None, 2, "no such file or folder"),
    ("", 2, "empty log"),
    ("\n\n", 2, "empty log (blank lines only)"),
    ('{"step": 1, "loss": 2.0}\nnot json at all\n{"step": 2, "loss": 1.9}\n', 2, "line 2: not JSON"),
    ('{"text": "a corpus record"}\n{"text": "another"}\n', 2, "not a pipeline.train log.jsonl"),
    ('[1, 2, 3]\n', 2, "line 1: expected a JSON object"),
    ('{"step": "one", "loss": 2.0}\n', 2, "key 'step' holds string, not a number"),
]


@pytest.mark.parametrize("content,code,fragment", BAD)
def test_bad_input_is_one_error_line(tmp_path, capsys, content, code, fragment):
    log = tmp_path / "log.jsonl"
    if content is not None:
        log.write_text(content)
    result = run_main(main, [log, "--output", tmp_path / "out"], capsys)
    assert_one_error(result, code, fragment)
    assert not (tmp_path / "out").exists()


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0, "lr": 1e-3}\n{"step": 2, "loss": 1.9, "lr": 1e-3}\n{"step": 3, "lo')
    result = run_main(main, [log, "--output", tmp_path / "out"], capsys)
    assert result.returncode == 0
    assert f"warning: {log} line 3: truncated last line" in result.stderr
    assert re.search(r"^steps\s+2$", result.stdout, re.M)
    assert png_size((tmp_path / "out" / "loss.png").read_bytes()) == ONE_PANEL


def test_nan_loss_reads_as_missing(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": NaN}\n{"step": 3, "loss": 1.5}\n')
    result = run_main(main, [log, "--summary"], capsys)
    assert result.returncode == 0 and re.search(r"^final train loss\s+1.5000$", result.stdout, re.M)


def test_help_imports_neither_torch_nor_matplotlib():
    code = ("import sys; from pipeline.report.__main__ import parse_args; parse_args(['log.jsonl', '--summary']); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'pyarrow') if m in sys.modules))")
    assert run_cli("-c", code).stdout.strip() == "[]"
    assert "--summary" in run_cli("-m", "pipeline.report", "--help").stdout
