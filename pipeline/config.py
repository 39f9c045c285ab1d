"""Run config: typed sections loaded from YAML, with dotted `key=value` overrides (CLI > file > defaults).

Every user error raises `ValueError` naming the key at fault and what to do.
"""
from __future__ import annotations

import json
import math
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
    # causal | block_causal: attention (and positions) restart after every EOD token of a packed sample
    attn_mask_type: str = "causal"
    eod_id: int | None = None           # None = the tokenizer's end-of-document id, from the data manifest
    qk_norm: bool = False               # llama: RMSNorm over each head's queries and keys (Qwen3, OLMo 2)

    def __post_init__(self):
        """Fill the arch-dependent defaults once, when the section is built (from_dict builds it from the final
        values, so an override of hidden_size or arch is seen)."""
        if self.kv_heads is None:
            self.kv_heads = self.num_heads
        if self.tie_embeddings is None:
            self.tie_embeddings = self.arch == "gpt"
        if self.ffn_hidden_size is None:
            if self.arch == "gpt":
                self.ffn_hidden_size = 4 * self.hidden_size
            else:
                self.ffn_hidden_size = 256 * ((int(8 * self.hidden_size / 3) + 255) // 256)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    sp: int = 1  # Ulysses sequence parallel degree: each rank holds seq_len/sp tokens of every sample
    deepspeed_config: str | None = None  # a user's DeepSpeed JSON; its values win over ours


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the blend: a `preprocess tokenize` output folder (or a Megatron prefix) and its weight."""
    path: str
    weight: float = 1.0


@dataclass
class DataConfig:
    datasets: list[DatasetEntry] = field(default_factory=list)  # YAML: [{path, weight}]
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
    decay_style: str = "cosine"  # cosine | linear | constant | wsd (warmup-stable-decay)
    decay_fraction: float = 0.1  # wsd: the last fraction of train.steps decays (linearly) to min_lr
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
    # Loss-spike skipping: a step whose loss or gradient norm lies more than spike_sigma standard deviations above
    # the mean of the last spike_window applied steps is not applied (on every rank alike), logged and counted.
    skip_spikes: bool = False
    spike_window: int = 128
    spike_sigma: float = 6.0
    # Resuming with another LR schedule (lr, min_lr, warmup_steps, decay_style, steps) is refused unless set; then
    # the schedule of this config applies from the resumed step on (Megatron's --override-opt_param-scheduler).
    override_lr_schedule: bool = False
    # Past this many minutes since start-up, save a committed checkpoint and exit 85 (requeue me), for clusters that
    # cannot signal before a time limit (Megatron's --exit-duration-in-mins). 0 = no limit.
    exit_after_minutes: float = 0.0
    loss_chunk_tokens: int = 0   # tokens per chunk of the fused LM head + loss; 0 = auto (~128 MiB of fp32 logits)
    z_loss: float = 0.0          # coefficient of the z-loss, z · mean(logsumexp(logits)²) (PaLM, OLMo); 0 = off
    compile: bool = False        # torch.compile each transformer block (torchtitan's granularity)


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
    # Copy the tensors to host memory and write (flush, commit) in the background while training goes on; costs one
    # more host copy of each rank's shard (pipeline.plan counts it). The commit protocol is unchanged.
    async_save: bool = False


@dataclass
class LogConfig:
    interval: int = 1
    jsonl: str | None = None
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    peak_tflops: float | None = None  # per-device peak for MFU; None = the table for known GPUs
    straggler_ratio: float = 1.2  # warn when a rank's data wait + forward exceeds its peers' median by this; 0 = never


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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isnan(number):  # NaN is never a setting: it poisons every comparison
            return number
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(hint) is list or hint is list:
        if isinstance(value, list):
            if typing.get_args(hint) == (DatasetEntry,):
                return [_dataset_entry(v, f"{key}[{i}]") for i, v in enumerate(value)]
            return value
    else:
        return value
    name = "a list of {path, weight}" if typing.get_args(hint) == (DatasetEntry,) else \
        _TYPE_NAMES.get(typing.get_origin(hint) or hint, getattr(hint, "__name__", str(hint)))
    raise ValueError(f"config key '{key}': expected {name}, got {value!r}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _dataset_entry(value, key: str) -> DatasetEntry:
    """`{path: d, weight: 2}` → DatasetEntry; an unknown key (`wieght`) or a missing path is refused by name."""
    if isinstance(value, DatasetEntry):
        return value
    known = [f.name for f in fields(DatasetEntry)]
    if not isinstance(value, dict):
        raise ValueError(f"config key '{key}': expected {{path, weight}}, got {value!r}")
    for k in value:
        if k not in known:
            raise ValueError(f"unknown config key '{key}.{k}' (known: {', '.join(known)})")
    if value.get("path") in (None, ""):
        raise ValueError(f"config key '{key}.path' is missing: each dataset is {{path, weight}}")
    hints = typing.get_type_hints(DatasetEntry)
    return DatasetEntry(**{k: _coerce(v, hints[k], f"{key}.{k}") for k, v in value.items()})


def _build(cls, values: dict, section: str):
    """One section from its final values: unknown keys and wrong types are refused with the key's name."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for k in values:
        if k not in known:
            raise ValueError(f"unknown config key '{section}.{k}' (known in '{section}': {', '.join(sorted(known))})")
    return cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})


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
    """Defaults, then each tree in turn (later ones win, key by key); each section is built once from its final
    values, so the model's arch-dependent defaults are resolved here and nowhere else."""
    sections = typing.get_type_hints(RunConfig)
    merged: dict[str, dict] = {name: {} for name in sections}
    for tree in trees:
        for section, values in tree.items():
            if section not in sections:
                raise ValueError(f"unknown config section '{section}' (known: {', '.join(sorted(sections))})")
            if not isinstance(values, dict):
                raise ValueError(f"config section '{section}' must be a mapping")
            merged[section].update(values)
    cfg = RunConfig(**{name: _build(cls, merged[name], name) for name, cls in sections.items()})
    if check:
        validate(cfg)
    return cfg


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Refuse impossible configurations (every problem, joined into one line) before any process group starts."""
    problems = find_problems(cfg, world_size)
    if problems:
        raise ValueError("; ".join(problems))


def find_problems(cfg: RunConfig, world_size: int | None = None) -> list[str]:
    """Every reason this configuration cannot run, one sentence each (empty when it can)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    problems = size_problems(cfg, world_size)
    if not problems:  # the divisibility rules need every size >= 1
        problems += _layout_problems(cfg, world_size)
    if m.arch not in ("gpt", "llama"):
        problems.append(f"model.arch: '{m.arch}' is not one of gpt, llama")
    problems += rope_scaling_problems(m.rope_scaling)
    if p.zero_stage not in (0, 1, 2, 3):
        problems.append(f"parallel.zero_stage must be 0-3, got {p.zero_stage}")
    if p.deepspeed_config and not os.path.isfile(p.deepspeed_config):
        problems.append(f"parallel.deepspeed_config: {p.deepspeed_config} is not a file")
    elif p.deepspeed_config:
        try:
            with open(p.deepspeed_config) as f:
                user_ds = json.load(f)
        except (OSError, ValueError) as e:
            user_ds = None
            problems.append(f"parallel.deepspeed_config: {p.deepspeed_config} is not readable JSON ({e})")
        # the trainer owns these: its optimizer groups, and the LR it sets before every step (pipeline/optim.py)
        for key in ("optimizer", "scheduler"):
            if isinstance(user_ds, dict) and key in user_ds:
                problems.append(f"parallel.deepspeed_config: {p.deepspeed_config} sets '{key}', which the trainer "
                                f"owns (train.lr, train.warmup_steps, train.decay_style, ...): remove it")
    if p.pp > 1 and p.zero_stage >= 2:
        problems.append(f"parallel.zero_stage {p.zero_stage} with parallel.pp {p.pp}: DeepSpeed's pipeline engine supports ZeRO 0-1 only; set parallel.zero_stage=1")
    if p.pp > 1 and p.zero_stage == 0 and t.precision == "bf16":
        problems.append(f"parallel.zero_stage 0 with parallel.pp {p.pp} and train.precision bf16: DeepSpeed's pipeline "
                        "engine then keeps its optimizer in a BF16_Optimizer whose checkpoints do not resume; "
                        "set parallel.zero_stage=1")
    if t.precision not in ("fp32", "bf16", "fp16"):
        problems.append(f"train.precision must be fp32, bf16 or fp16, got '{t.precision}'")
    if t.decay_style not in ("cosine", "linear", "constant", "wsd"):
        problems.append(f"train.decay_style must be cosine, linear, constant or wsd, got '{t.decay_style}'")
    if not 0 < t.decay_fraction <= 1:
        problems.append(f"train.decay_fraction must be in (0, 1], got {t.decay_fraction}")
    if m.attn_mask_type not in ("causal", "block_causal"):
        problems.append(f"model.attn_mask_type must be causal or block_causal, got '{m.attn_mask_type}'")
    if m.qk_norm and m.arch != "llama":
        problems.append("model.qk_norm needs model.arch llama (GPT-2 has no per-head query/key norm)")
    if t.skip_spikes:
        if t.spike_window < 2 or t.spike_sigma <= 0:
            problems.append(f"train.spike_window must be >= 2 and train.spike_sigma > 0, got {t.spike_window} "
                            f"and {t.spike_sigma}")
        if p.zero_stage == 0:
            problems.append("train.skip_spikes needs parallel.zero_stage 1-3 (the skip goes through the ZeRO "
                            "optimizer's own skipped-step path)")
    if t.on_nonfinite not in ("stop", "skip"):
        problems.append(f"train.on_nonfinite must be stop or skip, got '{t.on_nonfinite}'")
    elif t.on_nonfinite == "skip" and t.precision != "fp16":
        problems.append("train.on_nonfinite=skip needs train.precision=fp16 (its loss scaler skips bad updates); "
                        "in fp32/bf16 a non-finite loss stops the run")
    if t.compile and p.pp > 1:
        problems.append(f"train.compile with parallel.pp {p.pp}: pipeline stages are not compiled; "
                        "set train.compile=false or parallel.pp=1")
    if t.freeze_layers < 0 or t.freeze_layers > m.num_layers:
        problems.append(f"train.freeze_layers must be between 0 and model.num_layers {m.num_layers}")
    elif p.pp > 1 and t.freeze_layers >= m.num_layers // p.pp > 0:
        problems.append(f"train.freeze_layers {t.freeze_layers} with parallel.pp {p.pp}: the first pipeline stage "
                        f"(the embeddings and blocks 0-{m.num_layers // p.pp - 1}) would have nothing to train, which "
                        f"DeepSpeed's pipeline optimizer cannot hold; freeze fewer than {m.num_layers // p.pp} "
                        f"blocks or use fewer stages")
    if cfg.log.straggler_ratio and cfg.log.straggler_ratio < 1:
        problems.append(f"log.straggler_ratio must be >= 1 (a multiple of the median rank's time) or 0 (no "
                        f"warning), got {cfg.log.straggler_ratio}")
    split = split_problem(cfg.data.split)
    if split:
        problems.append(split)
    if not cfg.data.datasets:
        problems.append("data.datasets is empty: give a list of {path, weight} (a `preprocess tokenize` output folder)")
    for i, d in enumerate(cfg.data.datasets):
        if not (math.isfinite(d.weight) and d.weight > 0):
            problems.append(f"data.datasets[{i}].weight must be a positive number, got {d.weight}")
    return problems


