"""Run casty-sa's Alembic migrations from code.

The migrations live in the top-level ``migrations/`` folder of a checkout and
ship inside the wheel as ``casty_sa/migrations``; :func:`script_location`
finds whichever is there. casty-sa keeps its own version table
(:data:`casty_sa.models.VERSION_TABLE`), so an application's ``alembic_version``
in the same database is never touched.

Examples
--------
>>> import asyncio, pathlib, tempfile
>>> url = f"sqlite:///{pathlib.Path(tempfile.mkdtemp()) / 'journal.db'}"
>>> asyncio.run(current(url)) is None
True
>>> asyncio.run(upgrade(url))
>>> asyncio.run(current(url)) == head_revision()
True
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Connection, inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.diagnosis import access_denied, database_error, describe, sqlstate, upgrade_hint
from casty_sa.engine import (
    AUTOCOMMIT_ENGINES,
    bind_schema,
    open_engine,
    open_journal_engine,
    read_connection,
)
from casty_sa.errors import DatabaseUnavailable, JournalError, SchemaError
from casty_sa.models import VERSION_TABLE, metadata
from casty_sa.urls import UrlLike, safe_url, url_secrets

log = logging.getLogger("casty_sa")

__all__ = [
    "CASTY_EVENT_COLUMNS",
    "CASTY_SNAPSHOT_COLUMNS",
    "alembic_config",
    "checked_engine",
    "current",
    "current_revision",
    "downgrade",
    "ensure_schema",
    "exclude_journal_tables",
    "head_revision",
    "refuse_casty_tables",
    "script_location",
    "tables_match_models",
    "upgrade",
]


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
def head_revision() -> str:
    """The newest revision this casty-sa knows (what ``upgrade`` brings a database to)."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise SchemaError(f"casty-sa's migrations have {len(heads)} heads; expected one")
    return heads[0]


