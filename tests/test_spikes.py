"""train.skip_spikes: the rule (rolling mean + k·std of the last N applied steps), and through the real trainer an
injected outlier batch skipped on every rank with the weights bitwise unchanged, counted in log.jsonl, and a
resume across the skip that gives the straight run's losses bit for bit (1 process ZeRO-3; 2 pipeline stages;
ZeRO-1 in bf16, without resume).

This file is also the trainer's entry point for those runs (`__main__` below): pipeline.train with the batch of
step SPIKE_AT replaced by an outlier (one rare token repeated).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch

STEPS, SPIKE_AT, WINDOW = 8, 6, 3


def spike_filter(window=3, sigma=3.0):
    from pipeline.config import from_dict
    from pipeline.loop import SpikeFilter, TrainState

    cfg = from_dict({"data": {"datasets": [{"path": "d", "weight": 1}]},
                     "train": {"skip_spikes": True, "spike_window": window, "spike_sigma": sigma}})
    return SpikeFilter(cfg, TrainState(), log_enabled=False)


def test_rule_mean_plus_k_std_of_the_applied_window():
    f = spike_filter()
    assert [f.test(x, 1.0) for x in (5.0, 4.0, 6.0)] == [False] * 3  # filling the window decides nothing
    band = 5.0 + 3.0 * math.sqrt(2 / 3)  # mean 5, population std sqrt(2/3)
    assert f.test(band - 1e-6, 1.0) is False
    assert f.state.spikes["losses"] == [4.0, 6.0, band - 1e-6]  # the last WINDOW applied steps
    m = sum(f.state.spikes["losses"]) / 3
    s = math.sqrt(sum((x - m) ** 2 for x in f.state.spikes["losses"]) / 3)
    assert f.test(m + 3.0 * s + 1e-3, 1.0) is True  # loss spike
    assert f.test(m, float("nan")) is True and f.test(m, 100.0) is True  # gradient-norm spikes (NaN included)
    assert f.state.spikes["losses"] == [4.0, 6.0, band - 1e-6]  # skipped steps never enter the window
    assert f.state.spikes["skipped"] == 3
    assert spike_filter().test(1e9, 1e9) is False  # an empty window decides nothing
    from pipeline.config import from_dict
    from pipeline.loop import SpikeFilter, TrainState

    off = SpikeFilter(from_dict({"data": {"datasets": [{"path": "d", "weight": 1}]}}), TrainState(), False)
    assert off.test is None  # off by default: the engine is asked nothing


def test_skip_spikes_needs_a_zero_optimizer():
    from pipeline.config import from_dict

    with pytest.raises(ValueError, match="train.skip_spikes needs parallel.zero_stage 1-3"):
        from_dict({"data": {"datasets": [{"path": "d", "weight": 1}]}, "parallel": {"zero_stage": 0},
                   "train": {"skip_spikes": True}})


# name: (ranks, parallel section, arch, precision, resume from these steps)
LAYOUTS = {
    "zero3": (1, {"zero_stage": 3}, "llama", "fp32", (SPIKE_AT - 2, SPIKE_AT)),  # before the spike: it recurs
    "pp2_zero1": (2, {"pp": 2, "zero_stage": 1}, "gpt", "fp32", (SPIKE_AT - 2,)),
    "zero1_bf16": (1, {"zero_stage": 1}, "llama", "bf16", ()),  # DeepSpeed's ZeRO-1/2 optimizer class, in bf16
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_outlier_step_is_skipped_and_a_resume_across_it_is_exact(tmp_path, token_dir, layout):
    import yaml

    from pipeline.convert.hf import read_checkpoint
    from tests.conftest import torchrun

    ranks, parallel, arch, precision, resumes = LAYOUTS[layout]

    def run(name):
        cfg = {"model": {"arch": arch, "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 32},
               "parallel": parallel, "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}]},
               "train": {"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3,
                         "precision": precision, "warmup_steps": 1, "skip_spikes": True, "spike_window": WINDOW,
                         "spike_sigma": 3.0},
               "checkpoint": {"dir": str(tmp_path / name), "interval": 1, "keep": STEPS},
               "log": {"interval": 1, "jsonl": str(tmp_path / f"{name}.jsonl")}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        proc = torchrun(ranks, __file__, "--config", str(tmp_path / f"{name}.yaml"), timeout=600)
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "split" not in r}, proc.stdout + proc.stderr

    straight, output = run("straight")
    skipped = [straight[s]["skipped_steps"] for s in range(1, STEPS + 1)]
    assert skipped == [0] * (SPIKE_AT - 1) + [1] * (STEPS - SPIKE_AT + 1)
    assert f"step {SPIKE_AT}: loss spike, update skipped" in output
    assert output.count("loss spike") == 1  # logged once (rank 0), not at any other step
    weights = {s: read_checkpoint(str(tmp_path / "straight"), f"global_step{s}")[0]
               for s in (SPIKE_AT - 1, SPIKE_AT, SPIKE_AT + 1)}
    for name, before in weights[SPIKE_AT - 1].items():
        assert torch.equal(weights[SPIKE_AT][name], before), name  # the skipped step changed nothing
    assert any(not torch.equal(weights[SPIKE_AT + 1][n], w) for n, w in weights[SPIKE_AT].items())  # then it trains
    for start in resumes:  # before the spike (the statistics travel: it recurs), after it (the count travels)
        name = f"resumed_at_{start}"
        shutil.copytree(tmp_path / "straight" / f"global_step{start}", tmp_path / name / f"global_step{start}")
        (tmp_path / name / "latest").write_text(f"global_step{start}")
        resumed, _ = run(name)
        assert sorted(resumed) == list(range(start + 1, STEPS + 1))
        for s, row in resumed.items():
            assert (row["loss"], row["grad_norm"], row["skipped_steps"]) == \
                (straight[s]["loss"], straight[s]["grad_norm"], straight[s]["skipped_steps"]), (start, s)


def _outlier_batches() -> None:
    """Replace the training batch of step SPIKE_AT (0-based SPIKE_AT - 1) by one rare token repeated."""
    import pipeline.loop as loop

    real = loop.Batches.get

    def get(self, dataset, k):
        tokens, mask = real(self, dataset, k)
        return (torch.full_like(tokens, 1000) if k == SPIKE_AT - 1 else tokens), mask
    loop.Batches.get = get


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _outlier_batches()
    from pipeline.train import main

    main(sys.argv[1:])
