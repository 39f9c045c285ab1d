"""The trainer under interruption, on real 2-rank DeepSpeed ZeRO-3 runs: signals, kill -9 during saves,
damaged checkpoints, dead ranks. The uninterrupted run is the oracle: every logged loss must equal its."""
import json
import os
import signal
import time

import pytest
import yaml

from tests.launch import run_ranks, start_ranks, wait_all

STEPS = 12


def write_config(tmp_path, token_dir, **over):
    cfg = {
        "model": {"arch": "llama", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "kv_heads": 2,
                  "ffn_hidden_size": 64, "seq_len": 32},
        "parallel": {"zero_stage": 3},
        "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}]},
        "train": {"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2,
                  "dist_timeout_s": 60},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 1, "keep": 2},
        "log": {"interval": 1, "jsonl": str(tmp_path / "log.jsonl")},
    }
    for key, value in over.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def losses(tmp_path):
    rows = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "split" not in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_dir):
    tmp = tmp_path_factory.mktemp("reference")
    codes = run_ranks(2, "--config", write_config(tmp, token_dir), "checkpoint.interval=0", log_dir=tmp)
    assert codes == [0, 0], (tmp / "rank0.log").read_text()[-3000:]
    return dict(losses(tmp))


def assert_matches_reference(tmp_path, reference):
    seen = losses(tmp_path)
    assert {s for s, _ in seen} == set(range(1, STEPS + 1))
    for step, loss in seen:
        assert loss == reference[step], f"step {step}: {loss} != {reference[step]}"


def committed_steps(ckpt):
    return sorted(int(d.name[len("global_step"):]) for d in ckpt.glob("global_step*") if (d / "COMMITTED").exists())


def test_sigusr1_checkpoints_and_resume_is_exact(tmp_path, token_dir, reference):
    cfg = write_config(tmp_path, token_dir, checkpoint__interval=0)
    procs = start_ranks(2, "--config", cfg, log_dir=tmp_path)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    os.kill(procs[1].pid, signal.SIGUSR1)  # one rank only: the flag is agreed across ranks
    codes = wait_all(procs, 120)
    assert codes == [85, 85], (tmp_path / "rank0.log").read_text()[-3000:]
    done = committed_steps(tmp_path / "ckpt")
    assert len(done) == 1 and 3 <= done[0] < STEPS
    assert run_ranks(2, "--config", cfg, log_dir=tmp_path) == [0, 0]
    assert_matches_reference(tmp_path, reference)


# (kill point, tag, rank): a rank dies after writing the first file of a save, or rank 0 once every file of the tag
# is written and flushed but before its marker (pipeline/checkpoint/writer.py's test hook)
KILL_POINTS = [("kill", "global_step3", 1), ("kill", "global_step5", 0), ("kill-before-commit", "global_step8", 0)]


def test_kill9_during_saves_then_resume(tmp_path, token_dir, reference):
    """kill -9 at set points inside saves (every step saves): the other rank ends within the timeout, the killed
    save is never committed and `latest` never names it, and the next run resumes from the last committed tag.
    Every logged loss equals the uninterrupted run's."""
    cfg = write_config(tmp_path, token_dir, train__dist_timeout_s=60)
    ckpt = tmp_path / "ckpt"
    interrupted_saves = 0
    for action, tag, rank in KILL_POINTS:
        os.environ["PIPELINE_CKPT_TEST_HOOK"] = f"{action}:{tag}:{rank}"
        try:
            procs = start_ranks(2, "--config", cfg, log_dir=tmp_path)
        finally:
            del os.environ["PIPELINE_CKPT_TEST_HOOK"]
        t0 = time.time()
        codes = wait_all(procs, 240)
        assert codes[rank] == -signal.SIGKILL, f"{action}:{tag}:{rank}: exit codes {codes}; see {tmp_path}/rank0.log"
        assert None not in codes and time.time() - t0 < 240, f"{action}:{tag}: a rank outlived its peer"
        assert (ckpt / tag).is_dir() and not (ckpt / tag / "COMMITTED").exists(), f"{tag} was committed"
        interrupted_saves += 1
        latest = (ckpt / "latest").read_text().strip()
        assert latest != tag and (ckpt / latest / "COMMITTED").exists(), f"latest names {latest}"
        assert max(committed_steps(ckpt)) == int(tag[len("global_step"):]) - 1
    assert interrupted_saves == len(KILL_POINTS)
    assert run_ranks(2, "--config", cfg, log_dir=tmp_path) == [0, 0]
    assert_matches_reference(tmp_path, reference)


