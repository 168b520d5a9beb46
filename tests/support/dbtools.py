"""Small database helpers shared by the tests: SQL on a short-lived engine, what is open."""

from __future__ import annotations

import asyncio
import os
import sqlite3
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


async def run_script(url: URL | str, script: str) -> None:
    """Run a printed SQL script as its database's own client would, on a raw connection:
    SQLite's ``executescript``, the whole text on asyncpg (``psql -f``), and on MySQL one
    statement at a time in autocommit (``mysql < script``: its ``BEGIN``/``COMMIT`` count)."""
    url = make_url(url) if isinstance(url, str) else url
    backend = url.get_backend_name()
    if backend == "sqlite":
        connection = sqlite3.connect(url.database or "", isolation_level=None)
        try:
            connection.executescript(script)
        finally:
            connection.close()
    elif backend in ("mysql", "mariadb"):
        await mysql_script(url, mysql_statements(script))
    else:
        import asyncpg

        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        pg = await asyncpg.connect(dsn)
        try:
            await pg.execute(script)
        finally:
            await pg.close()


def mysql_statements(script: str) -> list[str]:
    """A MySQL script's statements, as the ``mysql`` client splits them (at ``;`` ending a
    line; ``--`` comment lines dropped)."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";\n") if s.strip().rstrip(";")]


async def mysql_script(url: URL, statements: list[str]) -> None:
    """Run ``statements`` one by one on a raw asyncmy connection in autocommit."""
    await mysql_execute(url, *(statement.rstrip(";") for statement in statements))


async def mysql_execute(url: URL, *statements: str) -> list[Any]:
    """Run statements on a raw asyncmy connection in autocommit (on the URL's database, or
    none); the rows of the last one."""
    connection = await mysql_connect(url, autocommit=True)
    rows: list[Any] = []
    try:
        async with connection.cursor() as cursor:
            for statement in statements:
                await cursor.execute(statement)
                rows = list(await cursor.fetchall())
    finally:
        connection.close()
    return rows
