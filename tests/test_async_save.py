"""Background checkpoint saves (`checkpoint.async_save`) and `train.exit_after_minutes`, on real 2-rank DeepSpeed
runs. The straight run with async saves every 2 steps is the oracle: every resumed run must log its losses bit for
bit. Interruptions happen at set points of the background writer (PIPELINE_CKPT_TEST_HOOK), not after sleeps."""
import os
import shutil
import signal

import pytest

from tests.ckpt_runs import committed_steps, log_text, losses, wait_for, write_config
from tests.launch import run_ranks, start_ranks, wait_all

STEPS = 8
ASYNC = {"checkpoint__async_save": True, "train__steps": STEPS}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, token_dir):
    """{layout: (folder, losses)} of uninterrupted runs saving in the background every 2 steps."""
    out = {}
    for layout in ("zero3", "pp2"):
        folder = tmp_path_factory.mktemp(f"straight-{layout}")
        cfg = write_config(folder, token_dir, layout, **ASYNC)
        assert run_ranks(2, "--config", cfg, log_dir=folder) == [0, 0], log_text(folder)[-3000:]
        out[layout] = (folder, losses(folder))
    return out


def assert_same_losses(folder, reference, first_step):
    got = losses(folder)
    assert sorted(got) == list(range(first_step, STEPS + 1)), sorted(got)
    for step, loss in got.items():
        assert loss == reference[step], f"step {step}: {loss} != {reference[step]}"


@pytest.mark.parametrize("layout", ["zero3", "pp2"])
def test_every_background_save_commits_and_resumes_exactly(straight, layout, tmp_path, token_dir):
    folder, reference = straight[layout]
    assert committed_steps(folder / "ckpt") == [2, 4, 6, 8]
    assert "writing it in the background" in log_text(folder)
    for step in (2, 4):  # resume from a background save, saving in the background again
        run = tmp_path / f"from{step}"
        shutil.copytree(folder / "ckpt" / f"global_step{step}", run / "ckpt" / f"global_step{step}")
        cfg = write_config(run, token_dir, layout, **ASYNC)
        assert run_ranks(2, "--config", cfg, log_dir=run) == [0, 0], log_text(run)[-3000:]
        assert_same_losses(run, reference, step + 1)
        if layout == "pp2":
            break  # one resume is enough for the second layout


def test_kill9_during_a_background_write_resumes_from_the_previous_tag(straight, tmp_path, token_dir):
    """Rank 1 is killed right after writing the first file of global_step4 in the background: that tag is never
    committed, the run fails, and the next run resumes from global_step2."""
    _, reference = straight["zero3"]
    cfg = write_config(tmp_path, token_dir, "zero3", **ASYNC)
    os.environ["PIPELINE_CKPT_TEST_HOOK"] = "kill:global_step4:1"
    try:
        codes = run_ranks(2, "--config", cfg, log_dir=tmp_path, timeout=240)
    finally:
        del os.environ["PIPELINE_CKPT_TEST_HOOK"]
    assert codes[1] == -signal.SIGKILL and codes[0] not in (0, 85, None), codes
    ckpt = tmp_path / "ckpt"
    assert committed_steps(ckpt) == [2]
    assert (ckpt / "latest").read_text().strip() == "global_step2"
    assert run_ranks(2, "--config", cfg, log_dir=tmp_path) == [0, 0], log_text(tmp_path)[-3000:]
    assert "resumed from global_step2" in log_text(tmp_path)
    assert_same_losses_from(tmp_path, reference, 3)


def assert_same_losses_from(folder, reference, first_step):
    got = losses(folder)  # the killed run's steps 1-4 were logged too; later lines of a step win
    for step in range(first_step, STEPS + 1):
        assert got[step] == reference[step], f"step {step}: {got[step]} != {reference[step]}"


def test_sigusr1_during_a_background_save_still_commits(straight, tmp_path, token_dir):
    """Rank 0's writer stops after the first file of global_step2 and waits; SIGUSR1 arrives meanwhile; the run
    waits for that save, commits it, saves its stop step and exits 85; the re-run resumes exactly."""
    _, reference = straight["zero3"]
    cfg = write_config(tmp_path, token_dir, "zero3", **ASYNC)
    tag_dir = tmp_path / "ckpt" / "global_step2"
    os.environ["PIPELINE_CKPT_TEST_HOOK"] = "pause:global_step2:0"
    try:
        procs = start_ranks(2, "--config", cfg, log_dir=tmp_path)
    finally:
        del os.environ["PIPELINE_CKPT_TEST_HOOK"]
    wait_for(lambda: (tag_dir / ".paused-rank0").exists(), 180, "the paused background write", procs)
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    (tag_dir / ".resume").touch()
    assert wait_all(procs, 120) == [85, 85], log_text(tmp_path)[-3000:]
    done = committed_steps(tmp_path / "ckpt")
    assert done[0] == 2 and 2 < done[-1] < STEPS, done  # the paused save, then the stop step's
    assert run_ranks(2, "--config", cfg, log_dir=tmp_path) == [0, 0], log_text(tmp_path)[-3000:]
    assert_same_losses_from(tmp_path, reference, done[-1] + 1)


def test_exit_after_minutes_commits_exits_85_and_resumes_exactly(straight, tmp_path, token_dir):
    _, reference = straight["zero3"]
    cfg = write_config(tmp_path, token_dir, "zero3", **ASYNC)
    # 0.001 minutes: past it after the first step
    assert run_ranks(2, "--config", cfg, "train.exit_after_minutes=0.001", log_dir=tmp_path) == [85, 85]
    done = committed_steps(tmp_path / "ckpt")
    assert len(done) == 1 and done[0] < STEPS
    assert "stopped by train.exit_after_minutes" in log_text(tmp_path)
    assert run_ranks(2, "--config", cfg, log_dir=tmp_path) == [0, 0], log_text(tmp_path)[-3000:]
    assert_same_losses_from(tmp_path, reference, done[0] + 1)


def test_plan_counts_the_host_copy():
    """One copy of each rank's shard: ZeRO-3 fp32 at dp 4 holds a quarter of the weights and optimizer state."""
    from pipeline.config import from_dict
    from pipeline.plan import async_host_copy_bytes, count_params, plan

    cfg = from_dict({"model": {"arch": "llama", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 256},
                     "parallel": {"zero_stage": 3}, "data": {"datasets": [{"path": "/nonexistent", "weight": 1}]},
                     "train": {"global_batch_size": 8, "micro_batch_size": 2}, "checkpoint": {"async_save": True}})
    n = count_params(cfg).per_rank
    assert async_host_copy_bytes(cfg, 4) == n * (4 + 12) / 4
    lines, _ = plan(cfg, 4)
    assert any(line.startswith("host memory") and "checkpoint.async_save" in line for line in lines)
    cfg.checkpoint.async_save = False
    assert not any(line.startswith("host memory") for line in plan(cfg, 4)[0])
