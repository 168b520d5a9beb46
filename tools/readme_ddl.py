"""Regenerate the DDL blocks of README.md from casty-sa's migrations.

The README shows the exact DDL a DBA reviews (``casty-sa upgrade --sql``) for
each dialect. Run ``python tools/readme_ddl.py`` after changing a migration;
``tests/test_readme.py`` fails while the README is stale.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

from alembic import command

from casty_sa.migrate import alembic_config

README = Path(__file__).resolve().parent.parent / "README.md"
DIALECTS = {"postgresql": "postgresql://", "sqlite": "sqlite://"}
_BLOCK = re.compile(r"(<!-- ddl:(\w+) -->\n```sql\n)(.*?)(```\n<!-- /ddl -->)", re.S)


def ddl(dialect: str) -> str:
    """The offline upgrade script from empty to head for ``dialect``."""
    buffer = io.StringIO()
    command.upgrade(alembic_config(DIALECTS[dialect], stdout=buffer), "head", sql=True)
    lines = [line.rstrip() for line in buffer.getvalue().strip().splitlines()]
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """``text`` with every DDL block replaced by the current DDL."""
    return _BLOCK.sub(lambda m: m.group(1) + ddl(m.group(2)) + m.group(4), text)


def main() -> int:
    text = README.read_text()
    updated = render(text)
    if updated != text:
        README.write_text(updated)
        print("README.md: DDL blocks updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