def known_revision(revision: str) -> bool:
    """True when ``revision`` is one of this casty-sa's migrations."""
    script = ScriptDirectory.from_config(alembic_config())
    return any(rev.revision == revision for rev in script.walk_revisions())


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
    >>> exclude_journal_tables(None, "orders", "table", True, None)
    True
    """
    if type_ == "table":
        return name not in metadata.tables and name != VERSION_TABLE
    return True


def _invoke(
    connection: Connection,
    action: Callable[..., Any],
    args: tuple[Any, ...],
    schema: str | None,
) -> Any:
    config = alembic_config(schema=schema)
    config.attributes["connection"] = connection
    return action(config, *args)


async def _on_engine(
    target: UrlLike | AsyncEngine,
    action: Callable[..., Any],
    args: tuple[Any, ...],
    schema: str | None,
    *,
    writes: bool = True,
) -> Any:

    engine, owned = open_engine(target)
    check_schema(engine.dialect.name, schema)
    try:
        if not writes:
            # a look at the version table: on SQLite it neither waits for nor blocks a writer
            async with read_connection(engine) as connection:
                return await connection.run_sync(_invoke, action, args, schema)
        # Alembic's migration context is process-wide: one migration at a time per loop,
        # or journals starting together on different databases trample each other
        async with _alembic_turn(), engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # The whole migration in one BEGIN IMMEDIATE transaction: all or nothing (a
                # crash half-way leaves no half-made schema), and another process migrating
                # the same file waits, then finds head. casty-sa's own engines begin that
                # way by themselves; an application's pysqlite would run DDL outside any
                # transaction, so it gets the BEGIN explicitly.
                if connection.sync_engine in AUTOCOMMIT_ENGINES:
                    await connection.begin()
                else:
                    await connection.exec_driver_sql("BEGIN IMMEDIATE")
            result = await connection.run_sync(_invoke, action, args, schema)
            await connection.commit()
            return result
    except (SQLAlchemyError, OSError) as exc:
        what = "migrate the schema" if writes else "read the schema revision"
        raise _migration_error(exc, engine.url, what) from exc
    finally:
        if owned:
            await engine.dispose()


def _migration_error(exc: BaseException, url: URL, what: str) -> JournalError:
    """A casty-sa error for a failed Alembic command: no DDL, no password in it."""
    text = describe(exc, url_secrets(url))
    if sqlstate(exc) == "42501" or "permission denied" in text or "must be owner" in text:
        return SchemaError(
            f"the role connecting to {safe_url(url)} may not change casty-sa's tables "
            f"({text}). Run the migrations (`casty-sa upgrade`) with a DDL-capable role, "
            "such as the owner of the database or schema; the journal itself needs only "
            "SELECT and INSERT on casty_sa_events, SELECT, INSERT and UPDATE on "
            f"casty_sa_snapshots, and SELECT on {VERSION_TABLE}. Nothing was changed."
        )
    # a refused login, a missing database or directory: not transient, whoever met it
    return access_denied(exc, url, what, url_secrets(url)) or DatabaseUnavailable(
        f"could not {what} on {safe_url(url)}: {text}"
    )


_alembic_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _alembic_turn() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _alembic_locks.get(loop)
    if lock is None:
        lock = _alembic_locks[loop] = asyncio.Lock()
    return lock


def check_schema(dialect: str, schema: str | None) -> None:
    """Refuse ``schema=`` where the database has no schemas to put tables in."""
    if schema is not None and dialect != "postgresql":
        raise ValueError(f"schema={schema!r} needs PostgreSQL; {dialect} has no schemas")


async def upgrade(
    target: UrlLike | AsyncEngine, revision: str = "head", *, schema: str | None = None
) -> None:
    """Migrate a database up to ``revision`` (default: the newest).

    Parameters
    ----------
    target : str | URL | os.PathLike | AsyncEngine
        A URL (plain ``sqlite:///…``/``postgresql://…`` picks the async
        driver) or an application's ``AsyncEngine``, which is left open.
    revision : str
        Alembic revision to reach.
    schema : str | None
        PostgreSQL schema to put the tables in (created if missing).

    Examples
    --------
    >>> import asyncio
    >>> asyncio.run(upgrade("sqlite://"))  # a throwaway in-memory database

    Raises
    ------
    SchemaError
        casty-sa's tables exist without casty-sa's version table (the
        application's own migrations made them): nothing is changed.
    """
    await _on_engine(target, _upgrade_own_tables, (revision,), schema)


def _upgrade_own_tables(config: Config, revision: str) -> None:
    """``alembic upgrade``, refusing tables casty-sa's history did not make.

    Without this, the first migration's ``CREATE TABLE`` fails with "relation
    already exists", although the journal uses such tables as they are.
    """
    connection: Connection = config.attributes["connection"]
    schema: str | None = config.attributes.get("schema")
    if current_revision(connection, schema) is None:
        present = set(inspect(connection).get_table_names(schema=schema))
        ours = sorted(present & set(metadata.tables))
        if ours:
            if tables_match_models(connection, schema):
                made = (
                    "they match this casty-sa's models: the application's own migrations "
                    "made them (from casty_sa.metadata), and SAJournal uses them as they are "
                    "(`casty-sa check` says so). Keep managing them with the application's "
                    "Alembic history; casty-sa's own migrations are not needed"
                )
            else:
                made = (
                    "they do not match this casty-sa's models either. Bring them to the "
                    "models with the migrations that made them, or move them away"
                )
            raise SchemaError(
                f"casty-sa's tables ({', '.join(ours)}) exist without casty-sa's version table "
                f"{VERSION_TABLE}, so casty-sa's migrations would create them again; {made}. "
                "Nothing was changed."
            )
    command.upgrade(config, revision)


async def downgrade(
    target: UrlLike | AsyncEngine, revision: str = "base", *, schema: str | None = None
) -> None:
    """Migrate a database down to ``revision``; ``"base"`` drops casty-sa's tables only."""
    await _on_engine(target, command.downgrade, (revision,), schema)


async def current(target: UrlLike | AsyncEngine, *, schema: str | None = None) -> str | None:
    """The casty-sa revision a database is at, or ``None`` when it has none."""
    revision: str | None = await _on_engine(
        target,
        lambda config: current_revision(config.attributes["connection"], schema),
        (),
        schema,
        writes=False,
    )
    return revision


async def ensure_schema(
    engine: AsyncEngine,
    *,
    schema: str | None = None,
    migrate: bool = False,
    secrets: frozenset[str] = frozenset(),
    turn: Callable[[], AbstractAsyncContextManager[object]] = contextlib.nullcontext,
) -> None:
    """Check that ``engine``'s database is at casty-sa's head, migrating it if allowed.

    Tables an application's own Alembic history made from ``casty_sa.metadata`` are
    accepted as they are. ``turn`` is held around each use of a connection (a memory
    database's single connection is taken in turns).

    Raises
    ------
    SchemaError
        The database is at another revision (or has no tables) and ``migrate`` is off,
        or a newer casty-sa migrated it, or it holds casty's own ``SqliteJournal`` tables.
    DatabaseUnavailable
        The database could not be read or migrated.
    """
    url = engine.url
    head = head_revision()
    try:
        async with turn(), read_connection(bind_schema(engine, schema)) as connection:
            await connection.run_sync(refuse_casty_tables, url)
            found = await connection.run_sync(current_revision, schema)
            app_managed = found is None and await connection.run_sync(tables_match_models, schema)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        raise database_error(
            exc, url, "read the schema revision", secrets=secrets, schema=schema
        ) from exc
    if found == head:
        return
    if app_managed:
        log.debug("casty_sa: tables managed by the application's migrations; using them")
        return
    if found is not None and not known_revision(found):
        raise SchemaError(
            f"{safe_url(url)} is at casty-sa schema revision {found!r}, which this "
            f"version of casty-sa does not know (its newest is {head!r}): a newer casty-sa "
            "migrated it. Upgrade the casty-sa package."
        )
    if not migrate:
        state = "has no casty-sa tables" if found is None else f"is at revision {found!r}"
        raise SchemaError(
            f"{safe_url(url)} {state}; casty-sa needs revision {head!r}. "
            f"{upgrade_hint(schema)}, or `await casty_sa.upgrade(url)`, or pass "
            "migrate=True to SAJournal."
        )
    log.info("casty_sa: migrating %s from %s to %s", safe_url(url), found, head)
    try:
        async with turn():
            await upgrade(engine, schema=schema)
    except (SQLAlchemyError, OSError, JournalError) as exc:
        # another process may have migrated the same file at the same moment
        async with turn(), read_connection(bind_schema(engine, schema)) as connection:
            if await connection.run_sync(current_revision, schema) != head:
                raise database_error(
                    exc, url, "migrate the schema", secrets=secrets, schema=schema
                ) from exc


@asynccontextmanager
async def checked_engine(
    target: UrlLike | AsyncEngine,
    *,
    migrate: bool | None = None,
    schema: str | None = None,
    **engine_options: Any,
) -> AsyncIterator[AsyncEngine]:
    """An engine on a database at casty-sa's head revision (async context manager).

    ``migrate`` as for :class:`~casty_sa.SAJournal` (``None``: migrate SQLite only).
    An engine casty-sa creates here is disposed of on the way out, also when the
    check fails; an engine passed in is left open.
    """
    budget = (
        engine_options.pop("connect_timeout", None),
        engine_options.pop("statement_timeout", None),
    )
    engine, owned, _timeouts = open_journal_engine(target, engine_options, budget=budget)
    try:
        check_schema(engine.dialect.name, schema)
        secrets = url_secrets(engine.url) | (
            url_secrets(target) if isinstance(target, str | URL) else frozenset()
        )
        allowed = engine.dialect.name == "sqlite" if migrate is None else migrate
        await ensure_schema(engine, schema=schema, migrate=allowed, secrets=secrets)
        yield engine
    finally:
        if owned:
            await engine.dispose()
