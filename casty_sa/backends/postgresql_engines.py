"""PostgreSQL's engines for a journal, through asyncpg or psycopg 3.

A fixed pool of ten connections (no overflow connections opened and closed in
bursts), each checked on checkout without a round trip (the driver knows when
it saw the connection close; SQLAlchemy's ``pool_pre_ping`` costs three round
trips, more than the journal's own statement: pass ``pool_pre_ping=True`` for
it), a connect timeout and a statement timeout, so a call during an outage
fails promptly instead of hanging. The statement timeout is also the server's
``statement_timeout``, and connections are named ``casty-sa`` in
``pg_stat_activity`` (the URL's ``application_name`` overrides it).

asyncpg does not take libpq's URL parameters (``sslmode``, ``connect_timeout``,
``options=-c …``): :mod:`casty_sa.libpq` translates them, and refuses one it
cannot honour. psycopg is libpq: it takes them all as they are.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import URL, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from casty_sa.backends.postgresql_drivers import driver_for
from casty_sa.dialects import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT,
    EngineRequest,
    Timeouts,
)
from casty_sa.libpq import DEFAULT_APPLICATION_NAME, libpq_timeouts, postgres_options

__all__ = ["postgresql_engine"]

_POOL = {"pool_size": 10, "max_overflow": 0}


def postgresql_engine(url: URL, request: EngineRequest) -> tuple[AsyncEngine, Timeouts | None]:
    """The engine of a PostgreSQL URL, for the driver it names (asyncpg by default)."""
    if url.get_driver_name().startswith("psycopg"):
        return _psycopg_engine(url, request)
    return _asyncpg_engine(url, request)


def _psycopg_engine(url: URL, request: EngineRequest) -> tuple[AsyncEngine, Timeouts | None]:
    """A psycopg engine: libpq reads the URL; the timeouts and the name are added to it."""
    url_connect, url_statement = libpq_timeouts(url)
    connect_timeout = request.connect_timeout
    if connect_timeout is None:
        connect_timeout = url_connect or DEFAULT_CONNECT_TIMEOUT
    statement_timeout = request.statement_timeout
    if statement_timeout is None:
        statement_timeout = url_statement or DEFAULT_STATEMENT_TIMEOUT
    user_connect_args = dict(request.connect_args)
    query = dict(url.query)
    # the URL's options first: the server takes the last of two settings of one name
    options = [str(user_connect_args.pop("options", query.get("options", "")))]
    options.append(f"-c statement_timeout={max(1, round(statement_timeout * 1000))}")
    connect_args: dict[str, Any] = {
        # libpq counts whole seconds, at least 2
        "connect_timeout": str(max(1, math.ceil(connect_timeout))),
        "options": " ".join(option for option in options if option),
    }
    if "application_name" not in query and "fallback_application_name" not in query:
        connect_args["application_name"] = DEFAULT_APPLICATION_NAME
    engine = create_async_engine(
        url, connect_args={**connect_args, **user_connect_args}, **{**_POOL, **request.options}
    )
    _check_on_checkout(engine, request)
    return engine, Timeouts(float(connect_timeout), float(statement_timeout))


def _asyncpg_engine(url: URL, request: EngineRequest) -> tuple[AsyncEngine, Timeouts | None]:
    """An asyncpg engine: the URL's libpq parameters translated, timeouts, a fixed pool."""
    # libpq parameters of the URL (sslmode=, application_name=, …), in asyncpg's terms
    libpq = postgres_options(url)
    # an explicit argument wins over the URL, which wins over the defaults
    connect_timeout = request.connect_timeout
    if connect_timeout is None:
        connect_timeout = libpq.connect_timeout or DEFAULT_CONNECT_TIMEOUT
    statement_timeout = request.statement_timeout
    if statement_timeout is None:
        statement_timeout = libpq.statement_timeout or DEFAULT_STATEMENT_TIMEOUT
    user_connect_args = dict(request.connect_args)
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
    final_connect_args = {**connect_args, **user_connect_args}
    engine = create_async_engine(
        libpq.url, connect_args=final_connect_args, **{**_POOL, **request.options}
    )
    timeouts = Timeouts(
        float(final_connect_args["timeout"]), float(final_connect_args["command_timeout"])
    )
    _check_on_checkout(engine, request)
    return engine, timeouts


def _check_on_checkout(engine: AsyncEngine, request: EngineRequest) -> None:
    """Hand out no connection its driver knows to be closed (unless ``pool_pre_ping``)."""
    if request.options.get("pool_pre_ping"):
        return
    driver = driver_for(engine.dialect.driver)

    @event.listens_for(engine.sync_engine, "checkout")
    def _check_alive(_dbapi: Any, record: Any, _proxy: Any) -> None:
        connection = record.driver_connection
        if connection is not None and not driver.usable(connection):
            # the pool discards it and hands out (or opens) another
            raise DisconnectionError("connection closed by the server or the network")
