"""Benchmark `preprocess tokenize` against bare SentencePiece and a Megatron-style baseline, side by side; with
`--kind byte-bpe`, against bare Hugging Face `tokenizers` for a GPT-2-style byte-level BPE tokenizer.

    flock /tmp/bench.lock .venv/bin/python bench/preprocess.py [--size-mb 200] [--small-mb 100] [--repeat 1]
    flock /tmp/bench.lock .venv/bin/python bench/preprocess.py --kind byte-bpe [--size-mb 50] [--vocab 50000]

Generates a jsonl corpus under /tmp (documents assembled from the built-in corpus's paragraphs), trains a
tokenizer on it once, then measures in fresh processes, each with the peak RSS summed over its process tree:
  bare        one process: sp.encode over the documents already in memory (encode time only)
  tokenize    `python -m preprocess tokenize` with 1 and 2 workers (wall time of the whole command)
  megatron    Megatron-LM's preprocess_data shape: Pool.imap over JSON lines, json.loads + one encode call per
              document, megatron-core's IndexedDatasetBuilder fed from the parent (2 workers)
and prints the ratios the preprocessing issue asks for, plus peak RSS on two corpus sizes.

--kind byte-bpe: the tokenizer is `train-tokenizer --model-type byte-bpe` on the built-in corpus, padded with
added tokens to --vocab (the built-in corpus alone supports ~12k tokens), passed to `tokenize` as its folder:
  bare        one process: `tokenizers` encode_batch (parallelism off: one thread) over the documents in memory,
              the ids taken out as Python lists (encode time only); also encode_batch_fast (no character offsets),
              which the workers call, as a second, stricter baseline
  tokenize    `python -m preprocess tokenize --tokenizer FOLDER` with 1 and 2 workers (wall time of the command,
              including transformers' AutoTokenizer load in the parent)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORK = "/tmp/bench_preprocess"

_BARE = r"""
import json, sys, time, sentencepiece as spm
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
texts = [json.loads(l)["text"] for f in sys.argv[2:] for l in open(f, "rb")]
t = time.perf_counter(); c = time.process_time(); n = 0
for i in range(0, len(texts), 256):
    n += sum(map(len, sp.encode(texts[i:i + 256], num_threads=1)))
print(json.dumps({"tokens": n + len(texts), "seconds": time.perf_counter() - t, "cpu_own": time.process_time() - c}))
"""

_MEGATRON = r"""
import json, sys, time, warnings
from multiprocessing import Pool
import numpy as np, sentencepiece as spm
warnings.simplefilter("ignore")
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
model, out, workers, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
sp = None
def init():
    global sp
    sp = spm.SentencePieceProcessor(model_file=model)
def encode(line):
    ids = sp.encode(json.loads(line)["text"])
    ids.append(sp.eos_id())
    return ids
def lines():
    for f in files:
        with open(f, "rb") as fh:
            yield from fh
t = time.perf_counter(); c = time.process_time(); setup = c; n = 0
builder = IndexedDatasetBuilder(out + ".bin", dtype=np.uint16)
with Pool(workers, initializer=init) as pool:
    for ids in pool.imap(encode, lines(), 32):  # as Megatron-LM's tools/preprocess_data.py does
        builder.add_document(ids, [len(ids)])
        n += len(ids)
builder.finalize(out + ".idx")
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t, "cpu_own": time.process_time() - c,
                  "cpu_setup": setup}))
