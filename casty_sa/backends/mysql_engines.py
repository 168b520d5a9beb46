"""MySQL's and MariaDB's engines for a journal, through asyncmy or aiomysql.

A fixed pool of ten connections in ``utf8mb4``, and per session a strict
``sql_mode`` (without it MySQL cuts a value that does not fit and only warns),
the server's own statement bound (MariaDB ``max_statement_time``, MySQL
``max_execution_time``, which bounds ``SELECT`` only), a lock wait shorter than
the statement timeout (a wait that ends is a contention the journal retries),
and on MariaDB ``idle_write_transaction_timeout``: a client frozen in a
transaction loses its session, and the locks it held, instead of stalling every
writer.

Opening a connection is bounded as a whole by the connect timeout: the drivers'
own ``connect_timeout`` bounds the TCP connection only, and a server that
accepts it but answers nothing (frozen, overloaded) would hold the handshake
forever. The session's settings go in the same bounded step.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import URL, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_

from casty_sa.backends.mysql_reads import LEFT_CLEAN
from casty_sa.dialects import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT,
    EngineRequest,
    Timeouts,
)

__all__ = ["STRICT_SQL_MODE", "mysql_engine", "session_settings"]

#: ``sql_mode`` of casty-sa's sessions: a value that does not fit is an error, never cut.
STRICT_SQL_MODE = "STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION"


def session_settings(statement_timeout: float, *, mariadb: bool) -> str:
    """The ``SET SESSION`` of each connection casty-sa opens (see the module's docstring).

    >>> session_settings(30.0, mariadb=False)  # doctest: +NORMALIZE_WHITESPACE
    "SET SESSION sql_mode = 'STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION',
    innodb_lock_wait_timeout = 10, max_execution_time = 30000"
    """
    settings = [
        f"sql_mode = '{STRICT_SQL_MODE}'",
        f"innodb_lock_wait_timeout = {max(1, int(statement_timeout / 3))}",
    ]
    if mariadb:
        settings += [
            f"max_statement_time = {statement_timeout:g}",
            f"idle_write_transaction_timeout = {max(1, math.ceil(2 * statement_timeout))}",
        ]
    else:
        settings.append(f"max_execution_time = {max(1, round(statement_timeout * 1000))}")
    return "SET SESSION " + ", ".join(settings)


def mysql_engine(url: URL, request: EngineRequest) -> tuple[AsyncEngine, Timeouts | None]:
    """An asyncmy (or aiomysql) engine: utf8mb4, strict sessions, timeouts, a fixed pool."""
    query_timeout = url.query.get("connect_timeout")
    connect_timeout = request.connect_timeout
    if connect_timeout is None:
        connect_timeout = float(str(query_timeout)) if query_timeout else DEFAULT_CONNECT_TIMEOUT
    statement_timeout = request.statement_timeout
    if statement_timeout is None:
        statement_timeout = DEFAULT_STATEMENT_TIMEOUT
    url = url.difference_update_query(["connect_timeout"])
    connect = request.connect_args.get("async_creator_fn")
    if connect is None:  # the driver's own (both are named after their module)
        connect = importlib.import_module(url.get_driver_name()).connect
    connect_args = {
        "charset": "utf8mb4",
        "connect_timeout": max(1, math.ceil(connect_timeout)),
        **request.connect_args,
        "async_creator_fn": _bounded_connect(connect, connect_timeout, statement_timeout),
    }
    # the pool's reset on return is the listener below (unless the caller chose one)
    defaults = {"pool_size": 10, "max_overflow": 0, "pool_reset_on_return": None}
    options = {**defaults, **request.options}
    engine = create_async_engine(url, connect_args=connect_args, **options)
    if options["pool_reset_on_return"] is None:
        event.listen(engine.sync_engine, "reset", _resetter(statement_timeout))
    event.listen(engine.sync_engine, "do_connect", _utf8_password)
    return engine, Timeouts(float(connect_timeout), float(statement_timeout))


def _utf8_password(_dialect: Any, _record: Any, _args: Any, params: dict[str, Any]) -> None:
    """The password's UTF-8 (as the server hashed it), as the latin-1 both drivers send."""
    if isinstance(password := params.get("password"), str):
        params["password"] = password.encode("utf-8", "surrogateescape").decode("latin-1")


def _bounded_connect(
    connect: Callable[..., Awaitable[Any]], within: float, statement_timeout: float
) -> Callable[..., Awaitable[Any]]:
    """The driver's ``connect``, handshake and session settings included, within ``within``
    seconds (``TimeoutError`` after it; the half-open connection is closed)."""

    async def opened(*args: Any, **kwargs: Any) -> Any:
        conn = await connect(*args, **kwargs)
        try:
            mariadb = "MariaDB" in conn.get_server_info()
            async with conn.cursor() as cursor:
                await cursor.execute(session_settings(statement_timeout, mariadb=mariadb))
        except BaseException:
            conn.close()  # the socket only: the server may be the one not answering
            raise
        return conn

    async def bounded(*args: Any, **kwargs: Any) -> Any:
        return await asyncio.wait_for(opened(*args, **kwargs), within)

    return bounded


def _resetter(statement_timeout: float) -> Callable[[Any, Any, Any], None]:
    """The pool's reset of a connection coming back: ``ROLLBACK``, as SQLAlchemy's own,
    unless casty-sa's backend left it :data:`~casty_sa.backends.mysql_reads.LEFT_CLEAN`:
    its work ended with ``COMMIT`` in the same packet and without an error (one round
    trip saved per read, and per write group not kept for the next). The mark, not the
    server's status flags: asyncmy leaves them stale after a ``COMMIT`` that follows a
    statement in one packet.

    The ``ROLLBACK`` is bounded by the statement timeout: one without an answer closes
    the connection's socket and fails the reset, and the pool discards the connection.
    (casty-sa's backend never hands back a connection it saw stop answering; this is for
    the application's own use of the engine.)
    """

    def reset(dbapi_connection: Any, record: Any, state: Any) -> None:
        clean = record.info.pop(LEFT_CLEAN, False)
        if clean or state.transaction_was_reset or not state.asyncio_safe:
            return
        driver = dbapi_connection.driver_connection
        try:
            await_(asyncio.wait_for(driver.rollback(), statement_timeout))
        except BaseException:
            driver.close()  # no goodbye to a server that does not answer
            raise

    return reset
