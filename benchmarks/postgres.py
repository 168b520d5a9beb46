"""PostgreSQL for the benchmark: the server, and a fresh database per repetition.

The server is ``CASTY_SA_BENCH_POSTGRES_URL`` (an admin URL allowed to create
databases) when set, otherwise a throwaway ``pgserver`` in a temporary
directory. Each fresh database is cloned from a template migrated once to
casty-sa's head, so no timing pays for a migration.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import URL

import casty_sa
from casty_sa.urls import to_async_url

from .progress import progress


def asyncpg_args(url: URL) -> dict[str, Any]:
    """asyncpg ``connect`` arguments of a SQLAlchemy URL (a unix socket rides in ``?host=``)."""
    args = {
        "user": url.username,
        "password": url.password,
        "database": url.database,
        "host": url.query.get("host") or url.host,
        "port": url.port,
    }
    return {key: value for key, value in args.items() if value}


class PostgresStores:
    """Fresh databases on one server, cloned from a template migrated to casty-sa's head."""

    def __init__(self, admin: URL) -> None:
        self.admin = admin
        self._template = f"casty_sa_bench_tpl_{os.getpid()}"
        self._counter = itertools.count()
        self._made: set[str] = set()

    async def _admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(**asyncpg_args(self.admin))
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def setup(self) -> None:
        await self._admin(
            f'DROP DATABASE IF EXISTS "{self._template}"', f'CREATE DATABASE "{self._template}"'
        )
        await casty_sa.upgrade(self.admin.set(database=self._template))

    async def fresh(self) -> URL:
        name = f"casty_sa_bench_{os.getpid()}_{next(self._counter)}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"')
        self._made.add(name)
        with contextlib.suppress(asyncpg.PostgresError):
            await self._admin("CHECKPOINT")  # so no checkpoint of the copy lands in a timing
        return self.admin.set(database=name)

    async def drop(self, url: URL) -> None:
        assert url.database is not None
        await self._admin(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        self._made.discard(url.database)

    async def teardown(self) -> None:
        for name in [*self._made, self._template]:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def describe(self) -> dict[str, str]:
        conn = await asyncpg.connect(**asyncpg_args(self.admin))
        try:
            settings = {}
            for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method"):
                settings[name] = str(await conn.fetchval(f"SHOW {name}"))
            return settings
        finally:
            await conn.close()


@contextlib.contextmanager
def postgres_server() -> Iterator[URL]:
    """The benchmark's PostgreSQL admin URL: the environment's, or a throwaway pgserver."""
    given = os.environ.get("CASTY_SA_BENCH_POSTGRES_URL")
    if given:
        yield to_async_url(given)
        return
    data = Path(tempfile.mkdtemp(prefix="casty-sa-bench-pg-"))
    progress("starting a throwaway PostgreSQL (pgserver) in", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgserver's and platformdirs' deprecation chatter
        import pgserver  # type: ignore[import-untyped,unused-ignore]

        server = pgserver.get_server(data, cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        yield to_async_url(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)
