"""`python -m pipeline.generate CKPT_OR_HF_DIR --prompt "..."`: sample text from a checkpoint or an exported folder.

Greedy with --temperature 0; otherwise temperature sampling, optionally with --top-k and --top-p. A KV cache
makes each new token cost one position. Stops at the end-of-document token or after --max-new-tokens.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .model import Transformer


def load_for_inference(path: str, tag: str | None = None) -> tuple[Transformer, "spm.SentencePieceProcessor"]:
    """Our model (fp32, eval mode) and its SentencePiece tokenizer from a checkpoint or a to-hf folder."""
    import sentencepiece as spm

    model = load_model(path, tag)
    tok_path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"{tok_path}: no tokenizer beside the model")
    return model, spm.SentencePieceProcessor(model_file=tok_path)


def load_model(path: str, tag: str | None = None) -> Transformer:
    """Our unsharded model (fp32, eval mode) from a checkpoint of any layout (or weights-only) or an HF folder."""
    if os.path.isfile(os.path.join(path, "config.json")):
        from .convert.hf import read_hf_config, read_hf_state_dict
        from .hf import model_config_from_hf

        mcfg = model_config_from_hf(read_hf_config(path))
        sd = read_hf_state_dict(path, mcfg)
    else:
        from .convert.hf import read_checkpoint

        sd, cfg, _ = read_checkpoint(path, tag)
        mcfg = cfg.model
    model = Transformer(mcfg)
    for name in ("embed_tokens.weight", "lm_head.weight"):  # the model may pad its vocabulary: zero rows
        rows = model.state_dict()[name].shape[0]
        if name in sd and sd[name].shape[0] < rows:
            sd[name] = torch.cat([sd[name], sd[name].new_zeros(rows - sd[name].shape[0], sd[name].shape[1])])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (mcfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Pick the next token from [batch, vocab] logits."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, eod_id: int | None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    """New token ids after `prompt_ids` (one sequence), with a KV cache."""
    gen = torch.Generator().manual_seed(seed)
    limit = model.cfg.seq_len
    ids = prompt_ids[-(limit - 1):] if prompt_ids else [eod_id if eod_id is not None else 0]
    caches = [{} for _ in model.layers]
    logits = model(torch.tensor([ids]), caches=caches, start_pos=0)[:, -1]
    pos, out = len(ids), []
    for _ in range(max_new_tokens):
        nxt = int(sample_next(logits, temperature, top_k, top_p, gen)[0])
        if nxt == eod_id:
            break
        out.append(nxt)
        if pos >= limit:
            break
        logits = model(torch.tensor([[nxt]]), caches=caches, start_pos=pos)[:, -1]
        pos += 1
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="CKPT_OR_HF_DIR")
    p.add_argument("--prompt", default="")
    p.add_argument("--prompt-file", default=None, help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest committed)")
    args = p.parse_args(argv)
    try:
        model, sp = load_for_inference(args.path, args.tag)
        prompts = [args.prompt]
        if args.prompt_file:
            with open(args.prompt_file) as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for prompt in prompts:
        new = generate(model, sp.encode(prompt), args.max_new_tokens, sp.eos_id(), args.temperature, args.top_k,
                       args.top_p, args.seed)
        print(prompt + sp.decode(new) if not prompt else sp.decode(sp.encode(prompt) + new))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
