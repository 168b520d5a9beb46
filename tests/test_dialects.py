"""A dialect is one registration: every layer of casty-sa looks it up in one registry.

The test registers a third dialect from here (SQLite's engine tuning and
backend under another name, over aiosqlite renamed for SQLAlchemy) and shows
that URL normalization, the journal kind, engine creation and the backend
registry all honour it, and that nothing of it is left once it is unregistered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from casty import JournalKind
from sqlalchemy import make_url
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite

from casty_sa import UnsupportedDatabase, dialects
from casty_sa.backends import SqliteBackend, backend_for
from casty_sa.engine import open_engine
from casty_sa.models import metadata
from casty_sa.urls import kind_of, to_async_url


class _TwinDialect(SQLiteDialect_aiosqlite):
    """SQLAlchemy's aiosqlite under another name: a database casty-sa does not know."""

    name = "sqlitetwin"


registry.register("sqlitetwin.aiosqlite", __name__, "_TwinDialect")

SQLITE = dialects.find("sqlite")
assert SQLITE is not None
#: SQLite's engine tuning and backend, under another name
TWIN = dataclasses.replace(
    SQLITE,
    name="sqlitetwin",
    label="SQLite twin",
    example="sqlitetwin:///journal.db",
    aliases=frozenset({"twin"}),
)


@pytest.fixture
def twin() -> Iterator[dialects.Dialect]:
    """The twin dialect, registered for the test only."""
    dialects.register(TWIN)
    try:
        yield TWIN
    finally:
        dialects.unregister(TWIN.name)


def test_a_registered_dialect_is_known_to_urls_and_messages(twin: dialects.Dialect) -> None:
    url = to_async_url("twin:///bank.db")  # the alias, no driver: the dialect's own
    assert url.drivername == "sqlitetwin+aiosqlite"
    assert kind_of(url) is JournalKind.local
    with pytest.raises(UnsupportedDatabase, match=r"use 'sqlitetwin\+aiosqlite://…'"):
        to_async_url("sqlitetwin+pysqlite:///bank.db")
    with pytest.raises(UnsupportedDatabase) as info:
        to_async_url("mysql://db/bank")
    assert str(info.value).endswith(
        "use SQLite ('sqlite:///journal.db'), PostgreSQL ('postgresql://…') "
        "or SQLite twin ('sqlitetwin:///journal.db')"
    )


async def test_a_registered_dialect_gets_its_engine_and_backend(
    twin: dialects.Dialect, tmp_path: Path
) -> None:
    engine, owned = open_engine(tmp_path / "twin.db")  # a path is SQLite: not the twin
    assert owned and engine.dialect.name == "sqlite"
    await engine.dispose()
    engine, _ = open_engine(f"twin:///{tmp_path / 'twin.db'}")
    try:
        assert engine.dialect.name == "sqlitetwin"
        async with engine.begin() as conn:
            # SQLite's engine tuning ran: WAL, and the tables go in like SQLite's
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            await conn.run_sync(metadata.create_all)
        backend = backend_for(engine, None)
        assert isinstance(backend, SqliteBackend)
        try:
            await backend.write([("acct-1", 1, 1.5, b"opened", "str")], [])
            assert await backend.fetch_events("acct-1", 1) == [(1, b"opened", 1.5)]
        finally:
            await backend.close()
    finally:
        await engine.dispose()


async def test_an_unregistered_dialect_is_refused_everywhere(tmp_path: Path) -> None:
    dialects.register(TWIN)
    try:
        engine, _ = open_engine(f"sqlitetwin:///{tmp_path / 'twin.db'}")
    finally:
        dialects.unregister(TWIN.name)
    try:
        with pytest.raises(
            UnsupportedDatabase, match=r"'sqlitetwin'.*use SQLite \(.*\) or Postgre"
        ):
            to_async_url("sqlitetwin:///bank.db")
        with pytest.raises(UnsupportedDatabase, match="'twin'"):
            to_async_url("twin:///bank.db")
        with pytest.raises(UnsupportedDatabase, match="use SQLite or PostgreSQL"):
            kind_of(make_url("sqlitetwin+aiosqlite:///bank.db"))
        with pytest.raises(UnsupportedDatabase, match="it supports postgresql and sqlite"):
            backend_for(engine, None)
    finally:
        await engine.dispose()


