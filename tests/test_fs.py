"""pipeline/fs.py: atomic writes, staging folders and the stale-lock break that both lock modules use."""
import json
import os
import stat

import pytest

from pipeline import fs


def test_late_breaker_never_removes_a_fresh_lock(tmp_path):
    lock = tmp_path / "LOCK.owner"
    stale = {"host": "h", "pid": 999999999}
    lock.write_text(json.dumps(stale))
    fs.break_stale_lock(str(lock), stale)  # the first breaker removes the dead holder's file
    assert not lock.exists()
    fresh = {"host": "h", "pid": os.getpid()}
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.write(fd, json.dumps(fresh).encode())
    os.close(fd)
    fs.break_stale_lock(str(lock), stale)  # a second one, acting on what it read before: must leave it
    assert json.loads(lock.read_text()) == fresh


def test_break_waits_for_a_live_breaker_and_clears_a_dead_one(tmp_path):
    lock = tmp_path / "LOCK.owner"
    stale = {"pid": 1}
    lock.write_text(json.dumps(stale))
    brk = tmp_path / "LOCK.owner.break"
    brk.write_text("")
    fs.break_stale_lock(str(lock), stale)  # another breaker at work: leave the file to it
    assert lock.exists()
    os.utime(brk, (0, 0))  # that breaker died long ago
    fs.break_stale_lock(str(lock), stale)
    fs.break_stale_lock(str(lock), stale)
    assert not lock.exists() and not brk.exists()


def test_staging_dir_keeps_existing_folders_and_uses_the_umask(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with fs.staging_dir(str(existing / "new" / "deeper" / "out"), overwrite=False):
            raise RuntimeError("boom")
    assert existing.is_dir() and not (existing / "new").exists()  # only what it made is removed
    old = os.umask(0o022)
    try:
        with fs.staging_dir(str(existing / "out"), overwrite=False) as tmp:
            (open(os.path.join(tmp, "f"), "w")).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(existing / "out").st_mode) == 0o755  # not mkdtemp's 0700


def test_overwrite_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(RuntimeError):
        with fs.staging_dir(str(out), overwrite=True):
            raise RuntimeError("boom")
    assert (out / "old").exists()
    with fs.staging_dir(str(out), overwrite=True) as tmp:
        (open(os.path.join(tmp, "new"), "w")).close()
    assert sorted(os.listdir(out)) == ["new"] and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
