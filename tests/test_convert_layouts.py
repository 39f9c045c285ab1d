"""to-hf and reshape from every parallel layout the trainer writes, proven by numbers.

A tiny model is trained for 4 steps under each layout (checkpoints at steps 2 and 4), then:
- to-hf: transformers (1) reproduces the validation loss the trainer logged after its last step, (2) gives our
  unsharded model's logits (fp32, max abs diff <= 1e-4) and (3) the same greedy tokens;
- reshape (tp2 -> tp1, pp2 -> pp1) of step 2, resumed in one process: the first loss (step 3) is the straight
  run's within 1e-4, and the next one (which also depends on the moved Adam state) within 2e-4."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.conftest import run_cli, torchrun

STEPS = 4
LAYOUTS = [  # (name, processes, arch, ZeRO stage, overrides, reshape target (tp, pp) or None)
    # ZeRO-3 across 2 data-parallel ranks is exported and checked against transformers in tests/test_e2e.py
    ("zero1-dp2", 2, "gpt", 1, [], None),
    ("tp2-zero3", 2, "llama", 3, ["parallel.tp=2"], (1, 1)),
    ("pp2-zero1", 2, "gpt", 1, ["parallel.pp=2"], (1, 1)),
    ("pp2-tp2-zero1", 4, "llama", 1, ["parallel.pp=2", "parallel.tp=2"], None),
]
RESHAPES = [layout for layout in LAYOUTS if layout[5]]
_RUNS = {}  # layout name -> its run folder: each layout is trained once for both tests

def layout_config(tmp, token_dir, arch: str, **model_keys) -> str:
    # 1024 tokens padded to a multiple of 96·tp (1056 rows, 1152 under tp2): export must cut the padding off
    model = {"arch": arch, "num_layers": 2, "hidden_size": 64, "num_heads": 4, "seq_len": 32,
             "make_vocab_size_divisible_by": 96, **model_keys}
    if arch == "llama":
        model.update(kv_heads=2, ffn_hidden_size=160)
    cfg = {"model": model,
           "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}], "split": "90,10,0"},
           "train": {"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1,
                     "eval_interval": STEPS, "eval_iters": 1},
           "checkpoint": {"dir": str(tmp / "ckpt"), "interval": STEPS // 2},
           "log": {"interval": 1, "jsonl": str(tmp / "log.jsonl")}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train_layout(layout, tmp_path_factory, token_dir):
    name, nproc, arch, zero, overrides, _ = layout
    if name not in _RUNS:
        tmp = tmp_path_factory.mktemp(name)
        torchrun(nproc, "-m", "pipeline.train", "--config", layout_config(tmp, token_dir, arch),
                 f"parallel.zero_stage={zero}", *overrides)
        _RUNS[name] = tmp
    return _RUNS[name]


def logged(path) -> tuple[dict, dict]:
    """({step: train loss}, {step: valid loss}) of a log.jsonl."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in rows if "split" not in r},
            {r["step"]: r["loss"] for r in rows if r.get("split") == "valid"})


