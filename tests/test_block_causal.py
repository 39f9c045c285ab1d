"""model.attn_mask_type block_causal: a document packed after others is seen exactly as if it stood alone, in
logits, gradients, generation and every parallel layout (one torchrun launch per world size runs all layouts of
that size; this file is also the worker, `__main__` below), and a run resumes exactly. Also qk_norm under tensor
parallelism (its replicated weight must get the gradient of all heads).
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

EOD = 3
VOCAB = 200
STEPS = 3
LR = 1e-3
# name: (world, tp, pp, zero_stage, activation checkpointing)
LAYOUTS = {
    "dp2_zero3": (2, 1, 1, 3, False),
    "tp2_zero3": (2, 2, 1, 3, False),
    "pp2_zero1": (2, 1, 2, 1, False),
    "pp2_zero1_checkpointing": (2, 1, 2, 1, True),
    "tp2_zero1_checkpointing": (2, 2, 1, 1, True),
    "pp2_tp2_zero1": (4, 2, 2, 1, False),
}
VARIANTS = {"gpt": ("gpt", False), "llama": ("llama", False), "llama_qk_norm": ("llama", True)}
# Fewer engines on a small machine: qk_norm where tp or stages touch it, four ranks and checkpointing once each
RUN_ON = {"dp2_zero3": ("gpt", "llama"), "pp2_zero1": ("gpt", "llama_qk_norm"), "pp2_tp2_zero1": ("llama_qk_norm",),
          "pp2_zero1_checkpointing": ("gpt",), "tp2_zero1_checkpointing": ("llama_qk_norm",)}


def model_config(arch: str, qk_norm: bool = False, seq_len: int = 24):
    from pipeline.config import ModelConfig

    return ModelConfig(arch=arch, num_layers=4, hidden_size=32, num_heads=4, kv_heads=2 if arch == "llama" else None,
                       ffn_hidden_size=64, vocab_size=VOCAB, seq_len=seq_len, make_vocab_size_divisible_by=64,
                       attn_mask_type="block_causal", eod_id=EOD, qk_norm=qk_norm, init_std=0.2)


def documents(lengths, seed: int) -> list[torch.Tensor]:
    """Random documents of the given lengths, each ended by EOD."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(EOD + 1, VOCAB, (n,), generator=g) for n in lengths]
    for d in docs:
        d[-1] = EOD
    return docs


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_document_packed_after_another_has_the_logits_it_has_alone(arch):
    from pipeline.model import build_model

    model = build_model(model_config(arch, qk_norm=arch == "llama"), seed=1).eval()
    a, b = documents([9, 12], seed=0)
    b = b[:-1]  # a document cut by the sample's end (no EOD)
    with torch.no_grad():
        packed = model(torch.cat([a, b])[None])[0, len(a):]
        alone = model(b[None])[0]
        model.cfg.attn_mask_type = "causal"
        leaky = model(torch.cat([a, b])[None])[0, len(a):]
    assert (packed - alone).abs().max() <= 1e-5
    assert (leaky - alone).abs().max() > 1e-3  # plain causal attention does see document A


@pytest.mark.parametrize("arch,checkpointing", [("gpt", False), ("llama", True)])
def test_gradients_of_a_packed_batch_equal_one_document_per_sequence(arch, checkpointing):
    """Summed token losses of [A B | C D] packed, against A, B, C, D run one per sequence: same gradients
    (positions restart, so gpt's learned position rows get the same gradient too)."""
    from pipeline.model import build_model

    model = build_model(model_config(arch, qk_norm=arch == "llama"), seed=2).train()
    model.checkpoint_activations = checkpointing
    docs = documents([7, 17, 12, 12], seed=1)

    def loss_sum(seqs, boundaries):
        total = 0.0
        for seq, cut in zip(seqs, boundaries):
            logits = model(seq[None, :-1])[0]
            losses = torch.nn.functional.cross_entropy(logits, seq[1:], reduction="none")
            keep = torch.ones_like(losses, dtype=torch.bool)
            keep[[c - 1 for c in cut]] = False  # no label crosses into the next document
            total = total + losses[keep].sum()
        return total

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    packed = grads(loss_sum([torch.cat(docs[:2]), torch.cat(docs[2:])], [[7], [12]]))
    alone = grads(loss_sum(docs, [[], [], [], []]))
    assert set(packed) == set(alone)
    for name, want in alone.items():
        torch.testing.assert_close(packed[name], want, rtol=1e-4, atol=5e-5, msg=lambda m: f"{name}: {m}")


def test_generation_from_a_prompt_of_several_documents_continues_the_last_alone():
    from pipeline.generate import generate
    from pipeline.model import build_model

    model = build_model(model_config("llama", seq_len=48), seed=3).eval()
    a, b = documents([10, 6], seed=2)
    b = b[:-1].tolist()
    want = generate(model, b, max_new_tokens=12, eod_id=None)
    assert generate(model, a.tolist() + b, max_new_tokens=12, eod_id=None) == want
    model.cfg.attn_mask_type = "causal"
    assert generate(model, a.tolist() + b, max_new_tokens=12, eod_id=None) != want  # the control