"""


def make_corpus(size_mb: int) -> list[str]:
    """`size_mb` MB of jsonl in 4 files, documents of 1-60 paragraphs drawn from the demo corpus."""
    folder = os.path.join(WORK, f"corpus_{size_mb}mb")
    files = [os.path.join(folder, f"part{i}.jsonl") for i in range(4)]
    if all(os.path.exists(f) for f in files):
        return files
    from preprocess.demo_corpus import write_demo_corpus

    demo = os.path.join(WORK, "demo")
    if not os.path.exists(os.path.join(demo, "corpus.jsonl")):
        write_demo_corpus(demo)
    paragraphs = [p for line in open(os.path.join(demo, "corpus.jsonl"))
                  for p in json.loads(line)["text"].split("\n\n") if p.strip()]
    rng = random.Random(size_mb)
    os.makedirs(folder, exist_ok=True)
    for f in files:
        written = 0
        with open(f + ".tmp", "w") as out:
            while written < size_mb * 1e6 / len(files):
                doc = "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(1, 60)))
                line = json.dumps({"id": written, "text": doc}) + "\n"
                out.write(line)
                written += len(line)
        os.replace(f + ".tmp", f)
    return files


def make_huge_document(size_mb: int) -> list[str]:
    """One jsonl file holding a single document of `size_mb` MB (plus a short one after it)."""
    path = os.path.join(WORK, f"huge_{size_mb}mb", "huge.jsonl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rng = random.Random(0)
        paragraphs = [json.loads(line)["text"] for line in open(make_corpus(10)[0])][:200]
        parts, size = [], 0
        while size < size_mb * 1e6:
            parts.append(rng.choice(paragraphs))
            size += len(parts[-1]) + 2
        with open(path + ".tmp", "w") as f:
            f.write(json.dumps({"text": "\n\n".join(parts)}) + "\n" + json.dumps({"text": "after"}) + "\n")
        os.replace(path + ".tmp", path)
    return [path]


_BARE_HF = r"""
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from tokenizers import Tokenizer
tk = Tokenizer.from_file(os.path.join(sys.argv[1], "tokenizer.json"))
texts = [json.loads(l)["text"] for f in sys.argv[2:] for l in open(f, "rb")]
def timed(encode):
    t = time.perf_counter(); c = time.process_time(); n = 0
    for i in range(0, len(texts), 256):
        n += sum(len(e.ids) for e in encode(texts[i:i + 256]))
    return n + len(texts), time.perf_counter() - t, time.process_time() - c
n, wall, cpu = timed(tk.encode_batch)
_, fast_wall, fast_cpu = timed(tk.encode_batch_fast)  # no offsets: what the workers call
print(json.dumps({"tokens": n, "seconds": wall, "cpu_own": cpu, "fast_seconds": fast_wall, "fast_cpu": fast_cpu}))
"""


def make_byte_bpe(vocab: int) -> str:
    """A byte-level BPE folder trained on the built-in corpus, padded with added tokens to `vocab` tokens."""
    out = os.path.join(WORK, f"byte_bpe_{vocab}")
    if os.path.exists(os.path.join(out, "tokenizer_info.json")):
        return out
    make_corpus(10)  # writes the built-in corpus to WORK/demo
    run([sys.executable, "-m", "preprocess", "train-tokenizer", os.path.join(WORK, "demo"), "--output", out,
         "--vocab-size", str(vocab), "--model-type", "byte-bpe"])
    from tokenizers import Tokenizer

    path = os.path.join(out, "tokenizer.json")
    tk = Tokenizer.from_file(path)
    tk.add_tokens([f"<extra_{i}>" for i in range(vocab - tk.get_vocab_size())])
    tk.save(path)
    return out


def make_tokenizer(files: list[str], vocab: int) -> str:
    out = os.path.join(WORK, f"tokenizer_{vocab}")
    model = os.path.join(out, "tokenizer.model")
    if not os.path.exists(model):
        run([sys.executable, "-m", "preprocess", "train-tokenizer", *files, "--output", out, "--vocab-size",
             str(vocab), "--sample-docs", "1000"])
    return model


def _cpu_of_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(cmd: list[str]) -> tuple[float, int, str, float]:
    """Run cmd; returns (wall seconds, peak RSS bytes summed over its process tree, stdout, CPU seconds of the
    whole tree: a figure the other load on a shared machine disturbs less than wall time)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cpu0 = _cpu_of_children()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        ps, peak = psutil.Process(proc.pid), 0
        top_cpu = 0.0
        while proc.poll() is None:
            try:
                procs = [ps, *ps.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
                times = ps.cpu_times()
                top_cpu = times.user + times.system
            except psutil.Error:
                pass
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        cpu = _cpu_of_children() - cpu0
        out.seek(0)
        text = out.read()
        err.seek(0)
        run.stderr = err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-2000:]}")
    run.top_cpu = top_cpu  # CPU of the top process alone (the parent), as last seen
    return wall, peak, text, cpu


def tokenize(files, model, workers, tag) -> dict:
    out = os.path.join(WORK, f"out_{tag}")
    subprocess.run(["rm", "-rf", out], check=True)
    wall, rss, _, cpu = run([sys.executable, "-m", "preprocess", "tokenize", *files, "--tokenizer", model,
                             "--output", out, "--workers", str(workers)])
    with open(os.path.join(out, "manifest.json")) as f:
        tokens = sum(s["tokens"] for s in json.load(f)["shards"])
    # the run's own timing (from its last log line): the work after start-up (imports, tokenizer load)
    timed = re.findall(r"tokens in ([0-9.]+) s", run.stderr)
    return {"tokens": tokens, "seconds": wall, "rss": rss, "cpu": cpu, "cpu_parent": run.top_cpu,
            "run_seconds": float(timed[-1]) if timed else wall}


