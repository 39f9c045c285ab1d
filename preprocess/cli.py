"""`python -m preprocess`: train a tokenizer, tokenize a corpus into Megatron shards, inspect the result."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from .plan import UNIT_BYTES

log = logging.getLogger("preprocess")
# OSErrors about a path the user gave (missing, not a folder, not writable); the others (a full disk, I/O) are not
_USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-tokenizer", help="train a tokenizer (SentencePiece or byte-level BPE) on a sample of "
                       "the corpus")
    t.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs (.jsonl .json .jsonl.zst "
                   ".jsonl.gz .parquet .txt, save_to_disk folders)")
    t.add_argument("--output", required=True, help="folder for tokenizer.model (bpe, unigram) or for the Hugging "
                   "Face tokenizer files (byte-bpe)")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, special tokens included")
    t.add_argument("--model-type", choices=["bpe", "unigram", "byte-bpe"], default="bpe",
                   help="bpe/unigram: SentencePiece with byte fallback (tokenizer.model); byte-bpe: GPT-2-style "
                   "byte-level BPE with <|endoftext|>, a folder transformers.AutoTokenizer loads (default %(default)s)")
    t.add_argument("--text-key", default="text",
                   help="JSON field holding the text; dots reach into objects (default %(default)s)")
    t.add_argument("--sample-docs", type=int, default=100_000, help="documents sampled uniformly over all inputs "
                   "(default %(default)s)")
    t.add_argument("--seed", type=int, default=1234, help="seed of the document sample (default %(default)s)")

    k = sub.add_parser(
        "tokenize", help="tokenize a corpus into .bin/.idx shards and manifest.json",
        description="Tokenize INPUTs into Megatron .bin/.idx shards plus manifest.json. The output is the same, "
        "byte for byte, whatever --workers, the number of MPI ranks or array tasks, or where a run was killed: "
        "re-run the same command to resume. Under mpirun/mpiexec or `srun --mpi=pmi2` the ranks split the work "
        "and rank 0 writes the manifest. In a Slurm array, give each task --part $SLURM_ARRAY_TASK_ID "
        "--num-parts $SLURM_ARRAY_TASK_COUNT, then run `python -m preprocess join OUT` once all tasks are done.")
    k.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs, as for train-tokenizer")
    k.add_argument("--tokenizer", required=True, help="a SentencePiece tokenizer.model, a Hugging Face "
                   "tokenizer.json, or a folder that transformers.AutoTokenizer loads")
    k.add_argument("--eod-token", help="the token appended to every document (default: the tokenizer's EOS, "
                   "e.g. <|endoftext|>); needed for a tokenizer without one")
    k.add_argument("--output", required=True, help="output folder (shards + manifest.json)")
    k.add_argument("--text-key", default="text",
                   help="JSON field holding the text; dots reach into objects (default %(default)s)")
    k.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="tokenizer processes (per MPI rank or array task); default: all CPUs")
    k.add_argument("--shard-tokens", type=int, default=1 << 30,
                   help="close a shard at the first document boundary past this many tokens (default 2^30)")
    k.add_argument("--unit-bytes", type=int, default=UNIT_BYTES,
                   help="size of a unit of work: smaller inputs are grouped, larger .jsonl files cut into "
                   "ranges of this size; shards never span units (default 256 MiB)")
    k.add_argument("--strict", action="store_true", help="stop at the first bad record (file:line: reason) "
                   "instead of skipping and counting it")
    k.add_argument("--overwrite", action="store_true", help="replace output made with different arguments (or "
                   "from inputs changed since); the old output stays until the new run has completed")
    k.add_argument("--log-interval", type=float, default=30.0, metavar="SECONDS",
                   help="when stderr is not a terminal (batch jobs), log progress this often (a terminal gets a bar; "
                   "default %(default)s)")
    k.add_argument("--part", type=int, help="do only part I of the units (0-based; with --num-parts); "
                   "no manifest is written: run `join` once every part is done")
    k.add_argument("--num-parts", type=int, help="number of parts K: part I takes units I, I+K, I+2K, ...")

    j = sub.add_parser("join", help="after every `tokenize --part` task: write the manifest that training reads",
                       description="Number the shards of all parts in input order and write OUT/manifest.json. "
                       "Fails, naming the first missing unit, until every part has finished; safe to re-run.")
    j.add_argument("output", help="the output folder of the tokenize --part tasks")

    i = sub.add_parser("inspect", help="summarise a tokenized output folder and decode documents")
    i.add_argument("output", help="a tokenize output folder")
    i.add_argument("--docs", type=int, default=0, help="decode the first K documents (default %(default)s)")
    i.add_argument("--verify", action="store_true", help="re-read every shard and check it against the manifest "
                   "(sha256, documents, tokens)")

    d = sub.add_parser("demo-corpus", help="write the built-in corpus (Python's own documentation) as jsonl")
    d.add_argument("--output", required=True, help="folder to write corpus.jsonl into")
    return p


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
            from .tokenize import mpi_world, tokenize

            m = tokenize(args.inputs, args.tokenizer, args.output, args.text_key, args.workers,
                         args.shard_tokens, args.strict, args.overwrite, args.part, args.num_parts, args.unit_bytes,
                         args.log_interval, eod_token=args.eod_token)
            if "part" in m:
                print(f"{args.output}: part {m['part']} of {m['num_parts']} done ({m['units']} of "
                      f"{m['total_units']} units); run `python -m preprocess join {args.output}` after all parts")
                return
            comm = mpi_world()
            if comm is not None and comm.Get_rank() != 0:
                return  # rank 0 reports
            docs = sum(s["documents"] for s in m["shards"])
            tokens = sum(s["tokens"] for s in m["shards"])
            print(f"{args.output}: {len(m['shards'])} shards, {docs:,} documents, {tokens:,} tokens; "
                  f"skipped {m['skipped'] or 'none'}")
        elif args.command == "join":
            from .join import join
            from .lock import folder_lock

            if not os.path.isdir(args.output):
                raise FileNotFoundError(f"{args.output}: no such folder")
            with folder_lock(args.output, "`preprocess join`"):
                m = join(args.output)
            print(f"{args.output}: {len(m['shards'])} shards, {sum(s['documents'] for s in m['shards']):,} documents, "
                  f"{sum(s['tokens'] for s in m['shards']):,} tokens; skipped {m['skipped'] or 'none'}")
        elif args.command == "inspect":
            from .inspect import inspect

            if not inspect(args.output, args.docs, args.verify):
                sys.exit(1)
        elif args.command == "demo-corpus":
            from .demo_corpus import write_demo_corpus

            write_demo_corpus(args.output)
    except (ValueError, OSError) as e:
        # A user error (bad input, argument or output folder) exits 2; a failure of the machine (a full disk, an
        # I/O error) exits 1. Under MPI every rank fails with the same message: rank 0 says it once.
        from .indexed import describe_os_error

        user_error = isinstance(e, (ValueError, FileNotFoundError)) or e.errno in _USER_ERRNOS
        if not any(os.environ.get(v, "0") not in ("", "0") for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK")):
            print(f"error: {e if isinstance(e, ValueError) or e.errno is None else describe_os_error(e)}",
                  file=sys.stderr)
        sys.exit(2 if user_error else 1)


if __name__ == "__main__":
    main()
