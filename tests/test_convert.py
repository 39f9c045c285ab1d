"""Conversion without training: random tiny HF models (built from a config, no hub) through from-hf and to-hf,
sharded and bf16 exports, the tokenizer, and one-line errors for bad input."""
import json
import os
import shutil

import pytest
import torch
import yaml

from pipeline import convert
from pipeline.checkpoint.read import read_weights_only

VOCAB = 300


def hf_model(arch: str):
    import transformers

    torch.manual_seed(0)
    if arch == "llama":  # grouped-query attention, untied head
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def run_config(path, **model):
    path.write_text(yaml.safe_dump({"model": model, "data": {"datasets": [{"path": "unused", "weight": 1}]}}))
    return str(path)


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `python -m pipeline.convert ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        convert.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def load_dir(d) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(d, f)))
    return sd


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def hf_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf_model(request.param).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    """from-hf of each random HF model: (hf_dir, ckpt, run config)."""
    tmp = tmp_path_factory.mktemp("imported")
    arch = "llama" if "llama" in hf_dir.name else "gpt"
    cfg = run_config(tmp / "run.yaml", arch=arch, num_layers=2, dropout=0.0)
    convert.main(["from-hf", str(hf_dir), str(tmp / "ckpt"), "--config", cfg])
    return hf_dir, tmp / "ckpt", cfg


def test_from_hf_then_to_hf_gives_identical_tensors(imported, tmp_path):
    from transformers import AutoConfig

    hf_dir, ckpt, _ = imported
    tag = ckpt / "global_step0"
    assert (ckpt / "latest").read_text() == "global_step0"
    assert {"model.safetensors", "run_config.json", "COMMITTED", "WEIGHTS_ONLY"} <= set(os.listdir(tag))
    sd = read_weights_only(str(ckpt), "global_step0")  # what the trainer loads
    assert sd["embed_tokens.weight"].shape == (VOCAB, 64) and "layers.1.attn.q_proj.weight" in sd

    convert.to_hf(str(ckpt), str(tmp_path / "back"))
    src, back = load_dir(hf_dir), load_dir(tmp_path / "back")
    src = {k: v for k, v in src.items() if not k.endswith((".attn.bias", ".masked_bias"))}
    assert set(back) == set(src) - {"lm_head.weight"} if "gpt2" in hf_dir.name else set(back) == set(src)
    for k, v in back.items():
        assert torch.equal(v, src[k]), k
    a, b = AutoConfig.from_pretrained(hf_dir), AutoConfig.from_pretrained(tmp_path / "back")
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "n_inner", "tie_word_embeddings"):
        assert getattr(a, key, None) == getattr(b, key, None) or key == "n_inner", key
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] is not None


def test_weights_only_checkpoint_runs_like_the_hf_model(imported):
    """Our model from the step-0 checkpoint (as generate loads it) gives the HF logits and greedy tokens."""
    from transformers import AutoModelForCausalLM

    from pipeline.generate import generate, load_model

    hf_dir, ckpt, _ = imported
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours = load_model(str(ckpt))  # a weights-only tag, as generate reads it
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
    prompt = x[0, :6].tolist()
    mine = generate(ours, prompt, max_new_tokens=20, eod_id=None)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, 6:].tolist()
    assert mine == theirs


def test_from_hf_refuses_differing_shape_keys(hf_dir, tmp_path, capsys):
    arch = "llama" if "llama" in hf_dir.name else "gpt"
    cfg = run_config(tmp_path / "run.yaml", arch=arch, hidden_size=128, num_layers=3)
    code, _, err = cli(capsys, "from-hf", hf_dir, tmp_path / "ckpt", "--config", cfg)
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1
    assert "model.hidden_size" in err and "model.num_layers" in err
    assert not (tmp_path / "ckpt").exists() and os.listdir(tmp_path) == ["run.yaml"]


def test_sharded_bf16_export_loads_in_transformers(imported, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt, _ = imported
    out = tmp_path / "sharded"
    code, _, err = cli(capsys, "to-hf", ckpt, out, "--dtype", "bf16", "--max-shard-size", str(60_000 / 2**30))
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in load_dir(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        a, b = hf(x).logits, back(x).logits
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()  # bf16 rounding only
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "temporary folder left behind"


def test_tokenizer_round_trip(tokenizer_model, imported, tmp_path):
    """The exported tokenizer (AutoTokenizer) encodes exactly as our SentencePiece model, and decodes back."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    _, ckpt, _ = imported
    work = tmp_path / "ckpt"
    shutil.copytree(ckpt, work)
    shutil.copy(tokenizer_model, work / "tokenizer.model")
    convert.to_hf(str(work), str(tmp_path / "hf"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    for text in ["The import statement finds a module.\n  Indented 123 ünïcode", "a  b\t\tc", "", " lead"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == sp.eos_id()
    # conventions transformers users rely on: a pad id in config.json (batched sequence classification), and a
    # model_max_length that truncation=True can trust
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["pad_token_id"] == sp.pad_id() == tok.pad_token_id
    run = json.loads((ckpt / "global_step0" / "run_config.json").read_text())
    assert tok.model_max_length == run["model"]["seq_len"]
    assert len(tok("word " * 500, truncation=True)["input_ids"]) == run["model"]["seq_len"]


def test_trainer_keeps_an_hf_tokenizer_beside_the_checkpoints(imported, tmp_path):
    """loop.copy_tokenizer: the data's HF tokenizer (a folder or a bare tokenizer.json, as the manifest records
    it) lands in CKPT/tokenizer/ unchanged, and to-hf then exports it (a bare tokenizer.json with its EOS named)."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from pipeline.loop import copy_tokenizer

    vocab = {w: i for i, w in enumerate(["<unk>", "<|endoftext|>", "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|endoftext|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "folder")
    _, ckpt, _ = imported
    for kind, src in [("folder", tmp_path / "folder"), ("file", tmp_path / "tokenizer.json")]:
        work = tmp_path / f"ckpt-{kind}"
        shutil.copytree(ckpt, work)
        shutil.rmtree(work / "tokenizer", ignore_errors=True)
        shutil.rmtree(work / "hf_source")
        docs = [SimpleNamespace(tokenizer={"kind": "hf", "path": str(src)})]
        copy_tokenizer(SimpleNamespace(checkpoint=SimpleNamespace(dir=str(work))), docs)
        names = sorted(os.listdir(work / "tokenizer"))
        assert names == (sorted(os.listdir(src)) if kind == "folder" else ["tokenizer.json"])
        for name in names:
            assert (work / "tokenizer" / name).read_bytes() == ((src / name) if kind == "folder" else src).read_bytes()
        convert.to_hf(str(work), str(tmp_path / f"hf-{kind}"))
        tok = AutoTokenizer.from_pretrained(tmp_path / f"hf-{kind}")
        assert tok("hello world")["input_ids"] == [2, 3] and tok.eos_token == "<|endoftext|>"
        assert json.loads((tmp_path / f"hf-{kind}" / "config.json").read_text())["eos_token_id"] == 1


BAD_INPUTS = [  # (name, how to spoil a good checkpoint or HF folder, the command)
    ("missing tag", None, lambda c, h, o, cfg: ["to-hf", c, o, "--tag", "global_step7"]),
    ("no checkpoint", None, lambda c, h, o, cfg: ["to-hf", o.parent / "nothing", o]),
    ("truncated shard", "truncate", lambda c, h, o, cfg: ["to-hf", c, o]),
    ("missing shard", "delete", lambda c, h, o, cfg: ["to-hf", c, o]),
    ("unknown arch", "arch", lambda c, h, o, cfg: ["to-hf", c, o]),
    ("HF folder of another model type", "bert", lambda c, h, o, cfg: ["from-hf", h, o, "--config", cfg]),
    ("HF folder with a truncated shard", "hf-truncate", lambda c, h, o, cfg: ["from-hf", h, o, "--config", cfg]),
]


@pytest.mark.parametrize("name,spoil,command", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_line_error_and_writes_nothing(name, spoil, command, imported, tmp_path, capsys):
    hf_src, ckpt_src, cfg = imported
    ckpt, hf = tmp_path / "ckpt", tmp_path / "hf"
    shutil.copytree(ckpt_src, ckpt)
    shutil.copytree(hf_src, hf)
    weights = ckpt / "global_step0" / "model.safetensors"
    if spoil == "truncate":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif spoil == "delete":
        weights.unlink()
    elif spoil == "arch":
        rc = json.loads((ckpt / "global_step0" / "run_config.json").read_text())
        rc["model"]["arch"] = "mamba"
        (ckpt / "global_step0" / "run_config.json").write_text(json.dumps(rc))
    elif spoil == "bert":
        c = json.loads((hf / "config.json").read_text())
        c["model_type"], c["architectures"] = "bert", ["BertForMaskedLM"]
        (hf / "config.json").write_text(json.dumps(c))
    elif spoil == "hf-truncate":
        w = hf / "model.safetensors"
        w.write_bytes(w.read_bytes()[:5000])
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *command(ckpt, hf, out, cfg))
    assert code != 0, name
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == before, "something was written"


def test_data_of_a_larger_vocabulary_is_refused_before_start(token_dir, tmp_path, capsys):
    """A model (say from-hf) with fewer token ids than the data's tokenizer would index past its embeddings: the
    trainer refuses it in one line before any process group starts."""
    from pipeline.train import main as train_main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"arch": "llama", "vocab_size": VOCAB},
                                   "data": {"datasets": [{"path": str(token_dir), "weight": 1}]},
                                   "checkpoint": {"dir": str(tmp_path / "ckpt")}}))
    with pytest.raises(SystemExit) as e:
        train_main(["--config", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"more than model.vocab_size {VOCAB}" in err, err
