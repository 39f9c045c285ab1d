"""The commit protocol's bookkeeping (pipeline/checkpoint/commit.py) on plain folders: what `prune` keeps."""
import os

from pipeline.checkpoint import commit, committed_tags, prune, resolve_tag, tag_for


def make_tag(ckpt, step, size=8):
    d = ckpt / tag_for(step)
    d.mkdir(parents=True)
    (d / "weights.pt").write_bytes(b"x" * size)
    commit(str(ckpt), tag_for(step), {"step": step})


def test_a_damaged_newer_tag_never_costs_the_good_ones(tmp_path):
    """Resumed from 900 because 1000 is truncated; saving 950 with keep=1 must keep 950, not the broken 1000."""
    make_tag(tmp_path, 900)
    make_tag(tmp_path, 1000)
    with open(tmp_path / tag_for(1000) / "weights.pt", "r+b") as f:
        f.truncate(3)
    assert resolve_tag(str(tmp_path)) == tag_for(900)
    make_tag(tmp_path, 950)
    prune(str(tmp_path), keep=1, current=tag_for(950))
    assert committed_tags(str(tmp_path)) == [tag_for(950)]
    assert resolve_tag(str(tmp_path)) == tag_for(950)
    assert (tmp_path / "latest").read_text() == tag_for(950)


def test_keep_counts_intact_tags_and_drops_leftovers(tmp_path):
    for step in (1, 2, 3, 4):
        make_tag(tmp_path, step)
    with open(tmp_path / tag_for(3) / "weights.pt", "r+b") as f:
        f.truncate(1)
    (tmp_path / tag_for(5)).mkdir()  # an interrupted save, no marker
    make_tag(tmp_path, 6)
    prune(str(tmp_path), keep=3, current=tag_for(6))
    assert sorted(os.listdir(tmp_path)) == ["global_step2", "global_step4", "global_step6", "latest"]


def test_keep_zero_keeps_every_intact_tag(tmp_path):
    for step in (1, 2, 3):
        make_tag(tmp_path, step)
    prune(str(tmp_path), keep=0, current=tag_for(3))
    assert committed_tags(str(tmp_path)) == [tag_for(3), tag_for(2), tag_for(1)]


def test_marker_never_lists_a_writers_temporary_file(tmp_path):
    d = tmp_path / tag_for(7)
    d.mkdir()
    (d / "a.pt").write_bytes(b"abc")
    (d / "b.pt.tmp-host-1-abcd").write_bytes(b"partial")
    commit(str(tmp_path), tag_for(7), {"step": 7})
    import json

    assert list(json.loads((d / "COMMITTED").read_text())["files"]) == ["a.pt"]