def test_flex_block_mask_masks_as_the_sdpa_mask():
    """The FlexAttention BlockMask (the GPU path) against the boolean SDPA mask, forward on CPU (torch 2.13 has
    no FlexAttention backward on CPU: scripts/gpu_check.sh compares forward and backward on a GPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    from pipeline.attention import attend, doc_mask, document_ids

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(EOD + 1, VOCAB, (3, 40), generator=g)
    tokens[0, [5, 6, 30]] = EOD  # an empty document, and one at the end
    tokens[2, -1] = EOD
    doc = document_ids(tokens, EOD)
    q, k, v = (torch.randn(3, h, 40, 16, generator=g) for h in (4, 2, 2))
    want = attend(q, k, v, doc_mask(doc), gqa=True)
    got = flex_attention(q, k, v, block_mask=doc_mask(doc, flex=True), enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_long_sequences_attend_in_chunks_with_the_same_results():
    """From 4 x CHUNK tokens the CPU path cuts the queries into chunks over the keys they may see: same output and
    gradients as one SDPA call under the whole mask."""
    import torch.nn.functional as F

    from pipeline.attention import CHUNK, attend, doc_mask, document_ids

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(EOD + 1, VOCAB, (2, 4 * CHUNK + 100), generator=g)
    tokens[tokens % 97 == 0] = EOD  # documents of ~100 tokens; one sample also holds a long one
    tokens[1, 700:2000] = EOD + 1
    mask = doc_mask(document_ids(tokens, EOD))
    results = []
    for chunked in (False, True):
        q, k, v = (torch.randn(2, h, tokens.shape[1], 8, generator=torch.Generator().manual_seed(h),
                               requires_grad=True) for h in (4, 2, 2))
        out = attend(q, k, v, mask, gqa=True) if chunked else \
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out.pow(2).sum().backward()
        results.append([out, q.grad, k.grad, v.grad])
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_document_ids_and_positions():
    from pipeline.attention import document_ids, document_positions

    tokens = torch.tensor([[5, EOD, 7, 8, EOD, EOD, 9], [EOD, 4, 4, 4, 4, 4, 4]])
    doc = document_ids(tokens, EOD)
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert document_positions(doc).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]


# ---- every layout against the single-process model -----------------------------------------------------------

def run_config(variant: str, tp: int = 1, pp: int = 1, zero: int = 3, checkpointing: bool = False):
    from pipeline.config import RunConfig, TrainConfig, ParallelConfig

    arch, qk_norm = VARIANTS[variant]
    return RunConfig(model=model_config(arch, qk_norm),
                     parallel=ParallelConfig(tp=tp, pp=pp, zero_stage=zero, activation_checkpointing=checkpointing),
                     train=TrainConfig(steps=10, global_batch_size=8, micro_batch_size=2, lr=LR, min_lr=1e-4,
                                       warmup_steps=2, grad_clip=0.5, seed=7))


def global_batch(step: int) -> torch.Tensor:
    """8 packed samples of 25 tokens with EODs in various places (one sample has none)."""
    g = torch.Generator().manual_seed(1000 + step)
    batch = torch.randint(EOD + 1, VOCAB, (8, 25), generator=g)
    for row in range(1, 8):
        batch[row, torch.randint(0, 25, (row % 4,), generator=g)] = EOD
    return batch


def oracle(variant: str):
    """The unsharded model under torch's AdamW: per-step losses, an eval loss after them, final parameters."""
    from pipeline.model import build_model, lm_loss
    from pipeline.optim import Schedule, build_optimizer, lr_at, set_lr

    cfg = run_config(variant)
    model = build_model(cfg.model, seed=cfg.train.seed)
    opt = build_optimizer(model, cfg.train)
    losses, norms = [], []
    for step in range(STEPS):
        set_lr(opt, lr_at(step, Schedule.from_train_config(cfg.train)))
        micro = global_batch(step).split(cfg.train.micro_batch_size)
        loss = sum(lm_loss(model(mb[:, :-1]), mb[:, 1:]) for mb in micro) / len(micro)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        held_out = global_batch(99)
        losses.append(float(lm_loss(model.eval()(held_out[:, :-1]), held_out[:, 1:])))
    vocab_rows = ("embed_tokens.weight", "lm_head.weight")
    return losses, norms, {k: v.detach()[:VOCAB] if k.endswith(vocab_rows) else v.detach()
                           for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    from tests.conftest import torchrun

    out = tmp_path_factory.mktemp("block_causal")
    for world in sorted({w for w, *_ in LAYOUTS.values()}):
        torchrun(world, __file__, str(out), timeout=900)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_layout_trains_as_the_single_process_model(layouts, variant):
    want_losses, want_norms, want_params = oracle(variant)
    ran = [layout for layout in LAYOUTS if variant in RUN_ON.get(layout, VARIANTS)]
    for layout in ran:
        got = torch.load(layouts / f"{variant}_{layout}.pt")
        assert got["losses"][0] == pytest.approx(want_losses[0], rel=1e-5), f"{layout}: first-step loss"
        assert got["losses"] == pytest.approx(want_losses, rel=1e-5), layout
        # the gradient norm sees every gradient (qk_norm under tp: the replicated weight must get all heads')
        assert got["norms"] == pytest.approx(want_norms, rel=1e-5), layout
        for name, want in want_params.items():
            # Adam turns fp32 summation noise in near-zero gradients into steps of up to ±LR whatever the
            # implementation (gpt's key bias: a zero gradient in exact arithmetic, softmax ignores the shift)
            atol = STEPS * LR if name.endswith("k_proj.bias") else 0.1 * LR
            torch.testing.assert_close(got["params"][name], want, rtol=1e-5, atol=atol,
                                       msg=lambda m: f"{layout} {name}: {m}")


def _worker(out: str) -> None:
    import gc

    from pipeline import dist
    from pipeline.engine import build_engine
    from pipeline.optim import Schedule, lr_at

    dist.init_distributed(300)
    world, rank = dist.world_size(), dist.rank()
    for layout, (w, tp, pp, zero, checkpointing) in LAYOUTS.items():
        for variant in RUN_ON.get(layout, VARIANTS) if w == world else ():
            engine = build_engine(run_config(variant, tp, pp, zero, checkpointing))
            per = 8 // engine.dp_size
            mine = slice(engine.dp_rank * per, (engine.dp_rank + 1) * per)
            schedule = Schedule.from_train_config(engine.cfg.train)
            losses, norms = [], []
            for step in range(STEPS):
                engine.set_lr(lr_at(step, schedule))  # as the train loop does
                losses.append(engine.train_step(global_batch(step)[mine]))
                norms.append(engine.grad_norm())
            losses.append(engine.eval_loss(global_batch(99)[mine]))
            params = engine.full_state_dict()
            if rank == 0:
                torch.save({"losses": losses, "norms": norms, "params": params},
                           os.path.join(out, f"{variant}_{layout}.pt"))
            del engine
            gc.collect()
    dist.exit_cleanly(0)


# ---- exact resume through pipeline.train ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_docs(corpus_dir, tokenizer_model, tmp_path_factory):
    """The demo corpus cut into paragraphs: documents of tens of tokens, so that samples hold several."""
    from preprocess.tokenize import tokenize

    src = tmp_path_factory.mktemp("paragraphs")
    with open(src / "paragraphs.jsonl", "w") as f:
        for line in (corpus_dir / "corpus.jsonl").read_text().splitlines()[:40]:
            for para in json.loads(line)["text"].split("\n\n"):
                if para.strip():
                    f.write(json.dumps({"text": para}) + "\n")
    out = tmp_path_factory.mktemp("paragraph_tokens")
    tokenize([str(src)], str(tokenizer_model), str(out))
    return out


def test_block_causal_run_resumes_exactly(tmp_path, short_docs):
    """pp2 + ZeRO-1 gpt (document ids between stages, learned positions restarting): 4 steps straight against
    2 + resume + 2, bit for bit, on samples that hold several documents each."""
    import numpy as np
    import yaml

    from pipeline.data import TokenDocuments
    from tests.launch import run_ranks

    token_dir = short_docs
    eod = TokenDocuments(str(token_dir)).tokenizer["eod_id"]

    def run(name, steps_before_copy=None):
        ckpt = tmp_path / name
        cfg = {"model": {"arch": "gpt", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 128,
                         "attn_mask_type": "block_causal"},
               "parallel": {"pp": 2, "zero_stage": 1},
               "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}]},
               "train": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1},
               "checkpoint": {"dir": str(ckpt), "interval": 2, "keep": 5},
               "log": {"interval": 1, "jsonl": str(tmp_path / f"{name}.jsonl")}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        codes = run_ranks(2, "--config", str(tmp_path / f"{name}.yaml"), log_dir=tmp_path)
        assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
        return {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / f"{name}.jsonl").read_text().splitlines())
                if "split" not in r}

    straight = run("straight")
    saved = json.loads((tmp_path / "straight" / "global_step2" / "run_config.json").read_text())
    assert saved["model"]["eod_id"] == eod  # taken from the manifest
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "global_step2", tmp_path / "resumed" / "global_step2")
    (tmp_path / "resumed" / "latest").write_text("global_step2")
    resumed = run("resumed")
    assert sorted(resumed) == [3, 4] and all(resumed[s] == straight[s] for s in resumed), (straight, resumed)
    from pipeline.config import from_dict
    from pipeline.data import build_datasets

    cfg = from_dict({"model": {"seq_len": 128}, "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}],
                                                         "cache_dir": str(tmp_path / "idx")},
                     "train": {"steps": 4, "global_batch_size": 4}, "checkpoint": {"dir": str(tmp_path / "x")}})
    train_ds, _ = build_datasets(cfg, [TokenDocuments(str(token_dir))])
    assert np.mean([(np.asarray(train_ds[i]) == eod).sum() for i in range(16)]) >= 1  # documents meet in samples


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch.set_num_threads(1)
    _worker(sys.argv[1])
