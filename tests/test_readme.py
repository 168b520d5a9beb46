"""The README stays true: its Python blocks run, and its DDL is the migrations' DDL."""

from __future__ import annotations

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
    """DDL from the migrations, sections from docs/_sections: run tools/sync_readme.py."""
    tool: Any = _tool()
    assert tool.render_readme(README) == README, "README is stale: run tools/sync_readme.py"
    for name in ("cluster", "guarantees", "benchmarks", "cli"):
        assert f"<!-- section:{name} -->" in README, name
    assert "CREATE TABLE casty_sa_events" in README
    assert "BYTEA" in README and "BLOB" in README
