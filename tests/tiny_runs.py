"""One real 2-rank training run with a resume and a planted straggler, shared by the report, straggler and evaluate
tests (built once per test session, whichever of them asks first).

Launch 1 (tests.straggler_main: rank 1 sleeps in every transformer block's training forward) trains 6 steps with
checkpoints and evaluations at steps 3 and 6. Then global_step6 is deleted, as if the job died before committing
it, and launch 2 (plain pipeline.train) resumes from global_step3: steps 4-6 are logged a second time, after a
`start` line. DP 2 under ZeRO-1, fp32, log.interval 1 (so every step is a log line).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tests.conftest import run_cli

STEPS, SLEEP_S = 6, 0.1
_built: dict = {}


def tiny_config(folder: Path, token_dir: Path, **overrides) -> Path:
    cfg = {
        "model": {"arch": "llama", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "kv_heads": 2,
                  "ffn_hidden_size": 160, "seq_len": 64},
        "parallel": {"zero_stage": 1},
        "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}], "split": "90,10,0"},
        "train": {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 2, "eval_interval": 3, "eval_iters": 2},
        "checkpoint": {"dir": str(folder / "ckpt"), "interval": 3},
        "log": {"interval": 1, "jsonl": str(folder / "log.jsonl")},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        cfg[section][name] = value
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def resumed_run(tmp_path_factory, token_dir: Path) -> Path:
    """The run folder: run.yaml, log.jsonl, ckpt/, launch1.out (its stdout, with the straggler warnings)."""
    if "run" in _built:
        return _built["run"]
    folder = tmp_path_factory.mktemp("resumed_run")
    cfg = tiny_config(folder, token_dir)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    first = run_cli(*torchrun, "-m", "tests.straggler_main", "--config", cfg,
                    env={"STRAGGLER_RANK": "1", "STRAGGLER_SLEEP_S": str(SLEEP_S)})
    (folder / "launch1.out").write_text(first.stdout + first.stderr)
    shutil.rmtree(folder / "ckpt" / f"global_step{STEPS}")
    run_cli(*torchrun, "-m", "pipeline.train", "--config", cfg)
    _built["run"] = folder
    return folder
