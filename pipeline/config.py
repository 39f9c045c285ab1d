"""Run config: typed sections loaded from YAML, with dotted `key=value` overrides (CLI > file > defaults).

Every user error raises `ValueError` naming the key at fault and what to do.
"""
from __future__ import annotations

import json
import os
import typing
from dataclasses import asdict, dataclass, field, fields

import yaml


@dataclass
class ModelConfig:
    arch: str = "llama"                 # gpt (GPT-2/3) | llama
    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    kv_heads: int | None = None         # grouped-query attention (llama); None = num_heads
    ffn_hidden_size: int | None = None  # None = 4h (gpt) or the Llama rule 8h/3 rounded up to 256
    vocab_size: int | None = None       # None = the tokenizer's vocabulary, from the data manifest
    seq_len: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE frequency scaling, in Hugging Face's form: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1+) or {"rope_type": "linear", "factor"}
    rope_scaling: dict | None = None
    qkv_bias: bool = False              # bias on the q, k, v projections of a llama (Qwen2); gpt always has biases
    tie_embeddings: bool | None = None  # None = True for gpt, False for llama
    dropout: float = 0.0
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128  # embedding rows padded so that tp shards are equal (Megatron)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    deepspeed_config: str | None = None  # a user's DeepSpeed JSON; its values win over ours


@dataclass
class DataConfig:
    datasets: list = field(default_factory=list)  # [{path, weight}]
    split: str = "98,1,1"
    seed: int = 1234
    cache_dir: str | None = None
    mask_eod_loss: bool = False


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 4   # sequences per rank per forward/backward
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "fp32"      # fp32 | bf16 | fp16
    seed: int = 1234
    eval_interval: int = 0       # 0 = no periodic evaluation
    eval_iters: int = 4
    dist_timeout_s: int = 600
    freeze_layers: int = 0       # freeze the bottom K transformer blocks (and the embeddings) when K > 0
    on_nonfinite: str = "stop"   # stop | skip: what a non-finite loss does (fp16 overflow is always skipped)
    # Resuming with another LR schedule (lr, min_lr, warmup_steps, decay_style, steps) is refused unless set; then
    # the schedule of this config applies from the resumed step on (Megatron's --override-opt_param-scheduler).
    override_lr_schedule: bool = False


@dataclass
class CheckpointConfig:
    dir: str = "runs/checkpoints"
    interval: int = 0  # 0 = only at the end (and on signal)
    keep: int = 3
    save_on_signal: bool = True
    # Flush every node's checkpoint files to storage (syncfs) before the commit marker: a power loss after the
    # commit cannot leave a "committed" tag with unwritten data. Saves on SIGUSR1/SIGTERM skip it (grace period).
    sync: bool = True
    force: bool = False  # resume even if the model shape or the data fingerprint differs from the checkpoint's


@dataclass
class LogConfig:
    interval: int = 1
    jsonl: str | None = None
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    peak_tflops: float | None = None  # per-device peak for MFU; None = the table for known GPUs


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(value, hint, key: str):
    """Check (and gently convert) a YAML value against a dataclass field's type."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(hint) is list or hint is list:
        if isinstance(value, list):
            return value
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ValueError(f"config key '{key}': expected {name}, got {value!r}")


def _apply(section_obj, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    known = {f.name for f in fields(section_obj)}
    for k, v in values.items():
        if k not in known:
            raise ValueError(f"unknown config key '{prefix}{k}' (known in '{prefix.rstrip('.')}': {', '.join(sorted(known))})")
        setattr(section_obj, k, _coerce(v, hints[k], prefix + k))


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ValueError(f"override '{key}': use section.key=value (e.g. train.steps=100)")
    tree.setdefault(parts[0], {})[parts[1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.steps=10", "data.datasets=[{path: d, weight: 1}]"]` → nested dict; values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}': expected key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def load_config(path: str | None, overrides: list[str] | None = None, check: bool = True) -> RunConfig:
    """Defaults, then the YAML file, then the overrides; types always checked, cross-field rules when `check`."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path} not found")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"config file {path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path}: expected a mapping of sections at the top level")
    return from_dict(raw, parse_overrides(overrides or []), check=check)


def from_dict(*trees: dict, check: bool = True) -> RunConfig:
    cfg = RunConfig()
    sections = {f.name for f in fields(cfg)}
    for tree in trees:
        for section, values in tree.items():
            if section not in sections:
                raise ValueError(f"unknown config section '{section}' (known: {', '.join(sorted(sections))})")
            if not isinstance(values, dict):
                raise ValueError(f"config section '{section}' must be a mapping")
            _apply(getattr(cfg, section), values, section + ".")
    if check:
        validate(cfg)
    return cfg


