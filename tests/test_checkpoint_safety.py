"""Checkpoints that other tools open safely, and runs that end cleanly: no project class pickled in any file,
DeepSpeed's own zero_to_fp32.py from inside the folder, planted pickles refused, older checkpoints still resume,
a garbled `latest`, a full disk, Ctrl-C and SIGTERM to torchrun. Real 2-rank DeepSpeed runs on CPU."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests.ckpt_runs import committed_steps, log_text, losses, wait_for, write_config
from tests.conftest import ROOT
from tests.launch import run_ranks, start_ranks, wait_all

# What DeepSpeed pickles into its own files (optimizer states); numpy only in RNG files of older checkpoints.
DEEPSPEED_TYPES = {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                   "deepspeed.utils.tensor_fragment.fragment_address"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, token_dir):
    """{layout: run folder} of a 4-step run saved at steps 2 and 4, for ZeRO-3 (llama), ZeRO-1 and pp2 (gpt)."""
    out = {}
    for layout in ("zero3", "zero1", "pp2"):
        folder = tmp_path_factory.mktemp(layout)
        cfg = write_config(folder, token_dir, layout, train__steps=4)
        assert run_ranks(2, "--config", cfg, log_dir=folder) == [0, 0], log_text(folder)[-3000:]
        out[layout] = folder
    return out


@pytest.mark.parametrize("layout", ["zero3", "zero1", "pp2"])
def test_no_file_pickles_more_than_deepspeed_types(checkpoints, layout):
    tag_dir = checkpoints[layout] / "ckpt" / "global_step4"
    files = sorted(tag_dir.glob("*.pt"))
    assert any("rng_rank" in f.name for f in files) and any("optim_states" in f.name for f in files)
    for f in files:
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        if f.name.startswith("rng_rank"):
            assert found == set(), f"{f.name}: our own files pickle nothing but tensors and plain data: {found}"
        else:
            assert found <= DEEPSPEED_TYPES, f"{f.name}: {found - DEEPSPEED_TYPES}"


@pytest.mark.parametrize("layout", ["zero3", "zero1"])
def test_deepspeed_zero_to_fp32_runs_inside_the_folder_and_matches_to_hf(checkpoints, layout, tmp_path):
    from safetensors.torch import load_file as load_safetensors

    from pipeline.checkpoint.read import read_run_config
    from pipeline.convert.hf import to_hf
    from pipeline.hf import to_hf_state_dict

    ckpt = checkpoints[layout] / "ckpt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path)  # anything but the repository
    proc = subprocess.run([sys.executable, "zero_to_fp32.py", ".", str(tmp_path / "fp32"), "--tag", "global_step4"],
                          cwd=ckpt, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "fp32" / "pytorch_model.bin", weights_only=True)

    to_hf(str(ckpt), str(tmp_path / "hf"), tag="global_step4", dtype="fp32")
    ours = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        ours.update(load_safetensors(str(f)))
    model_cfg = read_run_config(str(ckpt / "global_step4")).model
    if model_cfg.tie_embeddings and "lm_head.weight" not in theirs:
        theirs["lm_head.weight"] = theirs["embed_tokens.weight"]
    expected = to_hf_state_dict({k: v[:model_cfg.vocab_size] if "embed_tokens" in k or "lm_head" in k else v
                                 for k, v in theirs.items()}, model_cfg)
    assert set(ours) == set(expected)
    for name, t in ours.items():
        assert torch.equal(t, expected[name]), name


def recommit(ckpt, tag, meta):
    """Commit a tag again after changing its files (as an attacker, or an older version, would have)."""
    from pipeline.checkpoint.commit import commit

    (ckpt / tag / "COMMITTED").unlink()
    commit(str(ckpt), tag, meta)


def _planted(tag_dir, marker):
    """A model-states file whose unpickling would create `marker` (a classic __reduce__ payload)."""
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    victim = next(tag_dir.glob("*model_states.pt"))
    state = torch.load(victim, weights_only=False)
    state["payload"] = Payload()
    torch.save(state, victim)
    return victim


def test_a_planted_pickle_is_refused_by_every_reader(checkpoints, tmp_path):
    from pipeline.checkpoint.read import open_checkpoint
    from pipeline.checkpoint.writer import SafeCheckpointEngine

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["zero3"] / "ckpt" / "global_step4", ckpt / "global_step4")
    marker = tmp_path / "PAYLOAD_RAN"
    victim = _planted(ckpt / "global_step4", marker)
    recommit(ckpt, "global_step4", {"step": 4})  # sizes changed: commit again, as an attacker would
    with pytest.raises(ValueError, match="refused to load: it pickles posix.system"):
        open_checkpoint(str(ckpt))  # to-hf, generate, reshape's reader
    with pytest.raises(ValueError, match="refused to load"):
        SafeCheckpointEngine().load(str(victim))  # what DeepSpeed's engine reads through when the trainer resumes
    assert not marker.exists()


def test_a_planted_pickle_stops_a_resume_without_running(checkpoints, tmp_path, token_dir):
    """The trainer's resume goes through DeepSpeed's engine, which reads through our checkpoint engine."""
    folder = tmp_path
    cfg = write_config(folder, token_dir, "zero3", train__steps=6, train__override_lr_schedule=True)
    shutil.copytree(checkpoints["zero3"] / "ckpt", folder / "ckpt")
    marker = tmp_path / "PAYLOAD_RAN"
    _planted(folder / "ckpt" / "global_step4", marker)
    recommit(folder / "ckpt", "global_step4", {"step": 4, "world_size": 2, "consumed_samples": 16})
    codes = run_ranks(2, "--config", cfg, log_dir=folder)
    assert 1 in codes and 0 not in codes and not marker.exists()
    assert "refused to load" in log_text(folder, 0) + log_text(folder, 1)  # the rank that reads the file says why


def test_an_older_checkpoint_with_a_pickled_lr_schedule_still_resumes(checkpoints, tmp_path, token_dir):
    """Checkpoints from before the LR schedule became plain data hold a LambdaLR state whose callable carried the
    run's TrainConfig: they convert and resume (the schedule now comes from the config)."""
    from pipeline.checkpoint.read import open_checkpoint
    from pipeline.config import TrainConfig

    folder = tmp_path
    cfg = write_config(folder, token_dir, "zero3", train__steps=6, train__override_lr_schedule=True)
    shutil.copytree(checkpoints["zero3"] / "ckpt", folder / "ckpt")
    tag_dir = folder / "ckpt" / "global_step4"
    for f in tag_dir.glob("*model_states.pt"):
        state = torch.load(f, weights_only=True)
        state["lr_scheduler"] = {"base_lrs": [3e-3, 3e-3], "last_epoch": 4, "_step_count": 5,
                                 "lr_lambdas": [{"t": TrainConfig()}, {"t": TrainConfig()}]}
        torch.save(state, f)
    recommit(folder / "ckpt", "global_step4", {"step": 4, "world_size": 2, "consumed_samples": 16})
    assert any(g.startswith("pipeline.") for g in
               torch.serialization.get_unsafe_globals_in_checkpoint(str(next(tag_dir.glob("*model_states.pt")))))
    sd, _, tag, _ = open_checkpoint(str(folder / "ckpt"))
    assert tag == "global_step4" and len(list(sd.keys())) > 0
    assert run_ranks(2, "--config", cfg, log_dir=folder) == [0, 0], log_text(folder)[-3000:]
    assert "resumed from global_step4" in log_text(folder)


