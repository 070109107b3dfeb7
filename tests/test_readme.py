"""The README cannot rot: every command of its ```bash blocks is checked against the real CLI.

Each ``rsitr`` command line (also ``.venv/bin/rsitr``, ``python -m rsitr.cli``) is parsed into its
subcommand path and flags: the subcommands must exist and every ``--flag`` / ``-k`` must appear in
that subcommand's ``--help``. The fast ones (``--help``, ``data synth`` on a tiny set, ``data check``
on it) are run for real, in order, in one scratch folder; the rest need data or time CI lacks, so
their ``--help`` stands in. ``make TARGET`` must name a target of the Makefile. Other programs
(pip, python, curl) are left alone."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rsitr.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# subcommand paths fast enough to run here on their README arguments (seconds, no data CI lacks)
RUNNABLE = {("data", "synth"), ("data", "check")}
RUNNABLE_MAX_IMAGES = 100  # a `data synth` larger than this only gets its --help checked


def bash_commands(text: str) -> list[str]:
    """Every command line of the ```bash blocks, continuation lines joined, comments and blanks dropped."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(" ".join(shlex.quote(w) for w in words))
    return out


def rsitr_argv(words: list[str]) -> list[str] | None:
    """The arguments after the rsitr program in ``words`` (env assignments and `time` skipped),
    or None when the line runs another program."""
    i = 0
    while i < len(words) and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[i]) or words[i] == "time"):
        i += 1
    if i < len(words) and Path(words[i]).name == "rsitr":
        return words[i + 1:]
    if words[i:i + 3] in (["python", "-m", "rsitr.cli"], ["python3", "-m", "rsitr.cli"]):
        return words[i + 3:]
    return None


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def resolve(argv: list[str]) -> tuple[tuple[str, ...], argparse.ArgumentParser, list[str]]:
    """(subcommand path, its parser, problems): walks the subcommands, then checks every flag of
    the line against the help of the parser it belongs to (global options before the subcommand)."""
    parser, path, problems = build_parser(), (), []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("-") and tok != "-":
            flag = tok.split("=", 1)[0]
            action = next((a for a in parser._actions if flag in a.option_strings), None)
            if action is None or flag not in parser.format_help():
                problems.append(f"rsitr {' '.join(path)}: no option {flag}")
            elif action.nargs != 0 and "=" not in tok:
                n = action.nargs  # skip the flag's value(s); '+' / '*' values are words, never flags
                i += 1 if n in (None, "?") else (n if isinstance(n, int) else 0)
            i += 1
            continue
        sub = _subparsers(parser)
        if sub is not None:
            if tok not in sub.choices:
                problems.append(f"rsitr {' '.join(path)}: no subcommand {tok!r} (has {sorted(sub.choices)})")
                return path, parser, problems
            parser, path = sub.choices[tok], path + (tok,)
        i += 1
    if _subparsers(parser) is not None and "--help" not in argv and "-h" not in argv:
        problems.append(f"rsitr {' '.join(path)}: a command group, not a command")
    return path, parser, problems


def check_text(text: str, makefile: str) -> list[str]:
    """Every problem of the README text's commands (an empty list: every command exists)."""
    problems = []
    targets = set(re.findall(r"^([A-Za-z][\w.-]*):", makefile, flags=re.M))
    for line in bash_commands(text):
        words = shlex.split(line)
        if words[0] == "make":
            problems += [f"make: no target {t!r}" for t in words[1:] if not t.startswith("-") and t not in targets]
            continue
        argv = rsitr_argv(words)
        if argv is not None:
            problems += [f"{p}   [README: {line}]" for p in resolve(argv)[2]]
    return problems


def test_every_readme_command_names_real_subcommands_and_flags():
    text = README.read_text(encoding="utf-8")
    lines = [ln for ln in bash_commands(text) if rsitr_argv(shlex.split(ln)) is not None]
    assert len(lines) >= 20  # the README's commands were found
    assert check_text(text, (ROOT / "Makefile").read_text(encoding="utf-8")) == []


def test_the_check_catches_a_wrong_flag_subcommand_or_target():
    bad = "\n".join([
        "```bash",
        "rsitr search idx \"a marina\" --no-such-flag 3",
        "rsitr index frobnicate idx",
        ".venv/bin/rsitr --threads 1 data synth --out d --images 10 --nosie-frac 0.1   # typo",
        "make deploy",
        "rsitr search idx \"fine\" -k 5 --rerank qbnorm",
        "```",
    ])
    problems = check_text(bad, "demo: setup\ntest: setup\n")
    assert any("--no-such-flag" in p for p in problems)
    assert any("frobnicate" in p for p in problems)
    assert any("--nosie-frac" in p for p in problems)
    assert any("deploy" in p for p in problems)
    assert len(problems) == 4  # the correct line passes


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rsitr.cli", "--threads", "1", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_the_fast_readme_commands_run(tmp_path):
    """`rsitr --help`, the help of every README subcommand, and the README's runnable commands,
    run for real in one scratch folder (in README order, so `data check` sees what `data synth` wrote)."""
    text = README.read_text(encoding="utf-8")
    r = _run(["--help"], tmp_path)
    assert r.returncode == 0 and "usage: rsitr" in r.stdout
    paths, ran = set(), []
    for line in bash_commands(text):
        argv = rsitr_argv(shlex.split(line))
        if argv is None:
            continue
        path = resolve(argv)[0]
        paths.add(path)
        sizes = [int(v) for k, v in zip(argv, argv[1:]) if k == "--images"]
        if path in RUNNABLE and all(n <= RUNNABLE_MAX_IMAGES for n in sizes):
            r = _run(argv, tmp_path)
            assert r.returncode == 0, f"README command failed: {line}\n{r.stdout}\n{r.stderr}"
            ran.append(path)
    assert ("data", "synth") in ran and ("data", "check") in ran
    # the others: `rsitr PATH --help` of each, in one child process (one import of the package)
    rest = sorted(paths - set(ran))
    code = ("import contextlib, io, json, sys\nfrom rsitr.cli import main\nfor path in json.loads(sys.argv[1]):\n"
            "    buf = io.StringIO()\n    with contextlib.redirect_stdout(buf):\n        try:\n            rc = main([*path, '--help'])\n"
            "        except SystemExit as e:\n            rc = e.code\n"
            "    print(json.dumps([path, rc, buf.getvalue()]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(rest)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    helped = {tuple(p): (rc, out) for p, rc, out in map(json.loads, r.stdout.splitlines())}
    assert set(helped) == set(rest)
    for path, (rc, out) in helped.items():
        assert rc in (0, None) and f"usage: rsitr {' '.join(path)}" in " ".join(out.split()), (path, rc, out[:300])