# Sizes that are counts (>= 1) or may be zero (>= 0, where 0 means "off" or "all"); None means "not set".
AT_LEAST_ONE = ("model.num_layers", "model.hidden_size", "model.num_heads", "model.kv_heads", "model.ffn_hidden_size",
                "model.vocab_size", "model.seq_len", "model.make_vocab_size_divisible_by", "parallel.tp", "parallel.sp",
                "parallel.pp", "train.steps", "train.global_batch_size", "train.micro_batch_size", "train.eval_iters",
                "train.dist_timeout_s", "log.interval")
AT_LEAST_ZERO = ("train.warmup_steps", "train.eval_interval", "train.lr", "train.min_lr", "train.weight_decay",
                 "train.grad_clip", "checkpoint.interval", "checkpoint.keep", "model.dropout",
                 "train.loss_chunk_tokens", "train.z_loss", "train.exit_after_minutes")


def size_problems(cfg: RunConfig, world_size: int | None = None) -> list[str]:
    """Counts below 1 and amounts below 0 (a zero micro batch divides by zero; a negative one plans negative
    memory), one sentence each."""
    problems = []
    for key in AT_LEAST_ONE + AT_LEAST_ZERO:
        section, name = key.split(".")
        value, low = getattr(getattr(cfg, section), name), 1 if key in AT_LEAST_ONE else 0
        if value is not None and not value >= low:
            problems.append(f"{key} must be >= {low}, got {value}")
    if world_size is not None and world_size < 1:
        problems.append(f"world size must be >= 1, got {world_size}")
    return problems


