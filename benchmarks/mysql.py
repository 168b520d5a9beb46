"""MariaDB (or MySQL) for the benchmark: the server, and a fresh database per repetition.

The server is ``CASTY_SA_BENCH_MYSQL_URL`` (an admin URL allowed to create
databases, e.g. ``mysql://root@127.0.0.1:3306/``) when set, otherwise a
throwaway ``mariadbd`` started by the test suite's launcher
(``tests/support/mariadb.py``: Debian's ``mariadb-server``, a private data
directory, removed afterwards). MySQL has no template databases: each fresh
database gets the tables of one migrated to casty-sa's head once, copied with
``CREATE TABLE … LIKE`` and ``INSERT … SELECT`` (the event counter's row
included), so no timing pays for a migration.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncmy  # type: ignore[import-untyped,unused-ignore]
from sqlalchemy import URL

import casty_sa
from casty_sa.urls import to_async_url

from .progress import progress

if TYPE_CHECKING:
    from support.mariadb import MariaDBServer

#: the server settings the report records: the version, and what makes a commit durable
SETTINGS = (
    "version",
    "innodb_flush_log_at_trx_commit",
    "sync_binlog",
    "log_bin",
    "innodb_flush_method",
    "innodb_doublewrite",
)


def mysql_args(url: URL) -> dict[str, Any]:
    """asyncmy ``connect`` arguments of a SQLAlchemy URL (a socket rides in ``?unix_socket=``)."""
    args = {
        "user": url.username,
        "password": url.password,
        "database": url.database,
        "host": url.host,
        "port": url.port,
        "unix_socket": url.query.get("unix_socket"),
    }
    return {key: value for key, value in args.items() if value}


async def mysql_execute(url: URL, *statements: str) -> list[tuple[Any, ...]]:
    """Run ``statements`` in autocommit on one connection; the last one's rows."""
    conn = await asyncmy.connect(**mysql_args(url), autocommit=True)
    rows: list[tuple[Any, ...]] = []
    try:
        async with conn.cursor() as cursor:
            for statement in statements:
                await cursor.execute(statement)
                rows = list(await cursor.fetchall())
    finally:
        conn.close()
    return rows


class MySQLStores:
    """Fresh databases on one server, copied from a database migrated to casty-sa's head."""

    def __init__(self, admin: URL) -> None:
        self.admin = admin.set(database=None)
        self._template = f"casty_sa_bench_tpl_{os.getpid()}"
        self._counter = itertools.count()
        self._made: set[str] = set()
        self._tables: list[str] = []

    async def setup(self) -> None:
        await mysql_execute(
            self.admin,
            f"DROP DATABASE IF EXISTS `{self._template}`",
            f"CREATE DATABASE `{self._template}` CHARACTER SET utf8mb4",
        )
        await casty_sa.upgrade(self.admin.set(database=self._template))
        rows = await mysql_execute(
            self.admin,
            "SELECT table_name FROM information_schema.tables "
            f"WHERE table_schema = '{self._template}' ORDER BY table_name",
        )
        self._tables = [str(name) for (name,) in rows]

    async def fresh(self) -> URL:
        name = f"casty_sa_bench_{os.getpid()}_{next(self._counter)}"
        statements = [f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"]
        for table in self._tables:
            statements += [
                f"CREATE TABLE `{name}`.`{table}` LIKE `{self._template}`.`{table}`",
                f"INSERT INTO `{name}`.`{table}` SELECT * FROM `{self._template}`.`{table}`",
            ]
        self._made.add(name)
        await mysql_execute(self.admin, *statements)
        return self.admin.set(database=name)

    async def drop(self, url: URL) -> None:
        assert url.database is not None
        await mysql_execute(self.admin, f"DROP DATABASE IF EXISTS `{url.database}`")
        self._made.discard(url.database)

    async def teardown(self) -> None:
        for name in [*self._made, self._template]:
            with contextlib.suppress(Exception):
                await mysql_execute(self.admin, f"DROP DATABASE IF EXISTS `{name}`")

    async def describe(self) -> dict[str, str]:
        (values,) = await mysql_execute(
            self.admin, "SELECT " + ", ".join(f"@@{name}" for name in SETTINGS)
        )
        return {name: str(value) for name, value in zip(SETTINGS, values, strict=True)}


@contextlib.contextmanager
def mysql_server() -> Iterator[URL]:
    """The benchmark's MySQL admin URL (asyncmy): the environment's, or a throwaway MariaDB."""
    given = os.environ.get("CASTY_SA_BENCH_MYSQL_URL")
    if given:
        yield to_async_url(given).set(database=None)
        return
    launcher = _launcher()
    directory = Path(tempfile.mkdtemp(prefix="casty-sa-bench-mariadb-"))
    progress("starting a throwaway MariaDB (mariadbd) in", directory)
    server = launcher.start(directory)
    try:
        yield server.url
    finally:
        server.stop()


def _launcher() -> type[MariaDBServer]:
    """The test suite's ``MariaDBServer`` (``tests/support/mariadb.py``), one launcher for both.

    ``tests/`` goes last on ``sys.path`` (as pytest's ``pythonpath`` puts it first), so its
    ``support`` package shadows nothing of the benchmark's.
    """
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    from support import mariadb

    return mariadb.MariaDBServer
