"""MkDocs hook: fill the DDL blocks of the pages from casty-sa's migrations at build time.

A page marks a block the way README.md does (``<!-- ddl:postgresql -->``, an empty
```` ```sql ```` fence, ``<!-- /ddl -->``), and this hook fills it with the output of
``casty-sa upgrade --sql`` for that dialect, through ``tools/sync_readme.py``. The DDL is
therefore never copied into the docs by hand and cannot go stale.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "sync_readme.py"
_MARK = "<!-- ddl:"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("casty_sa_readme_ddl", _TOOL)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {_TOOL}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown: str, **_: Any) -> str:
    """The page's markdown with its DDL blocks generated."""
    if _MARK not in markdown:
        return markdown
    rendered: str = _tool().render(markdown)
    return rendered
