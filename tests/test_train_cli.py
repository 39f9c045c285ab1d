"""Training CLI refuses bad configs with one line naming the problem, before any process group starts."""
import pytest

from pipeline.config import load_config
from tests.conftest import run_cli


def _err(proc):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_config(tmp_path):
    p = run_cli("-m", "pipeline.train", "--config", str(tmp_path / "nope.yaml"), check=False)
    assert "nope.yaml" in _err(p)


def test_unknown_override_key():
    p = run_cli("-m", "pipeline.train", "--config", "configs/tiny.yaml", "train.stesp=10", check=False)
    assert "train.stesp" in _err(p)


def test_bad_value_type():
    p = run_cli("-m", "pipeline.train", "--config", "configs/tiny.yaml", "train.steps=many", check=False)
    assert "train.steps" in _err(p)


def test_missing_dataset(tmp_path):
    p = run_cli("-m", "pipeline.train", "--config", "configs/tiny.yaml",
                f"data.datasets=[{{path: {tmp_path / 'none'}, weight: 1}}]", check=False)
    assert "none" in _err(p)


def test_overrides_parse_lists_and_scalars(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["train.steps=7", "data.datasets=[{path: d1, weight: 2}]",
                                            "train.lr=1e-3"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3
    assert cfg.data.datasets == [{"path": "d1", "weight": 2}]


def test_zero3_with_pipeline_refused():
    with pytest.raises(ValueError, match="pipeline"):
        load_config("configs/tiny.yaml", ["parallel.pp=2", "parallel.zero_stage=3"])
