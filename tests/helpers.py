"""Plain helpers shared by test files (fixtures live in conftest.py): the CLI policy's one-line error, checked one way
for a subprocess and for a CLI's `main(argv)` run in this process."""
from __future__ import annotations

from typing import NamedTuple


class CliResult(NamedTuple):
    """What `run_main` returns; named like subprocess.CompletedProcess, so either goes to assert_one_error."""
    returncode: int
    stdout: str
    stderr: str


def run_main(main, argv: list[str], capsys) -> CliResult:
    """Run a CLI's `main(argv)` in this process (much faster than a new Python) and capture what it prints."""
    import os
    from unittest import mock

    def no_exit(code):  # a CLI that ends with os._exit would end pytest silently, with exit 0
        raise AssertionError(f"{getattr(main, '__module__', 'main')} called os._exit({code}) in the test process: "
                             f"it went past its checks and ran")

    capsys.readouterr()  # drop anything printed before
    try:
        with mock.patch.object(os, "_exit", no_exit):
            main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


def assert_one_error(result, code: int, fragment: str) -> str:
    """The CLI policy for a refused input: exit `code`, no traceback, and stderr's last line is `error: ...`
    containing `fragment`. Returns that line."""
    err = result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert result.returncode == code, f"exit {result.returncode}, expected {code}\n{err[-3000:]}"
    assert lines and lines[-1].startswith("error:"), err[-3000:]
    assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    assert sum(line.startswith("error:") for line in lines) == 1, err[-3000:]
    return lines[-1]
