"""Each DeepSpeed internal the pipeline uses (pipeline/ds_compat.py), checked against the installed DeepSpeed:
an upgrade that moves one fails here, in a test named after it."""
from __future__ import annotations

import os

import pytest

from tests.dist_harness import run_distributed


def test_version_in_tested_range_and_refused_outside(monkeypatch):
    import deepspeed

    from pipeline import ds_compat

    ds_compat.check_version()  # the installed one is in range (requirements.txt pins the same range)
    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    with pytest.raises(ds_compat.DeepSpeedVersionError, match=r"DeepSpeed 0\.99\.0 is installed.*>=0\.17,<0\.20"):
        ds_compat.check_version()


def test_requirements_pin_matches_tested_range():
    from pipeline import ds_compat

    lo, hi = ds_compat.TESTED
    req = open(os.path.join(os.path.dirname(__file__), "..", "requirements.txt")).read()
    assert f"deepspeed>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}" in req


def test_topology_matches_our_groups():
    from pipeline import ds_compat
    from pipeline.parallel.groups import coord_of

    topo = ds_compat.topology(pp=2, tp=2, dp=3)
    for rank in range(12):
        ours, theirs = coord_of(rank, tp=2, pp=2, world=12), topo.get_coord(rank)
        assert (ours.pp, ours.dp, ours.tp) == (theirs.pipe, theirs.data, theirs.model)


def test_universal_info_keys_exist():
    from deepspeed.checkpoint import constants as c

    from pipeline import ds_compat

    info = ds_compat.universal_info(["a"], ["b"], ["c"], 10)
    assert info[c.TP_REPLICATED_PARAMETER_PATTERNS] == ["a"]
    assert info[c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] == ["b"]
    assert info[c.VOCABULARY_PARAMETER_PATTERNS] == ["c"] and info[c.ORIGINAL_VOCAB_SIZE] == 10
    assert ds_compat.UNIVERSAL_INFO == c.UNIVERSAL_CHECKPOINT_INFO


def _zero3_params(rank, world, tmp):
    """ZeRO-3 parameter attributes, then a real checkpoint's file names and keys."""
    import deepspeed
    import torch

    from pipeline import ds_compat

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    first = torch.nn.Linear(8, 6)
    deepspeed.zero.Init(module=first, config_dict_or_path=cfg)
    late = torch.nn.Parameter(torch.ones(4, 3))
    assert ds_compat.is_zero_param(first.weight) and not ds_compat.is_zero_param(late)
    ds_compat.convert_to_zero_parameters(first.weight, [late])
    out = {"zero_after_convert": ds_compat.is_zero_param(late), "full_shape": ds_compat.full_shape(first.weight),
           "local_numel": ds_compat.local_data(first.weight).numel()}
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    loss = engine(torch.randn(1, 8)).sum()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(tmp, tag="t")
    names = os.listdir(os.path.join(tmp, "t"))
    out["model_files"] = sorted(n for n in names if ds_compat.ZERO3_MODEL_FILE.match(n))
    out["optim_files"] = sorted(n for n in names if ds_compat.ZERO3_OPTIM_FILE.match(n))
    if rank == 0:
        states = torch.load(os.path.join(tmp, "t", out["model_files"][0]), weights_only=False)
        optim = torch.load(os.path.join(tmp, "t", out["optim_files"][0]), weights_only=False)[ds_compat.OPTIMIZER_STATE]
        out["param_shapes"] = [dict(g) for g in states[ds_compat.PARAM_SHAPES]]
        out["partition_count"] = optim[ds_compat.PARTITION_COUNT]
        out["flat_groups"] = len(optim[ds_compat.FP32_FLAT_GROUPS])
        out["shared_key"] = ds_compat.SHARED_PARAMS in states and ds_compat.FROZEN_PARAM_SHAPES in states
    return out


def test_zero3_parameters_and_checkpoint_keys(tmp_path):
    rank0, rank1 = run_distributed(_zero3_params, 2, str(tmp_path))
    assert rank0["zero_after_convert"] and rank0["full_shape"] == (6, 8)
    assert rank0["local_numel"] == 24  # 48 values cut between 2 ranks
    assert len(rank0["model_files"]) == 2 and len(rank0["optim_files"]) == 2
    assert rank0["partition_count"] == 2 and rank0["flat_groups"] >= 1 and rank0["shared_key"]
    shapes = {k: tuple(v) for g in rank0["param_shapes"] for k, v in g.items()}
    assert shapes == {"0.weight": (8, 8), "0.bias": (8,), "1.weight": (2, 8), "1.bias": (2,)}


def _pipeline_layers(rank, world):
    import deepspeed
    import torch
    from deepspeed.pipe import LayerSpec, PipelineModule

    from pipeline import ds_compat

    deepspeed.init_distributed(dist_backend="gloo")
    layers = [LayerSpec(torch.nn.Linear, 4, 4) for _ in range(4)]
    module = PipelineModule(layers=layers, topology=ds_compat.topology(pp=2, tp=1, dp=1), partition_method="uniform")
    return [index for index, _ in ds_compat.local_pipeline_layers(module)]


def test_local_pipeline_layers():
    assert run_distributed(_pipeline_layers, 2) == [[0, 1], [2, 3]]


def test_model_file_patterns():
    from pipeline import ds_compat

    assert ds_compat.MODEL_FILE.match("mp_rank_01_model_states.pt").group(1) == "01"
    assert ds_compat.PIPE_LAYER_FILE.match("layer_03-model_01-model_states.pt").groups() == ("03", "01")
    assert ds_compat.PIPE_LAYER_FILE.match("layer_03-model_states.pt").groups() == ("03", None)
    assert ds_compat.ZERO3_OPTIM_FILE.match("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
