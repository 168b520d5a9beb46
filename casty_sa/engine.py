"""Engines for a journal, whatever the dialect: opening one, binding a schema, reading only.

:func:`open_engine` takes a URL (or an application's engine) and gives the
engine a journal runs on; :func:`build_engine` hands a URL over to its
dialect's engine factory (the tuning of each database lives in its module:
:mod:`casty_sa.backends.sqlite`, :mod:`casty_sa.backends.postgresql`; see
:mod:`casty_sa.dialects`). :func:`bind_schema` is the one place that applies
``schema_translate_map``; :func:`read_only` marks the transactions that only read.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from sqlalchemy import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker

from casty_sa.dialects import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT,
    EngineRequest,
    Timeouts,
)
from casty_sa.errors import UnsupportedDatabase
from casty_sa.urls import dialect_of, require_driver, to_async_url

__all__ = [
    "AUTOCOMMIT_ENGINES",
    "READ_ONLY",
    "Timeouts",
    "build_engine",
    "engine_settings",
    "open_engine",
    "open_journal_engine",
    "read_connection",
    "read_only",
]

#: Execution option of a connection whose transaction only reads: on SQLite it begins a
#: deferred transaction, which never waits for (nor blocks) another connection's writer.
READ_ONLY = "casty_sa_read_only"

#: Engines whose driver runs in autocommit mode (no implicit transactions; SQLite's, made
#: by casty-sa): a single statement commits on its own, and transactions begin explicitly.
AUTOCOMMIT_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


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

    The URL's dialect tunes it (:attr:`casty_sa.dialects.Dialect.engine`; SQLite
    reads ``busy_timeout`` and ``sqlite_synchronous``, PostgreSQL the two
    timeouts, which left ``None`` come from the URL, else default to 10 and 30
    seconds). ``engine_options`` go to
    :func:`~sqlalchemy.ext.asyncio.create_async_engine` last, so they override
    every default the dialect chooses; ``connect_args`` (and their
    ``server_settings``) are merged key by key.

    Returns
    -------
    tuple[AsyncEngine, Timeouts | None]
        The engine, and on a dialect whose calls are bounded (PostgreSQL) its
        timeouts as finally configured (argument, URL or default;
        ``connect_args`` override them too).

    Raises
    ------
    UnsupportedDatabase
        No dialect is registered for the URL, or it carries a parameter the
        driver cannot honour.
    """
    options = dict(engine_options)
    connect_args = dict(options.pop("connect_args", {}))
    request = EngineRequest(
        busy_timeout, sqlite_synchronous, connect_timeout, statement_timeout, options, connect_args
    )
    require_driver(url)
    return dialect_of(url).engine(url, request)


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
    engine, owned, _timeouts = open_journal_engine(target, engine_options)
    return engine, owned


def open_journal_engine(
    target: str | URL | os.PathLike[str] | AsyncEngine | async_sessionmaker[Any],
    options: dict[str, Any],
) -> tuple[AsyncEngine, bool, Timeouts | None]:
    """:func:`open_engine`, plus the timeouts a journal's calls are bounded by (PostgreSQL's).

    ``options`` are the journal's keyword arguments (see :func:`engine_settings`). Its
    ``connect_timeout`` and ``statement_timeout`` configure an engine casty-sa creates;
    on an application's engine they are only the journal's own bounds (``None`` for
    either: the default), since the timeouts that engine's connections were opened with
    cannot be read back reliably.
    """
    engine_options, (connect, statement) = engine_settings(options)
    if isinstance(target, async_sessionmaker):
        bound = target.kw.get("bind")
        if not isinstance(bound, AsyncEngine):
            raise UnsupportedDatabase(
                "the async_sessionmaker passed to casty-sa is not bound to an AsyncEngine; "
                "create it with async_sessionmaker(engine) or pass the engine itself"
            )
        target = bound
    if isinstance(target, AsyncEngine):
        if engine_options:
            raise TypeError(
                "engine options "
                f"({', '.join(sorted(engine_options))}) only apply when casty-sa creates the "
                "engine from a URL; configure the application's engine instead"
            )
        timeouts = None
        # to_async_url refuses an unsupported database early
        if dialect_of(to_async_url(target.url)).timed:
            timeouts = Timeouts(
                connect if connect is not None else DEFAULT_CONNECT_TIMEOUT,
                statement if statement is not None else DEFAULT_STATEMENT_TIMEOUT,
            )
        return target, False, timeouts
    url = to_async_url(target)
    engine, timeouts = build_engine(
        url,
        busy_timeout=engine_options.pop("busy_timeout", 5.0),
        sqlite_synchronous=engine_options.pop("sqlite_synchronous", "FULL"),
        connect_timeout=connect,
        statement_timeout=statement,
        engine_options=engine_options,
    )
    return engine, True, timeouts


def bind_schema[B: (AsyncEngine, Connection)](bind: B, schema: str | None) -> B:
    """``bind`` with casty-sa's tables looked up in ``schema`` (PostgreSQL), or as it is."""
    if schema is None:
        return bind
    return bind.execution_options(schema_translate_map={None: schema})


#: SAJournal's settings of its writes and reads: an engine that only checks, reads or
#: copies accepts them (as the journal does) and has no use for them
_JOURNAL_SETTINGS = frozenset(
    {
        "kind",
        "serialize",
        "deserialize",
        "group_commit",
        "max_batch_events",
        "max_batch_bytes",
        "max_pending",
        "read_retries",
        "retry_backoff",
    }
)
#: SAJournal's engine settings whose ``None`` means "the default"
_DEFAULTED = frozenset(
    {"busy_timeout", "sqlite_synchronous", "connect_timeout", "statement_timeout"}
)


def engine_settings(
    options: dict[str, Any],
) -> tuple[dict[str, Any], tuple[float | None, float | None]]:
    """SAJournal's keyword arguments as an engine takes them.

    The engine options (``None`` dropped: the default), and the
    ``(connect_timeout, statement_timeout)`` budget; the journal's own write and
    read settings are accepted and left out.

    Examples
    --------
    >>> engine_settings({"busy_timeout": None, "pool_size": 2, "read_retries": 1})
    ({'pool_size': 2}, (None, None))
    """
    kept = {
        name: value
        for name, value in options.items()
        if name not in _JOURNAL_SETTINGS and not (name in _DEFAULTED and value is None)
    }
    return kept, (kept.pop("connect_timeout", None), kept.pop("statement_timeout", None))
