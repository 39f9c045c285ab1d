"""to-hf of a 1.3B-parameter checkpoint on CPU: wall time and peak RSS against the fp32 model size.

    flock /tmp/bench.lock .venv/bin/python bench/convert.py [--work /tmp/bench-convert] [--layout zero3|zero1]
                                                            [--baseline] [--keep]

Writes a random-weight checkpoint in the trainer's layout under --work (ZeRO-3 over 2 data-parallel ranks:
fp32 master weights cut into per-rank flat partitions, as DeepSpeed saves them; or ZeRO-1: one
mp_rank_00_model_states.pt with the whole module), then runs `python -m pipeline.convert to-hf` in a child
process and reads its peak RSS (ru_maxrss, memory-mapped file pages included). With --baseline it also runs
the path this tool replaced (DeepSpeed's get_fp32_state_dict_from_zero_checkpoint, then transformers'
save_pretrained) on the same checkpoint, side by side. The Adam moments are not written: the reader
memory-maps the files and never touches them, so they would only cost disk.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import zlib

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.config import RunConfig, from_dict  # noqa: E402
from pipeline.model import Transformer  # noqa: E402

MODEL = {"arch": "llama", "num_layers": 24, "hidden_size": 2048, "num_heads": 16, "kv_heads": 16,
         "ffn_hidden_size": 5504, "vocab_size": 32000, "seq_len": 2048}


def shapes(cfg: RunConfig) -> dict:
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied/shared parameters once


def param(name: str, shape: tuple, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02


def write_zero3(tag_dir: str, cfg: RunConfig, dp: int = 2) -> None:
    """ZeRO-3 files as DeepSpeed writes them: per rank, the parameter shapes and its flat fp32 partitions."""
    params = shapes(cfg)
    groups = [{n: s for n, s in params.items() if len(s) >= 2}, {n: s for n, s in params.items() if len(s) < 2}]
    for rank in range(dp):
        flats = []
        for group in groups:
            parts = [math.ceil(math.prod(s) / dp) for s in group.values()]
            flat = torch.empty(sum(parts))
            offset = 0
            for i, ((name, shape), part) in enumerate(zip(group.items(), parts)):
                full = param(name, shape, zlib.crc32(name.encode())).reshape(-1)
                piece = full[rank * part:(rank + 1) * part]
                flat[offset:offset + piece.numel()] = piece
                flat[offset + piece.numel():offset + part] = 0
                offset += part
                del full
            flats.append(flat)
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": dp, "fp32_flat_groups": flats}},
                   os.path.join(tag_dir, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        del flats
        torch.save({"module": {}, "buffer_names": [], "param_shapes": [{n: torch.Size(s) for n, s in g.items()}
                                                                       for g in groups],
                    "shared_params": {}, "frozen_param_shapes": None, "frozen_param_fragments": None,
                    "ds_version": "0.19.8"},
                   os.path.join(tag_dir, f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"))


def write_zero1(tag_dir: str, cfg: RunConfig) -> None:
    module = {n: param(n, s, zlib.crc32(n.encode())) for n, s in shapes(cfg).items()}
    torch.save({"module": module, "buffer_names": []}, os.path.join(tag_dir, "mp_rank_00_model_states.pt"))


def make_checkpoint(work: str, layout: str) -> tuple[str, int]:
    cfg = from_dict({"model": MODEL, "data": {"datasets": [{"path": "unused", "weight": 1.0}]}}, check=False)
    ckpt = os.path.join(work, f"ckpt-{layout}")
    tag_dir = os.path.join(ckpt, "global_step1")
    n = sum(math.prod(s) for s in shapes(cfg).values())
    if not os.path.isfile(os.path.join(tag_dir, "COMMITTED")):
        shutil.rmtree(ckpt, ignore_errors=True)
        os.makedirs(tag_dir)
        t0 = time.time()
        (write_zero3 if layout == "zero3" else write_zero1)(tag_dir, cfg)
        with open(os.path.join(tag_dir, "run_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f)
        open(os.path.join(tag_dir, "COMMITTED"), "w").write("{}")
        open(os.path.join(ckpt, "latest"), "w").write("global_step1")
        print(f"wrote a {n / 1e9:.2f}B-parameter {layout} checkpoint in {time.time() - t0:.0f}s", flush=True)
    return ckpt, n


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a child process."""
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


BASELINE = """
import sys, torch, transformers
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from pipeline.config import from_dict
from pipeline.hf import hf_config, to_hf_state_dict
import json
ckpt, out = sys.argv[1:3]
cfg = from_dict(json.load(open(ckpt + '/global_step1/run_config.json')))
sd = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag='global_step1')
with torch.device('meta'):
    model = transformers.LlamaForCausalLM(hf_config(cfg.model, None))
model.load_state_dict(to_hf_state_dict(sd, cfg.model), strict=False, assign=True)
model.save_pretrained(out, max_shard_size='2GB')
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench-convert")
    p.add_argument("--layout", choices=["zero3", "zero1"], default="zero3")
    p.add_argument("--baseline", action="store_true", help="also run zero_to_fp32 + save_pretrained (zero3 only)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    ckpt, n = make_checkpoint(args.work, args.layout)
    fp32_gib = n * 4 / 2**30
    out = os.path.join(args.work, "hf")
    shutil.rmtree(out, ignore_errors=True)
    wall, rss = measure([sys.executable, "-m", "pipeline.convert", "to-hf", ckpt, out])
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"ours     to-hf {args.layout}: {wall:6.1f}s  peak RSS {rss:5.2f} GiB = {rss / fp32_gib:.2f}x fp32 model "
          f"({fp32_gib:.2f} GiB, {n / 1e9:.2f}B params); {len(files)} safetensors shards")
    if args.baseline and args.layout == "zero3":
        shutil.rmtree(out, ignore_errors=True)
        # RUSAGE_CHILDREN keeps the maximum over all children: run the baseline in its own process tree.
        code = ("import resource, subprocess, sys, time; t=time.time(); "
                "subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2], sys.argv[3]], check=True); "
                "print(time.time()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)")
        res = subprocess.run([sys.executable, "-c", code, BASELINE, ckpt, out], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": ROOT})
        if res.returncode:
            print("baseline failed:", res.stderr.strip().splitlines()[-1])
        else:
            bwall, brss = map(float, res.stdout.split()[-2:])
            print(f"baseline zero_to_fp32 + save_pretrained: {bwall:6.1f}s  peak RSS {brss:5.2f} GiB = "
                  f"{brss / fp32_gib:.2f}x fp32; ours/baseline: time {wall / bwall:.2f}x, RSS {rss / brss:.2f}x")
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)


if __name__ == "__main__":
    main()
