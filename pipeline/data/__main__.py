"""`python -m pipeline.data inspect|verify --config X [key=value ...]`: see what a run config trains on.

inspect: the datasets (documents, tokens, tokenizer), per split the documents, epochs, samples and blend
shares, and the tokens and decoded text of sample I of global batch S (`--step S --sample I`).
verify: checks every shard's `.bin` against the manifest's sha256 (reads all the data).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def _docs(cfg):
    from .documents import TokenDocuments

    return [TokenDocuments(d.path) for d in cfg.data.datasets]


def _decoder(docs):
    tok = docs[0].tokenizer
    if not tok:
        return None
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tok["path"])
    except Exception:  # the tokenizer file moved: show token ids only
        return None
    return lambda ids: sp.decode([int(t) for t in ids])


def _describe_split(name, ds, gbs) -> list[str]:
    from .datasets import BlendedDataset

    if ds is None:
        return [f"{name}: none"]
    parts = ds.datasets if isinstance(ds, BlendedDataset) else [ds]
    lines = [f"{name}: {len(ds)} samples ({len(ds) // gbs} global batches of {gbs})"]
    for k, part in enumerate(parts):
        share = ""
        if isinstance(ds, BlendedDataset):
            share = f", blend weight {ds.weights[k]:.4f}, share {ds.counts[k] / len(ds):.4f} ({ds.counts[k]} samples)"
        lines.append(f"  {part.docs.path}: documents [{part.lo}, {part.hi}), {part.tokens_per_epoch} tokens, "
                     f"{part.samples_per_epoch} samples per epoch, {part.num_epochs} epoch(s){share}")
    return lines


def inspect(cfg, step: int, sample: int, show_tokens: int) -> str:
    from .datasets import BlendedDataset, build_split, default_cache_dir

    docs = _docs(cfg)
    t = cfg.train
    out = [f"index cache: {default_cache_dir(cfg)}", "datasets:"]
    for d, spec in zip(docs, cfg.data.datasets):
        tok = d.tokenizer or {}
        out.append(f"  {d.path}: weight {spec.weight}, {len(d)} documents, {d.num_tokens} tokens, "
                   f"{len(d.shards)} shard(s), dtype {d.dtype}, vocab {tok.get('vocab_size', '?')}, "
                   f"eod {tok.get('eod_id', '?')}")
    train = build_split(cfg, docs, "train", t.steps * t.global_batch_size)
    out += _describe_split("train", train, t.global_batch_size)
    for name, n in (("valid", max(1, t.eval_iters) * t.global_batch_size), ("test", t.global_batch_size)):
        try:
            out += _describe_split(name, build_split(cfg, docs, name, n), t.global_batch_size)
        except ValueError as e:  # a split too small to use is worth showing, not fatal here
            out.append(f"{name}: unusable: {e}")
    i = step * t.global_batch_size + sample
    if not 0 <= sample < t.global_batch_size or train is None or i >= len(train):
        raise ValueError(f"--step {step} --sample {sample}: outside the {t.steps} steps x {t.global_batch_size} "
                         f"samples of the train split")
    tokens = train[i]
    where = ""
    if isinstance(train, BlendedDataset):
        k = int(train.index["dataset"][i])
        where = f" from {train.datasets[k].docs.path} (its sample {int(train.index['sample'][i])})"
    out.append(f"train sample {i} (step {step}, position {sample}){where}: {len(tokens)} tokens")
    out.append("  ids: " + " ".join(map(str, tokens[:show_tokens].tolist())) + (" …" if len(tokens) > show_tokens else ""))
    decode = _decoder(docs)
    if decode is not None:
        eod = (docs[0].tokenizer or {}).get("eod_id")
        pieces = np.split(tokens, np.flatnonzero(tokens == eod) + 1) if eod is not None else [tokens]
        out.append("  text (documents separated by ⏎EOD⏎):")
        out.append("  " + "⏎EOD⏎".join(decode(p[p != eod]) for p in pieces))
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="datasets, epochs, samples per split, blend shares, a decoded sample")
    i.add_argument("--config", required=True, help="run config YAML (see configs/)")
    i.add_argument("--step", type=int, default=0, help="global batch (training step) to show a sample of (default %(default)s)")
    i.add_argument("--sample", type=int, default=0, help="position of the sample within that global batch (default %(default)s)")
    i.add_argument("--show-tokens", type=int, default=32, help="how many token ids to print (default %(default)s)")
    i.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.seq_len=2048")
    v = sub.add_parser("verify", help="check every shard's .bin against the manifest's sha256")
    v.add_argument("--config", required=True, help="run config YAML (see configs/)")
    v.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.split=90,5,5")
    args = p.parse_args(argv)
    from ..config import load_config

    try:
        if args.command == "inspect" and (args.step < 0 or args.sample < 0 or args.show_tokens < 0):
            raise ValueError(f"--step {args.step}, --sample {args.sample}, --show-tokens {args.show_tokens}: "
                             f"each must be >= 0")
        cfg = load_config(args.config, args.overrides)
        if args.command == "inspect":
            print(inspect(cfg, args.step, args.sample, args.show_tokens))
        else:
            for d in _docs(cfg):
                d.verify()
                print(f"{d.path}: ok ({len(d.shards)} shard(s), {d.num_tokens} tokens)")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
