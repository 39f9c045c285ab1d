"""Every input format, dotted text keys, every bad-record kind counted, --strict, and huge documents."""
import gzip
import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from preprocess.indexed import IndexedDataset
from tests.conftest import run_cli

TEXTS = [f"Document number {i} talks about topic {chr(97 + i)} at some length.\nSecond line {i}." for i in range(6)]


def _decoded(out, tok):
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    m = json.loads((out / "manifest.json").read_text())
    docs = []
    for s in m["shards"]:
        ds = IndexedDataset(out / s["name"])
        for i in range(len(ds)):
            assert int(ds[i][-1]) == m["tokenizer"]["eod_id"]
            docs.append(sp.decode([int(t) for t in ds[i][:-1]]))
    return docs, m


def _tokenize(inputs, tok, out, *extra, check=True):
    return run_cli("-m", "preprocess", "tokenize", *map(str, inputs), "--tokenizer", str(tok), "--output", str(out),
                   "--workers", "1", *extra, check=check)


def _write_formats(d):
    """One folder with every format; sorted paths give the document order TEXTS[0..]."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (d / "a.jsonl").write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    (d / "b.json").write_text(json.dumps({"text": TEXTS[1]}) + "\n")
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": TEXTS[2]}) + "\n")
    (d / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress((json.dumps({"text": TEXTS[3]}) + "\n").encode()))
    pq.write_table(pa.table({"text": [TEXTS[4]], "id": [4]}), d / "e.parquet")
    (d / "f.txt").write_text(TEXTS[5])


def test_every_format_in_input_order(tokenizer_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _write_formats(src)
    docs, m = _decoded_after(tokenizer_model, tmp_path, [src])
    assert docs == TEXTS
    assert [i["documents"] for i in m["inputs"]] == [1] * 6 and m["skipped"] == {}


def _decoded_after(tok, tmp_path, inputs, *extra):
    out = tmp_path / "out"
    _tokenize(inputs, tok, out, *extra)
    return _decoded(out, tok)


def test_glob_save_to_disk_and_dotted_key(tokenizer_model, tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"meta": [{"body": t} for t in TEXTS[:3]]}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"meta": {"body": t}}) + "\n" for t in TEXTS[3:]))
    (tmp_path / "ignored.csv").write_text("not,an,input\n")
    docs, _ = _decoded_after(tokenizer_model, tmp_path, [tmp_path / "hf", tmp_path / "*.jsonl"],
                             "--text-key", "meta.body")
    assert docs == TEXTS


def _bad_corpus(d):
    good = json.dumps({"text": "a good document"}).encode()
    lines = [good,
             b'{"text": "unterminated',                      # 2 malformed_json
             json.dumps({"body": "x"}).encode(),             # 3 missing_text_key
             json.dumps({"text": 42}).encode(),              # 4 non_string_text
             b'{"text": "caf\xe9"}',                         # 5 invalid_utf8
             json.dumps({"text": "   "}).encode(),           # 6 empty_document
             b"",                                            # 7 blank line: not a record
             good]
    (d / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    payload = gzip.compress(b"".join(good + b"\n" for _ in range(2000)))
    (d / "b.jsonl.gz").write_bytes(payload[: len(payload) // 2])  # truncated_file
    import zstandard

    z = zstandard.ZstdCompressor().compress(b"".join(good + b"\n" for _ in range(2000)))
    (d / "c.jsonl.zst").write_bytes(z + z[: len(z) // 2])  # two frames, the second cut: truncated_file
    (d / "d.parquet").write_bytes(b"this is not parquet")  # unreadable_file
    os.symlink(d / "missing-target.jsonl", d / "e.jsonl")  # unreadable_file
    (d / "f.txt").write_bytes(b"")  # empty_document


def test_every_bad_record_kind_counted(tokenizer_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _bad_corpus(src)
    out = tmp_path / "out"
    p = _tokenize([src], tokenizer_model, out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped"] == {"empty_document": 2, "invalid_utf8": 1, "malformed_json": 1, "missing_text_key": 1,
                            "non_string_text": 1, "truncated_file": 2, "unreadable_file": 2}
    assert "truncated_file" in p.stdout  # the final summary names the reasons
    assert m["inputs"][0]["documents"] == 2
    assert m["inputs"][1]["documents"] > 0 and m["inputs"][2]["documents"] > 0  # the records before the cut
    inspect = run_cli("-m", "preprocess", "inspect", str(out), "--verify")
    assert "malformed_json 1" in inspect.stdout and "shards OK" in inspect.stdout


@pytest.mark.parametrize("name,content,where", [
    ("a.jsonl", b'{"text": "ok"}\n\n{"text": "ok"}\n{"text": 1}\n', "a.jsonl:4: non_string_text"),
    ("b.jsonl.gz", gzip.compress(b'{"text": "ok"}\n{"txt": "x"}\n'), "b.jsonl.gz:2: missing_text_key"),
])
def test_strict_stops_at_first_bad_record(tokenizer_model, tmp_path, name, content, where):
    (tmp_path / name).write_bytes(content)
    p = _tokenize([tmp_path / name], tokenizer_model, tmp_path / "out", "--strict", check=False)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and where in errors[0], p.stderr
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


def test_huge_document_encoded_piecewise_gives_the_same_ids(tokenizer_model, tmp_path, monkeypatch):
    import preprocess.runner as runner
    import preprocess.worker as worker
    from preprocess.tokenize import tokenize

    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta,", "gamma", "delta.", "x1", "\n", "  indented", "(paren)", "end\n\n"])
    text = " ".join(rng.choice(words, 60_000))
    (tmp_path / "h.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "tail"}) + "\n")
    monkeypatch.setattr(worker, "HUGE_CHARS", 5_000)  # ~80 pieces
    monkeypatch.setattr(runner, "CHUNK_BYTES", 1 << 16)  # the line spans several tasks, only the first reads it
    tokenize([str(tmp_path / "h.jsonl")], str(tokenizer_model), str(tmp_path / "out"), workers=1)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    ds = IndexedDataset(tmp_path / "out" / "shard_00000")
    assert ds[0].tolist() == sp.encode(text) + [sp.eos_id()]
    assert ds[1].tolist() == sp.encode("tail") + [sp.eos_id()]


@pytest.mark.parametrize("chunk", [3, 64, 5000])
def test_byte_ranges_cover_every_line_once(tmp_path, chunk):
    from preprocess.worker import _read_range

    rng = np.random.default_rng(chunk)
    lines = [bytes(rng.integers(97, 123, size=int(n), dtype=np.uint8)) for n in rng.integers(0, 300, size=200)]
    data = b"\n".join(lines)  # no newline at the end of the file
    (tmp_path / "f.jsonl").write_bytes(data)
    got = []
    for a in range(0, len(data), chunk):
        got += list(_read_range(str(tmp_path / "f.jsonl"), a, min(a + chunk, len(data)), a == 0))
    assert [line for _, _, line in got] == lines
    assert [s for s, _, _ in got] == [sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))]
