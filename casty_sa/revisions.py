"""casty-sa's revisions, where a database stands among them, and whose tables it holds.

The queries :mod:`casty_sa.migrate` and the ``casty-sa`` command share: the
Alembic configuration of casty-sa's own migrations (read from disk once), the
head, the revision a database is at and whether an application's own
migrations made the tables (:class:`SchemaState`, with
:mod:`casty_sa.table_owners`' answers for tables without a revision), and every sentence
that describes a database's state, so the journal's schema check and
``casty-sa check`` say it the same way.

Examples
--------
>>> describe_revision(None)
'base (no casty-sa tables)'
>>> describe_revision(head_revision()) == f"{head_revision()} (head)"
True
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TextIO

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import URL, Connection, inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.diagnosis import database_error, upgrade_hint
from casty_sa.engine import open_engine, read_connection
from casty_sa.errors import SchemaError
from casty_sa.models import VERSION_TABLE, metadata
from casty_sa.table_owners import (
    CASTY_EVENT_COLUMNS,
    CASTY_SNAPSHOT_COLUMNS,
    casty_tables,
    interrupted_first_run,
    refuse_casty_tables,
)
from casty_sa.urls import UrlLike, url_secrets

__all__ = [
    "CASTY_EVENT_COLUMNS",
    "CASTY_SNAPSHOT_COLUMNS",
    "NO_TABLES",
    "SchemaState",
    "alembic_config",
    "casty_tables",
    "check_report",
    "check_revision",
    "current_revision",
    "describe_revision",
    "exclude_journal_tables",
    "head_revision",
    "history",
    "known_revision",
    "not_at_head",
    "package_version",
    "read_state",
    "refuse_casty_tables",
    "revision_ids",
    "schema_state",
    "script_directory",
    "script_location",
    "tables_match_models",
    "unknown_revision",
]

#: How every message says a database has none of casty-sa's revisions.
NO_TABLES = "no casty-sa tables"


def package_version() -> str:
    """The installed casty-sa version, or ``unknown`` in a bare checkout."""
    try:
        return version("casty-sa")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


# -- casty-sa's migrations -------------------------------------------------------------------


def script_location() -> Path:
    """The folder holding ``env.py`` and ``versions/``, in a wheel or a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError(
        "casty-sa's migrations are missing from this installation (looked in "
        f"{package / 'migrations'} and {package.parent / 'migrations'}); reinstall casty-sa"
    )


def alembic_config(
    url: str | URL | None = None, *, schema: str | None = None, stdout: TextIO | None = None
) -> Config:
    """An Alembic ``Config`` for casty-sa's migrations, without any ini file.

    Parameters
    ----------
    url : str | URL | None
        Database to migrate. Kept as an attribute, never written into the
        config's text, so a password is neither interpolated nor printed.
    schema : str | None
        PostgreSQL schema for casty-sa's tables and version table (created if
        missing); ``None`` uses the connection's default (``public``).
    stdout : TextIO | None
        Where Alembic writes (``--sql`` output, ``history``).
    """
    config = Config(stdout=stdout, output_buffer=stdout) if stdout is not None else Config()
    config.set_main_option("script_location", str(script_location()))
    if url is not None:
        config.attributes["url"] = url
    if schema is not None:
        config.attributes["schema"] = schema
    return config


@functools.cache
def script_directory() -> ScriptDirectory:
    """casty-sa's migration scripts, read from disk once per process."""
    return ScriptDirectory.from_config(alembic_config())


@functools.cache
def head_revision() -> str:
    """The newest revision this casty-sa knows (what ``upgrade`` brings a database to)."""
    heads = script_directory().get_heads()
    if len(heads) != 1:
        raise SchemaError(f"casty-sa's migrations have {len(heads)} heads; expected one")
    return heads[0]


def revision_ids() -> list[str]:
    """The ids of casty-sa's migrations, newest first."""
    return [rev.revision for rev in script_directory().walk_revisions()]


def known_revision(revision: str) -> bool:
    """True when ``revision`` is one of this casty-sa's migrations."""
    return revision in revision_ids()


def history() -> list[tuple[str | None, str, bool, str]]:
    """casty-sa's migrations, newest first: ``(down revision, revision, is head, title)``."""
    heads = set(script_directory().get_heads())
    return [
        (
            rev.down_revision if isinstance(rev.down_revision, str) else None,
            rev.revision,
            rev.revision in heads,
            (rev.doc or "").strip().splitlines()[0] if rev.doc else "",
        )
        for rev in script_directory().walk_revisions()
    ]