def _layout_problems(cfg: RunConfig, world_size: int | None) -> list[str]:
    """Heads, layers and batch against the parallel sizes (every size already >= 1)."""
    problems = []
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.hidden_size % m.num_heads:
        problems.append(f"model.hidden_size {m.hidden_size} is not divisible by model.num_heads {m.num_heads}")
    if m.num_heads % m.kv_heads:
        problems.append(f"model.num_heads {m.num_heads} is not divisible by model.kv_heads {m.kv_heads}")
    if m.num_heads % p.tp or m.kv_heads % p.tp:
        problems.append(f"model.num_heads {m.num_heads} and model.kv_heads {m.kv_heads} must be divisible by parallel.tp {p.tp}")
    if m.num_layers % p.pp:
        problems.append(f"model.num_layers {m.num_layers} is not divisible by parallel.pp {p.pp}")
    if p.sp > 1:  # Ulysses: every rank attends over whole sequences for heads/(tp·sp) of the heads
        if m.num_heads % (p.tp * p.sp) or m.kv_heads % (p.tp * p.sp):
            problems.append(f"model.num_heads {m.num_heads} and model.kv_heads {m.kv_heads} must be divisible by "
                            f"parallel.tp x parallel.sp = {p.tp * p.sp}")
        if m.seq_len % p.sp:
            problems.append(f"model.seq_len {m.seq_len} is not divisible by parallel.sp {p.sp}")
        if p.pp > 1:
            problems.append(f"parallel.sp {p.sp} with parallel.pp {p.pp}: sequence parallelism runs without pipeline "
                            "stages; set parallel.pp=1 (use tp, sp and ZeRO-3)")
    if t.global_batch_size % t.micro_batch_size:
        problems.append(f"train.global_batch_size {t.global_batch_size} is not divisible by train.micro_batch_size {t.micro_batch_size}")
    if world_size is not None:
        mp = p.tp * p.pp * p.sp
        if world_size % mp:
            problems.append(f"world size {world_size} is not divisible by parallel.tp*parallel.pp*parallel.sp = {mp}")
        else:
            dp = world_size // mp
            if t.global_batch_size % (t.micro_batch_size * dp):
                problems.append(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                                f"train.micro_batch_size {t.micro_batch_size} x data-parallel size {dp}")
    return problems