def valid_batches(ckpt_tag_dir):
    """The validation batches the trainer evaluated on, rebuilt from the checkpoint's run config."""
    from pipeline.config import from_dict
    from pipeline.data import TokenDocuments, batch_for_rank, build_datasets

    cfg = from_dict(json.loads((ckpt_tag_dir / "run_config.json").read_text()))
    _, valid = build_datasets(cfg, [TokenDocuments(d.path) for d in cfg.data.datasets])
    return [torch.from_numpy(batch_for_rank(valid, k, cfg.train.global_batch_size, 0, 1))
            for k in range(cfg.train.eval_iters)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_export_reproduces_the_trained_model(layout, tmp_path_factory, token_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.convert import to_hf
    from pipeline.generate import generate, load_model

    trained = train_layout(layout, tmp_path_factory, token_dir)
    to_hf(str(trained / "ckpt"), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    arch = json.loads((trained / "ckpt" / f"global_step{STEPS}" / "run_config.json").read_text())["model"]["arch"]
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "gpt": "GPT2LMHeadModel"}[arch]
    assert hf.config.vocab_size == 1024  # the tensor-parallel vocab padding is gone

    want = logged(trained / "log.jsonl")[1][STEPS]
    with torch.no_grad():
        losses = [F.cross_entropy(hf(b[:, :-1]).logits.flatten(0, 1), b[:, 1:].flatten()).item()
                  for b in valid_batches(trained / "ckpt" / f"global_step{STEPS}")]
    assert abs(sum(losses) / len(losses) - want) <= 1e-4, (losses, want)

    ours = load_model(str(trained / "ckpt"))
    x = valid_batches(trained / "ckpt" / f"global_step{STEPS}")[0][:, :-1]
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
    prompt = x[0, :8].tolist()
    mine = generate(ours, prompt, max_new_tokens=16, eod_id=None)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, 8:].tolist()
    assert mine == theirs


@pytest.mark.parametrize("layout", RESHAPES, ids=[layout[0] for layout in RESHAPES])
def test_reshape_then_resume_continues_the_loss(layout, tmp_path_factory, token_dir, tmp_path):
    trained = train_layout(layout, tmp_path_factory, token_dir)
    _, _, _, zero, _, (tp, pp) = layout
    out = tmp_path / "reshaped"
    run_cli("-m", "pipeline.convert", "reshape", trained / "ckpt", out, "--tp", str(tp), "--pp", str(pp),
            "--tag", f"global_step{STEPS // 2}")
    assert (out / "latest").read_text() == f"global_step{STEPS // 2}"
    run_cli("-m", "pipeline.train", "--config", trained / "run.yaml", f"parallel.zero_stage={zero}",
            f"parallel.tp={tp}", f"parallel.pp={pp}", f"checkpoint.dir={out}",
            f"log.jsonl={tmp_path / 'resumed.jsonl'}")
    train, train2 = logged(trained / "log.jsonl")[0], logged(tmp_path / "resumed.jsonl")[0]
    assert sorted(train2) == [3, 4]
    assert abs(train2[3] - train[3]) <= 1e-4, (train2, train)
    assert abs(train2[4] - train[4]) <= 2e-4, (train2, train)


FREEZE_LAYOUTS = [  # (name, processes, ZeRO stage, overrides); 4 blocks, the bottom one frozen
    ("dp2-zero3", 2, 3, []),
    ("tp2-zero3", 2, 3, ["parallel.tp=2"]),
    ("pp2-tp2-zero1", 4, 1, ["parallel.pp=2", "parallel.tp=2"]),  # stage 0: embeddings, block 0 frozen, block 1
]


@pytest.mark.parametrize("layout", FREEZE_LAYOUTS, ids=[f[0] for f in FREEZE_LAYOUTS])
def test_from_hf_starts_a_run_with_frozen_layers(layout, tmp_path, token_dir):
    """An HF Llama 3.1 (llama3 RoPE scaling) → from-hf → a run with train.freeze_layers=1 in each layout: the
    first loss is the HF model's loss on the first batch, and after training the embeddings and block 0 still
    equal the HF weights bit for bit (exported from the layout's files), while the rest has moved."""
    import transformers
    from safetensors.torch import load_file

    from pipeline.convert import to_hf

    name, nproc, zero, overrides = layout
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    hf_cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False, initializer_range=0.05, rope_theta=500000.0,
                                      rope_scaling=dict(rope))  # transformers adds to the dict it is given
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg = layout_config(tmp_path, token_dir, "llama", num_layers=4, rope_theta=500000.0, rope_scaling=rope,
                        norm_eps=1e-6)
    run_cli("-m", "pipeline.convert", "from-hf", tmp_path / "hf", tmp_path / "ckpt", "--config", cfg)
    torchrun(nproc, "-m", "pipeline.train", "--config", cfg, "train.steps=2", "train.freeze_layers=1",
             "train.eval_interval=0", f"parallel.zero_stage={zero}", *overrides)

    from pipeline.config import from_dict
    from pipeline.data import TokenDocuments, batch_for_rank, build_datasets

    run = from_dict(json.loads((tmp_path / "ckpt" / "global_step2" / "run_config.json").read_text()))
    train, _ = build_datasets(run, [TokenDocuments(d.path) for d in run.data.datasets])
    batch = torch.from_numpy(batch_for_rank(train, 0, run.train.global_batch_size, 0, 1))
    with torch.no_grad():
        want = F.cross_entropy(hf(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert abs(logged(tmp_path / "log.jsonl")[0][1] - want) <= 1e-4

    to_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    before, after = hf.state_dict(), load_file(tmp_path / "out" / "model.safetensors")
    for name, t in after.items():
        frozen = name == "model.embed_tokens.weight" or name.startswith("model.layers.0.")
        assert torch.equal(t, before[name]) == frozen, name


def test_a_pipeline_stage_with_nothing_to_train_is_refused():
    """freeze_layers covering the whole first stage would leave DeepSpeed's pipeline optimizer an empty group: the
    configuration is refused in one line before start-up."""
    from pipeline.config import find_problems, from_dict

    cfg = from_dict({"model": {"num_layers": 4}, "parallel": {"pp": 2, "zero_stage": 1},
                     "train": {"freeze_layers": 2}}, check=False)
    assert any("nothing to train" in p and "fewer than 2" in p for p in find_problems(cfg))
    cfg.train.freeze_layers = 1
    assert not [p for p in find_problems(cfg) if "freeze_layers" in p]
