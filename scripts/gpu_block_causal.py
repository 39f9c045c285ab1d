"""GPU check of block_causal attention (a line of scripts/gpu_check.sh; needs CUDA): FlexAttention with the
document BlockMask (the GPU path of pipeline/attention.py) gives what SDPA with the boolean mask (the CPU path)
gives, forward and backward, in fp32 and bf16; and through the model, a document packed after another has the
logits it has alone, with the same gradients as the SDPA path. Prints the figures; exit 1 on a mismatch."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import model as model_mod  # noqa: E402
from pipeline.attention import attend, doc_mask, document_ids  # noqa: E402
from pipeline.config import ModelConfig  # noqa: E402

EOD, DEV = 2, "cuda"


def packed_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(EOD + 1, vocab, (batch, seq), generator=g)
    return tokens.masked_fill(torch.rand(batch, seq, generator=g) < 1 / 150, EOD)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def kernels() -> bool:
    ok = True
    doc = document_ids(packed_tokens(4, 1000, 1000), EOD).to(DEV)  # 1000: not a multiple of the 128 block
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        g = torch.Generator(device=DEV).manual_seed(1)
        base = [torch.randn(4, h, 1000, 64, generator=g, device=DEV, dtype=dtype) for h in (8, 4, 4)]
        results = []
        for flex in (False, True):
            q, k, v = (t.clone().requires_grad_() for t in base)
            out = attend(q, k, v, doc_mask(doc, flex=flex), gqa=True)
            out.float().pow(2).sum().backward()
            results.append([out, q.grad, k.grad, v.grad])
        errs = [rel_err(f, s) for s, f in zip(*results)]
        good = max(errs) <= tol
        ok &= good
        print(f"{'ok' if good else 'MISMATCH'} flex vs SDPA mask {dtype}: max relative error out {errs[0]:.2e}, "
              f"dq {errs[1]:.2e}, dk {errs[2]:.2e}, dv {errs[3]:.2e} (tolerance {tol:g})")
    return ok


def through_model() -> bool:
    cfg = ModelConfig(arch="llama", num_layers=2, hidden_size=256, num_heads=8, kv_heads=4, vocab_size=1000,
                      seq_len=384, attn_mask_type="block_causal", eod_id=EOD)
    model = model_mod.build_model(cfg, seed=0).to(DEV)
    a, b = packed_tokens(1, 150, 1000, seed=2)[0], packed_tokens(1, 200, 1000, seed=3)[0]
    a[-1] = EOD
    b = b.masked_fill(b == EOD, EOD + 1)
    with torch.no_grad():
        model.eval()
        packed = model(torch.cat([a, b])[None].to(DEV))[0, len(a):]
        alone = model(b[None].to(DEV))[0]
    err = rel_err(packed, alone)
    ok = err <= 1e-4
    print(f"{'ok' if ok else 'MISMATCH'} packed document's logits vs alone (flex path, fp32): {err:.2e}")
    x = packed_tokens(2, 385, 1000, seed=4).to(DEV)
    model.train()
    grads = []
    for flex in (False, True):  # the SDPA mask path, then the flex path
        model_mod.use_flex = (lambda device, dropout=0.0: False) if not flex else flex_default
        model.zero_grad()
        model_mod.lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model_mod.use_flex = flex_default
    err = max(rel_err(grads[1][n], grads[0][n]) for n in grads[0])
    good = err <= 1e-3
    print(f"{'ok' if good else 'MISMATCH'} model gradients flex vs SDPA mask (fp32): max relative error {err:.2e}")
    return ok and good


flex_default = model_mod.use_flex

if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a GPU")
    sys.exit(0 if kernels() & through_model() else 1)
