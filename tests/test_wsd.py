"""train.decay_style wsd (warmup-stable-decay): the LR of every step follows the formula, through the real
trainer; a resume with another train.decay_fraction is refused like any other schedule change."""
import json

import pytest
import yaml


def wsd_formula(step: int, lr: float, min_lr: float, warmup: int, steps: int, fraction: float) -> float:
    """Linear warmup over `warmup` steps, `lr` until the last round(fraction·steps) steps (never before the warmup
    ends), which go down linearly and end at min_lr on the last step. `step` is 0-based (the step taking the run
    from step to step+1)."""
    start = max(warmup, steps - max(1, round(fraction * steps)))
    if step < warmup:
        return lr * (step + 1) / warmup
    done = step - start + 1  # decay steps taken, this one included
    return lr if done <= 0 else lr - (lr - min_lr) * done / (steps - start)


@pytest.mark.parametrize("steps,warmup,fraction", [(20, 3, 0.25), (10, 0, 0.1), (7, 2, 1.0), (50, 5, 0.33)])
def test_lr_at_each_step_is_the_formula(steps, warmup, fraction):
    from pipeline.optim import Schedule, lr_at

    s = Schedule(lr=1e-3, min_lr=1e-5, warmup_steps=warmup, steps=steps, decay_style="wsd", decay_fraction=fraction)
    got = [lr_at(k, s) for k in range(steps)]
    assert got == pytest.approx([wsd_formula(k, 1e-3, 1e-5, warmup, steps, fraction) for k in range(steps)],
                                rel=1e-12, abs=1e-15)
    assert got[-1] == pytest.approx(1e-5)  # ends at min_lr
    stable = [x for x in got[warmup:] if x == 1e-3]
    assert len(stable) == max(warmup, steps - max(1, round(fraction * steps))) - warmup  # flat until the decay


def test_bad_decay_fraction_is_refused():
    from pipeline.config import from_dict

    with pytest.raises(ValueError, match="train.decay_fraction must be in"):
        from_dict({"data": {"datasets": [{"path": "d", "weight": 1}]}, "train": {"decay_fraction": 0}})
    with pytest.raises(ValueError, match="wsd"):
        from_dict({"data": {"datasets": [{"path": "d", "weight": 1}]}, "train": {"decay_style": "wsdd"}})


def test_trainer_follows_wsd_and_resume_refuses_another_fraction(tmp_path, token_dir):
    from tests.conftest import run_cli

    steps, warmup, fraction, lr, min_lr = 8, 2, 0.25, 2e-3, 1e-4
    cfg = {"model": {"arch": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "seq_len": 32},
           "parallel": {"zero_stage": 1},
           "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}]},
           "train": {"steps": steps, "global_batch_size": 2, "micro_batch_size": 2, "lr": lr, "min_lr": min_lr,
                     "warmup_steps": warmup, "decay_style": "wsd", "decay_fraction": fraction},
           "checkpoint": {"dir": str(tmp_path / "ckpt")},
           "log": {"interval": 1, "jsonl": str(tmp_path / "log.jsonl")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_cli("-m", "pipeline.train", "--config", str(tmp_path / "run.yaml"))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "split" not in r}
    assert sorted(lrs) == list(range(1, steps + 1))
    for step, got in lrs.items():  # the line of step k reports the LR its update used: the 0-based step k-1
        assert got == pytest.approx(wsd_formula(step - 1, lr, min_lr, warmup, steps, fraction), rel=1e-12), step
    refused = run_cli("-m", "pipeline.train", "--config", str(tmp_path / "run.yaml"), "train.steps=12",
                      "train.decay_fraction=0.5", check=False)
    assert refused.returncode == 2 and "train.decay_fraction 0.25 -> 0.5" in refused.stderr, refused.stderr
