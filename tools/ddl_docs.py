"""Write the DDL of every dialect into ``docs/_sections/ddl.md``, from the migrations.

The section holds, for each dialect casty-sa supports, exactly what
``casty-sa upgrade --sql --url <dialect>://`` prints for an empty database. The
documentation site shows it (``docs/ddl.md`` includes it) and ``tools/sync_readme.py``
copies it into the README, so the DDL a DBA reads is never typed by hand.
``tests/test_ddl_docs.py`` runs the command for each dialect and fails while the
section differs.

Usage::

    python tools/ddl_docs.py          # rewrite the section when it is stale
    python tools/ddl_docs.py --check  # exit 1 when it is stale, touch nothing
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = REPO / "docs" / "_sections" / "ddl.md"

if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Target:
    """One dialect's DDL: its heading and the URL ``--sql`` is given."""

    heading: str
    url: str
    note: str


#: In the order the page shows them.
TARGETS = (
    Target(
        "PostgreSQL",
        "postgresql://",
        "The same whichever driver (asyncpg, psycopg) the URL names.",
    ),
    Target(
        "SQLite",
        "sqlite://",
        "A file is migrated by the journal on first use; this is the same DDL.",
    ),
    Target(
        "MySQL 8",
        "mysql://",
        "Offline, a `mysql://` URL means MySQL 8 (collation `utf8mb4_0900_bin`); online, the "
        "server decides, so a `mysql://` URL of a MariaDB server gets MariaDB's DDL. The same "
        "with `+asyncmy` or `+aiomysql`. Each statement commits on its own: there is no "
        "transaction around the script.",
    ),
    Target(
        "MariaDB",
        "mariadb://",
        "The same as MySQL 8's but for the collation, `utf8mb4_nopad_bin`, and the quoting of "
        "`position`, which MariaDB reserves. This is the DDL the suite's MariaDB 10.11 runs.",
    ),
)

_INTRO = """\
What `casty-sa upgrade --sql` prints for an empty database, for each dialect. This text is
generated from the migrations by `python tools/ddl_docs.py`, and `tests/test_ddl_docs.py` runs
the command for each dialect and fails when it prints anything else.
"""


def ddl(url: str) -> str:
    """What ``casty-sa upgrade --sql --url URL`` prints: the script from empty to head.

    Trailing spaces are dropped (Alembic leaves some; an editor would take them away).
    """
    from casty_sa import migrate

    buffer = io.StringIO()
    migrate.write_sql(url, "head", buffer)
    return normalize(buffer.getvalue())


def normalize(text: str) -> str:
    """``text`` without trailing spaces or blank lines at either end, ending in a newline."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(lines) + "\n"


def block(target: Target, sql: str) -> str:
    """One dialect's part of the section: a heading, a sentence, the DDL folded away."""
    return (
        f"### {target.heading}\n\n`casty-sa upgrade --sql --url {target.url}` prints it. "
        f"{target.note}\n\n"
        f'<details markdown="1"><summary>The DDL for {target.heading}</summary>\n\n'
        f"```sql\n{sql}```\n\n</details>\n"
    )


def render() -> str:
    """The whole section, from the migrations as they are now."""
    parts = [_INTRO, *(block(target, ddl(target.url)) for target in TARGETS)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the section is stale")
    args = parser.parse_args(argv)
    text = render()
    current = SECTION.read_text() if SECTION.exists() else ""
    if text == current:
        return 0
    if args.check:
        print(f"{SECTION.relative_to(REPO)} is stale: run python tools/ddl_docs.py")
        return 1
    SECTION.write_text(text)
    print(f"{SECTION.relative_to(REPO)}: updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
