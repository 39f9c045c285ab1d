"""One training run per checkpoint.dir: a second run is refused in one line before any process group starts;
a holder killed with -9 leaves nothing that stops the next run; the O_EXCL stand-in's takeover rule."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline.checkpoint import lock as ckpt_lock
from pipeline.fs import process_start
from tests.ckpt_runs import committed_steps, log_text, losses, wait_for, write_config
from tests.conftest import ROOT, run_cli
from tests.launch import run_ranks, start_ranks, wait_all

HOLD = "import sys, time; from pipeline.checkpoint.lock import CheckpointLock; CheckpointLock(sys.argv[1]); " \
       "print('held', flush=True); time.sleep(600)"


def _holder(ckpt, env=None):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ckpt)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_dir_is_refused_naming_the_holder_and_freed_by_kill9(tmp_path):
    ckpt = tmp_path / "ckpt"
    holder = _holder(ckpt, {"SLURM_JOB_ID": "4242"})
    try:
        with pytest.raises(ckpt_lock.CheckpointDirBusy) as e:
            ckpt_lock.CheckpointLock(str(ckpt))
        text = str(e.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in text and "Slurm job 4242" in text
        with pytest.raises(ckpt_lock.CheckpointDirBusy):  # another rank of another run
            ckpt_lock.check_unlocked(str(ckpt), tries=2, wait_s=0.01)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    ckpt_lock.CheckpointLock(str(ckpt)).release()  # the kernel dropped the dead holder's flock
    ckpt_lock.check_unlocked(str(ckpt), tries=1)


def _info(**kw):
    me = ckpt_lock._me()
    return {**me, "job": None, **kw}


@pytest.mark.parametrize("case,gone", [
    ("this process", True),
    ("dead pid, this host", True),
    ("live pid, this host", False),
    ("reused pid (other start time)", True),
    ("same Slurm job (a requeue)", True),
    ("other host, other job", False),
    ("empty file", True),
])
def test_o_excl_takeover_rule(case, gone, monkeypatch):
    dead = subprocess.Popen(["true"])
    dead.wait()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    info = {
        "this process": _info(),
        "dead pid, this host": _info(pid=dead.pid),
        "live pid, this host": _info(pid=os.getppid(), started=process_start(os.getppid())),
        "reused pid (other start time)": _info(pid=os.getppid(), started="1"),
        "same Slurm job (a requeue)": _info(host="elsewhere", pid=1, job="77"),
        "other host, other job": _info(host="elsewhere", pid=1, job="78"),
        "empty file": None,
    }[case]
    assert ckpt_lock.holder_is_gone(info) is gone


def test_o_excl_stand_in_where_flock_is_missing(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(ckpt_lock.fcntl, "flock", no_flock)
    owner = tmp_path / "ckpt" / "LOCK.owner"
    (tmp_path / "ckpt").mkdir()
    owner.write_text(json.dumps(_info(host="elsewhere", pid=1, job="other")))
    with pytest.raises(ckpt_lock.CheckpointDirBusy, match=f"delete {owner}"):
        ckpt_lock.CheckpointLock(str(tmp_path / "ckpt"))
    monkeypatch.setenv("SLURM_JOB_ID", "other")  # the same job, requeued: takes it over
    held = ckpt_lock.CheckpointLock(str(tmp_path / "ckpt"))
    assert json.loads(owner.read_text())["pid"] == os.getpid()
    held.release()
    assert not owner.exists()


def test_second_training_on_one_dir_is_refused_then_a_kill9_holder_is_taken_over(tmp_path, token_dir):
    # a constant LR: the re-run may ask for fewer steps without changing the schedule
    cfg = write_config(tmp_path, token_dir, "zero3", train__steps=10000, train__decay_style="constant",
                       checkpoint__interval=3)
    first = start_ranks(2, "--config", cfg, log_dir=tmp_path)
    try:
        wait_for(lambda: (tmp_path / "log.jsonl").exists() and len(losses(tmp_path)) >= 1, 180, "a step", first)
        t0 = time.time()
        second = run_cli("-m", "pipeline.train", "--config", cfg, check=False, timeout=120)
        assert second.returncode == 2 and time.time() - t0 < 60
        err = second.stderr.strip().splitlines()
        assert err[-1].startswith("error: checkpoint.dir") and "is in use by" in err[-1], second.stderr
        assert "Traceback" not in second.stderr and "init_distributed" not in second.stdout
        wait_for(lambda: committed_steps(tmp_path / "ckpt"), 180, "a committed checkpoint", first)
    finally:
        for p in first:
            p.send_signal(signal.SIGKILL)
        wait_all(first, 60)
    codes = run_ranks(2, "--config", cfg, "train.steps=4", log_dir=tmp_path)
    assert codes == [0, 0], log_text(tmp_path)[-3000:]
    assert "resumed from global_step" in log_text(tmp_path)


def test_a_requeued_job_waits_for_its_dead_predecessors_lock(tmp_path, monkeypatch):
    """A network filesystem may hold a crashed client's flock until its lease ends: the same Slurm job id waits."""
    import threading

    ckpt = tmp_path / "ckpt"
    holder = _holder(ckpt, {"SLURM_JOB_ID": "99"})
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setattr(ckpt_lock, "REQUEUE_WAIT_S", 60)
    threading.Timer(1.0, holder.kill).start()  # the lease runs out
    try:
        ckpt_lock.CheckpointLock(str(ckpt)).release()
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setenv("SLURM_JOB_ID", "100")  # another job is refused at once
    holder = _holder(ckpt, {"SLURM_JOB_ID": "99"})
    try:
        t0 = time.time()
        with pytest.raises(ckpt_lock.CheckpointDirBusy):
            ckpt_lock.CheckpointLock(str(ckpt))
        assert time.time() - t0 < 10
    finally:
        holder.kill()
        holder.wait()
