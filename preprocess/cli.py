"""`python -m preprocess`: train a tokenizer, tokenize a corpus into Megatron shards, inspect the result."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger("preprocess")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on a sample of the corpus")
    t.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs (.jsonl .json .jsonl.zst "
                   ".jsonl.gz .parquet .txt, save_to_disk folders)")
    t.add_argument("--output", required=True, help="folder for tokenizer.model")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--text-key", default="text", help="JSON field holding the text; dots reach into objects")
    t.add_argument("--sample-docs", type=int, default=100_000, help="documents sampled uniformly over all inputs")
    t.add_argument("--seed", type=int, default=1234)

    k = sub.add_parser("tokenize", help="tokenize a corpus into .bin/.idx shards and manifest.json")
    k.add_argument("inputs", nargs="+", metavar="INPUT")
    k.add_argument("--tokenizer", required=True, help="path to tokenizer.model")
    k.add_argument("--output", required=True, help="output folder (shards + manifest.json)")
    k.add_argument("--text-key", default="text")
    k.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    k.add_argument("--shard-tokens", type=int, default=1 << 30, help="close a shard past this many tokens")
    k.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    k.add_argument("--overwrite", action="store_true", help="replace output made with different arguments")

    i = sub.add_parser("inspect", help="summarise a tokenized output folder and decode documents")
    i.add_argument("output")
    i.add_argument("--docs", type=int, default=0, help="decode the first K documents")

    d = sub.add_parser("demo-corpus", help="write the built-in corpus (Python's own documentation) as jsonl")
    d.add_argument("--output", required=True)
    return p


def inspect(output: str, docs: int = 0) -> None:
    from .indexed import IndexedDataset

    path = os.path.join(output, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no manifest (is {output} a `preprocess tokenize` output?)")
    with open(path) as f:
        m = json.load(f)
    total_docs = sum(s["documents"] for s in m["shards"])
    total_tokens = sum(s["tokens"] for s in m["shards"])
    print(f"{output}: {'complete' if m.get('complete') else 'INCOMPLETE'}, {len(m['shards'])} shards, "
          f"{total_docs:,} documents, {total_tokens:,} tokens, dtype {m['dtype']}")
    print(f"tokenizer: {m['tokenizer']['path']} (vocab {m['tokenizer']['vocab_size']}, eod {m['tokenizer']['eod_id']})")
    for s in m["shards"]:
        print(f"  {s['name']}: {s['documents']:,} documents, {s['tokens']:,} tokens")
    print(f"skipped: {m['skipped'] or 'none'}")
    if docs:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=m["tokenizer"]["path"])
        shown = 0
        for s in m["shards"]:
            ds = IndexedDataset(os.path.join(output, s["name"]))
            for j in range(min(len(ds), docs - shown)):
                print(f"--- document {shown} ({len(ds[j])} tokens)")
                print(sp.decode([int(t) for t in ds[j]]))
                shown += 1
            if shown >= docs:
                break


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = _parser().parse_args(argv)
    try:
        if args.command == "train-tokenizer":
            from .tokenizer import train_tokenizer

            path = train_tokenizer(args.inputs, args.output, args.vocab_size, args.model_type, args.text_key,
                                   args.sample_docs, args.seed)
            print(f"tokenizer written to {path}")
        elif args.command == "tokenize":
            from .tokenize import tokenize

            m = tokenize(args.inputs, args.tokenizer, args.output, args.text_key, args.workers,
                         args.shard_tokens, args.strict, args.overwrite)
            docs = sum(s["documents"] for s in m["shards"])
            tokens = sum(s["tokens"] for s in m["shards"])
            print(f"{args.output}: {len(m['shards'])} shards, {docs:,} documents, {tokens:,} tokens; "
                  f"skipped {m['skipped'] or 'none'}")
        elif args.command == "inspect":
            inspect(args.output, args.docs)
        elif args.command == "demo-corpus":
            from .demo_corpus import write_demo_corpus

            write_demo_corpus(args.output)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
