"""Run config parsing and the trainer's small pure pieces. Bad inputs, each refused in one line, are the table in
test_bad_inputs_pipeline.py."""
import pytest

from pipeline.config import DatasetEntry, load_config


def test_overrides_parse_lists_and_scalars(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["train.steps=7", "data.datasets=[{path: d1, weight: 2}]",
                                            "train.lr=1e-3"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3
    assert cfg.data.datasets == [DatasetEntry("d1", 2.0)]
    assert load_config("configs/tiny.yaml", ["data.datasets=[{path: d1}]"]).data.datasets[0].weight == 1.0


@pytest.mark.parametrize("overrides,expected", [
    ([], {"kv_heads": 2, "ffn_hidden_size": 384, "tie_embeddings": False}),  # tiny.yaml: llama, h128, kv 2
    (["model.hidden_size=256", "model.ffn_hidden_size=null"], {"ffn_hidden_size": 768}),  # 8h/3 up to 256
    (["model.arch=gpt", "model.kv_heads=null", "model.ffn_hidden_size=null"],
     {"kv_heads": 4, "ffn_hidden_size": 512, "tie_embeddings": True}),
    (["model.ffn_hidden_size=100"], {"ffn_hidden_size": 100}),
])
def test_model_defaults_are_resolved_once_from_the_final_values(overrides, expected):
    """load_config resolves the arch-dependent defaults; nothing downstream fills them in again."""
    m = load_config("configs/tiny.yaml", overrides).model
    assert {k: getattr(m, k) for k in expected} == expected


def test_config_round_trips_through_its_dict():
    """A checkpoint's run_config.json (to_dict) loads back into the same config, dataset entries included."""
    from pipeline.config import from_dict

    cfg = load_config("configs/tiny.yaml", ["data.datasets=[{path: a, weight: 3}, {path: b}]"])
    assert from_dict(cfg.to_dict()) == cfg


def test_zero3_with_pipeline_refused():
    with pytest.raises(ValueError, match="pipeline"):
        load_config("configs/tiny.yaml", ["parallel.pp=2", "parallel.zero_stage=3"])


@pytest.mark.parametrize("loss,grad_norm,precision,on_nonfinite,applied,expected", [
    (2.0, 1.0, "fp32", "stop", True, "ok"),
    (2.0, float("inf"), "fp32", "stop", False, "stop"),  # fp32: DeepSpeed skipped it silently; the run diverged
    (float("nan"), 1.0, "bf16", "stop", True, "stop"),
    (2.0, float("inf"), "fp16", "stop", False, "overflow"),  # routine for the loss scaler: never a stop
    (2.0, 1.0, "fp16", "stop", False, "overflow"),
    (2.0, 1.0, "fp16", "stop", True, "ok"),
    (float("nan"), float("nan"), "fp16", "skip", False, "skip"),
    (float("nan"), float("nan"), "fp16", "stop", False, "stop"),
])
def test_nonfinite_action(loss, grad_norm, precision, on_nonfinite, applied, expected):
    from pipeline.loop import nonfinite_action

    assert nonfinite_action(loss, grad_norm, precision, on_nonfinite, applied) == expected


def test_mfu_peaks_tell_pcie_and_nvl_parts_apart():
    from pipeline.metrics import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_layout_change_rules(tmp_path):
    """What a resume into another layout is told, from the tag's run_config.json and commit marker alone."""
    import json

    from pipeline.checkpoint import layout_change

    tag = tmp_path / "global_step2"
    tag.mkdir()
    (tag / "run_config.json").write_text(json.dumps({"parallel": {"tp": 1, "pp": 1, "zero_stage": 3}}))
    (tag / "COMMITTED").write_text(json.dumps({"world_size": 2}))
    same = {"tp": 1, "pp": 1, "zero_stage": 3}
    assert layout_change(str(tmp_path), tag.name, same, 2) is None
    assert "dp 2 -> 1" in layout_change(str(tmp_path), tag.name, same, 1)
    assert "convert reshape" in layout_change(str(tmp_path), tag.name, same, 4)
    assert layout_change(str(tmp_path), tag.name, same, None) is None  # world size unknown before start-up
    assert "tp 1 -> 2" in layout_change(str(tmp_path), tag.name, {**same, "tp": 2}, 2)
    assert "ZeRO-3 and ZeRO-0/1/2" in layout_change(str(tmp_path), tag.name, {**same, "zero_stage": 1}, 2)
    (tag / "UNIVERSAL").write_text("")
    assert layout_change(str(tmp_path), tag.name, {**same, "tp": 1}, 8) is None  # universal: any sizes
    assert "ZeRO-3 and ZeRO-0/1/2" in layout_change(str(tmp_path), tag.name, {**same, "zero_stage": 1}, 2)


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"WORLD_SIZE": "8"}, 8),
    ({"MV2_COMM_WORLD_SIZE": "16"}, 16),
    ({"PMIX_RANK": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}, 4),  # srun --mpi=pmix
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}, None),  # a batch shell, not a step: no size
])
def test_world_size_from_env(monkeypatch, env, expected):
    from pipeline.dist import world_size_from_env

    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_ID",
                "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert world_size_from_env(default=None) == expected
