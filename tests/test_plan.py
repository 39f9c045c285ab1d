"""`pipeline.plan`: refuses each impossible layout with its own line, and plans the big configs.

The arithmetic is called in-process (`plan()`, `find_problems()`); one test runs the real CLI in a subprocess."""
import pytest
import yaml

from pipeline.config import find_problems, from_dict, parse_overrides
from pipeline.plan import gpu_peak, plan
from tests.conftest import run_cli

BASE = {
    "model": {"arch": "gpt", "num_layers": 96, "hidden_size": 12288, "num_heads": 96, "seq_len": 2048,
              "vocab_size": 50257},
    "parallel": {"tp": 8, "pp": 16, "zero_stage": 1, "activation_checkpointing": True},
    "data": {"datasets": [{"path": "/nonexistent/data", "weight": 1}]},
    "train": {"steps": 1000, "global_batch_size": 1536, "micro_batch_size": 1, "precision": "bf16"},
}


def config(*overrides):
    return from_dict(BASE, parse_overrides(list(overrides)), check=False)


# (overrides, world size, text that must appear in one of the problems)
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
    # sizes below 1: refused by name, never planned into negative memory or a ZeroDivisionError
    ([], 0, "world size must be >= 1, got 0"),
    ([], -1, "world size must be >= 1, got -1"),
    (["parallel.tp=0"], 1024, "parallel.tp must be >= 1, got 0"),
    (["parallel.pp=-2"], 1024, "parallel.pp must be >= 1, got -2"),
    (["train.micro_batch_size=0"], 1024, "train.micro_batch_size must be >= 1, got 0"),
    (["train.micro_batch_size=-1"], 1024, "train.micro_batch_size must be >= 1, got -1"),
    (["train.global_batch_size=-1536"], 1024, "train.global_batch_size must be >= 1, got -1536"),
    (["model.seq_len=0"], 1024, "model.seq_len must be >= 1, got 0"),
]


@pytest.mark.parametrize("overrides,world,expected", IMPOSSIBLE)
def test_impossible_layouts_each_get_their_line(overrides, world, expected):
    cfg = config(*overrides)
    assert any(expected in p for p in find_problems(cfg, world)), find_problems(cfg, world)
    lines, problems = plan(cfg, world)
    assert any(expected in p for p in problems), problems
    assert not any("-" in line.split("GiB")[0] for line in lines if line.startswith("memory/GPU"))  # no negative memory


def test_the_base_plan_has_no_problem():
    lines, problems = plan(config(), 1024)
    assert problems == [] and find_problems(config(), 1024) == []
    assert any(line.startswith("time") for line in lines)


def test_several_problems_are_all_listed():
    problems = find_problems(config("parallel.zero_stage=3", "model.num_layers=90"), 1024)
    assert len(problems) == 2, problems


@pytest.mark.parametrize("world", [1024, 3072])
def test_175b_plans_at_scale(world):
    lines, problems = plan(config(), world, "H100", 0.4, None)
    out = "\n".join(lines)
    dp = world // 128
    assert not problems
    assert f"dp {dp} x tp 8 x pp 16" in out
    assert f"x dp {dp} = 1536 sequences" in out
    assert "174.6" in out  # GPT-3's 175B, counted from the shapes
    assert "memory/GPU" in out and "days" in out


@pytest.mark.parametrize("gpu,peak", [("H100", 989.0), ("H100 PCIe", 756.0), ("h100 pcie", 756.0),
                                      ("H100-PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.0), ("a100", 312.0),
                                      ("RTX 4090", None)])
def test_gpu_names(gpu, peak):
    assert gpu_peak(gpu) == peak


def test_every_gpu_gets_a_time_line_or_a_problem():
    """`--gpu "H100 PCIe"` used to drop the time line without a word; an unknown GPU is now a problem."""
    lines, problems = plan(config(), 1024, "H100 PCIe")
    assert any("on 1024 x H100 PCIe" in line and "756 TFLOPs" in line for line in lines) and not problems
    lines, problems = plan(config(), 1024, "RTX 4090")
    assert any("--gpu 'RTX 4090'" in p and "log.peak_tflops" in p for p in problems)
    lines, problems = plan(config("log.peak_tflops=165"), 1024, "RTX 4090")
    assert any("165 TFLOPs" in line for line in lines) and not problems


def test_memory_limit_is_enforced():
    _, problems = plan(config("parallel.activation_checkpointing=false"), 1024, "H100", 0.4, 16)
    assert any("exceeds --gpu-mem 16" in p for p in problems)


def test_dataset_too_small(token_dir):
    cfg = {"model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "seq_len": 4096, "vocab_size": 1024},
           "data": {"datasets": [{"path": str(token_dir), "weight": 1}]},
           "train": {"global_batch_size": 512, "micro_batch_size": 8}}
    _, problems = plan(from_dict(cfg, check=False), 1)
    assert any("fewer than one global batch" in p for p in problems), problems
    _, problems = plan(from_dict(cfg, parse_overrides(["train.global_batch_size=8", "model.seq_len=128"]),
                                 check=False), 1)
    assert problems == []


def test_cli(tmp_path, token_dir):
    """The real command, once: the report on stdout (the vocabulary from the dataset's manifest, the time on the
    named GPU), and each problem of an impossible layout on its own `error:` line, exit 2."""
    path = tmp_path / "gpt175b.yaml"
    path.write_text(yaml.safe_dump({**BASE, "data": {"datasets": [{"path": str(token_dir)}]},
                                    "model": {k: v for k, v in BASE["model"].items() if k != "vocab_size"}}))
    p = run_cli("-m", "pipeline.plan", "--config", str(path), "--world-size", "1024", "--gpu", "H100 PCIe",
                "train.global_batch_size=8", "parallel.zero_stage=3", "model.num_layers=90", check=False)
    assert "vocab 1024 padded to 1024" in p.stdout and "on 1024 x H100 PCIe" in p.stdout, p.stdout
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 2 and "Traceback" not in p.stderr, p.stderr
