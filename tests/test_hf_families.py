"""Parity with `transformers` for each model family from-hf takes: a small random model of each (built from a
config with the family's features, no hub), converted by from-hf, gives transformers' logits (fp32, <= 1e-4) in
one process and under tensor parallelism (tp2, gloo); from-hf then to-hf gives identical tensors and the same
model_type; features our model lacks are refused in one line."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline import convert
from tests.dist_harness import run_distributed

VOCAB = 300
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, head_dim=16, bos_token_id=1, eos_token_id=2)
FAMILIES = {  # name: (transformers config class, its arguments)
    "llama3.1": ("LlamaConfig", dict(SMALL, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False,
                                     eos_token_id=[2, 7])),  # Llama 3.1 instruct lists several EOS ids
    "llama3.2-tied": ("LlamaConfig", dict(SMALL, rope_theta=500000.0, tie_word_embeddings=True,
                                          rope_scaling=dict(LLAMA3_ROPE, factor=32.0))),
    "llama-linear": ("LlamaConfig", dict(SMALL, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral": ("MistralConfig", dict(SMALL, sliding_window=4096, rope_theta=1e6, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(SMALL, rope_theta=1e6, tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(SMALL, rope_theta=1e6, tie_word_embeddings=False)),  # per-head q/k RMSNorm
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                                eos_token_id=2)),
}


def hf_model(family: str, **changes):
    """A random transformers model of `family`; every tensor random (biases and norms too, so that a mix-up of
    any two shows in the logits)."""
    import transformers

    cls, kwargs = FAMILIES[family]
    cfg = getattr(transformers, cls)(**{**kwargs, **changes})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name or ".ln_" in name else 0.0, 0.1 if p.dim() == 1 else 0.05)
    return model


@pytest.fixture(scope="module")
def all_converted(tmp_path_factory):
    """{family: (HF folder, HF model, from-hf checkpoint made without --config)}."""
    out = {}
    for family in FAMILIES:
        tmp = tmp_path_factory.mktemp(family)
        model = hf_model(family)
        model.save_pretrained(tmp / "hf")
        convert.main(["from-hf", str(tmp / "hf"), str(tmp / "ckpt")])
        out[family] = (tmp / "hf", model, tmp / "ckpt")
    return out


@pytest.fixture(params=list(FAMILIES))
def converted(request, all_converted):
    """(family, HF folder, HF model, from-hf checkpoint)."""
    return (request.param, *all_converted[request.param])


def tokens(n: int = 40):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(1))


def test_logits_equal_transformers(converted):
    from pipeline.generate import generate, load_model

    family, _, hf, ckpt = converted
    ours = load_model(str(ckpt))
    x = tokens()
    with torch.no_grad():
        want = hf(x).logits
        assert (ours(x) - want).abs().max().item() <= 1e-4, family
    prompt = x[0, :6].tolist()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, 6:].tolist()
    assert generate(ours, prompt, max_new_tokens=12, eod_id=None) == theirs


def _tp_logits(rank, world, ckpt: str, x):
    """This rank's model under tp=world (the trainer's path: meta model, weights as init source, apply_tp,
    materialize), and the full logits gathered from the vocab-parallel slices."""
    import torch.distributed as dist

    from pipeline.checkpoint import resolve_tag
    from pipeline.checkpoint.read import read_weights_only
    from pipeline.config import from_dict
    from pipeline.engine import init_source
    from pipeline.model import build_model
    from pipeline.parallel.groups import ParallelState
    from pipeline.parallel.tp import apply_tp, materialize

    tag = resolve_tag(ckpt)
    cfg = from_dict(json.loads(open(os.path.join(ckpt, tag, "run_config.json")).read()), check=False)
    model = build_model(cfg.model, seed=0, tp=world, device="meta")
    model.init_source = init_source(model, read_weights_only(ckpt, tag))
    apply_tp(model, ParallelState(world, 1))
    materialize(model)
    with torch.no_grad():
        local = model.eval()(x)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)[..., :cfg.model.vocab_size]


def _tp_errors(rank, world, cases: dict, x):
    """{family: max |our tp logits - transformers' logits|} (floats: the harness's queue takes small results)."""
    return {family: (_tp_logits(rank, world, ckpt, x) - want).abs().max().item()
            for family, (ckpt, want) in cases.items()}


def test_logits_equal_transformers_under_tp2(all_converted):
    """Every family in one 2-rank gloo group (one start-up for all)."""
    x = tokens(24)
    with torch.no_grad():
        cases = {family: (str(ckpt), hf(x).logits) for family, (_, hf, ckpt) in all_converted.items()}
    for errors in run_distributed(_tp_errors, 2, cases, x):
        assert set(errors) == set(FAMILIES)
        assert all(e <= 1e-4 for e in errors.values()), errors


def test_from_hf_then_to_hf_gives_identical_tensors(converted, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    family, hf_dir, hf, ckpt = converted
    convert.to_hf(str(ckpt), str(tmp_path / "back"))
    src = load_file(hf_dir / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(src), family
    for k, v in back.items():
        assert torch.equal(v, src[k]), k
    a, b = AutoConfig.from_pretrained(hf_dir), AutoConfig.from_pretrained(tmp_path / "back")
    keys = ("model_type", "architectures", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
            "max_position_embeddings", "n_positions", "sliding_window", "use_sliding_window")
    assert [getattr(a, k, None) for k in keys] == [getattr(b, k, None) for k in keys], family
    assert getattr(a, "rope_parameters", None) == getattr(b, "rope_parameters", None)
    # transformers 4.x reads the RoPE settings from these keys (5.x from rope_parameters)
    raw = json.loads((tmp_path / "back" / "config.json").read_text())
    if family != "gpt2":
        assert raw["rope_theta"] == a.rope_parameters["rope_theta"]
        assert (raw["rope_scaling"] or {}).get("factor") == a.rope_parameters.get("factor")
    x = tokens(16)
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
        assert torch.equal(again(x).logits, hf(x).logits)


@pytest.mark.parametrize("feature,architecture", [("qkv_bias", "Qwen2ForCausalLM"), ("qk_norm", "Qwen3ForCausalLM")])
def test_to_hf_of_our_own_model_picks_the_family_of_its_features(feature, architecture, tmp_path):
    """A model trained from scratch with model.qkv_bias exports as Qwen2, with model.qk_norm as Qwen3."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from pipeline.checkpoint import WEIGHTS_FILE, WEIGHTS_ONLY, commit
    from pipeline.config import ModelConfig, RunConfig
    from pipeline.model import build_model

    cfg = RunConfig()
    cfg.model = ModelConfig(arch="llama", num_layers=2, hidden_size=32, num_heads=4, kv_heads=2, ffn_hidden_size=64,
                            vocab_size=VOCAB, seq_len=32, init_std=0.3, **{feature: True})
    model = build_model(cfg.model, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases and norms away from 0 and 1, so that a lost one shows
                p.add_(torch.randn_like(p) * 0.3)
    tag = tmp_path / "ckpt" / "global_step0"
    tag.mkdir(parents=True)
    sd = {k: v[:VOCAB].clone() if "embed" in k or "lm_head" in k else v.clone() for k, v in model.state_dict().items()}
    save_file(sd, tag / WEIGHTS_FILE)
    (tag / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    (tag / WEIGHTS_ONLY).write_text("{}")
    commit(str(tmp_path / "ckpt"), "global_step0", {"step": 0, "weights_only": True})
    convert.to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture
    x = tokens(20)
    with torch.no_grad():
        assert (hf(x).logits - model.eval()(x)).abs().max().item() <= 1e-4


REFUSED = [  # (family, config changes, run config model keys or None, a fragment of the one-line error)
    ("mistral", dict(sliding_window=16), None, "sliding_window=16"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=64), None, "sliding_window=64"),
    ("llama3.1", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
     None, "RoPE scaling 'yarn'"),
    ("llama3.1", dict(attention_bias=True), None, "attention_bias=True"),
    ("llama3.1", dict(head_dim=32), None, "head_dim=32"),
    ("gpt2", dict(activation_function="relu"), None, "activation_function='relu'"),
    ("llama3.1", {}, {"arch": "llama", "hidden_size": 128}, "model.hidden_size"),
]


@pytest.mark.parametrize("family,changes,model_keys,fragment", REFUSED, ids=[r[3] for r in REFUSED])
def test_features_we_lack_are_refused_in_one_line(family, changes, model_keys, fragment, tmp_path, capsys):
    import yaml

    hf_model(family, **changes).save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    args = ["from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]
    if model_keys is not None:
        (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": model_keys}))
        args += ["--config", str(tmp_path / "run.yaml")]
    with pytest.raises(SystemExit) as e:
        convert.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert not (tmp_path / "ckpt").exists()


def test_mistral_window_shorter_than_the_hf_length_is_accepted_with_a_shorter_seq_len(tmp_path):
    """A sliding window >= model.seq_len is full attention: from-hf takes it when --config sets such a seq_len."""
    hf = hf_model("mistral", sliding_window=64)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "run.yaml").write_text("model: {seq_len: 64}\n")
    convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--config", str(tmp_path / "run.yaml")])
    from pipeline.generate import load_model

    x = tokens(64)
    with torch.no_grad():
        assert (load_model(str(tmp_path / "ckpt"))(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_training_without_the_hf_rope_scaling_is_refused(all_converted):
    """A run config that leaves out what the weights mean (here Llama 3.1's RoPE scaling) would train another
    model silently: resuming the from-hf checkpoint with it is refused, naming the key."""
    from pipeline.checkpoint import check_resumable
    from pipeline.checkpoint.read import read_run_config

    _, _, ckpt = all_converted["llama3.1"]
    cfg = read_run_config(str(ckpt / "global_step0"))
    check_resumable(cfg, "global_step0", None, None)  # the from-hf run config itself is fine
    cfg.model.rope_scaling = None
    with pytest.raises(ValueError, match="model.rope_scaling"):
        check_resumable(cfg, "global_step0", None, None)
