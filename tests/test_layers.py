"""The layers of README "Layout" hold: every import points down (inside functions too), checked by
import-linter's layers contract in pyproject.toml. lint-imports runs in a child process (it
configures logging, which would silence the package's loggers for the other tests)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("importlinter")
pytestmark = pytest.mark.slow  # child processes

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"


def lint(config: Path, *paths: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", LINT, str(config)], capture_output=True, text=True, env=env, timeout=600)


def test_the_package_keeps_its_layers():
    r = lint(ROOT / "pyproject.toml", ROOT / "src")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "KEPT" in r.stdout


def test_an_upward_import_inside_a_function_is_caught(tmp_path):
    """The same kind of contract on a small package whose bottom layer imports its top layer
    inside a function: lint-imports fails and names the import."""
    pkg = tmp_path / "layered_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("VALUE = 1\n")
    (pkg / "bottom.py").write_text("def f():\n    from layered_demo.top import VALUE\n    return VALUE\n")
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_package = "layered_demo"

        [[tool.importlinter.contracts]]
        name = "demo layers"
        type = "layers"
        containers = ["layered_demo"]
        layers = ["top", "bottom"]
    """))
    r = lint(cfg, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "BROKEN" in r.stdout and "layered_demo.bottom -> layered_demo.top" in r.stdout