def test_a_garbled_latest_warns_and_falls_back(checkpoints, tmp_path, caplog):
    from pipeline.checkpoint import resolve_tag

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["zero3"] / "ckpt", ckpt)
    (ckpt / "latest").write_bytes(b"\x00\xffgarbage\nglobal_step999")
    with caplog.at_level("WARNING", logger="pipeline"):
        assert resolve_tag(str(ckpt)) == "global_step4"
    assert str(ckpt / "latest") in caplog.text and "not a committed checkpoint" in caplog.text


def test_disk_full_during_a_save_is_one_line_naming_the_file():
    from pipeline.checkpoint.writer import write_file

    with pytest.raises(OSError, match="no space left on device writing checkpoint file /dev/full"):
        write_file({"w": torch.zeros(1 << 16)}, "/dev/full")


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_ends_the_run_with_one_line(tmp_path, token_dir):
    """checkpoint.dir on a 600 KB filesystem: the first checkpoint does not fit."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "600k"):
        pytest.skip("needs `mount -t tmpfs` (root) to make a small full filesystem")
    try:
        cfg = write_config(tmp_path, token_dir, "zero3", train__steps=4, checkpoint__dir=str(disk / "ckpt"),
                           data__cache_dir=str(tmp_path / "cache"))
        codes = run_ranks(2, "--config", cfg, log_dir=tmp_path)
        assert 0 not in codes and 85 not in codes
        full = [r for r in (0, 1) if "no space left on device" in log_text(tmp_path, r).lower()]
        assert full, log_text(tmp_path)[-2000:]
        r = full[0]  # the rank whose write failed (its peers then lose it, a failure of their own)
        text = log_text(tmp_path, r)
        err = [line for line in text.splitlines() if line.startswith("error:")]
        assert codes[r] == 1 and err and str(disk / "ckpt") in err[-1], text[-2000:]
        assert "no space left on device" in err[-1].lower() and "Traceback" not in text
        assert committed_steps(disk / "ckpt") == []
    finally:
        subprocess.run(["umount", str(disk)])


def test_ctrl_c_commits_and_exits_85(tmp_path, token_dir):
    cfg = write_config(tmp_path, token_dir, "zero3", train__steps=10000, checkpoint__interval=0)
    procs = start_ranks(2, "--config", cfg, log_dir=tmp_path)
    wait_for(lambda: (tmp_path / "log.jsonl").exists() and len(losses(tmp_path)) >= 2, 180, "two steps", procs)
    for p in procs:  # a terminal's Ctrl-C reaches every process of the foreground group
        p.send_signal(signal.SIGINT)
    assert wait_all(procs, 120) == [85, 85], log_text(tmp_path)[-3000:]
    assert len(committed_steps(tmp_path / "ckpt")) == 1
    assert "KeyboardInterrupt" not in log_text(tmp_path) and "stopped by SIGINT" in log_text(tmp_path)


def test_sigterm_to_torchrun_commits_and_says_so(tmp_path, token_dir):
    """torchrun passes SIGTERM on to its workers (30 s grace): they commit a checkpoint and exit 85, the last
    line of the run says so, and a re-run resumes."""
    cfg = write_config(tmp_path, token_dir, "zero3", train__steps=10000, checkpoint__interval=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "pipeline.train", "--config", cfg], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: (tmp_path / "log.jsonl").exists() and len(losses(tmp_path)) >= 2, 180, "two steps", [proc])
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    text = (tmp_path / "torchrun.log").read_text()
    assert code != 0, "a stopped run must not look finished"
    assert len(committed_steps(tmp_path / "ckpt")) == 1
    assert "checkpoint committed, exiting with 85" in text, text[-3000:]
