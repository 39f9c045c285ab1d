"""The DeepSpeed engine for a parallel layout, behind one train step and one eval step.

The train loop sees only `TrainEngine`: it hands over this data-parallel rank's slice of a global batch and
gets back the loss averaged over the whole global batch, on every rank. The layout follows
`parallel.tp`, `parallel.pp` and `parallel.zero_stage` (data-parallel size = world / (tp·pp)):

    pp = 1   the model, tensor-parallel when tp > 1 (pipeline/parallel/tp.py), under ZeRO-0…3 with our `mpu`
    pp > 1   the same model cut into a DeepSpeed PipelineModule (pipeline/parallel/pipe.py), TP inside each
             stage, ZeRO-0/1 across data-parallel replicas, 1F1B through `train_batch`

Parallelism is applied in a fixed order: build the unsharded model on the meta device (each weight a function of
the seed and its name), take `init_state_dict` as the source of values, tensor-parallel, freeze, activation
checkpointing, pipeline cut (or allocate the whole shard), then DeepSpeed.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist

from . import dist, ds_compat
from .config import RunConfig
from .ds_config import build_ds_config
from .loss import IGNORE
from .model import build_model, num_params
from .optim import build_optimizer, set_lr


def init_source(model, sd: dict) -> dict:
    """Check a full unsharded state dict (our names; vocabulary padded or not) against the model config and
    return it with the vocabulary padded as the model's: the values `materialize` takes instead of init."""
    from .parallel.tp import VOCAB, pad_vocab

    own = model.state_dict()
    sd = {k: pad_vocab(v, model.vocab_size, model.padded_vocab_size) if k in VOCAB else v for k, v in sd.items()}
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(k for k in set(own) - set(sd) if not (k == "lm_head.weight" and model.cfg.tie_embeddings))
    if unexpected or missing:
        raise ValueError(f"init_state_dict does not match model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"init_state_dict['{k}'] has shape {tuple(v.shape)}, the model config wants {tuple(own[k].shape)}")
    if model.cfg.tie_embeddings and "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd["embed_tokens.weight"]):
        raise ValueError("init_state_dict: lm_head.weight differs from embed_tokens.weight but model.tie_embeddings is set")
    return {k: v.detach().float() for k, v in sd.items()}


def freeze_layers(model, k: int) -> None:
    """train.freeze_layers=K: no gradient for the embeddings (the tied head too) and the bottom K blocks."""
    if k > model.cfg.num_layers:
        raise ValueError(f"train.freeze_layers {k} exceeds model.num_layers {model.cfg.num_layers}")
    frozen = [model.embed_tokens] + ([model.embed_positions] if hasattr(model, "embed_positions") else [])
    for m in frozen + list(model.layers[:k]):
        m.requires_grad_(False)


def materialize_partitioned(model, ds_config: dict, dp_group, mpu, precision: str) -> None:
    """ZeRO-3: allocate the (meta) model one block at a time and partition each block before the next.

    A rank's peak memory is then its ZeRO-3 shard of the whole model plus one full block, not its whole TP
    shard (what DeepSpeed would otherwise allocate before partitioning; zero.Init's role, with our per-name
    init). DeepSpeed's engine finds every parameter already partitioned, exactly as it would have made it: same
    dtype, same data-parallel group, same offload settings."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch import nn

    from .parallel.tp import materialize

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    offload = ds_config.get("zero_optimization", {}).get("offload_param") or {}
    remote = offload.get("device") if offload.get("device") not in (None, "none") else None
    parts = []
    for name, child in model.named_children():  # embeddings, each block, final norm, head: in model order
        if isinstance(child, nn.ModuleList):
            parts += [(f"{name}.{i}", block) for i, block in enumerate(child)]
        else:
            parts.append((name, child))
    parts.append(("", model))  # whatever is left (a root parameter): nothing today
    first = None  # one Init for the whole model (hpZ groups, NVMe swappers: made once), as DeepSpeed's engine does
    for prefix, part in parts:
        materialize(model, part, prefix)
        fresh = [prm for prm in part.parameters() if not ds_compat.is_zero_param(prm)]
        for prm in fresh:
            if prm.dtype != dtype and prm.is_floating_point():
                prm.data = prm.data.to(dtype)
        if not fresh:
            continue
        if first is None:
            deepspeed.zero.Init(module=part, data_parallel_group=dp_group, dtype=dtype, config_dict_or_path=ds_config,
                                remote_device=remote, pin_memory=bool(offload.get("pin_memory", False)), mpu=mpu)
            first = fresh[0]
        else:
            ds_compat.convert_to_zero_parameters(first, fresh)
    # The engine moves nothing of a partitioned model: the buffers (rope tables) go to the device here.
    device = torch.device(get_accelerator().current_device_name())
    for m in model.modules():
        for k, b in m._buffers.items():
            if b is not None and b.device != device:
                m._buffers[k] = b.to(device)


class TrainEngine:
    def __init__(self, cfg: RunConfig, init_state_dict: dict | None = None, load_universal: bool = False):
        import deepspeed

        from .parallel.groups import ParallelState

        ds_compat.check_version()
        from .parallel.tp import apply_tp, materialize

        self.cfg = cfg
        p = cfg.parallel
        if p.pp > 1 and p.zero_stage >= 2:
            raise ValueError(f"parallel.zero_stage {p.zero_stage} with parallel.pp {p.pp}: DeepSpeed's pipeline "
                             "engine supports ZeRO 0-1 only; set parallel.zero_stage=1")
        if p.pp > 1 and cfg.train.freeze_layers and cfg.model.tie_embeddings:
            raise ValueError("train.freeze_layers with parallel.pp > 1 and model.tie_embeddings: DeepSpeed's pipeline "
                             "engine all-reduces the tied embedding's gradient, which a frozen embedding lacks; use pp=1")
        self.world, self.rank = dist.world_size(), dist.rank()
        self.state = ParallelState(p.tp, p.pp, p.sp)
        self.dp_size, self.dp_rank = self.state.dp, self.state.coord.dp  # which samples this rank reads
        # Losses are averaged over every replica of the weights: data x sequence parallel ranks.
        self.dp_group, self.replicas = self.state.get_data_parallel_group(), self.state.dp * self.state.sp
        self.start_pos = self.state.coord.sp * (cfg.model.seq_len // p.sp)  # this rank's first token (Ulysses)
        self.micro = cfg.train.micro_batch_size
        # On the meta device: each rank allocates only its own shard of its own stage (parallel/tp.materialize).
        model = build_model(cfg.model, seed=cfg.train.seed, tp=p.tp, device="meta")
        self.num_params = num_params(model) - (model.padded_vocab_size - model.vocab_size) * cfg.model.hidden_size * \
            (1 if cfg.model.tie_embeddings else 2)
        if init_state_dict is not None:
            model.init_source = init_source(model, init_state_dict)
        apply_tp(model, self.state)
        if p.sp > 1:
            from .parallel.ulysses import apply_sp

            apply_sp(model, self.state)
        if cfg.train.freeze_layers:  # after TP, which makes fresh parameters
            freeze_layers(model, cfg.train.freeze_layers)
        model.checkpoint_activations = p.activation_checkpointing
        if cfg.train.compile:  # pp > 1 is refused by config validation
            from .parallel.compile import CompileTimer, apply_compile

            apply_compile(model)
        self._compile_timer = CompileTimer(cfg.train.compile, self.rank) if cfg.train.compile else None
        self.vocab_size, self.vocab_start = model.vocab_size, getattr(model, "vocab_start", 0)
        model.lm_head.chunk_tokens = cfg.train.loss_chunk_tokens
        self.z_loss, self.last_z_loss = cfg.train.z_loss, 0.0
        self._pipe_z: list = []  # pipelines: the z-loss terms of this step's micro batches (last stage)
        self.pipelined = p.pp > 1
        ds_config = build_ds_config(cfg, self.dp_size)
        if p.sp > 1:  # DeepSpeed counts sequence-parallel ranks as data-parallel ones: its batch arithmetic must agree
            ds_config["train_batch_size"] = cfg.train.global_batch_size * p.sp
        # Set from the tag being resumed, not from a config: a run resumed from a universal checkpoint saves
        # ordinary tags next to it, and its requeue must load those the ordinary way.
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": load_universal}
        if self.pipelined:
            from .parallel.pipe import build_pipeline_module

            module = build_pipeline_module(model, self.state, self.loss)
            self._pipe_head = next((m for m in module.modules() if hasattr(m, "head_loss")), None)  # last stage
            model.init_source = None  # the layer specs keep the (meta) model alive, not the source values
            del model  # every stage keeps only its own layers, allocated as DeepSpeed built them
            self.optimizer = build_optimizer(module, cfg.train)
            self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=ds_config)
        else:
            mpu = self.state if p.tp > 1 or p.sp > 1 else None
            if p.zero_stage == 3:
                materialize_partitioned(model, ds_config, self.dp_group if mpu else None, mpu, cfg.train.precision)
            else:
                materialize(model)
            model.init_source = None
            offload = p.zero_stage == 3 and p.offload_optimizer
            self.optimizer = build_optimizer(model, cfg.train, offload=offload)
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config,
                                                        mpu=mpu)
        self.device = self.engine.device

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The pipeline's loss_fn, on the last stage: the head fused with the chunked (vocab-parallel when tp > 1)
        cross-entropy on the final hidden states, plus the z-loss term while training."""
        ce, lse_sq = self._pipe_head.head_loss(hidden, labels)
        if self.z_loss and torch.is_grad_enabled():
            self._pipe_z.append(self.z_loss * lse_sq.detach())
            return ce + self.z_loss * lse_sq
        return ce

    def _dp_mean(self, value: torch.Tensor) -> float:
        if self.replicas > 1:
            tdist.all_reduce(value, group=self.dp_group)
            value = value / self.replicas
        return value.item()

    def _micro_batches(self, batch: torch.Tensor, loss_mask: torch.Tensor | None = None):
        inputs, labels = batch[:, :-1], batch[:, 1:]
        if loss_mask is not None:
            labels = labels.masked_fill(loss_mask == 0, IGNORE)
        if self.state.sp > 1:  # this rank's slice of every sequence (Ulysses); attention all-to-alls the rest
            n = inputs.shape[1] // self.state.sp
            inputs, labels = inputs[:, self.start_pos:self.start_pos + n], labels[:, self.start_pos:self.start_pos + n]
        return iter(list(zip(inputs.to(self.device).split(self.micro), labels.to(self.device).split(self.micro))))

    def train_step(self, batch: torch.Tensor, loss_mask: torch.Tensor | None = None, skip_if=None) -> float:
        """One optimizer step on this rank's [per_rank, seq_len+1] tokens (and [per_rank, seq_len] loss mask);
        returns the global-batch mean loss.

        `skip_if(loss, grad_norm) -> bool` (train.skip_spikes): asked inside the optimizer step, once the gradient
        norm is known and before any update, with the same figures on every rank; True discards the step."""
        self.spike_skipped, self._spike_norm = False, None
        if skip_if is None:
            return self._train_step(batch, loss_mask)
        with ds_compat.decide_step(self.engine.optimizer, lambda norm: self._decide(skip_if, norm)) as skipped:
            loss = self._train_step(batch, loss_mask)
        self.spike_skipped = bool(skipped)
        return loss

    def _decide(self, skip_if, norm: float) -> bool:
        """The collective skip decision: the batch loss (all ranks), the test, then one vote so that every rank
        does alike."""
        if self.pipelined:
            loss = ds_compat.pipeline_batch_loss(self.engine)
        else:
            total, n = self._partial_loss
            loss = total[0].clone()
            if self.replicas > 1:
                tdist.all_reduce(loss, group=self.dp_group)
            loss = loss.item() / (n * self.replicas)
        flag = torch.tensor([1.0 if skip_if(loss, norm) else 0.0], device=self.device)
        if self.world > 1:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        self._spike_norm = norm
        return bool(flag.item())

    def _train_step(self, batch: torch.Tensor, loss_mask: torch.Tensor | None = None) -> float:
        if self.pipelined:
            self._pipe_z = []
            loss = float(self.engine.train_batch(self._micro_batches(batch, loss_mask)))
            if self.z_loss:  # every last-stage rank (tp x dp of them) holds its micro batches' terms
                z = torch.stack(self._pipe_z).mean() if self._pipe_z else torch.zeros((), device=self.device)
                tdist.all_reduce(z)
                self.last_z_loss = z.item() / (self.state.tp * self.dp_size)
                loss -= self.last_z_loss
            return loss
        if self._compile_timer:
            self._compile_timer.start()
        total = torch.zeros(2, device=self.device)
        chunks = list(self._micro_batches(batch, loss_mask))
        for inputs, labels in chunks:
            ce, lse_sq = self.engine(inputs, labels=labels, start_pos=self.start_pos)  # the head is in the loss
            z = self.z_loss * lse_sq
            self.engine.backward(ce + z if self.z_loss else ce)
            total += torch.stack([ce.detach(), z.detach()])
            self._partial_loss = (total, len(chunks))  # what a skip decision in the last step() reads
            self.engine.step()
        if self.replicas > 1:
            tdist.all_reduce(total, group=self.dp_group)
        total = total / (len(chunks) * self.replicas)
        if self._compile_timer:
            self._compile_timer.stop()
        self.last_z_loss = total[1].item()
        return total[0].item()

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor, loss_mask: torch.Tensor | None = None) -> float:
        if self.pipelined:
            n = -(-batch.shape[0] // self.micro)
            return float(self.engine.eval_batch(self._micro_batches(batch, loss_mask), num_micro_batches=n))
        self.engine.eval()
        losses = [self.engine(x, labels=y, start_pos=self.start_pos)[0] for x, y in self._micro_batches(batch, loss_mask)]
        self.engine.train()
        return self._dp_mean(torch.stack(losses).mean())

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every rank's parameters (its ZeRO-3 partition, TP shard, stage) are finite. Collective."""
        ok = all(bool(torch.isfinite(ds_compat.local_data(p)).all()) for p in self.engine.module.parameters())
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        if self.world > 1:
            tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        return bool(flag.item())

    def grad_norm(self) -> float | None:
        if getattr(self, "spike_skipped", False):  # DeepSpeed reports the skip as an infinite norm: the tested one
            return self._spike_norm
        gn = self.engine.get_global_grad_norm()
        return float(gn) if gn is not None else None

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, lr: float) -> None:
        """The LR of the next optimizer step (pipeline/optim.py computes it from the step)."""
        set_lr(self.optimizer, lr)

    def step_applied(self) -> bool:
        """False when DeepSpeed skipped the last optimizer step (an fp16 loss-scale overflow)."""
        applied = getattr(self.engine, "was_step_applied", None)
        return bool(applied()) if applied is not None else True

    def local_state_dict(self) -> dict:
        """This rank's parameters (its TP shard, its pipeline stage) under our model's names, on CPU.

        Collective under ZeRO-3 (every rank must call it)."""
        import deepspeed

        module = self.engine.module
        if self.pipelined:
            from .parallel.pipe import pipe_state_to_model

            out = {}
            for index, layer in ds_compat.local_pipeline_layers(module):
                if hasattr(layer, "state_dict"):
                    out.update(pipe_state_to_model(index, layer.state_dict(), self.cfg.model))
            return {k: v.detach().cpu().clone() for k, v in out.items()}
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.parallel.zero_stage == 3):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def full_state_dict(self) -> dict:
        """The whole unsharded model (vocabulary padding stripped), assembled on every rank. Collective.

        For checks and small models: every rank's shard travels to every rank."""
        from .parallel.tp import merge_tp_shards, strip_vocab_padding

        mine = (self.state.coord, self.local_state_dict())
        everyone = [None] * self.world
        tdist.all_gather_object(everyone, mine) if self.world > 1 else everyone.__setitem__(0, mine)
        stages: dict = {}
        for c, sd in everyone:
            if c.dp == 0 and c.sp == 0:
                stages.setdefault(c.tp, {}).update(sd)
        full = merge_tp_shards([stages[r] for r in sorted(stages)], self.cfg.model)
        return strip_vocab_padding(full, self.cfg.model)


def build_engine(cfg: RunConfig, init_state_dict: dict | None = None, load_universal: bool = False) -> TrainEngine:
    """The engine for cfg's layout; `init_state_dict` (a full unsharded state dict in our names, vocabulary
    padded or not) replaces the seeded initial weights, e.g. a converted Hugging Face model; `load_universal`:
    the checkpoint to load is a universal one (`convert reshape`)."""
    return TrainEngine(cfg, init_state_dict, load_universal)
