"""`convert reshape`: a run checkpointed at step 2 under tp2 (or pp2, 2 processes) is moved to tp1/pp1 and
resumed in one process: its first loss (step 3) is the unreshaped run's within 1e-4, and so is the next one
(step 4, which also depends on the moved Adam state; tp changes the reduction order, hence 2e-4 there)."""
import json

import pytest

from tests.conftest import run_cli, torchrun
from tests.test_convert_layouts import layout_config

CASES = [  # (name, arch, zero stage, source overrides, target tp, target pp)
    ("tp2-to-tp1", "llama", 3, ["parallel.tp=2"], 1, 1),
    ("pp2-to-pp1", "gpt", 1, ["parallel.pp=2"], 1, 1),
]


def losses(path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "split" not in r}


@pytest.mark.parametrize("name,arch,zero,source,tp,pp", CASES, ids=[c[0] for c in CASES])
def test_reshape_then_resume_continues_the_loss(name, arch, zero, source, tp, pp, tmp_path, token_dir):
    cfg = layout_config(tmp_path, token_dir, arch)
    overrides = ["train.eval_interval=0", "checkpoint.keep=0", f"parallel.zero_stage={zero}"]
    torchrun(2, "-m", "pipeline.train", "--config", cfg, *source, *overrides)
    straight = losses(tmp_path / "log.jsonl")
    out = tmp_path / "reshaped"
    run_cli("-m", "pipeline.convert", "reshape", tmp_path / "ckpt", out, "--tp", str(tp), "--pp", str(pp),
            "--tag", "global_step2")
    assert (out / "latest").read_text() == "global_step2"
    run_cli("-m", "pipeline.train", "--config", cfg, *overrides, f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"checkpoint.dir={out}", f"parallel.deepspeed_config={out / 'ds_universal.json'}",
            f"log.jsonl={tmp_path / 'resumed.jsonl'}")
    resumed = losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [3, 4]
    assert abs(resumed[3] - straight[3]) <= 1e-4, (resumed, straight)
    assert abs(resumed[4] - straight[4]) <= 2e-4, (resumed, straight)
