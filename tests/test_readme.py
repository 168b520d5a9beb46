"""The README stays true: its Python blocks run, and its generated sections are current."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = [
    textwrap.dedent(body)
    for _indent, body in re.findall(r"^( *)```python\n(.*?)^\1```", README, re.S | re.M)
]


def _tool() -> object:
    spec = importlib.util.spec_from_file_location("sync_readme", REPO / "tools" / "sync_readme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_has_python_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index: int, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", PYTHON_BLOCKS[index]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, f"block {index} failed:\n{PYTHON_BLOCKS[index]}\n{run.stderr}"


def test_readme_generated_parts_are_current() -> None:
    """Sections from docs/_sections (the DDL one from the migrations): run tools/sync_readme.py."""
    tool: Any = _tool()
    assert tool.render_readme(README) == README, "README is stale: run tools/sync_readme.py"
    for name in ("cluster", "guarantees", "benchmarks", "cli", "ddl"):
        assert f"<!-- section:{name} -->" in README, name
    assert "CREATE TABLE casty_sa_events" in README
    assert "BYTEA" in README and "BLOB" in README


#: ``test_file.py::name`` or ``test_file.py::Class::name`` cited as evidence in the docs
_CITATION = re.compile(r"`(test_\w+\.py)::(\w+)(?:::(\w+))?(?:\[[^\]`]*\])?`")


def _defined(tree: ast.Module) -> dict[str, set[str]]:
    """Top-level test functions and classes of a module, each class with its methods."""
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            names[node.name] = {
                item.name
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            }
    return names


def test_every_test_the_docs_cite_exists() -> None:
    """The guarantees name their evidence: a renamed or removed test must not leave a claim
    standing on nothing."""
    documents = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    cited = {
        (doc.relative_to(REPO).as_posix(), *match)
        for doc in documents
        for match in _CITATION.findall(doc.read_text())
    }
    assert len(cited) > 50  # the guarantees cite their tests; this check must see them
    modules: dict[str, dict[str, set[str]]] = {}
    missing = []
    for doc, filename, name, member in sorted(cited):
        path = REPO / "tests" / filename
        if not path.exists():
            missing.append(f"{doc}: {filename} does not exist")
            continue
        if filename not in modules:
            modules[filename] = _defined(ast.parse(path.read_text()))
        defined = modules[filename]
        if name not in defined or (member and member not in defined[name]):
            missing.append(f"{doc}: {filename}::{name}{'::' + member if member else ''}")
    assert not missing, "cited tests that do not exist:\n" + "\n".join(missing)


def test_every_image_the_readme_shows_exists() -> None:
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", README)
    assert images, "the README shows the benchmark chart"
    assert [image for image in images if not (REPO / image).is_file()] == []
