"""Small database helpers shared by the tests: SQL on a short-lived engine, what is open."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import URL, inspect, make_url, text
from sqlalchemy.dialects import mysql

from casty_sa.engine import open_engine


def plain(url: URL | str) -> str:
    """A URL as a user would type it, password included."""
    return url if isinstance(url, str) else url.render_as_string(hide_password=False)


def asyncpg_args(url: URL) -> dict[str, Any]:
    """asyncpg ``connect`` arguments of a SQLAlchemy URL (a unix socket rides in ``?host=``)."""
    args: dict[str, Any] = {
        "user": url.username,
        "password": url.password,
        "database": url.database,
        "host": url.query.get("host") or url.host,
        "port": url.port,
    }
    return {key: value for key, value in args.items() if value}


#: Quotes names in raw MySQL statements (``casty_sa.ordering.take_positions(MYSQL_QUOTES)``).
MYSQL_QUOTES = mysql.dialect().identifier_preparer


async def mysql_connect(url: URL, **options: Any) -> Any:
    """A raw asyncmy connection to the URL's MySQL/MariaDB database (autocommit off)."""
    import asyncmy  # type: ignore[import-untyped,unused-ignore]

    return await asyncmy.connect(
        host=url.host,
        port=url.port or 3306,
        user=url.username,
        password=url.password or "",
        database=url.database,
        **options,
    )


async def execute(url: URL | str, *statements: str) -> None:
    """Run statements in one transaction on a short-lived engine."""
    engine, _ = open_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def query(url: URL | str, statement: str) -> list[Any]:
    """The rows of one query, on a short-lived engine."""
    engine, _ = open_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(statement))).all())
    finally:
        await engine.dispose()


async def table_names(url: URL | str) -> set[str]:
    """The tables of the database's default schema."""
    engine, _ = open_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def open_connections(url: URL | str, *, within: float = 5.0) -> int:
    """Connections left open on the database once those closing have had ``within`` seconds.

    SQLite: this process's file handles on the database file (Linux's ``/proc``); PostgreSQL
    and MySQL: the server's sessions on the database, other than the one asking.
    """
    url = make_url(url) if isinstance(url, str) else url
    deadline = time.monotonic() + within
    while True:
        if url.get_backend_name() == "sqlite":
            count = _file_handles(url.database or "")
        elif url.get_backend_name() in ("mysql", "mariadb"):
            [(count,)] = await query(
                url,
                "SELECT count(*) FROM information_schema.processlist"
                " WHERE db = DATABASE() AND id <> CONNECTION_ID()",
            )
        else:
            [(count,)] = await query(
                url,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
        if count == 0 or time.monotonic() > deadline:
            return int(count)
        await asyncio.sleep(0.05)


def _file_handles(database: str) -> int:
    """This process's open file descriptors on ``database`` (Linux)."""
    path = os.path.realpath(database)
    return sum(1 for fd in Path("/proc/self/fd").iterdir() if os.path.realpath(fd) == path)
