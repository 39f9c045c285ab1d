"""`python -m pipeline.generate CKPT_OR_HF_DIR --prompt "..."`: sample text from a checkpoint or an exported folder.

Greedy with --temperature 0; otherwise temperature sampling, optionally with --top-k and --top-p. A KV cache
makes each new token cost one position. Stops at the end-of-document token or after --max-new-tokens. A prompt
longer than model.seq_len keeps its last seq_len tokens (said on stderr); when the window is full, it slides
(the last half is kept and re-read), so --max-new-tokens are always produced.

The tokenizer is the one beside the model: CKPT/tokenizer/ (a Hugging Face tokenizer, from `convert from-hf` or
an HF-tokenized dataset), CKPT/tokenizer.model (SentencePiece), or the tokenizer files of an HF folder.
Exit codes: 0 done, 2 bad arguments or input (one `error:` line), 1 a runtime failure.
"""
from __future__ import annotations

import argparse
import math
import os
import sys


class Tokenizer:
    """encode / decode / eos_id over either a SentencePiece model or a transformers tokenizer."""

    def __init__(self, sp=None, hf=None):
        self.sp, self.hf = sp, hf

    @property
    def eos_id(self) -> int | None:
        return self.sp.eos_id() if self.sp is not None else self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        # An HF tokenizer's own call adds its specials (Llama 3's <|begin_of_text|>), as in the training data.
        return self.sp.encode(text) if self.sp is not None else self.hf(text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids) if self.sp is not None else self.hf.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str) -> Tokenizer:
    from .convert.tokenizer import HF_TOKENIZER_DIR, SP_MODEL, is_hf_tokenizer_dir, load_hf_tokenizer

    for folder in (os.path.join(path, HF_TOKENIZER_DIR), path):
        if os.path.isdir(folder) and is_hf_tokenizer_dir(folder):
            return Tokenizer(hf=load_hf_tokenizer(folder))
    if os.path.isfile(os.path.join(path, SP_MODEL)):
        import sentencepiece as spm

        return Tokenizer(sp=spm.SentencePieceProcessor(model_file=os.path.join(path, SP_MODEL)))
    raise FileNotFoundError(f"{path}: no tokenizer beside the model (tokenizer/, tokenizer.json or tokenizer.model)")


def load_for_inference(path: str, tag: str | None = None):
    """Our model (fp32, eval mode) and the tokenizer beside it, from a checkpoint or an HF folder."""
    return load_model(path, tag), load_tokenizer(path)


def load_model(path: str, tag: str | None = None):
    """Our unsharded model (fp32, eval mode) from a checkpoint of any layout (or weights-only) or an HF folder."""
    import torch

    from .model import Transformer

    if os.path.isfile(os.path.join(path, "config.json")):
        from .convert.hf import read_hf_config, read_hf_state_dict
        from .hf import check_sliding_window, model_config_from_hf

        hf = read_hf_config(path)
        mcfg = model_config_from_hf(hf)
        check_sliding_window(hf, mcfg.seq_len)
        sd = read_hf_state_dict(path, mcfg, hf.model_type)
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


def sample_next(logits, temperature: float, top_k: int, top_p: float, gen):
    """Pick the next token from [batch, vocab] logits."""
    import torch

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


def generate(model, prompt_ids: list[int], max_new_tokens: int, eod_id: int | None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    """New token ids after `prompt_ids` (one sequence), with a KV cache.

    The context is at most model.seq_len tokens: a longer prompt keeps its last seq_len; when the window fills,
    the last seq_len/2 tokens are read again into a fresh cache (positions restart at 0, as in training, where
    every sample starts at position 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    limit = model.cfg.seq_len
    ids = list(prompt_ids[-limit:]) if prompt_ids else [eod_id if eod_id is not None else 0]
    out = []
    with torch.no_grad():
        while len(out) < max_new_tokens:
            caches = [{} for _ in model.layers]
            logits = model(torch.tensor([ids]), caches=caches, start_pos=0)[:, -1]
            pos = len(ids)
            while True:
                nxt = int(sample_next(logits, temperature, top_k, top_p, gen)[0])
                if nxt == eod_id:
                    return out
                out.append(nxt)
                ids.append(nxt)
                if len(out) >= max_new_tokens:
                    return out
                if pos >= limit:  # the window is full: slide it
                    ids = ids[-max(1, limit // 2):]
                    break
                logits = model(torch.tensor([[nxt]]), caches=caches, start_pos=pos)[:, -1]
                pos += 1
    return out


def check_args(args) -> str | None:
    """What is wrong with the sampling arguments (a `--flag value: reason` sentence), or None."""
    if math.isnan(args.temperature) or args.temperature < 0:
        return f"--temperature {args.temperature}: must be a number >= 0 (0 = greedy)"
    if math.isnan(args.top_p) or not 0 < args.top_p <= 1:
        return f"--top-p {args.top_p}: must be in (0, 1] (1 = off)"
    if args.top_k < 0:
        return f"--top-k {args.top_k}: must be >= 0 (0 = off)"
    if args.max_new_tokens < 0:
        return f"--max-new-tokens {args.max_new_tokens}: must be >= 0"
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="CKPT_OR_HF_DIR", help="a checkpoint folder (checkpoint.dir) or a to-hf folder")
    p.add_argument("--prompt", default="", help="the text to continue (default: empty, start from EOD)")
    p.add_argument("--prompt-file", default=None, help="one prompt per line (default: none, use --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = off (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest committed)")
    args = p.parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        model, tok = load_for_inference(args.path, args.tag)
        prompts = [args.prompt]
        if args.prompt_file:
            with open(args.prompt_file) as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    limit = model.cfg.seq_len
    for prompt in prompts:
        ids = tok.encode(prompt)
        if len(ids) > limit:
            print(f"warning: the prompt has {len(ids)} tokens, more than model.seq_len {limit}: cut to its last "
                  f"{limit}", file=sys.stderr)
        new = generate(model, ids, args.max_new_tokens, tok.eos_id, args.temperature, args.top_k, args.top_p,
                       args.seed)
        print(prompt + tok.decode(new) if not prompt else tok.decode(ids + new))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
