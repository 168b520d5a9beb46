"""Engines tuned for a journal: durable SQLite, pooled PostgreSQL.

SQLite (``aiosqlite``)
    WAL mode, ``synchronous=FULL`` by default (an acknowledged commit survives
    power loss; ``NORMAL`` is faster and may lose the last commits on power
    loss, never corrupting the file; ``OFF`` trusts the OS entirely), a busy
    timeout so writers from other processes wait instead of failing, and
    ``BEGIN IMMEDIATE`` for every write transaction so a transaction never has
    to upgrade a read lock (the source of "database is locked" deadlocks). An
    in-memory database uses one connection for the journal's lifetime, so all
    calls see one database.
PostgreSQL (``asyncpg``)
    A fixed pool of ten connections, each checked on checkout (asyncpg knows
    when the server or the network closed it, so no round trip is spent; pass
    ``pool_pre_ping=True`` for SQLAlchemy's full ping), a connect timeout and
    a statement timeout, so a call during an outage fails promptly instead of
    hanging. The statement timeout is also the server's ``statement_timeout``,
    and connections are named ``casty-sa`` in ``pg_stat_activity`` (the URL's
    ``application_name`` overrides it). The URL's libpq parameters
    (``sslmode``, ``connect_timeout``, ``options=-c …``) are translated for
    asyncpg; one it cannot honour is refused.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

from sqlalchemy import URL, Connection, Engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

from casty_sa.errors import UnsupportedDatabase
from casty_sa.libpq import DEFAULT_APPLICATION_NAME, postgres_options
from casty_sa.urls import is_memory_sqlite, to_async_url

__all__ = [
    "AUTOCOMMIT_ENGINES",
    "READ_ONLY",
    "SQLITE_SYNCHRONOUS",
    "Timeouts",
    "build_engine",
    "open_engine",
    "open_journal_engine",
    "read_connection",
    "read_only",
]

#: Execution option of a connection whose transaction only reads: on SQLite it begins a
#: deferred transaction, which never waits for (nor blocks) another connection's writer.
READ_ONLY = "casty_sa_read_only"


SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

#: PostgreSQL: seconds before a connection attempt fails, and before a statement does
#: (on the client and on the server), unless the call or the URL says otherwise.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_STATEMENT_TIMEOUT = 30.0

#: SQLite engines whose driver runs in autocommit mode (no implicit transactions): a
#: single statement commits on its own, and transactions are explicit BEGIN IMMEDIATE.
AUTOCOMMIT_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class Timeouts:
    """A PostgreSQL journal's timeouts in seconds: a call's budget is derived from them.

    Parameters
    ----------
    connect : float
        Before a connection attempt fails.
    statement : float
        Before a statement fails.
    """

    connect: float = DEFAULT_CONNECT_TIMEOUT
    statement: float = DEFAULT_STATEMENT_TIMEOUT

    @property
    def budget(self) -> float:
        """A call's budget end to end: it may have to open a connection and run its statement."""
        return self.connect + self.statement

    @property
    def ping(self) -> float:
        """How long a liveness ping may take: a live server answers ``SELECT 1`` well within
        the shorter of the two."""
        return min(self.connect, self.statement)


def build_engine(
    url: URL,
    *,
    busy_timeout: float,
    sqlite_synchronous: str,
    connect_timeout: float | None,
    statement_timeout: float | None,
    engine_options: dict[str, Any],
) -> tuple[AsyncEngine, Timeouts | None]:
    """Create the async engine for a normalized URL (see :func:`casty_sa.urls.to_async_url`).

    ``engine_options`` go to :func:`~sqlalchemy.ext.asyncio.create_async_engine`
    last, so they override every default chosen here; ``connect_args`` (and
    their ``server_settings``) are merged key by key. On PostgreSQL,
    ``connect_timeout`` and ``statement_timeout`` left ``None`` come from the
    URL (``?connect_timeout=``, ``?options=-c statement_timeout=``), else
    default to 10 and 30 seconds; the URL's libpq parameters are translated by
    :func:`casty_sa.libpq.postgres_options`.

    Returns
    -------
    tuple[AsyncEngine, Timeouts | None]
        The engine, and on PostgreSQL its timeouts as finally configured
        (argument, URL or default; ``connect_args`` override them too).

    Raises
    ------
    UnsupportedDatabase
        The URL carries a parameter asyncpg cannot honour.
    """
    options = dict(engine_options)
    user_connect_args = dict(options.pop("connect_args", {}))
    if url.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url, busy_timeout, sqlite_synchronous, options, user_connect_args)
        return engine, None
    return _postgresql_engine(url, connect_timeout, statement_timeout, options, user_connect_args)


