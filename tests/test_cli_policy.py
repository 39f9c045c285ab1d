"""The CLI policy (README, "Command-line policy"), checked on every command-line entry point of the project:
`--help` answers without importing torch (well under a second), every option has help text naming its default,
and a flag the parser refuses exits 2. The entry points are discovered (a package's `__main__.py`, a module's
`if __name__ == "__main__":`), so a new CLI is held to the policy without editing this file."""
from __future__ import annotations

import argparse
import re
import runpy
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# runpy warns when a CLI module was already imported by another test; running it again as __main__ is the point
pytestmark = pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
CORE = {"pipeline.train", "pipeline.plan", "pipeline.data", "pipeline.convert", "pipeline.generate", "preprocess"}


def entry_points() -> list[str]:
    """`python -m X` modules under pipeline/ and preprocess/."""
    found = set()
    for package in ("pipeline", "preprocess"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if path.name == "__main__.py":
                found.add(".".join(parts[:-1]))
            elif 'if __name__ == "__main__":' in path.read_text() and not (path.parent / "__main__.py").exists():
                found.add(".".join(parts))
    return sorted(found)


CLIS = entry_points()


def test_the_entry_points_are_found():
    assert CORE <= set(CLIS), CLIS


@pytest.mark.parametrize("module", CLIS)
def test_help_imports_no_torch(module):
    """`-X importtime` lists every module a process imports: `--help` must not reach torch or deepspeed."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "deepspeed", "transformers"}, sorted(imported & {"torch", "deepspeed"})


class _Parsed(Exception):
    pass


def parsers_of(module: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """Run `python -m module` in this process up to its argument parsing, and return its parser and subparsers."""
    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(sys, "argv", [module])
    with pytest.raises(_Parsed):
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    out, todo = [], [seen[0]]
    while todo:
        parser = todo.pop()
        out.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())
    return out


def _has_default(action: argparse.Action) -> bool:
    d = action.default
    return not (d is None or d is False or d == [] or d == argparse.SUPPRESS)  # 0 is a default; False is a flag


def _shows_default(action: argparse.Action) -> bool:
    """The help says the default: `%(default)s`, or in words where the value depends on the machine or reads
    better in units ("default: all CPUs", "default 256 MiB")."""
    return "%(default)" in action.help or re.search(r"\bdefault\b", action.help) is not None


@pytest.mark.parametrize("module", CLIS)
def test_every_option_has_help_with_its_default(module, monkeypatch):
    missing = []
    for parser in parsers_of(module, monkeypatch):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.help == argparse.SUPPRESS:
                continue
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{parser.prog} {c.dest}: no help" for c in action._choices_actions if not c.help]
                continue
            if not action.help:
                missing.append(f"{name}: no help")
            elif (_has_default(action) and not action.required and not isinstance(action, argparse._StoreConstAction)
                  and not _shows_default(action)):
                missing.append(f"{name}: help does not say its default {action.default!r}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("module", CLIS)
def test_a_refused_flag_exits_2(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--no-such-flag"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and lines and "error:" in lines[-1], lines
