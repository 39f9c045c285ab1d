"""Bad inputs to the trainer's CLIs (train, plan, data, convert), as a table: each row runs a CLI's `main(argv)` in
this process and expects the exit code of the CLI policy (2: user error), no traceback, and one error line with
a fragment naming the key, flag or file. `error:` rows fail after parsing (config, data, paths, checkpoints);
`usage` rows are flags the argument parser refuses (its usage line, then `PROG: error: ...`). Add a row for every
new way a user can hurt a run."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from tests.helpers import assert_one_error, run_main


def _main(cli: str):
    if cli == "train":
        from pipeline.train import main
    elif cli == "plan":
        from pipeline.plan import main
    elif cli == "data":
        from pipeline.data.__main__ import main
    else:
        from pipeline.convert.cli import main
    return main


@pytest.fixture(scope="module")
def base(token_dir, tmp_path_factory) -> dict:
    """A sound run config (a 2-layer gpt over the shared token shards) and the paths the rows refer to."""
    d = tmp_path_factory.mktemp("bad_inputs_pipeline")
    cfg = {"model": {"arch": "gpt", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "seq_len": 64},
           "data": {"datasets": [{"path": str(token_dir), "weight": 1}], "split": "90,5,5"},
           "train": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 2},
           "checkpoint": {"dir": str(d / "ckpt")}, "log": {"jsonl": str(d / "log.jsonl")}}
    (d / "run.yaml").write_text(yaml.safe_dump(cfg))
    (d / "a_file").write_text("not a folder\n")
    (d / "ds_sched.json").write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    (d / "ds_bad.json").write_text("{not json")
    return {"config": str(d / "run.yaml"), "data": str(token_dir), "tmp": str(d), "file": str(d / "a_file"),
            "seq_ckpt": _committed_tag_with_other_seq_len(d, token_dir),
            **_broken_manifests(d, token_dir)}


def _broken_manifests(d, token_dir) -> dict:
    """Copies of the token folder (shards linked) whose manifest has one wrong field each."""
    out = {}
    for name, change in (("no_sha", lambda m: m["tokenizer"].pop("sha256")),
                         ("bad_dtype", lambda m: m.update(dtype="foo")),
                         ("vocab_str", lambda m: m["tokenizer"].update(vocab_size="100"))):
        folder = d / f"data_{name}"
        folder.mkdir()
        for p in token_dir.iterdir():
            if p.name.startswith("shard_"):
                (folder / p.name).symlink_to(p)
        m = json.loads((token_dir / "manifest.json").read_text())
        change(m)
        (folder / "manifest.json").write_text(json.dumps(m))
        out[name] = str(folder)
    return out


def _committed_tag_with_other_seq_len(d, token_dir) -> str:
    """A committed checkpoint of the same gpt with seq_len 128 (its learned position table has 128 rows)."""
    from pipeline.checkpoint import commit
    from pipeline.config import from_dict

    vocab = json.loads((token_dir / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    cfg = from_dict({"model": {"arch": "gpt", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "seq_len": 128,
                               "vocab_size": vocab}}, check=False)
    tag = d / "seq_ckpt" / "global_step2"
    tag.mkdir(parents=True)
    (tag / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    commit(str(d / "seq_ckpt"), "global_step2", {"world_size": 1})
    return str(d / "seq_ckpt")


RO = "/sys/pipeline-test"  # not writable, even by root (sysfs refuses new files)
TRAIN = ["--config", "{config}"]
PLAN = ["--config", "{config}", "--world-size", "2"]

# (id, cli, argv, exit code, fragment of the error line, kind: "error" after parsing | "usage" from argparse)
ROWS = [
    ("config missing", "train", ["--config", "{tmp}/nope.yaml"], 2, "nope.yaml", "error"),
    ("config not yaml", "train", ["--config", "{file}"], 2, "expected a mapping of sections", "error"),
    ("unknown key", "train", TRAIN + ["train.stesp=10"], 2, "unknown config key 'train.stesp'", "error"),
    ("unknown section", "train", TRAIN + ["trian.steps=10"], 2, "unknown config section 'trian'", "error"),
    ("override without =", "train", TRAIN + ["train.steps"], 2, "expected key=value", "error"),
    ("not an integer", "train", TRAIN + ["train.steps=many"], 2, "'train.steps': expected an integer", "error"),
    ("lr nan", "train", TRAIN + ["train.lr=nan"], 2, "'train.lr': expected a number, got 'nan'", "error"),
    ("micro batch 0", "train", TRAIN + ["train.micro_batch_size=0"], 2, "train.micro_batch_size must be >= 1, got 0",
     "error"),
    ("micro batch < 0", "train", TRAIN + ["train.micro_batch_size=-2"], 2, "train.micro_batch_size must be >= 1",
     "error"),
    ("global batch < 0", "train", TRAIN + ["train.global_batch_size=-4"], 2,
     "train.global_batch_size must be >= 1, got -4", "error"),
    ("steps 0", "train", TRAIN + ["train.steps=0"], 2, "train.steps must be >= 1, got 0", "error"),
    ("exit_after_minutes < 0", "train", TRAIN + ["train.exit_after_minutes=-1"], 2,
     "train.exit_after_minutes must be >= 0, got -1.0", "error"),
    ("split nan", "train", TRAIN + ["data.split=nan,1,1"], 2, "data.split 'nan,1,1'", "error"),
    ("split words", "train", TRAIN + ["data.split=a,b"], 2, "data.split 'a,b': expected comma-separated numbers",
     "error"),
    ("dataset missing", "train", TRAIN + ["data.datasets=[{path: {tmp}/none}]"], 2, "none", "error"),
    ("dataset key typo", "train", TRAIN + ["data.datasets=[{path: {data}, wieght: 5}]"], 2,
     "unknown config key 'data.datasets[0].wieght' (known: path, weight)", "error"),
    ("weight not a number", "train", TRAIN + ["data.datasets=[{path: {data}, weight: heavy}]"], 2,
     "'data.datasets[0].weight': expected a number, got 'heavy'", "error"),
    ("weight negative", "train", TRAIN + ["data.datasets=[{path: {data}, weight: -1}]"], 2,
     "data.datasets[0].weight must be a positive number, got -1", "error"),
    ("dataset without path", "train", TRAIN + ["data.datasets=[{weight: 1}]"], 2, "'data.datasets[0].path' is missing",
     "error"),
    ("datasets not a list", "train", TRAIN + ["data.datasets={path: {data}}"], 2,
     "'data.datasets': expected a list of {path, weight}", "error"),
    ("dataset not a mapping", "train", TRAIN + ["data.datasets=[[1, 2]]"], 2,
     "'data.datasets[0]': expected {path, weight}", "error"),
    ("log.jsonl read-only", "train", TRAIN + [f"log.jsonl={RO}/log.jsonl"], 2,
     f"log.jsonl {RO}/log.jsonl is not writable", "error"),
    ("log.jsonl a folder", "train", TRAIN + ["log.jsonl={tmp}"], 2, "is a folder; name a file", "error"),
    ("checkpoint.dir read-only", "train", TRAIN + [f"checkpoint.dir={RO}/ckpt"], 2,
     f"checkpoint.dir {RO}/ckpt is not writable", "error"),
    ("checkpoint.dir below a file", "train", TRAIN + ["checkpoint.dir={file}/ckpt"], 2, "is a file, not a folder",
     "error"),
    ("tensorboard_dir read-only", "train", TRAIN + [f"log.tensorboard_dir={RO}/tb"], 2,
     "log.tensorboard_dir", "error"),
    ("resume gpt with another seq_len", "train", TRAIN + ["checkpoint.dir={seq_ckpt}"], 2,
     "model.seq_len 128 -> 64", "error"),
    ("manifest tokenizer without sha256", "train", TRAIN + ["data.datasets=[{path: {no_sha}}]"], 2,
     "tokenizer.sha256", "error"),
    ("manifest dtype foo", "train", TRAIN + ["data.datasets=[{path: {bad_dtype}}]"], 2, "dtype 'foo'", "error"),
    ("manifest vocab_size a string", "train", TRAIN + ["data.datasets=[{path: {vocab_str}}]"], 2,
     "tokenizer.vocab_size is '100'", "error"),
    ("deepspeed json sets a scheduler", "train", TRAIN + ["parallel.deepspeed_config={tmp}/ds_sched.json"], 2,
     "sets 'scheduler', which the trainer owns", "error"),
    ("deepspeed json not json", "train", TRAIN + ["parallel.deepspeed_config={tmp}/ds_bad.json"], 2,
     "is not readable JSON", "error"),
    ("deepspeed json missing", "train", TRAIN + ["parallel.deepspeed_config={tmp}/none.json"], 2,
     "none.json is not a file", "error"),
    ("plan world 0", "plan", ["--config", "{config}", "--world-size", "0"], 2,
     "argument --world-size: must be >= 1, got 0", "usage"),
    ("plan world -1", "plan", ["--config", "{config}", "--world-size", "-1"], 2,
     "argument --world-size: must be >= 1, got -1", "usage"),
    ("plan mfu 0", "plan", PLAN + ["--mfu", "0"], 2, "argument --mfu: must be > 0 and <= 1, got 0", "usage"),
    ("plan mfu -1", "plan", PLAN + ["--mfu", "-1"], 2, "argument --mfu: must be > 0 and <= 1, got -1", "usage"),
    ("plan mfu 40", "plan", PLAN + ["--mfu", "40"], 2, "argument --mfu: must be > 0 and <= 1, got 40", "usage"),
    ("plan gpu-mem 0", "plan", PLAN + ["--gpu-mem", "0"], 2, "argument --gpu-mem: must be > 0", "usage"),
    ("plan tp 0", "plan", PLAN + ["parallel.tp=0"], 2, "parallel.tp must be >= 1, got 0", "error"),
    ("plan pp -2", "plan", PLAN + ["parallel.pp=-2"], 2, "parallel.pp must be >= 1, got -2", "error"),
    ("plan micro batch < 0", "plan", PLAN + ["train.micro_batch_size=-1"], 2,
     "train.micro_batch_size must be >= 1, got -1", "error"),
    ("plan global batch < 0", "plan", PLAN + ["train.global_batch_size=-8"], 2,
     "train.global_batch_size must be >= 1, got -8", "error"),
    ("plan unknown gpu", "plan", PLAN + ["--gpu", "RTX 4090"], 2, "--gpu 'RTX 4090': no peak TFLOPs known", "error"),
    ("plan split nan", "plan", PLAN + ["data.split=nan,1,1"], 2, "data.split 'nan,1,1'", "error"),
    ("data inspect key typo", "data", ["inspect", "--config", "{config}", "data.datasets=[{path: {data}, wieght: 5}]"],
     2, "data.datasets[0].wieght", "error"),
    ("convert shard size 0", "convert", ["to-hf", "{tmp}", "{tmp}/out", "--max-shard-size", "0"], 2,
     "--max-shard-size must be a positive number", "usage"),
]


def assert_usage_error(result, code: int, fragment: str) -> str:
    """argparse's refusal of a flag: exit `code`, no traceback, the last line `PROG: error: ...` with `fragment`."""
    err = result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert result.returncode == code, f"exit {result.returncode}, expected {code}\n{err[-3000:]}"
    assert lines and ": error: " in lines[-1] and sum("error:" in line for line in lines) == 1, err[-3000:]
    assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    return lines[-1]


