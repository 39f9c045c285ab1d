"""Bad inputs to preprocessing and to the data reader, as a table: each row sets up a case, runs a CLI and expects
one `error:` line with a fragment, the exit code of the CLI policy (2: user error, 1: runtime failure) and no
traceback. Rows run the CLI's `main(argv)` in this process; a row that needs another process (a lock holder)
starts a real one. Add a row for every new way a user or a filesystem can hurt us.

Below the table: the behaviours those refusals protect (two real tokenize runs on one output, a killed lock
holder, a flipped byte anywhere in a .idx, BOMs, edited inputs, failed and overwriting runs)."""
from __future__ import annotations

import builtins
import errno
import fcntl
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import ROOT, shard_bytes
from tests.helpers import assert_one_error, run_main

HEADER = 34  # bytes of the .idx header before the sizes


# ---- fixtures: a small corpus and its complete output --------------------------------------------------------
@pytest.fixture(scope="module")
def small_src(multi_corpus, tmp_path_factory) -> Path:
    """Two short jsonl files (in-process tokenizing takes well under a second)."""
    out = tmp_path_factory.mktemp("small_src")
    for i in range(2):
        lines = (multi_corpus / f"part{i}.jsonl").read_text().splitlines()[:30]
        (out / f"part{i}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def tokenize_in_process(src, tok, out, *extra):
    from preprocess.cli import main

    main(["tokenize", str(src), "--tokenizer", str(tok), "--output", str(out), "--workers", "1", *map(str, extra)])


@pytest.fixture(scope="module")
def small_out(small_src, tokenizer_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_out") / "o"
    tokenize_in_process(small_src, tokenizer_model, out)
    return out


HOLDER = r"""
import contextlib, errno, fcntl, sys
from preprocess.lock import folder_lock, unit_locks
kind, out = sys.argv[1], sys.argv[2]
if kind.startswith("fallback"):  # a filesystem without flock
    def no_flock(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    fcntl.flock = no_flock
with contextlib.ExitStack() as held:
    if kind in ("run", "fallback"):  # else a --part task (part, unit, fallback-part)
        held.enter_context(folder_lock(out, "`preprocess tokenize`"))
    else:
        held.enter_context(folder_lock(out, "`preprocess tokenize --part 0 --num-parts 2`", shared=True))
    if kind == "unit":
        held.enter_context(unit_locks(sys.argv[3], [0], out))
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin, or kills us
"""


@pytest.fixture
def ctx(small_src, small_out, tokenizer_model, tmp_path, monkeypatch):
    """Paths for a row (out: a copy of a complete output; src, tok) and `hold`, which starts a lock holder."""
    out = tmp_path / "out"
    shutil.copytree(small_out, out)
    holders = []

    def hold(kind, *extra):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(out), *map(str, extra)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        holders.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    c = SimpleNamespace(out=out, src=small_src, tok=tokenizer_model, tmp=tmp_path, cfg=tmp_path / "run.yaml",
                        monkeypatch=monkeypatch, hold=hold)
    c.cfg.write_text(yaml.safe_dump({
        "model": {"seq_len": 32}, "data": {"datasets": [{"path": str(out), "weight": 1}],
                                           "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 2, "global_batch_size": 2, "micro_batch_size": 1}}))
    yield c
    for p in holders:
        p.kill()
        p.wait()


# ---- the setups of the rows ----------------------------------------------------------------------------------
def held_by(kind, then=None):
    def setup(c):
        if kind == "unit":
            from preprocess.plan import UNIT_BYTES, args_key, parts_dir
            from preprocess.readers import expand_inputs
            from preprocess.tokenizer import describe_tokenizer

            shutil.rmtree(c.out)  # a fresh output, so that the part's units are to do
            key = args_key(expand_inputs([str(c.src)]), describe_tokenizer(str(c.tok))["sha256"], "text", 1 << 30,
                           UNIT_BYTES)
            os.makedirs(parts_dir(str(c.out), key))
            c.hold("unit", parts_dir(str(c.out), key))
        else:
            c.hold(kind)
        if then is not None:
            then(c)
    return setup


def no_flock(c):
    def refuse(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    c.monkeypatch.setattr(fcntl, "flock", refuse)


def lock_file_from_another_host(c):
    no_flock(c)
    (c.out / ".lock.owner").write_text(json.dumps({"what": "`preprocess tokenize`", "host": "node-elsewhere",
                                                   "pid": 4242, "since": "2026-01-01 00:00:00 UTC"}))


def manifest(text):
    def setup(c):
        (c.out / "manifest.json").write_text(text)
    return setup


def flip_idx_byte(where):
    """Change one byte of shard_00000.idx: in the pointers (found on open) or the document index (by sha256)."""
    def setup(c):
        path = c.out / "shard_00000.idx"
        data = bytearray(path.read_bytes())
        n = int.from_bytes(data[18:26], "little")
        data[{"pointer": HEADER + 4 * n + 8, "doc_index": HEADER + 12 * n + 8}[where]] ^= 0x01
        path.write_bytes(bytes(data))
    return setup


def idx_dtype_int16(c):
    """uint16 → int16 (dtype code 8 → 3): same item size, so sizes and pointers still agree; the manifest does not."""
    path = c.out / "shard_00000.idx"
    data = bytearray(path.read_bytes())
    assert data[17] == 8
    data[17] = 3
    path.write_bytes(bytes(data))


def edit_input_in_place(c):
    """A copy of the corpus, tokenized, then one character changed: same size, same modification time."""
    src = c.tmp / "src"
    shutil.copytree(c.src, src)
    shutil.rmtree(c.out)
    tokenize_in_process(src, c.tok, c.out)
    f = src / "part1.jsonl"
    st = f.stat()
    data = bytearray(f.read_bytes())
    i = data.index(b"e", len(data) // 2)
    data[i:i + 1] = b"a"
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    c.src = src


def disk_full(c):
    """Every write of a shard's .bin fails as on a full disk (ENOSPC from write(), which names no file)."""
    from preprocess import indexed

    class Full(io.FileIO):
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *a, **k):
        return Full(path, "w") if ".bin" in str(path) and "w" in mode else builtins.open(path, mode, *a, **k)
    shutil.rmtree(c.out)
    c.monkeypatch.setattr(indexed, "open", fake_open, raising=False)


def read_only_cache(c):
    """chmod 0555 (enough for a user); root ignores modes, so the OS's answer is simulated for it too."""
    from pipeline.data import cache

    d = c.tmp / "cache"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:
        class ReadOnly:
            def __getattr__(self, name):
                return getattr(os, name)

            def open(self, path, flags, *a):
                if str(path).startswith(str(d)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
                    raise PermissionError(errno.EACCES, "Permission denied", path)
                return os.open(path, flags, *a)
        c.monkeypatch.setattr(cache, "os", ReadOnly())


TOKENIZE = ["tokenize", "{src}", "--tokenizer", "{tok}", "--output", "{out}", "--workers", "1"]
DATA_INSPECT = ["inspect", "--config", "{cfg}"]

# id, setup, CLI, argv, exit code, fragment of the error line
TABLE = [
    ("output held by a running tokenize", held_by("run"), "preprocess", TOKENIZE, 2,
     "is in use by `preprocess tokenize` (pid"),
    ("whole run while --part tasks run", held_by("part"), "preprocess", TOKENIZE, 2,
     "in use by `preprocess tokenize --part 0 --num-parts 2`"),
    ("join while a --part task runs", held_by("part"), "preprocess", ["join", "{out}"], 2,
     "in use by `preprocess tokenize --part 0 --num-parts 2`"),
    ("a part started twice", held_by("unit"), "preprocess", TOKENIZE + ["--part", "0", "--num-parts", "1"], 2,
     "unit 0 is being written by another `tokenize --part` task"),
    ("no flock: O_EXCL lock file of a live holder", held_by("fallback", no_flock), "preprocess", TOKENIZE, 2,
     "is in use by `preprocess tokenize` (pid"),
    ("no flock: whole run while a --part task runs", held_by("fallback-part", no_flock), "preprocess", TOKENIZE, 2,
     "in use by `preprocess tokenize --part 0 --num-parts 2`"),
    ("flock here, O_EXCL lock file of a live holder", held_by("fallback"), "preprocess", TOKENIZE, 2,
     "is in use by `preprocess tokenize` (pid"),
    ("no flock: lock file from another host", lock_file_from_another_host, "preprocess", TOKENIZE, 2,
     "node-elsewhere"),
    ("manifest []: inspect", manifest("[]"), "preprocess", ["inspect", "{out}"], 2,
     "manifest.json: not a `preprocess tokenize` manifest (a JSON list"),
    ("manifest {}: inspect", manifest("{}"), "preprocess", ["inspect", "{out}"], 2,
     "manifest.json: not a `preprocess tokenize` manifest (key 'shards'"),
    ("manifest {}: tokenize", manifest("{}"), "preprocess", TOKENIZE, 2, "manifest.json: not a `preprocess"),
    ("manifest []: join", manifest("[]"), "preprocess", ["join", "{out}"], 2, "manifest.json: not a `preprocess"),
    ("manifest not JSON", manifest('{"shards": ['), "preprocess", ["inspect", "{out}"], 2,
     "manifest.json: not valid JSON"),
    ("other arguments without --overwrite", None, "preprocess", TOKENIZE + ["--shard-tokens", "50"], 2,
     "holds the output of other arguments (another --shard-tokens); pass --overwrite"),
    ("input edited in place, same size and mtime", edit_input_in_place, "preprocess", TOKENIZE, 2,
     "part1.jsonl has changed since"),
    ("disk full while writing a shard", disk_full, "preprocess", TOKENIZE, 1,
     "no space left on device while writing "),
    ("flipped .idx pointer: inspect --docs", flip_idx_byte("pointer"), "preprocess",
     ["inspect", "{out}", "--docs", "1"], 2, "shard_00000.idx: corrupt index"),
    ("--part without --num-parts", None, "preprocess", TOKENIZE + ["--part", "1"], 2, "--part I and --num-parts K"),
    ("--workers 0", None, "preprocess", TOKENIZE + ["--workers", "0"], 2, "--workers must be >= 1"),
    ("join of a folder that is not there", None, "preprocess", ["join", "{tmp}/nothing"], 2, "no such folder"),
    ("inspect of a folder without a manifest", None, "preprocess", ["inspect", "{tmp}"], 2, "manifest.json: no manifest"),
    ("--output is a file", None, "preprocess", TOKENIZE[:5] + ["{out}/manifest.json"], 2,
     "manifest.json: not a folder"),
    ("data: manifest []", manifest("[]"), "pipeline.data", DATA_INSPECT, 2,
     "manifest.json: not a `preprocess tokenize` manifest"),
    ("data: manifest {}", manifest("{}"), "pipeline.data", DATA_INSPECT, 2, "(key 'shards' is missing"),
    ("data: flipped .idx pointer", flip_idx_byte("pointer"), "pipeline.data", DATA_INSPECT, 2,
     "shard_00000.idx: corrupt index"),
    ("data: .idx dtype changed", idx_dtype_int16, "pipeline.data", DATA_INSPECT, 2,
     "shard_00000.idx: dtype int16, the manifest says uint16"),
    ("data verify: flipped .idx document index", flip_idx_byte("doc_index"), "pipeline.data",
     ["verify", "--config", "{cfg}"], 2, "shard_00000.idx: sha256"),
    ("data inspect --step -1", None, "pipeline.data", DATA_INSPECT + ["--step", "-1"], 2, "--step -1"),
    ("data inspect --sample -2", None, "pipeline.data", DATA_INSPECT + ["--sample", "-2"], 2, "--sample -2"),
    ("data: read-only cache_dir", read_only_cache, "pipeline.data", DATA_INSPECT, 2,
     "data.cache_dir {tmp}/cache: not writable"),
]


@pytest.mark.parametrize("setup,cli,argv,code,fragment", [pytest.param(*row[1:], id=row[0]) for row in TABLE])
def test_bad_input(ctx, capsys, setup, cli, argv, code, fragment):
    if setup is not None:
        setup(ctx)
    if cli == "preprocess":
        from preprocess.cli import main
    else:
        from pipeline.data.__main__ import main
    fill = {"src": ctx.src, "tok": ctx.tok, "out": ctx.out, "cfg": ctx.cfg, "tmp": ctx.tmp}
    result = run_main(main, [a.format(**fill) for a in argv], capsys)
    assert_one_error(result, code, fragment.format(**fill))


# ---- what the refusals protect --------------------------------------------------------------------------------
def _tokenize_cmd(src, tok, out, *extra):
    from tests.conftest import PREPROCESS_SPLIT

    return [sys.executable, "-m", "preprocess", "tokenize", str(src), "--tokenizer", str(tok), "--output", str(out),
            "--workers", "1", *PREPROCESS_SPLIT, *extra]


def test_two_tokenize_runs_on_one_output(multi_corpus, tokenizer_model, multi_reference, tmp_path):
    """The second run is refused naming the first, which then finishes with the reference's bytes."""
    out = tmp_path / "o"
    first = subprocess.Popen(_tokenize_cmd(multi_corpus, tokenizer_model, out), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = out / ".lock"
    while not (lock.exists() and lock.read_bytes()):  # the holder's description is written once it holds the lock
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.002)
    first.send_signal(signal.SIGSTOP)  # holds the lock, mid-run, for as long as the second one needs
    try:
        assert first.poll() is None
        second = subprocess.run(_tokenize_cmd(multi_corpus, tokenizer_model, out), cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_error(second, 2, f"is in use by `preprocess tokenize` (pid {first.pid} on {socket.gethostname()}")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert shard_bytes(out) == shard_bytes(multi_reference)
    assert (out / ".lock").read_bytes() == b""  # released


def test_mpi_run_refused_once_while_held(ctx):
    """Rank 0 takes the lock for the whole MPI run; refused, every rank stops and rank 0 alone says why."""
    holder = ctx.hold("run")
    cmd = [os.path.join(os.path.dirname(sys.executable), "mpirun"), "-n", "2", sys.executable, "-m", "preprocess",
           *[a.format(src=ctx.src, tok=ctx.tok, out=ctx.out) for a in TOKENIZE]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_one_error(proc, 2, f"is in use by `preprocess tokenize` (pid {holder.pid}")


@pytest.mark.parametrize("kind", ["run", "fallback", "reused pid"])
def test_lock_of_a_killed_holder_is_taken_over(ctx, capsys, caplog, kind):
    """kill -9 of a holder: flock is dropped by the kernel; the O_EXCL file stays and is taken over (dead pid on
    this host, or its pid now used by a process that started at another time)."""
    from preprocess.cli import main

    shutil.rmtree(ctx.out)
    holder = ctx.hold("run" if kind == "run" else "fallback")
    owner = ctx.out / ".lock.owner"
    if kind != "run":
        no_flock(ctx)
        assert json.loads(owner.read_text())["pid"] == holder.pid
    holder.kill()
    holder.wait()
    if kind == "reused pid":  # the pid of a live process (this one), which started at another time than the holder
        owner.write_text(json.dumps({**json.loads(owner.read_text()), "pid": os.getpid()}))
    result = run_main(main, [a.format(src=ctx.src, tok=ctx.tok, out=ctx.out) for a in TOKENIZE], capsys)
    assert result.returncode == 0, result.stderr
    assert json.loads((ctx.out / "manifest.json").read_text())["complete"]
    assert not (ctx.out / ".lock.owner").exists()
    assert ("no longer running" in caplog.text) == (kind != "run")


def test_every_flipped_idx_byte_is_caught(small_out, tmp_path):
    """Header, sizes and pointers: the reader refuses the file on open. Document index: verify's sha256 does."""
    from preprocess.indexed import IndexedDataset
    from preprocess.inspect import verify

    out = tmp_path / "o"
    shutil.copytree(small_out, out)
    m = json.loads((out / "manifest.json").read_text())
    path = out / "shard_00000.idx"
    good = path.read_bytes()
    n = int.from_bytes(good[18:26], "little")
    assert verify(str(out), m) == []
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x01
        path.write_bytes(bytes(bad))
        try:
            IndexedDataset(out / "shard_00000")
        except ValueError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:
            assert i >= HEADER + 12 * n, f"byte {i} (before the document index) changed and the file opened"
            assert any(f"{path}: sha256 differs" in p for p in verify(str(out), m)), i
    bad = bytearray(good)
    bad[HEADER + 12 * n + 8 * (n // 2 & ~1)] ^= 0x01  # document k (even) now starts at k + 1: opens, monotone
    path.write_bytes(bytes(bad))
    proc = subprocess.run([sys.executable, "-m", "preprocess", "inspect", str(out), "--verify"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and f"verify: {path}: sha256 differs" in proc.stdout, proc.stdout
    path.write_bytes(good)


def test_bom_is_stripped(small_src, tokenizer_model, tmp_path):
    """A UTF-8 BOM before the first line (plain and gzip jsonl, and .txt) loses no document and changes no token."""
    import gzip

    plain, bom = tmp_path / "plain", tmp_path / "bom"
    for d in (plain, bom):
        d.mkdir()
    text = (small_src / "part0.jsonl").read_bytes()
    (plain / "a.jsonl").write_bytes(text)
    (bom / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + text)
    (plain / "b.jsonl.gz").write_bytes(gzip.compress(text))
    (bom / "b.jsonl.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + text))
    (plain / "c.txt").write_bytes(b"one whole document")
    (bom / "c.txt").write_bytes(b"\xef\xbb\xbfone whole document")
    for d in (plain, bom):
        tokenize_in_process(d, tokenizer_model, tmp_path / f"out_{d.name}")
    m = json.loads((tmp_path / "out_bom" / "manifest.json").read_text())
    assert m["skipped"] == {} and [i["documents"] for i in m["inputs"]] == [text.count(b"\n")] * 2 + [1]
    assert shard_bytes(tmp_path / "out_bom")["files"] == shard_bytes(tmp_path / "out_plain")["files"]


def test_input_touched_is_not_taken_as_complete(small_src, tokenizer_model, tmp_path, capsys):
    """Only the modification time changes: the rerun is refused; with --overwrite it tokenizes again."""
    from preprocess.cli import main

    src = tmp_path / "src"
    shutil.copytree(small_src, src)
    argv = [a.format(src=src, tok=tokenizer_model, out=tmp_path / "o") for a in TOKENIZE]
    assert run_main(main, argv, capsys).returncode == 0
    os.utime(src / "part0.jsonl", ns=(time.time_ns(), (src / "part0.jsonl").stat().st_mtime_ns + 10**9))
    assert_one_error(run_main(main, argv, capsys), 2, "part0.jsonl has changed since")
    again = run_main(main, argv + ["--overwrite"], capsys)
    assert again.returncode == 0 and "nothing to do" not in again.stderr


def test_a_failed_run_needs_no_overwrite(small_src, tokenizer_model, tmp_path, capsys):
    from preprocess.cli import main

    out = tmp_path / "o"
    argv = [a.format(src=small_src, tok=tokenizer_model, out=out) for a in TOKENIZE]
    assert_one_error(run_main(main, argv + ["--text-key", "body"], capsys), 2, "no usable documents")
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert run_main(main, argv, capsys).returncode == 0  # the corrected command, without --overwrite
    assert json.loads((out / "manifest.json").read_text())["complete"]
    assert not list(out.glob(".parts-*"))  # the failed run's parts went with the join


def test_overwrite_replaces_only_once_the_new_run_completes(small_out, small_src, tokenizer_model, tmp_path, capsys):
    from preprocess.cli import main
    from preprocess.inspect import verify

    out = tmp_path / "o"
    shutil.copytree(small_out, out)
    before = shard_bytes(out)
    argv = [a.format(src=small_src, tok=tokenizer_model, out=out) for a in TOKENIZE] + ["--overwrite"]
    assert_one_error(run_main(main, argv + ["--text-key", "body"], capsys), 2, "no usable documents")
    assert shard_bytes(out) == before  # bad arguments: the good output is untouched
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and verify(str(out), m) == []
    # killed in the join of the replacing run: the rerun finishes it, leaving no shard of the old output
    proc = subprocess.run([sys.executable, "-m", "preprocess", *argv[:-1], "--shard-tokens", "2000", "--overwrite"],
                          cwd=ROOT, env={**os.environ, "PREPROCESS_KILL_IN_JOIN": "2"}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert run_main(main, argv + ["--shard-tokens", "2000"], capsys).returncode == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["args"]["shard_tokens"] == 2000 and verify(str(out), m) == []
    assert sorted(p.name for p in out.glob("shard_*")) == sorted(s["name"] + e for s in m["shards"]
                                                                for e in (".bin", ".idx"))
    fresh = tmp_path / "fresh"
    tokenize_in_process(small_src, tokenizer_model, fresh, "--shard-tokens", "2000")
    assert shard_bytes(out) == shard_bytes(fresh)


def test_disk_full_then_resume(small_src, small_out, tokenizer_model, tmp_path, capsys, monkeypatch):
    from preprocess.cli import main

    c = SimpleNamespace(out=tmp_path / "o", monkeypatch=monkeypatch)
    c.out.mkdir()
    disk_full(c)
    argv = [a.format(src=small_src, tok=tokenizer_model, out=c.out) for a in TOKENIZE]
    line = assert_one_error(run_main(main, argv, capsys), 1, "no space left on device while writing ")
    assert str(c.out / ".parts-") in line and line.split("writing ")[1].split(";")[0].endswith(".bin")
    monkeypatch.undo()
    assert run_main(main, argv, capsys).returncode == 0
    assert shard_bytes(c.out) == shard_bytes(small_out)
    assert not list(c.out.glob("**/*.tmp*"))