def check_revision(revision: str, *, down: bool = False) -> None:
    """Refuse a revision (or ``FROM:TO`` range) casty-sa's migrations do not have.

    A range needs both ends and must go its command's way (``head:base`` as an
    upgrade would print a script that drops the version table).

    Raises
    ------
    ValueError
        Naming the unknown part and the revisions there are, or what is wrong
        with the range.
    """
    parts = revision.split(":")
    if len(parts) > 2 or (len(parts) == 2 and not all(parts)):
        raise ValueError(
            f"revision range {revision!r} is not FROM:TO; for example "
            f"{'head:base' if down else 'base:head'}"
        )
    for part in parts:
        if part in ("", "head", "heads", "base") or re.fullmatch(r"[+-]\d+", part):
            continue
        try:
            script_directory().get_revisions(part)
        except CommandError:
            raise ValueError(
                f"unknown revision {part!r}; casty-sa's revisions: "
                f"{', '.join(revision_ids())} (or head, base, +N, -N)"
            ) from None
    if len(parts) == 2:
        start, end = (_depth(part) for part in parts)
        if start is not None and end is not None and (end > start if down else end < start):
            other = "upgrade" if down else "downgrade"
            raise ValueError(
                f"revision range {revision!r} goes {'up' if down else 'down'}: "
                f"that is `casty-sa {other} {revision}`"
            )


def _depth(part: str) -> int | None:
    """How many revisions lie from base up to ``part`` (``None``: relative, or a prefix)."""
    ids = ["base", *reversed(revision_ids())]  # one line of history, oldest first
    return len(ids) - 1 if part in ("head", "heads") else ids.index(part) if part in ids else None


# -- where a database stands -----------------------------------------------------------------


def current_revision(connection: Connection, schema: str | None = None) -> str | None:
    """The revision a (sync) connection's database is at, or ``None`` before any."""
    context = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
    )
    heads = context.get_current_heads()
    return heads[0] if heads else None


def tables_match_models(connection: Connection, schema: str | None = None) -> bool:
    """True when casty-sa's tables exist with the models' columns.

    That is the case when an application created them through its own Alembic
    history from :data:`casty_sa.metadata`, instead of running casty-sa's
    migrations.
    """
    inspector = inspect(connection)
    present = set(inspector.get_table_names(schema=schema))
    for table in metadata.tables.values():
        if table.name not in present:
            return False
        columns = {column["name"] for column in inspector.get_columns(table.name, schema=schema)}
        if columns != set(table.columns.keys()):
            return False
    return True


@dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a database stands.

    Parameters
    ----------
    revision : str | None
        Its casty-sa revision; ``None`` before any.
    app_managed : bool
        No revision, but tables matching the models: the application's own
        migrations made them, and the journal uses them as they are.
    stray : tuple[str, ...]
        No revision, and casty-sa's tables that do not match the models: an
        application's own migrations made them from an older casty-sa.
    interrupted : tuple[str, ...]
        No revision, and the empty tables a first migration stopped half-way left on
        MySQL/MariaDB (:mod:`casty_sa.first_run`): upgrading finishes it.
    """

    revision: str | None
    app_managed: bool
    stray: tuple[str, ...] = ()
    interrupted: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """True when a journal may use the tables as they are."""
        return self.revision == head_revision() or self.app_managed

    @property
    def unknown(self) -> bool:
        """True when a newer casty-sa migrated the database."""
        return self.revision is not None and not known_revision(self.revision)


def read_state(connection: Connection, schema: str | None = None) -> SchemaState:
    """The :class:`SchemaState` of a (sync) connection's database."""
    revision = current_revision(connection, schema)
    if revision is not None:
        return SchemaState(revision, False)
    if tables_match_models(connection, schema):
        return SchemaState(None, True)
    if interrupted := interrupted_first_run(connection, schema):
        return SchemaState(None, False, interrupted=interrupted)
    present = set(inspect(connection).get_table_names(schema=schema))
    return SchemaState(None, False, tuple(sorted(present & set(metadata.tables))))