def _sqlite_engine(
    url: URL,
    busy_timeout: float,
    sqlite_synchronous: str,
    options: dict[str, Any],
    user_connect_args: dict[str, Any],
) -> AsyncEngine:
    """A SQLite engine: WAL, ``synchronous``, busy timeout, ``BEGIN IMMEDIATE`` writes."""
    synchronous = sqlite_synchronous.upper()
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(
            f"sqlite_synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}, "
            f"not {sqlite_synchronous!r}"
        )
    memory = is_memory_sqlite(url)
    # autocommit at the driver: pysqlite opens no transaction behind our back; writes
    # are single statements or explicit BEGIN IMMEDIATE transactions (never a read
    # lock upgraded to a write lock, the source of "database is locked" deadlocks)
    connect_args: dict[str, Any] = {"isolation_level": None, "timeout": busy_timeout}
    # A fixed set of connections: SQLite allows one writer at a time anyway, and
    # opening and closing overflow connections (a thread and pragmas each) costs more
    # than waiting for a pooled one.
    defaults: dict[str, Any] = {}
    if memory:
        defaults["poolclass"] = StaticPool
    else:
        defaults.update(pool_size=5, max_overflow=0)
    final_connect_args = {**connect_args, **user_connect_args}
    engine = create_async_engine(url, connect_args=final_connect_args, **{**defaults, **options})
    if final_connect_args.get("isolation_level", "") is None:
        AUTOCOMMIT_ENGINES.add(engine.sync_engine)

        @event.listens_for(engine.sync_engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            # SQLAlchemy-level transactions (sessions, migrations) are real ones; those
            # that only read take no write lock (WAL readers never wait for writers)
            if connection.get_execution_options().get(READ_ONLY):
                connection.exec_driver_sql("BEGIN DEFERRED")
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

    busy_ms = int(busy_timeout * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        finally:
            cursor.close()

    return engine


def _postgresql_engine(
    url: URL,
    connect_timeout: float | None,
    statement_timeout: float | None,
    options: dict[str, Any],
    user_connect_args: dict[str, Any],
) -> tuple[AsyncEngine, Timeouts]:
    """An asyncpg engine: the URL's libpq parameters translated, timeouts, a fixed pool."""
    # libpq parameters of the URL (sslmode=, application_name=, …), in asyncpg's terms
    libpq = postgres_options(url)
    # an explicit argument wins over the URL, which wins over the defaults
    if connect_timeout is None:
        connect_timeout = libpq.connect_timeout or DEFAULT_CONNECT_TIMEOUT
    if statement_timeout is None:
        statement_timeout = libpq.statement_timeout or DEFAULT_STATEMENT_TIMEOUT
    # The server enforces the statement timeout too, so a statement whose client is cut
    # off (a network partition, a frozen process) does not run on, holding its locks;
    # and connections carry a name a DBA sees in pg_stat_activity.
    server_settings = {
        "application_name": DEFAULT_APPLICATION_NAME,
        **libpq.server_settings,
        "statement_timeout": str(max(1, round(statement_timeout * 1000))),
        **user_connect_args.pop("server_settings", {}),
    }
    connect_args = {
        **libpq.connect_args,
        "timeout": connect_timeout,
        "command_timeout": statement_timeout,
        "server_settings": server_settings,
    }
    # A fixed pool (no overflow connections opened and closed in bursts), checked on
    # checkout without a round trip: SQLAlchemy's pre-ping costs three on asyncpg
    # (BEGIN, SELECT, ROLLBACK), more than the journal's own statement.
    defaults = {"pool_size": 10, "max_overflow": 0}
    final_connect_args = {**connect_args, **user_connect_args}
    engine = create_async_engine(
        libpq.url, connect_args=final_connect_args, **{**defaults, **options}
    )
    timeouts = Timeouts(
        float(final_connect_args["timeout"]), float(final_connect_args["command_timeout"])
    )
    if not options.get("pool_pre_ping"):

        @event.listens_for(engine.sync_engine, "checkout")
        def _check_alive(_dbapi: Any, record: Any, _proxy: Any) -> None:
            driver = record.driver_connection
            if driver is not None and driver.is_closed():
                # the pool discards it and hands out (or opens) another
                raise DisconnectionError("connection closed by the server or the network")

    return engine, timeouts


def read_only(engine: AsyncEngine) -> AsyncEngine:
    """``engine`` for connections whose transactions only read (see :data:`READ_ONLY`).

    Every path of casty-sa that only looks (the schema check, ``current``,
    ``check``, ``inspect``, the source of a copy) reads through this, so none
    of them waits for, or holds up, an application's writer on SQLite.
    """
    return engine.execution_options(**{READ_ONLY: True})


def read_connection(engine: AsyncEngine) -> AsyncConnection:
    """A connection of ``engine`` for reading only (use as ``async with``)."""
    return read_only(engine).connect()


def open_engine(
    target: str | URL | os.PathLike[str] | AsyncEngine | async_sessionmaker[Any],
    **engine_options: Any,
) -> tuple[AsyncEngine, bool]:
    """The engine for ``target`` and whether the caller owns (must dispose) it.

    An ``AsyncEngine`` (or the engine an ``async_sessionmaker`` is bound to) is
    returned as is (not owned) after checking its dialect; a URL gets an
    engine tuned by :func:`casty_sa.engine.build_engine`.
    """
    engine, owned, _timeouts = open_journal_engine(target, engine_options, budget=None)
    return engine, owned


def open_journal_engine(
    target: str | URL | os.PathLike[str] | AsyncEngine | async_sessionmaker[Any],
    engine_options: dict[str, Any],
    *,
    budget: tuple[float | None, float | None] | None,
) -> tuple[AsyncEngine, bool, Timeouts | None]:
    """:func:`open_engine`, plus the PostgreSQL timeouts a journal's calls are bounded by.

    ``budget``: the journal's ``(connect_timeout, statement_timeout)`` arguments. On an
    engine casty-sa creates they configure it; on an application's engine they are only
    the journal's own bounds (``None`` for either: the default), since the timeouts that
    engine's connections were opened with cannot be read back reliably.
    """
    if isinstance(target, async_sessionmaker):
        bound = target.kw.get("bind")
        if not isinstance(bound, AsyncEngine):
            raise UnsupportedDatabase(
                "the async_sessionmaker passed to casty-sa is not bound to an AsyncEngine; "
                "create it with async_sessionmaker(engine) or pass the engine itself"
            )
        target = bound
    connect, statement = budget if budget is not None else (None, None)
    if isinstance(target, AsyncEngine):
        if engine_options:
            raise TypeError(
                "engine options "
                f"({', '.join(sorted(engine_options))}) only apply when casty-sa creates the "
                "engine from a URL; configure the application's engine instead"
            )
        to_async_url(target.url)  # refuse unsupported databases early
        timeouts = None
        if target.dialect.name == "postgresql":
            timeouts = Timeouts(
                connect if connect is not None else DEFAULT_CONNECT_TIMEOUT,
                statement if statement is not None else DEFAULT_STATEMENT_TIMEOUT,
            )
        return target, False, timeouts
    options = dict(engine_options)
    url = to_async_url(target)
    engine, timeouts = build_engine(
        url,
        busy_timeout=options.pop("busy_timeout", 5.0),
        sqlite_synchronous=options.pop("sqlite_synchronous", "FULL"),
        connect_timeout=options.pop("connect_timeout", connect),
        statement_timeout=options.pop("statement_timeout", statement),
        engine_options=options,
    )
    return engine, True, timeouts


def bind_schema[B: (AsyncEngine, Connection)](bind: B, schema: str | None) -> B:
    """``bind`` with casty-sa's tables looked up in ``schema`` (PostgreSQL), or as it is."""
    if schema is None:
        return bind
    return bind.execution_options(schema_translate_map={None: schema})
