"""data.mask_eod_loss through the pipeline engine: the first logged loss equals the single-process model's
masked loss on the same batch (labels after an EOD excluded), and differs from the unmasked loss."""
import json

import numpy as np
import torch
import yaml

from tests.launch import run_ranks


def test_masked_first_loss_matches_oracle(tmp_path, token_dir):
    from pipeline.config import load_config
    from pipeline.data import TokenDocuments, batch_for_rank, build_datasets, loss_mask
    from pipeline.model import build_model, lm_loss

    cfg_dict = {
        "model": {"arch": "gpt", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "seq_len": 64,
                  "init_std": 1.0},  # large weights: per-token losses vary, so the mask shows
        "parallel": {"pp": 2, "zero_stage": 1},
        "data": {"datasets": [{"path": str(token_dir), "weight": 1.0}], "mask_eod_loss": True},
        "train": {"steps": 1, "global_batch_size": 32, "micro_batch_size": 16},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
        "log": {"jsonl": str(tmp_path / "log.jsonl")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    assert run_ranks(2, "--config", str(path), log_dir=tmp_path) == [0, 0], (tmp_path / "rank0.log").read_text()[-2000:]
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["loss"]

    cfg = load_config(str(path), [f"model.vocab_size={json.loads((token_dir / 'manifest.json').read_text())['tokenizer']['vocab_size']}"])
    docs = [TokenDocuments(str(token_dir))]
    train, _ = build_datasets(cfg, docs)
    tokens = batch_for_rank(train, 0, 32, 0, 1)
    eod = docs[0].tokenizer["eod_id"]
    mask = loss_mask(tokens, eod)
    assert 0 < mask.sum() < mask.size  # the batch really has EODs inside
    model = build_model(cfg.model, seed=cfg.train.seed).eval()
    with torch.no_grad():
        per_mb = []
        for mb, m in zip(np.split(tokens, 2), np.split(mask, 2)):
            x = torch.from_numpy(mb)
            per_mb.append(lm_loss(model(x[:, :-1]), x[:, 1:], torch.from_numpy(m)).item())
        plain = lm_loss(model(torch.from_numpy(tokens[:, :-1])), torch.from_numpy(tokens[:, 1:])).item()
    expected = float(np.mean(per_mb))
    assert abs(logged - expected) < 1e-5 * abs(expected), (logged, expected)
    assert abs(logged - plain) > 100 * abs(logged - expected), (logged, expected, plain)