def script(code, *args) -> dict:
    wall, rss, text, cpu = run([sys.executable, "-c", code, *args])
    return {**json.loads(text.strip().splitlines()[-1]), "rss": rss, "wall": wall, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--small-mb", type=int, default=100, help="second corpus size for the RSS comparison")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=1, help="best of N for each timing")
    ap.add_argument("--huge-mb", type=int, default=0, help="only measure peak RSS on one document of this size")
    ap.add_argument("--kind", choices=["sentencepiece", "byte-bpe"], default="sentencepiece")
    args = ap.parse_args()
    if args.kind == "byte-bpe":
        return main_byte_bpe(args)
    if args.huge_mb:
        model = make_tokenizer(make_corpus(args.size_mb), args.vocab)
        files = make_huge_document(args.huge_mb)
        r = tokenize(files, model, 2, "huge")
        print(f"one {args.huge_mb} MB document: {r['tokens']:,} tokens in {r['seconds']:.1f} s, peak RSS "
              f"{r['rss'] / 2**20:.0f} MiB over all processes (2 workers)")
        return
    files = make_corpus(args.size_mb)
    small = make_corpus(args.small_mb)
    model = make_tokenizer(files, args.vocab)
    size = sum(os.path.getsize(f) for f in files)
    print(f"corpus: {size / 1e6:.0f} MB in {len(files)} files; tokenizer vocab {args.vocab}; {os.cpu_count()} CPUs; "
          f"load average before: {os.getloadavg()[0]:.1f}")

    def best(fn):
        runs = [fn() for _ in range(args.repeat)]
        return min(runs, key=lambda r: r["seconds"])

    r = {}
    r["bare"] = best(lambda: script(_BARE, model, *files))
    r["tok1"] = best(lambda: tokenize(files, model, 1, "w1"))
    r["tok2"] = best(lambda: tokenize(files, model, 2, "w2"))
    r["meg2"] = best(lambda: script(_MEGATRON, model, os.path.join(WORK, "megatron"), "2", *files))
    r["small2"] = tokenize(small, model, 2, "small")
    rate = {k: v["tokens"] / v["seconds"] for k, v in r.items()}
    for k, v in r.items():
        print(f"  {k:7s} {v['tokens']:>12,} tokens {v['seconds']:7.1f} s {rate[k] / 1e6:6.3f} Mtok/s "
              f"peak RSS {v['rss'] / 2**20:6.0f} MiB; CPU {v['cpu']:6.1f} s (whole process tree)")
    print(f"tokenize per worker / bare encode:   1 worker {rate['tok1'] / rate['bare']:.3f}, "
          f"2 workers {rate['tok2'] / 2 / rate['bare']:.3f}   (goal >= 0.85)")
    print(f"tokenize / megatron-style, 2 workers: {rate['tok2'] / rate['meg2']:.3f}   (goal >= 1.5)")
    print(f"tokenize 2 workers / 1 worker:        {rate['tok2'] / rate['tok1']:.3f}   (goal >= 1.7)")
    print(f"peak RSS, 2 workers: {r['small2']['rss'] / 2**20:.0f} MiB on {args.small_mb} MB, "
          f"{r['tok2']['rss'] / 2**20:.0f} MiB on {args.size_mb} MB   (goal < 1024 MiB, flat)")
    print(f"load average after: {os.getloadavg()[0]:.1f} (wall-time ratios hold only on an otherwise idle machine)")
    # The same ratios from CPU seconds, which other load disturbs far less: the time each run would take on an
    # idle 2-core machine is at least its CPU over 2 cores and at least its parent's (serial) CPU.
    idle = {"bare": r["bare"]["cpu_own"], "tok1": r["tok1"]["cpu"],
            "tok2": max(r["tok2"]["cpu"] / 2, r["tok2"]["cpu_parent"]),
            "meg2": max((r["meg2"]["cpu"] - r["meg2"]["cpu_setup"]) / 2, r["meg2"]["cpu_own"])}
    print(f"CPU-time estimate for an idle machine: per worker / bare: 1 worker {idle['bare'] / idle['tok1']:.3f}, "
          f"2 workers {idle['bare'] / idle['tok2'] / 2:.3f}; vs megatron-style {idle['meg2'] / idle['tok2']:.3f}; "
          f"2 / 1 workers {idle['tok1'] / idle['tok2']:.3f}  (parent CPU: tokenize {r['tok2']['cpu_parent']:.1f} s, "
          f"megatron-style {r['meg2']['cpu_own']:.1f} s)")
    assert r["tok1"]["tokens"] == r["tok2"]["tokens"] == r["meg2"]["tokens"] == r["bare"]["tokens"], \
        "token counts differ between the runs"


def main_byte_bpe(args) -> None:
    vocab = 50_000 if args.vocab == 32000 else args.vocab  # 32000 is the SentencePiece default
    folder = make_byte_bpe(vocab)
    if args.huge_mb:
        r = tokenize(make_huge_document(args.huge_mb), folder, 2, "hf_huge")
        print(f"one {args.huge_mb} MB document, byte-level BPE: {r['tokens']:,} tokens in {r['seconds']:.1f} s, "
              f"peak RSS {r['rss'] / 2**20:.0f} MiB over all processes (2 workers)")
        return
    files = make_corpus(args.size_mb)
    size = sum(os.path.getsize(f) for f in files)
    print(f"corpus: {size / 1e6:.0f} MB in {len(files)} files; byte-level BPE, vocab {vocab:,} (trained on the "
          f"built-in corpus, padded with added tokens); {os.cpu_count()} CPUs; load average before: "
          f"{os.getloadavg()[0]:.1f}")

    def best(fn):
        runs = [fn() for _ in range(args.repeat)]
        return min(runs, key=lambda r: r["seconds"])

    r = {"bare": best(lambda: script(_BARE_HF, folder, *files)),
         "tok1": best(lambda: tokenize(files, folder, 1, "hf_w1")),
         "tok2": best(lambda: tokenize(files, folder, 2, "hf_w2"))}
    rate = {k: v["tokens"] / v["seconds"] for k, v in r.items()}
    for k, v in r.items():
        print(f"  {k:7s} {v['tokens']:>12,} tokens {v['seconds']:7.1f} s {rate[k] / 1e6:6.3f} Mtok/s "
              f"peak RSS {v['rss'] / 2**20:6.0f} MiB; CPU {v['cpu']:6.1f} s (whole process tree)")
    fast = r["bare"]["tokens"] / r["bare"]["fast_seconds"]
    print(f"  bare encode_batch_fast: {fast / 1e6:.3f} Mtok/s ({r['bare']['fast_seconds']:.1f} s)")
    print(f"tokenize per worker / bare tokenizers encode_batch: 1 worker {rate['tok1'] / rate['bare']:.3f}, "
          f"2 workers {rate['tok2'] / 2 / rate['bare']:.3f}   (goal >= 0.85); / encode_batch_fast: "
          f"{rate['tok1'] / fast:.3f}, {rate['tok2'] / 2 / fast:.3f}")
    print(f"tokenize 2 workers / 1 worker: {rate['tok2'] / rate['tok1']:.3f}   (goal >= 1.7)")
    run_rate = {k: r[k]["tokens"] / r[k]["run_seconds"] for k in ("tok1", "tok2")}
    print(f"after start-up (tokenize's own timing, without imports and the AutoTokenizer load: "
          f"{r['tok1']['seconds'] - r['tok1']['run_seconds']:.1f} s with 1 worker): per worker / bare "
          f"{run_rate['tok1'] / rate['bare']:.3f}, {run_rate['tok2'] / 2 / rate['bare']:.3f}; 2 / 1 workers "
          f"{run_rate['tok2'] / run_rate['tok1']:.3f}")
    print(f"load average after: {os.getloadavg()[0]:.1f} (wall-time ratios hold only on an otherwise idle machine)")
    idle = {"bare": r["bare"]["cpu_own"], "tok1": r["tok1"]["cpu"],
            "tok2": max(r["tok2"]["cpu"] / 2, r["tok2"]["cpu_parent"])}
    fast_cpu = r["bare"]["fast_cpu"]
    print(f"CPU-time estimate for an idle machine: per worker / bare: 1 worker {idle['bare'] / idle['tok1']:.3f}, "
          f"2 workers {idle['bare'] / idle['tok2'] / 2:.3f} (/ encode_batch_fast: {fast_cpu / idle['tok1']:.3f}, "
          f"{fast_cpu / idle['tok2'] / 2:.3f}); 2 / 1 workers {idle['tok1'] / idle['tok2']:.3f}  "
          f"(parent CPU with 2 workers: {r['tok2']['cpu_parent']:.1f} s, of which the start-up (imports, "
          f"AutoTokenizer) is a fixed cost)")
    assert r["tok1"]["tokens"] == r["tok2"]["tokens"] == r["bare"]["tokens"], "token counts differ between the runs"


if __name__ == "__main__":
    main()

