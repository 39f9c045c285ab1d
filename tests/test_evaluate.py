"""pipeline.evaluate gives the trainer's own valid loss for the same checkpoint and data: in another layout (one
process, from a dp-2 ZeRO-1 checkpoint: the full state dict path) and in the same one (2 ranks: DeepSpeed's own
load); it appends a `split: valid` line that the report reads; bad input is one error line."""
import json
import shutil

import pytest

from pipeline.evaluate import main
from tests.conftest import run_cli, torchrun
from tests.helpers import assert_one_error, run_main
from tests.tiny_runs import STEPS, resumed_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, token_dir):
    return resumed_run(tmp_path_factory, token_dir)


def trainer_valid(log, step: int) -> float:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "valid" and r["step"] == step and "source" not in r][-1]


def test_one_process_equals_the_trainer_and_appends_to_the_log(run, tmp_path):
    log = tmp_path / "log.jsonl"
    shutil.copyfile(run / "log.jsonl", log)  # the shared run's log stays as the trainer wrote it
    before = log.read_text()
    proc = run_cli("-m", "pipeline.evaluate", run / "ckpt", "--config", run / "run.yaml", f"log.jsonl={log}")
    appended = log.read_text()[len(before):].splitlines()
    assert len(appended) == 1
    line = json.loads(appended[0])
    assert {k: line[k] for k in ("split", "step", "source", "tag")} == \
        {"split": "valid", "step": STEPS, "source": "evaluate", "tag": f"global_step{STEPS}"}
    # Trained at dp 2 (each rank's micro-batch means, then the mean over ranks), evaluated at dp 1: fp32 rounding.
    assert line["loss"] == pytest.approx(trainer_valid(log, STEPS), rel=1e-6, abs=1e-6)
    assert "loaded via full state dict" in proc.stdout
    from pipeline.report.runlog import read_log

    report = read_log(str(log))
    assert report.valid["source"][-1] == "evaluate" and report.valid["loss"][-1] == pytest.approx(line["loss"])


@pytest.mark.parametrize("layout,how", [([], "deepspeed"), (["parallel.pp=2"], "full state dict")],
                         ids=["same-layout", "pipeline"])
def test_two_ranks_give_the_trainers_loss(run, tmp_path, layout, how):
    """The trainer's layout (dp 2, ZeRO-1) loads through DeepSpeed and gives its loss exactly; two pipeline stages
    (dp 1) read the full state dict and agree to fp32 rounding."""
    log = tmp_path / "log.jsonl"
    proc = torchrun(2, "-m", "pipeline.evaluate", run / "ckpt", "--config", run / "run.yaml", "--tag", "global_step3",
                    f"log.jsonl={log}", *layout)
    assert f"loaded via {how}, world 2" in proc.stdout
    line = json.loads(log.read_text())
    want = trainer_valid(run / "log.jsonl", 3)
    assert line["step"] == 3
    assert line["loss"] == want if how == "deepspeed" else line["loss"] == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_other_datasets(run, tmp_path, token_dir):
    proc = run_cli("-m", "pipeline.evaluate", run / "ckpt", "--config", run / "run.yaml", "--datasets", token_dir,
                   "--iters", "1", f"log.jsonl={tmp_path / 'log.jsonl'}")
    line = json.loads((tmp_path / "log.jsonl").read_text())
    assert line["data"] == str(token_dir) and line["loss"] > 0
    assert f"global_step{STEPS}: step {STEPS} | loss" in proc.stdout


BAD = [  # (argument list after CKPT given as a function of the run folder, fragment of the error line)
    (lambda run: [run / "nope", "--config", run / "run.yaml"], "no such checkpoint folder"),
    (lambda run: [run / "ckpt", "--config", run / "run.yaml", "model.hidden_size=128"],
     "model shape differs from the checkpoint's: model.hidden_size 64 -> 128"),
    (lambda run: [run / "ckpt", "--config", run / "run.yaml", "--tag", "global_step5"], "global_step5"),
    (lambda run: [run / "ckpt", "--config", run / "run.yaml", "--datasets", run / "nope"], "nope"),
    (lambda run: [run / "ckpt", "--config", run / "run.yaml", "data.split=100,0,0"], "no validation documents"),
    (lambda run: [run / "ckpt", "--config", run / "run.yaml", "--iters", "0"], "--iters must be >= 1"),
]


@pytest.mark.parametrize("argv,fragment", BAD)
def test_bad_input_is_one_error_line(run, capsys, argv, fragment):
    assert_one_error(run_main(main, argv(run), capsys), 2, fragment)