@pytest.mark.parametrize("cli,argv,code,fragment,kind", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(base, capsys, monkeypatch, cli, argv, code, fragment, kind):
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def ran(*args, **kwargs):
        raise AssertionError("the input passed every check and training started")
    monkeypatch.setattr("pipeline.train.run", ran)
    result = run_main(_main(cli), [_fill(a, base) for a in argv], capsys)
    check = assert_one_error if kind == "error" else assert_usage_error
    check(result, code, _fill(fragment, base))


def _fill(text: str, paths: dict) -> str:
    """Put the fixture's paths in for `{config}`, `{data}`, ... (YAML's own braces are left alone)."""
    for key, value in paths.items():
        text = text.replace("{" + key + "}", value)
    return text


def test_the_base_config_is_sound(base, capsys):
    """The rows fail because of their one change: the same config plans cleanly."""
    result = run_main(_main("plan"), ["--config", base["config"], "--world-size", "2"], capsys)
    assert result.returncode == 0, result.stderr


def test_writability_check_leaves_nothing_behind(tmp_path):
    from pipeline.train import check_writable

    check_writable("checkpoint.dir", str(tmp_path / "a" / "b"), True)
    check_writable("log.jsonl", str(tmp_path / "c" / "log.jsonl"), False)
    (tmp_path / "log.jsonl").write_text("{}\n")
    check_writable("log.jsonl", str(tmp_path / "log.jsonl"), False)
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl"] and (tmp_path / "log.jsonl").read_text() == "{}\n"