def test_truncated_newest_checkpoint_falls_back(tmp_path, token_dir, reference):
    cfg = write_config(tmp_path, token_dir, checkpoint__interval=2, checkpoint__keep=3)
    assert run_ranks(2, "--config", cfg, log_dir=tmp_path) == [0, 0]
    newest = tmp_path / "ckpt" / f"global_step{STEPS}"
    victim = max((p for p in newest.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    assert run_ranks(2, "--config", cfg, log_dir=tmp_path) == [0, 0]
    text = (tmp_path / "rank0.log").read_text()
    assert f"skipping damaged checkpoint global_step{STEPS}" in text
    assert f"resumed from global_step{STEPS - 2}" in text
    assert_matches_reference(tmp_path, reference)


def test_changed_model_shape_is_refused(tmp_path, token_dir):
    cfg = write_config(tmp_path, token_dir)
    assert run_ranks(1, "--config", cfg, "train.steps=1", "train.global_batch_size=2", log_dir=tmp_path) == [0]
    codes = run_ranks(1, "--config", cfg, "train.steps=2", "train.global_batch_size=2", "model.hidden_size=64",
                      log_dir=tmp_path)
    assert codes == [2]
    err = (tmp_path / "rank0.log").read_text().strip().splitlines()[-1]
    assert err.startswith("error: cannot resume") and "model.hidden_size 32 -> 64" in err


def test_dead_rank_ends_the_job_within_timeout(tmp_path, token_dir):
    cfg = write_config(tmp_path, token_dir, train__steps=100000, checkpoint__interval=0, train__dist_timeout_s=20)
    procs = start_ranks(2, "--config", cfg, log_dir=tmp_path)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    codes = wait_all(procs, 60)
    assert codes[0] not in (0, None), codes
    assert time.time() - t0 < 30


def test_nonfinite_loss_never_overwrites_a_good_checkpoint(tmp_path, token_dir):
    """A learning rate near the edge of fp32 (3e37): step 1 trains and is saved, its update leaves weights near
    fp32's limit, step 2's gradients overflow (DeepSpeed skips that update); the run stops with one error line
    before saving anything more, and `latest` still names the step-1 checkpoint."""
    cfg = write_config(tmp_path, token_dir, checkpoint__interval=1)
    codes = run_ranks(1, "--config", cfg, "train.global_batch_size=2", "train.micro_batch_size=2", "train.steps=3",
                      "train.warmup_steps=0", "train.lr=3e37", "train.min_lr=3e37", log_dir=tmp_path)
    assert codes == [1]
    err = (tmp_path / "rank0.log").read_text().strip().splitlines()[-1]
    assert err.startswith("error:") and "non-finite" in err and "at step 2" in err, err
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step1"
    assert committed_steps(tmp_path / "ckpt") == [1]


def test_changed_lr_schedule_is_refused_unless_overridden(tmp_path, token_dir):
    """Resuming with another LR or horizon: refused in one line naming the keys; with train.override_lr_schedule
    the resumed steps follow the new schedule exactly as a fresh run of the new config would at those steps."""
    def lrs(folder):
        rows = [json.loads(l) for l in (folder / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in rows if "split" not in r}

    cfg = write_config(tmp_path, token_dir, train__steps=4, checkpoint__interval=0, train__global_batch_size=2)
    assert run_ranks(1, "--config", cfg, log_dir=tmp_path) == [0]
    text = (tmp_path / "rank0.log").read_text()  # the files reach storage before the tag is committed
    assert -1 < text.find("flushed checkpoint global_step4 to storage") < text.find("saved checkpoint")
    old = lrs(tmp_path)
    new = ["train.steps=8", "train.lr=1e-3"]
    assert run_ranks(1, "--config", cfg, *new, log_dir=tmp_path) == [2]
    err = (tmp_path / "rank0.log").read_text().strip().splitlines()[-1]
    assert err.startswith("error: cannot resume") and "train.lr 0.003 -> 0.001" in err and "train.steps 4 -> 8" in err
    assert "override_lr_schedule" in err
    assert run_ranks(1, "--config", cfg, *new, "train.override_lr_schedule=true", log_dir=tmp_path) == [0]
    resumed = lrs(tmp_path)
    assert {s: resumed[s] for s in range(1, 5)} == old and set(resumed) == set(range(1, 9))

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    ref = write_config(fresh, token_dir, train__steps=8, train__lr=1e-3, checkpoint__interval=0,
                       train__global_batch_size=2)
    assert run_ranks(1, "--config", ref, log_dir=fresh) == [0]
    expected = lrs(fresh)
    for s in range(5, 9):
        assert resumed[s] == pytest.approx(expected[s], rel=1e-12), (s, resumed[s], expected[s])
    assert resumed[5] != pytest.approx(old[4])  # the schedule did change


def test_resume_at_another_data_parallel_size(tmp_path, token_dir):
    """A ZeRO-3 job saved at dp 2 and restarted on 1 process: refused in one line that says how to convert; after
    `convert reshape` it resumes, and steps 3-4 see the same samples as the dp-2 run (losses equal but for the
    order of the gradient sums)."""
    import shutil

    from tests.conftest import run_cli

    cfg = write_config(tmp_path, token_dir, train__steps=4, checkpoint__interval=2)
    assert run_ranks(2, "--config", cfg, log_dir=tmp_path) == [0, 0]
    reference = dict(losses(tmp_path))
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "ckpt" / "global_step2", moved / "global_step2")
    (moved / "latest").write_text("global_step2")
    (tmp_path / "log.jsonl").unlink()
    assert run_ranks(1, "--config", cfg, f"checkpoint.dir={moved}", log_dir=tmp_path) == [2]
    err = (tmp_path / "rank0.log").read_text().strip().splitlines()[-1]
    assert err.startswith("error: cannot resume") and "dp 2 -> 1" in err and "convert reshape" in err, err
    out = tmp_path / "universal"
    run_cli("-m", "pipeline.convert", "reshape", str(moved), str(out), "--tp", "1", "--pp", "1")
    assert run_ranks(1, "--config", cfg, f"checkpoint.dir={out}", log_dir=tmp_path) == [0]  # sees UNIVERSAL
    resumed = dict(losses(tmp_path))
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), (step, resumed[step], reference[step])
    # A requeue of that run resumes from the ordinary tag it saved next to the universal one.
    assert run_ranks(1, "--config", cfg, f"checkpoint.dir={out}", "train.steps=6", "train.override_lr_schedule=true",
                     log_dir=tmp_path) == [0], (tmp_path / "rank0.log").read_text()[-2000:]
    assert sorted(dict(losses(tmp_path))) == [3, 4, 5, 6]