def split_problem(split: str) -> str | None:
    """Why data.split is unusable ("nan,1,1", "a,b", four parts, all zero), or None."""
    try:
        parts = [float(x) for x in str(split).split(",")]
    except ValueError:
        return f"data.split '{split}': expected comma-separated numbers like 98,1,1"
    if len(parts) > 3:
        return f"data.split '{split}': at most three parts (train, valid, test)"
    if not all(math.isfinite(x) and x >= 0 for x in parts) or sum(parts) <= 0:
        return f"data.split '{split}': the parts must be finite, non-negative and not all zero (e.g. 98,1,1)"
    return None


ROPE_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                     "linear": ("factor",)}


def rope_scaling_problems(rs) -> list[str]:
    """Why model.rope_scaling is unusable (empty when it is None or a complete llama3/linear description)."""
    if rs is None:
        return []
    if not isinstance(rs, dict) or rs.get("rope_type") not in ROPE_SCALING_KEYS:
        return [f"model.rope_scaling: expected {{rope_type: llama3|linear, ...}}, got {rs!r}"]
    keys = ROPE_SCALING_KEYS[rs["rope_type"]]
    bad = [k for k in keys if isinstance(rs.get(k), bool) or not isinstance(rs.get(k), (int, float)) or not rs[k] > 0]
    unknown = sorted(set(rs) - {"rope_type", *keys})
    return [f"model.rope_scaling ({rs['rope_type']}): {k} must be a positive number" for k in bad] + \
        ([f"model.rope_scaling ({rs['rope_type']}): unknown keys {', '.join(unknown)} (it takes "
          f"{', '.join(keys)}; the RoPE base is model.rope_theta)"] if unknown else [])


def padded_vocab_size(m: ModelConfig, tp: int = 1) -> int:
    """Embedding rows: the vocabulary rounded up to a multiple of make_vocab_size_divisible_by·tp (Megatron's
    rule), so that every tensor-parallel shard is equal."""
    multiple = max(1, m.make_vocab_size_divisible_by) * tp
    return -(-m.vocab_size // multiple) * multiple


def dump(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
