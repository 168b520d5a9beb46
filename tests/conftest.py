"""Shared fixtures: real SQLite files and a real PostgreSQL server.

PostgreSQL comes from ``CASTY_SA_TEST_POSTGRES_URL`` when set, otherwise the
suite starts its own server with the ``pgserver`` wheel. It is never skipped:
a PostgreSQL that cannot start fails the run.

Every test that takes ``db_url`` runs once per backend. Each gets a fresh
database (a SQLite file in its tmp dir, or a PostgreSQL database cloned from a
template migrated to head), and every journal made through ``make_journal``
is checked, after the test, to have no connection left checked out.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import URL, make_url

import casty_sa
from casty_sa import SAJournal

os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="casty-sa-xdg-"))  # for pgserver

collect_ignore = ["app_fixture"]  # an Alembic script folder, imported only by Alembic

BACKENDS = ("sqlite", "postgresql")
_TEMPLATE = "casty_sa_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[URL]:
    """An admin URL (``postgresql+asyncpg://…/postgres``) of a running server."""
    given = os.environ.get("CASTY_SA_TEST_POSTGRES_URL")
    if given:
        yield casty_sa.urls.to_async_url(given)
        return
    import pgserver  # type: ignore[attr-defined,unused-ignore]

    data = Path(tempfile.mkdtemp(prefix="casty-sa-pg-"))
    server = pgserver.get_server(data, cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        yield casty_sa.urls.to_async_url(server.get_uri())
    finally:
        server.cleanup()


def _asyncpg_args(url: URL) -> dict[str, Any]:
    args: dict[str, Any] = {
        "user": url.username,
        "password": url.password,
        "database": url.database,
        "host": url.query.get("host") or url.host,
        "port": url.port,
    }
    return {k: v for k, v in args.items() if v}


async def admin_execute(server: URL, *statements: str) -> None:
    """Run statements on the server's admin database (outside any transaction)."""
    conn = await asyncpg.connect(**_asyncpg_args(server))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_template(postgres_server_url: URL) -> str:
    """A database migrated to head, cloned for each test."""

    async def make() -> None:
        await admin_execute(postgres_server_url, f'DROP DATABASE IF EXISTS "{_TEMPLATE}"')
        await admin_execute(postgres_server_url, f'CREATE DATABASE "{_TEMPLATE}"')
        await casty_sa.upgrade(postgres_server_url.set(database=_TEMPLATE))

    asyncio.run(make())
    return _TEMPLATE


@pytest.fixture
async def new_postgres_db(
    postgres_server_url: URL, postgres_template: str
) -> AsyncIterator[Callable[..., Awaitable[URL]]]:
    """Factory of fresh databases: ``await new_postgres_db(migrated=True)``."""
    made: list[str] = []

    async def create(*, migrated: bool = True) -> URL:
        name = f"t_{os.getpid()}_{next(_counter)}"
        template = postgres_template if migrated else "template0"
        await admin_execute(postgres_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        made.append(name)
        return postgres_server_url.set(database=name)

    yield create
    for name in made:
        await admin_execute(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def db_url(
    backend: str, tmp_path: Path, new_postgres_db: Callable[..., Awaitable[URL]]
) -> URL:
    """A fresh database at head on the test's backend."""
    if backend == "sqlite":
        url = make_url(f"sqlite+aiosqlite:///{tmp_path / 'journal.db'}")
        await casty_sa.upgrade(url)
        return url
    return await new_postgres_db(migrated=True)


@pytest.fixture
async def empty_db_url(
    backend: str, tmp_path: Path, new_postgres_db: Callable[..., Awaitable[URL]]
) -> URL:
    """A fresh database without casty-sa's tables on the test's backend."""
    if backend == "sqlite":
        return make_url(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    return await new_postgres_db(migrated=False)


@pytest.fixture
async def make_journal() -> AsyncIterator[Callable[..., SAJournal]]:
    """Factory of journals; each is closed after the test, with no connection leaked."""
    journals: list[SAJournal] = []

    def make(url: Any, **options: Any) -> SAJournal:
        journal = SAJournal(url, **options)
        journals.append(journal)
        return journal

    yield make
    for journal in journals:
        checked_out = await _settled_checkouts(journal)
        await journal.close()
        assert checked_out == 0, f"{journal!r} left {checked_out} connection(s) checked out"


async def _settled_checkouts(journal: SAJournal, within: float = 5.0) -> int:
    """Connections still checked out once work a cancelled caller left running has ended."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        checked_out: int = journal.engine.pool.checkedout()  # type: ignore[attr-defined]
        if checked_out == 0 or asyncio.get_running_loop().time() > deadline:
            return checked_out
        await asyncio.sleep(0.02)


@pytest.fixture
async def journal(db_url: URL, make_journal: Callable[..., SAJournal]) -> SAJournal:
    """A started journal on a fresh database of the test's backend."""
    j = make_journal(db_url)
    await j.start()
    return j
