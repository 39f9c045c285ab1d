"""Streaming safetensors writer: one tensor built and written at a time, sharded with the index transformers reads."""
from __future__ import annotations

import json
import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
DEFAULT_SHARD_BYTES = 2 * 1024**3


def _st_header(entries: list[tuple[str, torch.dtype, tuple]]) -> bytes:
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        meta[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(out_dir: str, entries: list[tuple[str, torch.dtype, tuple]], get, max_shard_bytes: int,
                      prefix: str = "model") -> list[str]:
    """Stream tensors into safetensors files (sharded above `max_shard_bytes`, with the index file that
    transformers reads): `get(name)` builds one tensor at a time, so only one is held in memory."""
    sizes = [torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in entries]
    shards, cur, cur_size = [], [], 0
    for e, n in zip(entries, sizes):
        if cur and cur_size + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(e)
        cur_size += n
    shards.append(cur)
    names = [f"{prefix}.safetensors"] if len(shards) == 1 else \
        [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(_st_header(shard))
            for name, dtype, shape in shard:
                t = get(name).to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"{name}: built shape {tuple(t.shape)}, planned {tuple(shape)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                del t
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}}
        with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return names
