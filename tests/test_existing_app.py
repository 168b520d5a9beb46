"""Living inside an application that already uses SQLAlchemy and Alembic."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL, inspect
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import casty_sa
from casty_sa import SAJournal, SchemaError


def ev(seq: int) -> PersistedEvent[Any]:
    return PersistedEvent(seq, f"e{seq}", float(seq))


async def test_shares_an_async_sessionmaker(db_url: URL) -> None:
    engine = create_async_engine(db_url)
    sessions = async_sessionmaker(engine)
    try:
        async with SAJournal(sessions) as journal:
            assert journal.engine is engine
            await journal.persist("acct", [ev(1)])
            assert [e.sequence_nr for e in await journal.load("acct")] == [1]
        async with sessions() as session:  # the app's maker still works
            assert (await session.execute(casty_sa.EventRecord.__table__.select())).all()
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_engine_options_with_an_app_engine_are_refused(db_url: URL) -> None:
    engine = create_async_engine(db_url)
    try:
        with pytest.raises(TypeError, match="pool_size"):
            SAJournal(engine, pool_size=3)
    finally:
        await engine.dispose()


class TestPostgresSchema:
    async def test_tables_in_their_own_schema(
        self, new_postgres_db: Callable[..., Awaitable[URL]]
    ) -> None:
        url = await new_postgres_db(migrated=False)
        await casty_sa.upgrade(url, schema="casty")
        assert await casty_sa.current(url, schema="casty") == casty_sa.head_revision()
        assert await casty_sa.current(url) is None  # nothing in public
        async with SAJournal(url, schema="casty") as journal:
            await journal.persist("acct", [ev(1), ev(2)])
            await journal.save_snapshot("acct", Snapshot(2, "s", 1.0))
            assert [e.sequence_nr for e in await journal.load("acct")] == [1, 2]
            assert "schema='casty'" in repr(journal)
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                names = await conn.run_sync(
                    lambda c: {
                        s: set(inspect(c).get_table_names(schema=s)) for s in ("casty", "public")
                    }
                )
        finally:
            await engine.dispose()
        assert names["casty"] == {
            "casty_sa_events",
            "casty_sa_snapshots",
            casty_sa.VERSION_TABLE,
        }
        assert names["public"] == set()
        await casty_sa.downgrade(url, "base", schema="casty")
        assert await casty_sa.current(url, schema="casty") is None

    async def test_journal_on_a_schema_that_is_not_migrated(
        self, new_postgres_db: Callable[..., Awaitable[URL]]
    ) -> None:
        url = await new_postgres_db(migrated=True)  # migrated in public only
        journal = SAJournal(url, schema="casty")
        try:
            with pytest.raises(SchemaError, match="--schema casty"):
                await journal.start()
        finally:
            await journal.close()

    def test_schema_needs_postgresql(self) -> None:
        with pytest.raises(ValueError, match="needs PostgreSQL"):
            SAJournal("sqlite://", schema="casty")
