"""Run casty-sa's Alembic migrations from code: the commands, and the journal's schema check.

The migrations live in the top-level ``migrations/`` folder of a checkout and
ship inside the wheel as ``casty_sa/migrations`` (see
:func:`casty_sa.revisions.script_location`). casty-sa keeps its own version
table (:data:`casty_sa.models.VERSION_TABLE`), so an application's
``alembic_version`` in the same database is never touched. What a database is
at, and the revisions there are, is :mod:`casty_sa.revisions`.

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
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TextIO

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Connection, inspect
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.diagnosis import database_error, migration_error
from casty_sa.engine import (
    AUTOCOMMIT_ENGINES,
    bind_schema,
    open_engine,
    open_journal_engine,
    read_connection,
)
from casty_sa.errors import JournalError, SchemaError, UnsupportedDatabase
from casty_sa.models import VERSION_TABLE, metadata
from casty_sa.revisions import (
    alembic_config,
    current_revision,
    head_revision,
    not_at_head,
    read_state,
    refuse_casty_tables,
    tables_match_models,
    unknown_revision,
)
from casty_sa.table_owners import interrupted_first_run
from casty_sa.urls import UrlLike, engine_secrets, safe_url, to_async_url

log = logging.getLogger("casty_sa")

__all__ = [
    "SchemaNotSupported",
    "check_schema",
    "checked_engine",
    "current",
    "downgrade",
    "ensure_schema",
    "migration_engine_options",
    "unsupported_schema",
    "upgrade",
    "write_sql",
]


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
    engine, owned = open_engine(target, **migration_engine_options(target, {}))
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
        raise migration_error(exc, engine.url, what) from exc
    finally:
        if owned:
            await engine.dispose()


_alembic_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _alembic_turn() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _alembic_locks.get(loop)
    if lock is None:
        lock = _alembic_locks[loop] = asyncio.Lock()
    return lock


#: PostgreSQL: the statement timeout of an engine casty-sa opens to migrate (a journal's is
#: 30 s): a ``CREATE INDEX CONCURRENTLY`` on millions of rows (0002) is one long statement.
MIGRATION_STATEMENT_TIMEOUT = 24 * 3600.0


def migration_engine_options(
    target: UrlLike | AsyncEngine, options: dict[str, Any]
) -> dict[str, Any]:
    """``options`` for the engine casty-sa opens to migrate ``target`` (none for an engine).

    >>> migration_engine_options("postgresql://db/app", {"connect_timeout": 5})
    {'connect_timeout': 5, 'statement_timeout': 86400.0}
    """
    if isinstance(target, AsyncEngine):
        return options
    if options.get("statement_timeout") is None:
        return {**options, "statement_timeout": MIGRATION_STATEMENT_TIMEOUT}
    return options


def unsupported_schema(dialect: str, schema: str | None, option: str = "schema=") -> str | None:
    """Why ``schema`` cannot be used on ``dialect`` (named as ``option`` says), or ``None``.

    The one refusal of a schema on a database without schemas: the journal,
    the migrations, ``migrations/env.py`` and the ``--schema`` option all say it so.

    Examples
    --------
    >>> unsupported_schema("sqlite", "app", option="--schema ")
    "--schema 'app' needs PostgreSQL; sqlite has no schemas"
    >>> unsupported_schema("postgresql", "app") is None
    True
    """
    if schema is None or dialect == "postgresql":
        return None
    return f"{option}{schema!r} needs PostgreSQL; {dialect} has no schemas"


def refuse_lax_session(connection: Connection, url: URL) -> None:
    """Refuse a MySQL/MariaDB session without strict mode (casty-sa's own engines set it).

    Without ``STRICT_TRANS_TABLES`` or ``STRICT_ALL_TABLES`` the server stores a value
    that does not fit cut or changed, with only a warning: the journal would report
    stored what is not. An application's engine gets the mode from the server's
    default or its own ``init_command``.

    Raises
    ------
    UnsupportedDatabase
        The session's ``sql_mode`` is not strict.
    """
    if connection.dialect.name not in ("mysql", "mariadb"):
        return
    mode = str(connection.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar() or "")
    if {"STRICT_TRANS_TABLES", "STRICT_ALL_TABLES"} & set(mode.upper().split(",")):
        return
    raise UnsupportedDatabase(
        f"the engine's sessions on {safe_url(url)} are not in strict mode (sql_mode is "
        f"{mode!r}): MySQL/MariaDB would store a value that does not fit cut short, with a "
        "warning only, and the journal would report it stored. Give the engine "
        "connect_args={'init_command': \"SET SESSION sql_mode = CONCAT(@@sql_mode, "
        "',STRICT_ALL_TABLES')\"} (or set it on the server), or let casty-sa create the "
        "engine from the URL"
    )


class SchemaNotSupported(ValueError):
    """``schema=`` on a database that has no schemas to put tables in."""


def check_schema(dialect: str, schema: str | None) -> None:
    """Refuse ``schema=`` (:class:`SchemaNotSupported`) where the database has no schemas."""
    reason = unsupported_schema(dialect, schema)
    if reason is not None:
        raise SchemaNotSupported(reason)


async def upgrade(
    target: UrlLike | AsyncEngine, revision: str = "head", *, schema: str | None = None
) -> None:
    """Migrate a database up to ``revision`` (default: the newest).

    Parameters
    ----------
    target : str | URL | os.PathLike | AsyncEngine
        A URL (plain ``sqlite:///…``/``postgresql://…`` picks the async
        driver) or an application's ``AsyncEngine``, which is left open (and keeps
        its statement timeout; a URL's gets :data:`MIGRATION_STATEMENT_TIMEOUT`).
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
        application's own migrations made them): nothing is changed. (The
        empty tables a first migration stopped half-way left on MySQL/MariaDB
        are no such tables: the upgrade finishes that migration.)
    """
    await _on_engine(target, _upgrade_own_tables, (revision,), schema)


def _upgrade_own_tables(config: Config, revision: str) -> None:
    """``alembic upgrade``, refusing tables casty-sa's history did not make.

    Without this, the first migration's ``CREATE TABLE`` fails with "relation
    already exists", although the journal uses such tables as they are. The
    empty tables of a first migration stopped half-way on MySQL/MariaDB are
    casty-sa's own: the run finishes it (see :mod:`casty_sa.table_owners`).
    """
    connection: Connection = config.attributes["connection"]
    schema: str | None = config.attributes.get("schema")
    if current_revision(connection, schema) is None:
        present = set(inspect(connection).get_table_names(schema=schema))
        ours = sorted(present & set(metadata.tables))
        if ours and interrupted_first_run(connection, schema):
            log.warning(
                "casty_sa: finishing a first migration that stopped half-way (it left %s, "
                "empty, and no revision)",
                ", ".join(ours),
            )
        elif ours:
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


def write_sql(
    url: str | URL,
    revision: str,
    stdout: TextIO,
    *,
    down: bool = False,
    schema: str | None = None,
) -> None:
    """Write the DDL of an upgrade (or with ``down``, a downgrade) for ``target``'s dialect.

    Connects to nothing: ``postgresql://`` is enough of a ``url``. ``revision`` may be a
    ``FROM:TO`` range (a downgrade needs one).

    Raises
    ------
    UnsupportedDatabase
        ``url`` is not a database casty-sa supports.
    SchemaNotSupported
        ``schema`` on a database without schemas.
    """
    # an unsupported dialect fails here, with its own message
    check_schema(to_async_url(url).get_backend_name(), schema)
    config = alembic_config(url, schema=schema, stdout=stdout)
    try:
        (command.downgrade if down else command.upgrade)(config, revision, sql=True)
    except SystemExit as exc:  # migrations/env.py refuses a schema with SystemExit(message)
        raise SchemaNotSupported(str(exc.code)) from None


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
    try:
        async with turn(), read_connection(bind_schema(engine, schema)) as connection:
            await connection.run_sync(refuse_casty_tables, url)
            await connection.run_sync(refuse_lax_session, url)
            state = await connection.run_sync(read_state, schema)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        raise database_error(
            exc, url, "read the schema revision", secrets=secrets, schema=schema
        ) from exc
    if state.usable:
        if state.app_managed:
            log.debug("casty_sa: tables managed by the application's migrations; using them")
        return
    if state.unknown:
        raise unknown_revision(safe_url(url), str(state.revision))
    if not migrate:
        raise not_at_head(safe_url(url), state, schema)
    head = head_revision()
    found = state.revision
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
    ``engine_options`` are the journal's: its engine settings (``connect_timeout``,
    ``busy_timeout``, ``pool_size``, …; ``None`` for a default) configure the engine,
    and its write and read settings (``group_commit``, ``read_retries``, …) are
    accepted and have nothing to do here. An engine casty-sa creates here is
    disposed of on the way out, also when the check fails; an engine passed in is
    left open. A migration under way runs to its end even if the caller is cancelled,
    as a journal's start does.
    """
    engine, owned, _timeouts = open_journal_engine(target, engine_options)
    try:
        check_schema(engine.dialect.name, schema)
        secrets = engine_secrets(engine.url, target)
        allowed = engine.dialect.name == "sqlite" if migrate is None else migrate
        check = asyncio.ensure_future(
            ensure_schema(engine, schema=schema, migrate=allowed, secrets=secrets)
        )
        try:
            await asyncio.shield(check)
        except asyncio.CancelledError:
            # the migration under way ends first, however often the caller is cancelled
            while not check.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({check})
            if not check.cancelled():
                check.exception()  # retrieved: the caller's cancellation is what it sees
            raise
        yield engine
    finally:
        if owned:
            await engine.dispose()
