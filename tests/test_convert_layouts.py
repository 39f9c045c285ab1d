"""to-hf from every parallel layout the trainer writes, proven by numbers: a tiny model trained under each layout
is exported, and transformers (1) reproduces the validation loss the trainer logged after its last step,
(2) gives our unsharded model's logits (fp32, max abs diff <= 1e-4) and (3) the same greedy tokens."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.conftest import torchrun

STEPS = 4
LAYOUTS = [  # (name, processes, arch, overrides)
    ("zero3-dp2", 2, "llama", ["parallel.zero_stage=3"]),
    ("zero1-dp2", 2, "gpt", ["parallel.zero_stage=1"]),
    ("tp2-zero3", 2, "llama", ["parallel.tp=2", "parallel.zero_stage=3"]),
    ("pp2-zero1", 2, "gpt", ["parallel.pp=2", "parallel.zero_stage=1"]),
    ("pp2-tp2-zero1", 4, "llama", ["parallel.pp=2", "parallel.tp=2", "parallel.zero_stage=1"]),
]


def layout_config(tmp, token_dir, arch: str) -> str:
    model = {"arch": arch, "num_layers": 2, "hidden_size": 64, "num_heads": 4, "seq_len": 32}
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


@pytest.fixture(scope="module", params=LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def trained(request, tmp_path_factory, token_dir):
    name, nproc, arch, overrides = request.param
    tmp = tmp_path_factory.mktemp(name)
    cfg = layout_config(tmp, token_dir, arch)
    torchrun(nproc, "-m", "pipeline.train", "--config", cfg, *overrides)
    return tmp


def valid_batches(ckpt_tag_dir):
    """The validation batches the trainer evaluated on, rebuilt from the checkpoint's run config."""
    from pipeline.config import from_dict
    from pipeline.data import TokenDocuments, batch_for_rank, build_datasets

    cfg = from_dict(json.loads((ckpt_tag_dir / "run_config.json").read_text()))
    _, valid = build_datasets(cfg, [TokenDocuments(d["path"]) for d in cfg.data.datasets])
    return [torch.from_numpy(batch_for_rank(valid, k, cfg.train.global_batch_size, 0, 1))
            for k in range(cfg.train.eval_iters)]


def test_export_reproduces_the_trained_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.convert import to_hf
    from pipeline.generate import generate, load_model

    to_hf(str(trained / "ckpt"), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    arch = json.loads((trained / "ckpt" / f"global_step{STEPS}" / "run_config.json").read_text())["model"]["arch"]
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "gpt": "GPT2LMHeadModel"}[arch]
    assert hf.config.vocab_size == 1024  # the tensor-parallel vocab padding is gone

    logged = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    want = [r for r in logged if r.get("split") == "valid" and r["step"] == STEPS][0]["loss"]
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
