"""Whether a run may resume from a checkpoint: one `check_resumable`, called before any process group starts."""
from __future__ import annotations

import hashlib
import json
import os

from .commit import is_universal, is_weights_only, marker

SCHEDULE_KEYS = ("lr", "min_lr", "warmup_steps", "decay_style", "steps", "decay_fraction")
SHAPE_KEYS = ("arch", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_hidden_size", "vocab_size",
              "tie_embeddings")


def data_fingerprint(docs) -> str:
    """One value for the datasets of a run (their manifests' checksums and document lengths)."""
    return hashlib.sha256("".join(d.fingerprint() for d in docs).encode()).hexdigest()


def _run_config(ckpt_dir: str, tag: str) -> dict | None:
    try:
        with open(os.path.join(ckpt_dir, tag, "run_config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def layout_change(ckpt_dir: str, tag: str, parallel_cfg: dict, world_size: int | None) -> str | None:
    """Why DeepSpeed could not load `tag` into this layout (tensor/pipeline/data-parallel sizes, ZeRO stage), or
    None. Weights-only tags load anywhere; universal ones into any sizes, but not across ZeRO-3 and ZeRO-0/1/2.
    `world_size` None (unknown before start-up): the data-parallel size is not compared."""
    if is_weights_only(ckpt_dir, tag):
        return None
    try:
        old = (_run_config(ckpt_dir, tag) or {}).get("parallel", {})
        old_world = int(marker(ckpt_dir, tag)["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an older or unreadable tag: check_compatible and DeepSpeed speak for it

    def sizes(p: dict, world: int | None) -> dict:
        tp, pp = int(p.get("tp", 1)), int(p.get("pp", 1))
        # "dp": the ranks ZeRO partitions over, data x sequence parallel (Ulysses ranks hold the same weights and
        # are DeepSpeed's data-parallel ranks too, pipeline/parallel/groups.py): a change of sp alone loads.
        return {"tp": tp, "pp": pp, "dp": world // (tp * pp) if world else None,
                "zero_stage": int(p.get("zero_stage", 0))}
    a, b = sizes(old, old_world), sizes(parallel_cfg, world_size)
    if (a["zero_stage"] == 3) != (b["zero_stage"] == 3):
        return (f"it was saved with ZeRO-{a['zero_stage']} and this run uses ZeRO-{b['zero_stage']}; DeepSpeed "
                f"cannot move optimizer state between ZeRO-3 and ZeRO-0/1/2: keep parallel.zero_stage="
                f"{a['zero_stage']}, or start from the weights alone (convert to-hf, then convert from-hf)")
    if is_universal(ckpt_dir, tag):
        return None
    keys = ["tp", "pp", "zero_stage"] + (["dp"] if b["zero_stage"] > 0 and b["dp"] is not None else [])
    diff = [f"{k} {a[k]} -> {b[k]}" for k in keys if a[k] != b[k]]
    if not diff:
        return None
    return (f"it was saved in another layout ({', '.join(diff)}), which DeepSpeed cannot load directly; convert it: "
            f"python -m pipeline.convert reshape {ckpt_dir} OUT --tp {b['tp']} --pp {b['pp']}, then run with "
            f"checkpoint.dir=OUT")


def schedule_changes(ckpt_dir: str, tag: str, train_cfg: dict) -> list[str]:
    """The LR-schedule settings of `train_cfg` that differ from the ones `tag` was trained with ("train.lr a -> b").

    `steps` counts only where it shapes the schedule (a decay that ends at train.steps), `decay_fraction` only
    for wsd."""
    saved = _run_config(ckpt_dir, tag)
    if saved is None:
        return []  # check_compatible reports an unreadable run_config.json
    old = saved.get("train", {})
    styles = (old.get("decay_style"), train_cfg.get("decay_style"))
    keys = [k for k in SCHEDULE_KEYS if (k != "steps" or "constant" not in styles)
            and (k != "decay_fraction" or "wsd" in styles)]
    return [f"train.{k} {old.get(k)} -> {train_cfg.get(k)}" for k in keys if k in old and old.get(k) != train_cfg.get(k)]


def check_compatible(ckpt_dir: str, tag: str, model_cfg: dict, fingerprint: str | None) -> str | None:
    """Why resuming `tag` with this model shape and data would be wrong, or None."""
    saved = _run_config(ckpt_dir, tag)
    if saved is None:
        return f"{os.path.join(ckpt_dir, tag)}/run_config.json is missing or unreadable"
    old = saved.get("model", {})
    # a learned position table (gpt) has seq_len rows; RoPE models may change seq_len (context extension)
    keys = SHAPE_KEYS + (("seq_len",) if model_cfg.get("arch") == "gpt" else ())
    keys += tuple(k for k in ("qk_norm",) if k in old or k in model_cfg)
    old = {"qk_norm": False, **old}  # saved before the key existed: no qk_norm
    # what the weights mean, beyond their shapes (a Llama 3.1's RoPE scaling, a Qwen2's biases); older tags lack them
    keys += tuple(k for k in ("rope_theta", "rope_scaling", "qkv_bias", "norm_eps") if k in old)
    diff = [f"model.{k} {old.get(k)} -> {model_cfg.get(k)}" for k in keys if old.get(k) != model_cfg.get(k)]
    if diff:
        return "the model shape differs from the checkpoint's: " + ", ".join(diff)
    saved_fp = marker(ckpt_dir, tag).get("data_fingerprint")
    if fingerprint and saved_fp and saved_fp != fingerprint and not is_weights_only(ckpt_dir, tag):
        return "the datasets differ from the checkpoint's (data fingerprint changed)"
    return None


def check_resumable(cfg, tag: str, fingerprint: str | None, world_size: int | None) -> None:
    """Raise ValueError (one line, with what to do) when the run `cfg` must not resume from `tag`."""
    where = os.path.join(cfg.checkpoint.dir, tag)
    full = cfg.to_dict()
    problem = check_compatible(cfg.checkpoint.dir, tag, full["model"], fingerprint)
    if problem and not cfg.checkpoint.force:
        raise ValueError(f"cannot resume from {where}: {problem} (use a new checkpoint.dir, or checkpoint.force=true)")
    moved = layout_change(cfg.checkpoint.dir, tag, full["parallel"], world_size)
    if moved:
        raise ValueError(f"cannot resume from {where}: {moved}")
    changes = [] if is_weights_only(cfg.checkpoint.dir, tag) else schedule_changes(cfg.checkpoint.dir, tag, full["train"])
    if changes and not cfg.train.override_lr_schedule:
        raise ValueError(f"cannot resume from {where}: the LR schedule differs from the checkpoint's: "
                         f"{', '.join(changes)} (set train.override_lr_schedule=true to follow this config's "
                         f"schedule from the resumed step, or restore the values)")
