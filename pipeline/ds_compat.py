"""Every use of DeepSpeed internals, in one place, behind a version check.

The trainer relies on a few DeepSpeed details that are not public API: ZeRO-3 parameter attributes, the
pipeline module's local layers, the 3D topology class, the key names inside checkpoint files, and the
universal-checkpoint constants. They are read here and nowhere else, so that a DeepSpeed upgrade that moves one
fails in this module, with one message naming the version range this project was tested with
(tests/test_ds_compat.py has a test per use).
"""
from __future__ import annotations

import contextlib
import re

TESTED = ((0, 17), (0, 20))  # [from, to): the DeepSpeed versions these uses were checked against

# Checkpoint file names DeepSpeed writes (per tag folder).
ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
ZERO3_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
PIPE_LAYER_FILE = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")

# Keys inside those files.
MODULE = "module"                          # mp_rank_XX_model_states.pt: the whole module's state dict
OPTIMIZER_STATE = "optimizer_state_dict"   # *_optim_states.pt
PARTITION_COUNT = "partition_count"        # ZeRO: the data-parallel size the state was cut for
FP32_FLAT_GROUPS = "fp32_flat_groups"      # ZeRO-3: [group] flat fp32 partition of this rank
PARAM_SHAPES = "param_shapes"              # ZeRO-3 model states: [group] {name: full shape}, in flat order
FROZEN_PARAM_SHAPES = "frozen_param_shapes"
FROZEN_PARAM_FRAGMENTS = "frozen_param_fragments"
SHARED_PARAMS = "shared_params"
UNIVERSAL_INFO = "universal_checkpoint_info"


class DeepSpeedVersionError(RuntimeError):
    pass


def version() -> tuple[int, int]:
    import deepspeed

    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", deepspeed.__version__).groups())
    return major, minor


def check_version() -> None:
    """Raise one clear line when the installed DeepSpeed is outside the tested range."""
    v = version()
    if not (TESTED[0] <= v < TESTED[1]):
        import deepspeed

        raise DeepSpeedVersionError(
            f"DeepSpeed {deepspeed.__version__} is installed; this pipeline uses DeepSpeed internals checked with "
            f">={TESTED[0][0]}.{TESTED[0][1]},<{TESTED[1][0]}.{TESTED[1][1]} (pipeline/ds_compat.py): install a "
            f"version in that range (pip install -r requirements.txt)")


# ---- ZeRO-3 parameters ----------------------------------------------------------------------------------------
def is_zero_param(p) -> bool:
    """Whether DeepSpeed's ZeRO-3 has already partitioned `p`."""
    from deepspeed.runtime.zero.utils import is_zero_param as _is_zero_param

    return _is_zero_param(p)


def full_shape(p) -> tuple:
    """A parameter's full shape, also when ZeRO-3 has partitioned it (its `.shape` is then empty)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def local_data(p):
    """The values this rank holds: its ZeRO-3 partition, or the whole tensor."""
    return getattr(p, "ds_tensor", p.data)


def convert_to_zero_parameters(partitioned, params: list) -> None:
    """Partition `params` with the same ZeRO-3 settings (groups, offload, dtype) as the already partitioned
    parameter `partitioned` (the one zero.Init made)."""
    partitioned.convert_to_zero_parameters(param_list=params)


# ---- pipeline module -------------------------------------------------------------------------------------------
def local_pipeline_layers(module):
    """(global layer index, layer) of the layers a PipelineModule built on this stage."""
    start = module._local_start
    return [(start + i, layer) for i, layer in enumerate(module.forward_funcs)]


def topology(pp: int, tp: int, dp: int):
    """DeepSpeed's 3D rank grid (axes pipe, data, model: tensor-parallel ranks adjacent)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)


# ---- universal checkpoints -------------------------------------------------------------------------------------
def universal_info(replicated: list[str], row_parallel: list[str], vocab: list[str], vocab_size: int) -> dict:
    """The `universal_checkpoint_info` DeepSpeed's ds_to_universal reads to merge tensor-parallel shards."""
    from deepspeed.checkpoint import constants as c

    return {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            c.TP_REPLICATED_PARAMETER_PATTERNS: replicated, c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
            c.VOCABULARY_PARAMETER_PATTERNS: vocab, c.ORIGINAL_VOCAB_SIZE: vocab_size}


# ---- one optimizer step decided on its figures (train.skip_spikes) -------------------------------------------------
@contextlib.contextmanager
def decide_step(optimizer, decide):
    """Within: the next step() of the ZeRO optimizer `optimizer` (stage 1-3) computes its global gradient norm as
    usual, then calls `decide(norm)` (unscaled; the same on every rank). When that returns True the step is
    discarded through DeepSpeed's own skipped-step path, the one fp16 overflows take: gradients cleared,
    parameters and optimizer state untouched, the engine's `skipped_steps` counted. The loss scaler is left as it
    was: a skipped spike is no overflow."""
    import torch
    from deepspeed.runtime.utils import combine_grad_norm_groups
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
        raise TypeError(f"decide_step needs a ZeRO optimizer, got {type(optimizer).__name__}")
    zero3 = isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3)
    name = "_get_norm_groups" if zero3 else "scaled_global_norm"  # what step() calls for the norm
    real, scaler = getattr(optimizer, name), dict(vars(optimizer.loss_scaler))
    skipped = []

    def norm_then_decide(*args, **kwargs):
        out = real(*args, **kwargs)
        norm = combine_grad_norm_groups(out) if zero3 else out
        if not decide(float(norm) / optimizer.loss_scale):
            return out
        skipped.append(True)
        inf = torch.full_like(norm, float("inf"))  # an invalid norm: step() discards the update
        return [inf] if zero3 else inf

    setattr(optimizer, name, norm_then_decide)
    check = getattr(optimizer, "check_grad_overflow", None)
    if not zero3:  # ZeRO-1/2 in bf16 acts on an invalid norm only with this set
        optimizer.check_grad_overflow = True
    try:
        yield skipped
    finally:
        delattr(optimizer, name)  # the class's method again
        if not zero3:
            optimizer.check_grad_overflow = check
        if skipped:
            vars(optimizer.loss_scaler).update(scaler)


def pipeline_batch_loss(engine) -> float:
    """Inside a pipeline engine's optimizer step: the batch's loss, averaged over micro batches and data-parallel
    ranks and sent from the last stage to every stage (what train_batch returns afterwards). Collective."""
    return float(engine._aggregate_total_loss())
