"""Whose tables a database holds, where casty-sa's own history cannot tell.

Two questions the schema check asks beside casty-sa's version table:

- does a SQLite file hold casty's own ``SqliteJournal`` tables (which casty-sa
  never reads: :func:`refuse_casty_tables`)?
- are casty-sa's tables without a version revision what a first migration
  stopped half-way left (:func:`interrupted_first_run`)?

and one a migration asks of its own steps on MySQL/MariaDB: did a run that
stopped half-way do this one already (:func:`already_there`)?

On MySQL and MariaDB each ``CREATE TABLE`` commits on its own: no transaction
spans a migration. A first ``casty-sa upgrade`` (or a journal's migration on
start) killed half-way through revision 0001 leaves some of its tables behind
while casty-sa's version table names no revision yet. Those look like an
application's own tables (casty-sa's tables without its version table), which
casty-sa refuses to take over. casty-sa finishes such a run, and only such a
run: every casty-sa table there is one revision 0001 makes, they are a prefix of
its steps (``casty_sa_events``, then ``casty_sa_snapshots``), each exactly in
revision 0001's shape (its columns and primary key) and empty, and the
database's DDL commits at once (MySQL, MariaDB). Anything else (a row in one of
them, another casty-sa table, another shape; SQLite or PostgreSQL, where a
migration is one transaction, rolled back whole) stays a refusal.

Examples
--------
>>> [name for name, _columns, _key in FIRST_TABLES]
['casty_sa_events', 'casty_sa_snapshots']
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import URL, Connection, inspect

from casty_sa.errors import SchemaError
from casty_sa.models import metadata
from casty_sa.urls import safe_url

__all__ = [
    "CASTY_EVENT_COLUMNS",
    "CASTY_SNAPSHOT_COLUMNS",
    "FIRST_TABLES",
    "already_there",
    "casty_tables",
    "interrupted_first_run",
    "refuse_casty_tables",
]

#: The columns of casty's own ``SqliteJournal`` tables ``events`` and ``snapshots`` (casty 0.21).
CASTY_EVENT_COLUMNS = frozenset({"entity_id", "sequence_nr", "event_data", "timestamp"})
CASTY_SNAPSHOT_COLUMNS = frozenset({"entity_id", "sequence_nr", "state_data", "timestamp"})


def casty_tables(connection: Connection) -> list[str]:
    """The tables of casty's own ``SqliteJournal`` a SQLite database holds (none elsewhere).

    ``SqliteJournal`` keeps its journal in ``events`` and ``snapshots`` tables
    with the columns :data:`CASTY_EVENT_COLUMNS` and
    :data:`CASTY_SNAPSHOT_COLUMNS`; casty-sa never reads them.
    """
    if connection.dialect.name != "sqlite":
        return []  # SqliteJournal writes SQLite files only
    expected = {"events": CASTY_EVENT_COLUMNS, "snapshots": CASTY_SNAPSHOT_COLUMNS}
    # one query on the schema table: this runs on every journal's start
    found = connection.exec_driver_sql(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('events', 'snapshots')"
    ).all()
    inspector = inspect(connection)
    return sorted(
        name
        for (name,) in found
        if expected[name] <= {column["name"] for column in inspector.get_columns(name)}
    )


def refuse_casty_tables(connection: Connection, url: URL) -> None:
    """Refuse a SQLite file written by casty's own ``SqliteJournal``.

    casty-sa keeps its journal in tables of its own, so on such a file every
    entity would recover from nothing, silently, beside its real history.

    Raises
    ------
    SchemaError
        The file holds ``SqliteJournal``'s tables; the message gives the
        ``casty-sa import`` command that copies them into a new file.
    """
    tables = casty_tables(connection)
    if not tables:
        return
    database = url.database or "journal.db"
    old = Path(database)
    new = old.with_name(f"{old.stem}-casty-sa{old.suffix or '.db'}")
    raise SchemaError(
        f"{safe_url(url)} is a journal file of casty's own SqliteJournal (it holds its "
        f"{' and '.join(repr(t) for t in tables)} tables), which SAJournal does not read: "
        "opening it would recover every entity from nothing. Copy it into a new file, "
        f"`casty-sa import --from '{old}' --url 'sqlite:///{new}'`, and give SAJournal that "
        f"file (SAJournal('sqlite:///{new}')); nothing was written to {old}."
    )


_COLUMNS = frozenset({"entity_id", "sequence_nr", "timestamp", "payload"})

#: The tables revision 0001 makes, in the order it makes them: each one's name, columns
#: and primary key as that revision wrote them (``test_migrations`` checks they still do).
FIRST_TABLES: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("casty_sa_events", _COLUMNS, ("entity_id", "sequence_nr")),
    ("casty_sa_snapshots", _COLUMNS, ("entity_id",)),
)

#: the dialects whose DDL commits at once, outside any transaction
_DDL_COMMITS = frozenset({"mysql", "mariadb"})


def interrupted_first_run(connection: Connection, schema: str | None = None) -> tuple[str, ...]:
    """The tables a first migration stopped half-way left, if that is all the database's
    casty-sa tables are (see the module's docstring); ``()`` otherwise.

    Only meaningful where the version table names no revision.
    """
    if connection.dialect.name not in _DDL_COMMITS:
        return ()
    inspector = inspect(connection)
    present = set(inspector.get_table_names(schema=schema)) & set(metadata.tables)
    made = [name for name, _columns, _key in FIRST_TABLES][: len(present)]
    if not present or present != set(made):
        return ()  # none, or not the first steps of revision 0001
    for name, columns, key in FIRST_TABLES[: len(made)]:
        found = {column["name"] for column in inspector.get_columns(name, schema=schema)}
        primary = inspector.get_pk_constraint(name, schema=schema)["constrained_columns"]
        if found != columns or tuple(primary) != key:
            return ()
        table = connection.dialect.identifier_preparer.quote(name)
        if connection.exec_driver_sql(f"SELECT 1 FROM {table} LIMIT 1").first() is not None:
            return ()  # it holds data: not casty-sa's to take over
    return tuple(made)


def already_there(*, table: str, column: str | None = None, index: str | None = None) -> bool:
    """In a migration: whether a step's table (its ``column``, its ``index``) exists already.

    Only ever true on MySQL/MariaDB, online. There each DDL statement commits on its own
    (no transaction spans a migration), so a run that failed half-way leaves the steps
    it did behind while the version table still names the revision before; run again,
    a migration skips them. Elsewhere a migration runs in one transaction, rolled back
    whole, and ``--sql`` prints every step.
    """
    from alembic import op

    context = op.get_context()
    if context.as_sql or context.dialect.name not in ("mysql", "mariadb"):
        return False
    inspector = inspect(op.get_bind())
    schema = context.version_table_schema
    if not inspector.has_table(table, schema=schema):
        return False
    if column is not None:
        return column in {found["name"] for found in inspector.get_columns(table, schema=schema)}
    if index is not None:
        return index in {found["name"] for found in inspector.get_indexes(table, schema=schema)}
    return True
