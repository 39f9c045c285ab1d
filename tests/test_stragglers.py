"""Per-rank timing: a planted straggler (rank 1 sleeps in its training forwards) is named, with its host, in
log.jsonl and in the warning of a real 2-rank run; the comparison groups ranks by pipeline stage."""
import json
import socket

import pytest
import torch

from pipeline.config import load_config
from pipeline.stragglers import compare
from tests.tiny_runs import STEPS, resumed_run


def test_planted_straggler_is_named_in_the_log_and_the_warning(tmp_path_factory, token_dir):
    run = resumed_run(tmp_path_factory, token_dir)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    first_launch = [r for r in rows if "split" not in r][:STEPS]  # the launch with the sleeping rank 1
    host = socket.gethostname()
    for r in first_launch:
        assert (r["slowest_rank"], r["slowest_host"]) == (1, host), r
        assert r["straggler_ratio"] > 1.2
        assert r["rank_forward_s"] > r["median_forward_s"]
        assert r["rank_step_s"] >= r["rank_forward_s"]
    out = (run / "launch1.out").read_text()
    warnings = [line for line in out.splitlines() if "straggler at step" in line]
    assert len(warnings) == STEPS, out[-3000:]
    assert all(f"rank 1 on {host} took" in line for line in warnings)


def table(rows):
    return torch.tensor(rows, dtype=torch.float64)


CASES = [  # (rows of data, forward, whole step (s/step), stage, rank), expected slowest rank, expected ratio
    # The whole step is equal on every rank (they wait for each other); it never names the straggler.
    ([[0.0, 0.10, 1, 0, 0], [0.0, 0.10, 1, 0, 1], [0.0, 0.30, 1, 0, 2], [0.0, 0.10, 1, 0, 3]], 2, 3.0),
    ([[0.2, 0.10, 1, 0, 0], [0.0, 0.10, 1, 0, 1], [0.0, 0.10, 1, 0, 2]], 0, 3.0),  # a rank slow at reading data
    # Two pipeline stages: the last stage's forward is legitimately longer; only a peer in a stage is compared.
    ([[0.0, 0.10, 1, 0, 0], [0.0, 0.11, 1, 0, 1], [0.0, 0.50, 1, 1, 2], [0.0, 0.60, 1, 1, 3]], 3, 1.2),
    ([[0.0, 0.10, 1, 0, 0]], 0, 1.0),  # one rank: nothing to compare
]


@pytest.mark.parametrize("rows,slowest,ratio", CASES)
def test_compare(rows, slowest, ratio):
    hosts = [f"node{r}" for r in range(len(rows))]
    fields = compare(table(rows), hosts)
    assert fields["slowest_rank"] == slowest and fields["slowest_host"] == f"node{slowest}"
    assert fields["straggler_ratio"] == pytest.approx(ratio, rel=1e-3)


def test_threshold_below_one_is_refused():
    with pytest.raises(ValueError, match="log.straggler_ratio must be >= 1"):
        load_config(None, ["log.straggler_ratio=0.5", "data.datasets=[{path: x, weight: 1}]"])
    assert load_config(None, ["log.straggler_ratio=0", "data.datasets=[{path: x, weight: 1}]"]).log.straggler_ratio == 0