def test_a_name_is_registered_once() -> None:
    sqlite = dialects.find("sqlite")
    assert sqlite is not None
    with pytest.raises(ValueError, match="already registered: sqlite"):
        dialects.register(sqlite)
    assert [d.name for d in dialects.dialects()] == ["sqlite", "postgresql"]


def test_a_failed_write_on_a_dialect_without_its_own_rule_is_never_read_by_another() -> None:
    """What a failed write stored is read by the rule its dialect registered. A dialect
    that registered none is refused, never read by SQLite's or PostgreSQL's rule (a unique
    violation taken for a lost commit would tell the caller "outcome unknown")."""
    import sqlite3

    from casty_sa.backends.failures import WriteRefused, classify_write_failure

    error = sqlite3.IntegrityError("UNIQUE constraint failed")
    assert isinstance(
        classify_write_failure(error, committing=True, dialect="sqlite"), WriteRefused
    )
    ruleless = dataclasses.replace(TWIN, name="ruleless", aliases=frozenset(), write_failure=None)
    dialects.register(ruleless)
    try:
        with pytest.raises(ValueError, match=r"no rule for failed writes .* 'ruleless'"):
            classify_write_failure(error, committing=True, dialect="ruleless")
    finally:
        dialects.unregister("ruleless")
    with pytest.raises(ValueError, match="'nonsense-typo'"):
        classify_write_failure(error, committing=True, dialect="nonsense-typo")


def test_a_missing_driver_names_the_extra_that_installs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``postgresql+psycopg://`` without psycopg: ``DriverNotInstalled`` says which extra to
    install (and never shows the password); a plain ``postgresql://`` keeps asyncpg."""
    import importlib.util

    from casty_sa import DriverNotInstalled

    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else found(name)
    )
    with pytest.raises(DriverNotInstalled) as info:
        open_engine("postgresql+psycopg://app:s3cret-pw@127.0.0.1/bank")
    assert "pip install 'casty-sa[psycopg]'" in str(info.value)
    assert "s3cret-pw" not in str(info.value)
    assert to_async_url("postgresql://app@h/db").drivername == "postgresql+asyncpg"
    assert to_async_url("postgresql+psycopg://app@h/db").drivername == "postgresql+psycopg"


@pytest.mark.only_backends("postgresql")
async def test_the_journals_connections_are_named_bounded_and_left_as_the_pool_gave_them(
    new_server_db: Any, make_journal: Any
) -> None:
    """On either driver: casty-sa's engine names its connections ``casty-sa`` and gives the
    server its statement timeout; the journal works in autocommit (psycopg's connection is
    switched while the journal holds it) and gives it back to the pool as it came."""
    from casty import PersistedEvent

    url = await new_server_db()
    journal = make_journal(url, statement_timeout=7.0)
    await journal.persist("acct", [PersistedEvent(1, "a", 1.0)])
    backend = journal._backend
    sql = "SELECT current_setting('application_name'), current_setting('statement_timeout')"
    async with backend.connection() as conn:
        found = await backend._driver.fetchrow(conn, sql, (), 5.0)
        if backend._driver.name == "psycopg":
            assert conn.autocommit
    assert tuple(found) == ("casty-sa", "7s")
    await backend.release_held()
    async with journal._engine.connect() as app:  # an application's turn on the same pool
        driver = (await app.get_raw_connection()).driver_connection
        if backend._driver.name == "psycopg":
            assert not driver.autocommit, "an application got an autocommit connection"
