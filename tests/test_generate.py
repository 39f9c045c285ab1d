"""Generation: the KV cache changes nothing, the samplers keep to their sets, EOD stops, --prompt-file works."""
import shutil

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.generate import generate, main, sample_next
from pipeline.model import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", num_layers=2, hidden_size=32, num_heads=4, kv_heads=2, ffn_hidden_size=64,
                      vocab_size=50, seq_len=64, init_std=0.5)
    return Transformer(cfg).eval()


def test_kv_cache_gives_the_uncached_greedy_tokens(model):
    prompt = [3, 14, 15, 9, 2, 6]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert generate(model, prompt, max_new_tokens=20, eod_id=None) == ids[len(prompt):]


def test_generation_stops_at_eod_and_at_max_new_tokens(model):
    free = generate(model, [5, 7], max_new_tokens=10, eod_id=None)
    assert len(free) == 10
    assert generate(model, [5, 7], max_new_tokens=10, eod_id=free[3]) == free[:free.index(free[3])]


def test_samplers_keep_to_their_sets():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0, -1.0]]).repeat(400, 1)
    assert sample_next(logits, 0.0, 0, 1.0, g).eq(1).all()  # greedy
    assert set(sample_next(logits, 1.0, 2, 1.0, g).tolist()) == {1, 2}  # top-k 2
    probs = logits[0].softmax(-1)  # top-p just above p(1): tokens 1 and 2 only
    assert set(sample_next(logits, 1.0, 0, float(probs[1]) + 0.01, g).tolist()) == {1, 2}
    assert sample_next(logits, 1.0, 0, 0.01, g).eq(1).all()
    assert len(set(sample_next(logits, 5.0, 0, 1.0, g).tolist())) == 5  # high temperature reaches all
    a = sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(7))
    assert a.equal(sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(7)))  # seeded


def test_cli_prompt_file_and_sampling(tokenizer_model, tmp_path, capsys):
    import transformers

    from pipeline import convert

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    shutil.copy(tokenizer_model, tmp_path / "hf" / "tokenizer.model")
    (tmp_path / "run.yaml").write_text("model: {arch: llama}\ndata: {datasets: [{path: unused, weight: 1}]}\n")
    convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--config", str(tmp_path / "run.yaml")])
    capsys.readouterr()
    (tmp_path / "prompts.txt").write_text("The module\n\nA class is\n")
    main([str(tmp_path / "ckpt"), "--prompt-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "5"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("The module") and lines[1].startswith("A class is")
    outs = set()
    for seed in range(3):
        main([str(tmp_path / "ckpt"), "--prompt", "The", "--max-new-tokens", "8", "--temperature", "1.0",
              "--top-p", "0.95", "--seed", str(seed)])
        outs.add(capsys.readouterr().out)
    assert len(outs) > 1
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nothing"), "--prompt", "x"])
    assert e.value.code != 0 and capsys.readouterr().err.startswith("error: ")


BAD_ARGS = [  # (arguments, a fragment of the one-line error)
    (["--temperature", "nan"], "--temperature nan"),
    (["--temperature", "-0.5"], "--temperature -0.5"),
    (["--top-p", "0"], "--top-p 0.0"),
    (["--top-p", "1.5"], "--top-p 1.5"),
    (["--top-p", "nan"], "--top-p nan"),
    (["--top-k", "-1"], "--top-k -1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens -3"),
]


@pytest.mark.parametrize("args,fragment", BAD_ARGS, ids=[a[1] for a in BAD_ARGS])
def test_bad_sampling_arguments_give_one_error_line(args, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--prompt", "x", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err


def test_prompt_longer_than_seq_len_is_cut_and_the_window_slides(model):
    """A prompt past seq_len keeps its last seq_len tokens; --max-new-tokens are all produced (the window slides),
    and the tokens until the window fills are the model's greedy ones on the cut prompt."""
    limit = model.cfg.seq_len
    prompt = [(7 * i) % 50 for i in range(limit + 30)]
    out = generate(model, prompt, max_new_tokens=limit + 8, eod_id=None)
    assert len(out) == limit + 8
    ids = prompt[-limit:]
    with torch.no_grad():
        assert out[0] == int(model(torch.tensor([ids]))[0, -1].argmax())
        slid = (ids + out[:1])[-(limit // 2):]  # after the first token the window is full: it keeps its last half
        assert out[1] == int(model(torch.tensor([slid]))[0, -1].argmax())


def test_cli_says_when_the_prompt_is_cut(tmp_path, capsys):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pipeline import convert

    vocab = {f"w{i}": i for i in range(64)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w1")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")])
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    capsys.readouterr()
    prompt = " ".join(f"w{2 + i % 60}" for i in range(40))
    main([str(tmp_path / "ckpt"), "--prompt", prompt, "--max-new-tokens", "30"])
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and "model.seq_len 16: cut to its last 16" in out.err, out.err
    assert len(out.out.split()) > 40  # the cut prompt still got its continuation


def test_help_answers_without_importing_torch():
    import subprocess
    import sys

    code = "import sys\nfrom pipeline.generate import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--top-p" in proc.stdout and proc.stdout.strip().endswith("False")
