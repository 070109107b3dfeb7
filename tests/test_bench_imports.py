"""The benchmarks' modules import each other without a circle (measurements <- suite <- report,
never back), and argparse stays in ``cli/``: no module below it imports argparse or takes a
``Namespace``. Checked on the source with ``ast`` (every import statement, inside functions too)."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rsitr"


def _imports(path: Path) -> set[str]:
    """Every module name an import statement of ``path`` names (``from a import b`` gives ``a`` and ``a.b``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every simple cycle through the graph's first-listed node of each cycle (enough to say whether there is one)."""
    found = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    found.append(path)
                elif nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return found


def bench_graph(folder: Path) -> dict[str, set[str]]:
    mods = {f"rsitr.bench.{p.stem}": p for p in folder.glob("*.py")}
    return {m: {d for d in _imports(p) if d in mods and d != m} for m, p in mods.items()}


def test_the_bench_modules_import_without_a_circle():
    graph = bench_graph(SRC / "bench")
    assert {"rsitr.bench.measurements", "rsitr.bench.report", "rsitr.bench.suite"} <= set(graph)
    assert _cycles(graph) == []
    assert graph["rsitr.bench.measurements"] == set()  # the bottom of the harness: report and suite build on it


def test_the_cycle_check_sees_a_circle(tmp_path):
    """The check finds a circle closed by an import inside a function (as the old report <-> measurements one was)."""
    (tmp_path / "a.py").write_text("from rsitr.bench.b import X\n")
    (tmp_path / "b.py").write_text("X = 1\ndef f():\n    from rsitr.bench.c import Y\n    return Y\n")
    (tmp_path / "c.py").write_text("def g():\n    from rsitr.bench.a import X\n    return X\n")
    assert _cycles(bench_graph(tmp_path))


def test_no_argparse_below_cli():
    """No module below ``cli/`` imports argparse, names ``Namespace`` or has a function taking ``args``."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if "cli" in path.relative_to(SRC).parts[:1]:
            continue
        text = path.read_text(encoding="utf-8")
        if "argparse" in _imports(path) or "Namespace" in text:
            offenders.append(str(path.relative_to(SRC)))
        # a parameter named ``args`` is how a parsed command line slips through untyped (``run(args: Any)``)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if "args" in [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}(args)")
    assert offenders == []
