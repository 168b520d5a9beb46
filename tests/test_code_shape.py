"""The shape the code keeps (issue 11): small modules, classes and functions, layers without
import cycles, a benchmark harness of small files. A change that outgrows a limit splits the
code along a seam instead of raising the limit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "casty_sa"
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80  # docstrings included
MAX_BENCHMARK_BYTES = 40_000


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _spans(path: Path) -> list[tuple[str, str, int]]:
    """``(kind, name, lines)`` of every class and function in ``path``."""
    spans = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            spans.append((kind, node.name, lines))
    return spans


@pytest.mark.parametrize("name", sorted(_modules()))
def test_a_module_stays_small(name: str) -> None:
    path = _modules()[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines"
    too_long = [
        f"{kind} {node}: {lines} lines"
        for kind, node, lines in _spans(path)
        if lines > (MAX_CLASS_LINES if kind == "class" else MAX_FUNCTION_LINES)
    ]
    assert not too_long, f"{name}: {too_long}"


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports, anywhere in it (a local import counts)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if module in known and module != name}


def test_no_import_cycle_inside_the_package() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for imported in sorted(graph[name]):
            if state.get(imported) == 1:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_checks_above_see_what_they_check() -> None:
    """The walk finds the package's modules and its imports (a check of nothing passes)."""
    modules = _modules()
    assert {"casty_sa.journal", "casty_sa.backends", "casty_sa.backends.sqlite"} <= set(modules)
    journal = _imports("casty_sa.journal", modules["casty_sa.journal"], set(modules))
    assert {"casty_sa.writer", "casty_sa.codec", "casty_sa.backends"} <= journal


def test_benchmark_files_stay_small() -> None:
    files = sorted((REPO / "benchmarks").glob("*.py"))
    assert files
    sizes = [f"{path.name}: {path.stat().st_size} bytes" for path in files]
    assert all(path.stat().st_size <= MAX_BENCHMARK_BYTES for path in files), sizes
