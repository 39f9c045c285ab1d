"""`pipeline.plan`: refuses each impossible layout with its own line, and plans the big configs."""
import pytest
import yaml

from tests.conftest import run_cli

BASE = {
    "model": {"arch": "gpt", "num_layers": 96, "hidden_size": 12288, "num_heads": 96, "seq_len": 2048,
              "vocab_size": 50257},
    "parallel": {"tp": 8, "pp": 16, "zero_stage": 1, "activation_checkpointing": True},
    "data": {"datasets": [{"path": "/nonexistent/data", "weight": 1}]},
    "train": {"steps": 1000, "global_batch_size": 1536, "micro_batch_size": 1, "precision": "bf16"},
}

# (overrides, world size, text that must appear on its own error line)
IMPOSSIBLE = [
    (["parallel.zero_stage=3"], 1024, "parallel.zero_stage 3 with parallel.pp 16"),
    (["parallel.zero_stage=2"], 1024, "parallel.zero_stage 2 with parallel.pp 16"),
    (["model.num_heads=100"], 1024, "not divisible by model.num_heads 100"),
    (["model.num_heads=96", "model.kv_heads=12"], 1024, "must be divisible by parallel.tp"),
    (["model.kv_heads=36"], 1024, "model.num_heads 96 is not divisible by model.kv_heads 36"),
    (["model.num_layers=90"], 1024, "model.num_layers 90 is not divisible by parallel.pp 16"),
    (["model.make_vocab_size_divisible_by=0"], 1024, "model.make_vocab_size_divisible_by must be >= 1"),
    ([], 1000, "world size 1000 is not divisible"),
    (["train.global_batch_size=1540"], 1024, "not divisible by train.micro_batch_size 1 x data-parallel size 8"),
    ([], 1024, None),  # the base plan itself is fine
]


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "gpt175b.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


@pytest.mark.parametrize("overrides,world,expected", IMPOSSIBLE)
def test_impossible_layouts_each_get_their_line(base_config, overrides, world, expected):
    p = run_cli("-m", "pipeline.plan", "--config", str(base_config), "--world-size", str(world), *overrides,
                check=False)
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    if expected is None:
        assert p.returncode == 0 and not errors, p.stderr
        return
    assert p.returncode == 1
    assert any(expected in e for e in errors), errors


def test_several_problems_are_all_listed(base_config):
    p = run_cli("-m", "pipeline.plan", "--config", str(base_config), "--world-size", "1024",
                "parallel.zero_stage=3", "model.num_layers=90", check=False)
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert p.returncode == 1 and len(errors) == 2


@pytest.mark.parametrize("world", [1024, 3072])
def test_175b_plans_at_scale(base_config, world):
    p = run_cli("-m", "pipeline.plan", "--config", str(base_config), "--world-size", str(world))
    out = p.stdout
    dp = world // 128
    assert f"dp {dp} x tp 8 x pp 16" in out
    assert f"x dp {dp} = 1536 sequences" in out
    assert "174.6" in out  # GPT-3's 175B, counted from the shapes
    assert "memory/GPU" in out and "days" in out


def test_memory_limit_is_enforced(base_config):
    p = run_cli("-m", "pipeline.plan", "--config", str(base_config), "--world-size", "1024",
                "parallel.activation_checkpointing=false", "--gpu-mem", "16", check=False)
    assert p.returncode == 1 and "exceeds --gpu-mem 16" in p.stderr


def test_dataset_too_small(token_dir, tmp_path):
    cfg = {"model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "seq_len": 4096},
           "data": {"datasets": [{"path": str(token_dir), "weight": 1}]},
           "train": {"global_batch_size": 512, "micro_batch_size": 8}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = run_cli("-m", "pipeline.plan", "--config", str(path), "--world-size", "1", check=False)
    assert p.returncode == 1 and "fewer than one global batch" in p.stderr
    ok = run_cli("-m", "pipeline.plan", "--config", str(path), "--world-size", "1", "train.global_batch_size=8",
                 "model.seq_len=128")
    assert "vocab 1024" in ok.stdout  # taken from the manifest