def resolve_model_defaults(m: ModelConfig) -> None:
    """Fill the arch-dependent defaults (idempotent)."""
    if m.kv_heads is None:
        m.kv_heads = m.num_heads
    if m.tie_embeddings is None:
        m.tie_embeddings = m.arch == "gpt"
    if m.ffn_hidden_size is None:
        if m.arch == "gpt":
            m.ffn_hidden_size = 4 * m.hidden_size
        else:
            m.ffn_hidden_size = 256 * ((int(8 * m.hidden_size / 3) + 255) // 256)


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Refuse impossible configurations (every problem, joined into one line) before any process group starts."""
    problems = find_problems(cfg, world_size)
    if problems:
        raise ValueError("; ".join(problems))


def find_problems(cfg: RunConfig, world_size: int | None = None) -> list[str]:
    """Every reason this configuration cannot run, one sentence each (empty when it can)."""
    problems = []
    m, p, t = cfg.model, cfg.parallel, cfg.train
    resolve_model_defaults(m)
    if m.arch not in ("gpt", "llama"):
        problems.append(f"model.arch: '{m.arch}' is not one of gpt, llama")
    problems += rope_scaling_problems(m.rope_scaling)
    if m.hidden_size % m.num_heads:
        problems.append(f"model.hidden_size {m.hidden_size} is not divisible by model.num_heads {m.num_heads}")
    if m.num_heads % m.kv_heads:
        problems.append(f"model.num_heads {m.num_heads} is not divisible by model.kv_heads {m.kv_heads}")
    if m.num_heads % p.tp or m.kv_heads % p.tp:
        problems.append(f"model.num_heads {m.num_heads} and model.kv_heads {m.kv_heads} must be divisible by parallel.tp {p.tp}")
    if m.num_layers % p.pp:
        problems.append(f"model.num_layers {m.num_layers} is not divisible by parallel.pp {p.pp}")
    if m.make_vocab_size_divisible_by < 1:  # the vocabulary itself never blocks tp: it is padded (Megatron)
        problems.append("model.make_vocab_size_divisible_by must be >= 1")
    if p.zero_stage not in (0, 1, 2, 3):
        problems.append(f"parallel.zero_stage must be 0-3, got {p.zero_stage}")
    if p.pp > 1 and p.zero_stage >= 2:
        problems.append(f"parallel.zero_stage {p.zero_stage} with parallel.pp {p.pp}: DeepSpeed's pipeline engine supports ZeRO 0-1 only; set parallel.zero_stage=1")
    if p.pp > 1 and p.zero_stage == 0 and t.precision == "bf16":
        problems.append(f"parallel.zero_stage 0 with parallel.pp {p.pp} and train.precision bf16: DeepSpeed's pipeline "
                        "engine then keeps its optimizer in a BF16_Optimizer whose checkpoints do not resume; "
                        "set parallel.zero_stage=1")
    if t.precision not in ("fp32", "bf16", "fp16"):
        problems.append(f"train.precision must be fp32, bf16 or fp16, got '{t.precision}'")
    if t.decay_style not in ("cosine", "linear", "constant"):
        problems.append(f"train.decay_style must be cosine, linear or constant, got '{t.decay_style}'")
    if t.on_nonfinite not in ("stop", "skip"):
        problems.append(f"train.on_nonfinite must be stop or skip, got '{t.on_nonfinite}'")
    elif t.on_nonfinite == "skip" and t.precision != "fp16":
        problems.append("train.on_nonfinite=skip needs train.precision=fp16 (its loss scaler skips bad updates); "
                        "in fp32/bf16 a non-finite loss stops the run")
    if t.freeze_layers < 0 or t.freeze_layers > m.num_layers:
        problems.append(f"train.freeze_layers must be between 0 and model.num_layers {m.num_layers}")
    if t.steps < 1:
        problems.append(f"train.steps must be >= 1, got {t.steps}")
    if t.global_batch_size % t.micro_batch_size:
        problems.append(f"train.global_batch_size {t.global_batch_size} is not divisible by train.micro_batch_size {t.micro_batch_size}")
    if world_size is not None:
        mp = p.tp * p.pp
        if world_size % mp:
            problems.append(f"world size {world_size} is not divisible by parallel.tp*parallel.pp = {mp}")
        else:
            dp = world_size // mp
            if t.global_batch_size % (t.micro_batch_size * dp):
                problems.append(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                                f"train.micro_batch_size {t.micro_batch_size} x data-parallel size {dp}")
    if not cfg.data.datasets:
        problems.append("data.datasets is empty: give a list of {path, weight} (a `preprocess tokenize` output folder)")
    for i, d in enumerate(cfg.data.datasets):
        if not isinstance(d, dict) or "path" not in d:
            problems.append(f"data.datasets[{i}]: expected {{path, weight}}, got {d!r}")
    return problems


ROPE_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                     "linear": ("factor",)}


def rope_scaling_problems(rs) -> list[str]:
    """Why model.rope_scaling is unusable (empty when it is None or a complete llama3/linear description)."""
    if rs is None:
        return []
    if not isinstance(rs, dict) or rs.get("rope_type") not in ROPE_SCALING_KEYS:
        return [f"model.rope_scaling: expected {{rope_type: llama3|linear, ...}}, got {rs!r}"]
    bad = [k for k in ROPE_SCALING_KEYS[rs["rope_type"]]
           if isinstance(rs.get(k), bool) or not isinstance(rs.get(k), (int, float)) or not rs[k] > 0]
    return [f"model.rope_scaling ({rs['rope_type']}): {k} must be a positive number" for k in bad]


def padded_vocab_size(m: ModelConfig, tp: int = 1) -> int:
    """Embedding rows: the vocabulary rounded up to a multiple of make_vocab_size_divisible_by·tp (Megatron's
    rule), so that every tensor-parallel shard is equal."""
    multiple = max(1, m.make_vocab_size_divisible_by) * tp
    return -(-m.vocab_size // multiple) * multiple


def dump(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
