"""The README stays true: its Python blocks run, and its DDL is the migrations' DDL."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
PYTHON_BLOCKS = [
    textwrap.dedent(body)
    for _indent, body in re.findall(r"^( *)```python\n(.*?)^\1```", README, re.S | re.M)
]


def _tool() -> object:
    spec = importlib.util.spec_from_file_location("readme_ddl", REPO / "tools" / "readme_ddl.py")
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


def test_readme_ddl_is_generated_from_the_migrations() -> None:
    tool = _tool()
    assert tool.render(README) == README, "README DDL is stale: run python tools/readme_ddl.py"  # type: ignore[attr-defined]
    assert "CREATE TABLE casty_sa_events" in README
    assert "BYTEA" in README and "BLOB" in README
