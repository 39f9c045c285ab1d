"""ZeRO-3 start-up memory, side by side in one run: `python bench/zero3_memory.py [--ranks 2] [--layers 8]`.

Builds TrainEngine (ZeRO-3, data-parallel over --ranks gloo processes) for a Llama of ~230M parameters twice per
precision: as the engine does it (each block allocated, then partitioned before the next: engine.
materialize_partitioned) and the plain way (the whole model allocated, then partitioned by DeepSpeed). Prints
each rank's peak RSS growth during construction and the ratio. The gap grows with the data-parallel size:
the plain way always peaks at the whole (TP-sharded) model, ours at 1/dp of it plus one block.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(precision: str, plain: bool, layers: int) -> None:
    sys.path.insert(0, ROOT)
    from pipeline import dist
    from pipeline.config import from_dict

    cfg = from_dict({"model": {"arch": "llama", "num_layers": layers, "hidden_size": 1536, "num_heads": 12,
                               "kv_heads": 12, "ffn_hidden_size": 4096, "seq_len": 64, "vocab_size": 1000},
                     "parallel": {"zero_stage": 3},
                     "train": {"global_batch_size": int(os.environ["WORLD_SIZE"]), "micro_batch_size": 1,
                               "precision": precision},
                     "data": {"datasets": [{"path": "unused", "weight": 1}]}})
    dist.init_distributed(300)
    import pipeline.engine as engine_mod

    if plain:
        from pipeline.parallel.tp import materialize

        engine_mod.materialize_partitioned = lambda model, *a, **k: materialize(model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine = engine_mod.TrainEngine(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rank": dist.rank(), "params": engine.num_params, "peak_mib": (peak - before) / 1024}),
          flush=True)
    dist.exit_cleanly(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker[0], a.worker[1] == "plain", a.layers)
        return
    env = {**os.environ, "PYTHONPATH": ROOT}
    for precision in ("bf16", "fp32"):
        peaks = {}
        for way in ("ours", "plain"):
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={a.ranks}", __file__, "--layers", str(a.layers),
                                  "--worker", precision, way], env=env, capture_output=True, text=True)
            rows = [json.loads(m) for m in re.findall(r'\{"rank"[^{}]*\}', out.stdout)]  # ranks may share a line
            if out.returncode or len(rows) != a.ranks:
                sys.exit(f"{way} {precision} failed:\n{out.stderr[-3000:]}")
            peaks[way] = max(r["peak_mib"] for r in rows)
            params = rows[0]["params"]
        print(f"{precision}: {params / 1e6:.0f}M params, dp {a.ranks}: peak RSS growth per rank during engine "
              f"construction ours {peaks['ours']:.0f} MiB, plain {peaks['plain']:.0f} MiB, "
              f"plain/ours {peaks['plain'] / peaks['ours']:.2f}x")


if __name__ == "__main__":
    main()
