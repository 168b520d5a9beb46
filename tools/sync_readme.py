"""Regenerate the generated parts of README.md.

- DDL blocks (``<!-- ddl:postgresql -->`` … ``<!-- /ddl -->``): the exact DDL a
  DBA reviews (``casty-sa upgrade --sql``) for each dialect, from the migrations.
- Sections (``<!-- section:NAME -->`` … ``<!-- /section -->``): the text of
  ``docs/_sections/NAME.md``, which the documentation site includes too, so
  each text has one source.

Run ``python tools/sync_readme.py`` after changing either;
``tests/test_readme.py`` fails while the README is stale.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

from alembic import command

from casty_sa.revisions import alembic_config

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SECTIONS = REPO / "docs" / "_sections"
DIALECTS = {"postgresql": "postgresql://", "sqlite": "sqlite://"}
_BLOCK = re.compile(r"(<!-- ddl:(\w+) -->\n```sql\n)(.*?)(```\n<!-- /ddl -->)", re.S)
_SITE_LINK = re.compile(r"\]\((assets/|[\w-]+\.md)")
_SECTION = re.compile(r"(<!-- section:([\w-]+) -->\n)(.*?)(<!-- /section -->)", re.S)


def ddl(dialect: str) -> str:
    """The offline upgrade script from empty to head for ``dialect``."""
    buffer = io.StringIO()
    command.upgrade(alembic_config(DIALECTS[dialect], stdout=buffer), "head", sql=True)
    lines = [line.rstrip() for line in buffer.getvalue().strip().splitlines()]
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """``text`` with every DDL block replaced by the current DDL."""
    return _BLOCK.sub(lambda m: m.group(1) + ddl(m.group(2)) + m.group(4), text)


def section(name: str) -> str:
    """The text of ``docs/_sections/NAME.md``, its links to ``docs/assets`` made README-relative.

    The sections are written for the documentation site, whose pages sit in ``docs/``: a
    link to a page (``](projections.md``) or an asset points into ``docs/`` in the README.
    """
    text = (SECTIONS / f"{name}.md").read_text().rstrip("\n") + "\n"
    # links to the site's pages and assets, from the README's folder
    return _SITE_LINK.sub(r"](docs/\1", text)


def render_readme(text: str) -> str:
    """``text`` with its sections and DDL blocks regenerated."""
    with_sections = _SECTION.sub(lambda m: m.group(1) + section(m.group(2)) + m.group(4), text)
    return render(with_sections)


def main() -> int:
    text = README.read_text()
    updated = render_readme(text)
    if updated != text:
        README.write_text(updated)
        print("README.md: generated parts updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
