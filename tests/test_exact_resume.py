"""Exact resume in every kind of layout: a run saved at step N/2 and resumed in a fresh job gives, bit for bit,
the losses of the straight run for steps N/2+1..N (2 real DeepSpeed processes each, CPU; fp32, and bf16 with
ZeRO-3 offloading parameters and optimizer state, with pipeline stages, with tensor parallelism)."""
import json
import shutil

import pytest
import yaml

from tests.launch import run_ranks

N = 6
LAYOUTS = [  # (name, arch, parallel section, train section overrides)
    ("tp2-zero3", "llama", {"tp": 2, "zero_stage": 3}, {}),
    ("pp2-zero1", "gpt", {"pp": 2, "zero_stage": 1}, {}),
    ("dp2-zero3-offload-bf16", "llama", {"zero_stage": 3, "offload_params": True, "offload_optimizer": True},
     {"precision": "bf16"}),
    ("pp2-zero1-bf16", "llama", {"pp": 2, "zero_stage": 1}, {"precision": "bf16"}),
    ("tp2-zero1-bf16", "gpt", {"tp": 2, "zero_stage": 1}, {"precision": "bf16"}),
]


def config(tmp_path, token_dir, arch, parallel, train, ckpt):
    cfg = {
        "model": {"arch": arch, "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 32},
        "parallel": parallel,
        "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}]},
        "train": {"steps": N, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2, **train},
        "checkpoint": {"dir": str(ckpt), "interval": N // 2, "keep": 5},
        "log": {"interval": 1, "jsonl": str(ckpt.parent / f"{ckpt.name}.jsonl")},
    }
    path = tmp_path / f"{ckpt.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "split" not in r}


@pytest.mark.parametrize("name,arch,parallel,train", LAYOUTS, ids=[l[0] for l in LAYOUTS])
def test_half_resume_half_equals_straight(tmp_path, token_dir, name, arch, parallel, train):
    straight = tmp_path / "straight"
    codes = run_ranks(2, "--config", config(tmp_path, token_dir, arch, parallel, train, straight), log_dir=tmp_path)
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    resumed = tmp_path / "resumed"
    half = f"global_step{N // 2}"
    shutil.copytree(straight / half, resumed / half)
    (resumed / "latest").write_text(half)
    codes = run_ranks(2, "--config", config(tmp_path, token_dir, arch, parallel, train, resumed), log_dir=tmp_path)
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    a, b = losses(tmp_path / "straight.jsonl"), losses(tmp_path / "resumed.jsonl")
    assert sorted(b) == list(range(N // 2 + 1, N + 1))
    assert all(x == x for x in a.values()) and a[N] < a[1]  # it trains
    for step in b:
        assert b[step] == a[step], f"{name} step {step}: {b[step]!r} != {a[step]!r}"
