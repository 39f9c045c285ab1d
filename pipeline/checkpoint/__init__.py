"""Checkpoints: the commit protocol (`commit`), saving and loading the training state through DeepSpeed
(`save`), whether a run may resume (`resume`), and reading any layout as one state dict (`read`).

    commit.py   tags, COMMITTED markers, `latest`, pruning: the protocol every writer follows
    save.py     the trainer's collective save and load (DeepSpeed files + RNG state), background saves
    writer.py   the checkpoint engine DeepSpeed writes and reads through: safe loads, background writes
    safe.py     torch.load with weights_only=True and an allow-list of DeepSpeed's plain-data types
    lock.py     one run per checkpoint.dir (CKPT/LOCK, held by rank 0)
    resume.py   check_resumable: model shape, data, layout and LR schedule against a tag
    read.py     any layout (ZeRO-3, ZeRO-0/1/2, pipeline, tensor-parallel, weights-only) as one lazy state dict
"""
from .commit import (COMMIT, UNIVERSAL, WEIGHTS_FILE, WEIGHTS_ONLY, commit, committed_tags, is_universal,
                     is_weights_only, marker, prune, resolve_tag, tag_for, verify)
from .resume import (check_compatible, check_resumable, data_fingerprint, layout_change, schedule_changes)
from .save import background_done, finish, load, rng_state, save, set_rng_state

__all__ = ["COMMIT", "UNIVERSAL", "WEIGHTS_FILE", "WEIGHTS_ONLY", "background_done", "check_compatible",
           "check_resumable", "commit", "committed_tags", "data_fingerprint", "finish", "is_universal",
           "is_weights_only", "layout_change", "load", "marker", "prune", "resolve_tag", "rng_state", "save",
           "schedule_changes", "set_rng_state", "tag_for", "verify"]
