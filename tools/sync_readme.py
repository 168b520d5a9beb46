"""Regenerate the generated parts of README.md.

Sections (``<!-- section:NAME -->`` … ``<!-- /section -->``) are the text of
``docs/_sections/NAME.md``, which the documentation site includes too, so each
text has one source. One of them, ``ddl``, is itself generated from the
migrations by ``tools/ddl_docs.py``: this script brings it up to date first.

Run ``python tools/sync_readme.py`` after changing a section or a migration;
``tests/test_readme.py`` fails while the README is stale (and
``tests/test_ddl_docs.py`` while the DDL section is).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SECTIONS = REPO / "docs" / "_sections"
_SITE_LINK = re.compile(r"\]\((assets/|[\w-]+\.md)")
_SECTION = re.compile(r"(<!-- section:([\w-]+) -->\n)(.*?)(<!-- /section -->)", re.S)


def section(name: str) -> str:
    """The text of ``docs/_sections/NAME.md``, its links to ``docs/assets`` made README-relative.

    The sections are written for the documentation site, whose pages sit in ``docs/``: a
    link to a page (``](projections.md``) or an asset points into ``docs/`` in the README.
    """
    text = (SECTIONS / f"{name}.md").read_text().rstrip("\n") + "\n"
    # links to the site's pages and assets, from the README's folder
    return _SITE_LINK.sub(r"](docs/\1", text)


def render_readme(text: str) -> str:
    """``text`` with its sections regenerated from ``docs/_sections``."""
    return _SECTION.sub(lambda m: m.group(1) + section(m.group(2)) + m.group(4), text)


def _ddl_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddl_docs", REPO / "tools" / "ddl_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ddl_docs", module)  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    _ddl_docs().main([])
    text = README.read_text()
    updated = render_readme(text)
    if updated != text:
        README.write_text(updated)
        print("README.md: generated parts updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
