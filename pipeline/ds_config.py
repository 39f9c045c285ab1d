"""The DeepSpeed JSON: a template from ds_configs/ plus the run's values; a user-supplied JSON wins."""
from __future__ import annotations

import copy
import json
import os

from .config import RunConfig

DS_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def template_name(cfg: RunConfig) -> str:
    p = cfg.parallel
    if p.pp > 1 or p.zero_stage < 3:
        return "zero1.json"
    return "zero3_offload.json" if (p.offload_optimizer or p.offload_params) else "zero3.json"


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"DeepSpeed config {path} not found") from None
    except ValueError as e:
        raise ValueError(f"DeepSpeed config {path}: invalid JSON ({e})") from None


def build_ds_config(cfg: RunConfig, dp_size: int) -> dict:
    p, t = cfg.parallel, cfg.train
    ds = _read_json(os.path.join(DS_CONFIGS, template_name(cfg)))
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = p.zero_stage
    if p.zero_stage == 3 and not p.offload_params:
        zero.pop("offload_param", None)
    if p.zero_stage == 3 and not p.offload_optimizer:
        zero.pop("offload_optimizer", None)
    run = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp_size),
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
    }
    ds = _merge(ds, run)
    if p.deepspeed_config:
        ds = _merge(ds, _read_json(p.deepspeed_config))
    return ds