async def schema_state(
    target: UrlLike | AsyncEngine,
    schema: str | None = None,
    **engine_options: Any,
) -> SchemaState:
    """:func:`read_state` on a reading connection, failures in casty-sa's words.

    An engine casty-sa opens for a URL ``target`` (with ``engine_options``) is
    disposed of on the way out; an engine passed in is left open.
    """
    engine, owned = open_engine(target, **engine_options)
    try:
        async with read_connection(engine) as connection:
            return await connection.run_sync(read_state, schema)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        # the library's words for it: a refused login is DatabaseAccessDenied here too
        raise database_error(
            exc, engine.url, "read the schema revision", secrets=url_secrets(engine.url)
        ) from exc
    finally:
        if owned:
            await engine.dispose()


# -- casty-sa's tables beside an application's -----------------------------------------------


def exclude_journal_tables(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """An Alembic ``include_object`` hook that leaves casty-sa's tables alone.

    Give it to the application's ``context.configure(include_object=...)`` when
    casty-sa's own migrations manage its tables, so the application's
    autogenerate neither drops them nor tries to create them.

    Examples
    --------
    >>> exclude_journal_tables(None, "casty_sa_events", "table", True, None)
    False
    >>> exclude_journal_tables(None, "casty_sa_projection_offsets", "table", True, None)
    False
    >>> exclude_journal_tables(None, "orders", "table", True, None)
    True
    """
    if type_ == "table":
        return name not in metadata.tables and name != VERSION_TABLE
    return True


# -- in words --------------------------------------------------------------------------------


def describe_revision(revision: str | None) -> str:
    """A revision for people: ``0001 (head)``, ``base (…)``, or unknown."""
    if revision is None:
        return f"base ({NO_TABLES})"
    if revision == head_revision():
        return f"{revision} (head)"
    if not known_revision(revision):
        return f"{revision} (unknown to casty-sa {package_version()}: a newer casty-sa wrote it)"
    return revision


def unknown_revision(where: str, revision: str) -> SchemaError:
    """The error for a database at ``revision``, which a newer casty-sa migrated."""
    return SchemaError(
        f"{where} is at casty-sa schema revision {revision!r}, which this version of "
        f"casty-sa does not know (its newest is {head_revision()!r}): a newer casty-sa "
        "migrated it. Upgrade the casty-sa package."
    )


def not_at_head(where: str, state: SchemaState, schema: str | None) -> SchemaError:
    """The journal's error for a database it may not migrate and cannot use as it is."""
    if state.stray:
        return SchemaError(f"{where} {_stray(state)}")
    found = "has " + NO_TABLES if state.revision is None else f"is at revision {state.revision!r}"
    if state.interrupted:
        found = _interrupted(state)
    return SchemaError(
        f"{where} {found}; casty-sa needs revision {head_revision()!r}. "
        f"{upgrade_hint(schema)}, or `await casty_sa.upgrade(url)`, or pass "
        "migrate=True to SAJournal."
    )


def check_report(where: str, state: SchemaState) -> str:
    """What ``casty-sa check`` says of a database (exit 0 when ``state.usable``)."""
    head = head_revision()
    if state.revision == head:
        return f"{where}: at head ({head})"
    if state.app_managed:
        return (
            f"{where}: casty-sa's tables match this casty-sa's models (made by the "
            "application's own migrations)"
        )
    if state.stray:
        return f"{where}: {_stray(state)}"
    if state.interrupted:
        return f"{where}: {_interrupted(state)}; head is {head}. Run: casty-sa upgrade"
    if state.revision is None:
        return f"{where}: {NO_TABLES}; head is {head}. Run: casty-sa upgrade"
    if state.unknown:
        return f"{where}: at {describe_revision(state.revision)}; upgrade the casty-sa package"
    return f"{where}: at {state.revision}, head is {head}. Run: casty-sa upgrade"


def _interrupted(state: SchemaState) -> str:
    """What to say of the tables a first migration stopped half-way left."""
    tables = ", ".join(state.interrupted)
    return f"holds only {tables} (empty), left by a first migration that stopped half-way"


def _stray(state: SchemaState) -> str:
    """What to say of tables an application's migrations made from an older casty-sa."""
    missing = sorted(set(metadata.tables) - set(state.stray))
    lacking = f" ({', '.join(missing)} missing)" if missing else ""
    return (
        f"holds casty-sa's tables {', '.join(state.stray)} without casty-sa's version table, "
        f"and they do not match this casty-sa's models{lacking}: the application's own "
        "migrations made them from an older casty_sa.metadata. Add a revision to the "
        "application's Alembic history (autogenerate from casty_sa.metadata adds what this "
        "casty-sa needs) and run it."
    )
