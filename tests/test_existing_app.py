"""Living inside an application that already uses SQLAlchemy and Alembic."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL, Connection, MetaData, inspect, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

import casty_sa
from casty_sa import SAJournal, SchemaError
from casty_sa.cli import ExitCode, main
from casty_sa.engine import open_engine

from support.dbtools import plain


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


def _driver(fairy: Any) -> Any:
    """The driver connection of a pooled one."""
    return fairy.driver_connection


def _client_cursor() -> dict[str, Any]:
    import psycopg

    return {"connect_args": {"cursor_factory": psycopg.AsyncClientCursor}}


@pytest.mark.parametrize(
    "app_options",
    [
        pytest.param(lambda: {"isolation_level": "AUTOCOMMIT"}, id="isolation-autocommit"),
        pytest.param(lambda: {"connect_args": {"autocommit": True}}, id="connect-autocommit"),
        # the client-side binding SQLAlchemy documents for psycopg (e.g. behind PgBouncer)
        pytest.param(_client_cursor, id="client-cursor"),
    ],
)
async def test_an_app_psycopg_engine_works_and_keeps_its_connections_as_configured(
    new_postgres_db: Callable[..., Awaitable[URL]], app_options: Callable[[], dict[str, Any]]
) -> None:
    """REVIEW (review-pg): an application's psycopg engine configured its own way (autocommit
    connections; psycopg's client-side cursors) shares it with the journal: the journal
    works, and the application's next session gets its connection as configured, not one
    the journal switched out of autocommit (whose writes would then roll back unseen)."""
    url = (await new_postgres_db()).set(drivername="postgresql+psycopg")
    options = app_options()
    engine = create_async_engine(url, pool_size=1, max_overflow=0, **options)
    try:
        async with engine.connect() as app:
            before = _driver(await app.get_raw_connection()).autocommit
        async with SAJournal(engine) as journal:
            await journal.persist("acct", [ev(1), ev(2)])
            await journal.save_snapshot("acct", Snapshot(2, "s", 2.0))
            await journal.persist("acct", [ev(3)])
            assert [e.sequence_nr for e in await journal.load("acct")] == [1, 2, 3]
        async with engine.connect() as app:
            assert _driver(await app.get_raw_connection()).autocommit == before
            await app.execute(text("CREATE TABLE app_note (n int)"))
            await app.execute(text("INSERT INTO app_note VALUES (1)"))
            if not before:
                await app.commit()
        async with engine.connect() as app:  # an autocommit app's writes landed unasked
            assert (await app.execute(text("SELECT count(*) FROM app_note"))).scalar() == 1
    finally:
        await engine.dispose()


async def test_an_app_connection_with_a_pending_notification_is_not_destroyed(
    new_postgres_db: Callable[..., Awaitable[URL]],
) -> None:
    """An application LISTENs on a connection of the engine it shares with the journal; a
    notification from elsewhere waits in that connection's socket while it sits in the pool.
    The journal's next use of it must not take it for ended and close it: the application's
    session (and its LISTEN) goes on."""
    url = (await new_postgres_db()).set(drivername="postgresql+psycopg")
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    other = create_async_engine(url, poolclass=NullPool)
    try:
        async with SAJournal(engine) as journal:
            await journal.persist("acct", [ev(1)])
            await journal._backend.release_held()
            async with engine.connect() as app:
                await app.execute(text("LISTEN app_events"))
                await app.commit()
                listener = _driver(await app.get_raw_connection())
                pid = listener.info.backend_pid
            async with other.connect() as notifier:
                await notifier.execute(text("NOTIFY app_events, 'hello'"))
                await notifier.commit()
            arrived = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_reader(listener.pgconn.socket, arrived.set)
            try:
                async with asyncio.timeout(5):
                    await arrived.wait()
            finally:
                loop.remove_reader(listener.pgconn.socket)
            assert len(await journal.load("acct")) == 1
        async with engine.connect() as app:
            assert _driver(await app.get_raw_connection()).info.backend_pid == pid
    finally:
        await engine.dispose()
        await other.dispose()


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
        assert names["casty"] == {*casty_sa.metadata.tables, casty_sa.VERSION_TABLE}
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


# -- an application with its own models and Alembic history in the same database ---------------

APP_SCRIPTS = Path(__file__).resolve().parent / "app_fixture"


def _app_models() -> MetaData:
    spec = importlib.util.spec_from_file_location("app_fixture_models", APP_SCRIPTS / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # resolvable for its string annotations
    spec.loader.exec_module(module)
    metadata: MetaData = module.AppBase.metadata
    return metadata


APP_METADATA = _app_models()


async def run_app_alembic(
    url: URL,
    action: Callable[..., Any],
    *args: Any,
    scripts: Path = APP_SCRIPTS,
    target_metadata: Any = APP_METADATA,
    include_object: Any = None,
    **kwargs: Any,
) -> Any:
    """Run an ``alembic.command`` of the app's own history, the way apps do from code."""

    def invoke(connection: Connection) -> Any:
        config = Config()
        config.set_main_option("script_location", str(scripts))
        config.attributes.update(
            connection=connection, target_metadata=target_metadata, include_object=include_object
        )
        return action(config, *args, **kwargs)

    engine, _ = open_engine(url)
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(invoke)
    finally:
        await engine.dispose()


async def autogenerate_diff(url: URL, target_metadata: Any, include_object: Any) -> list[Any]:
    def diff(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_object": include_object}
        )
        return list(compare_metadata(context, target_metadata))

    engine, _ = open_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(diff)
    finally:
        await engine.dispose()


async def app_revision(url: URL) -> list[str]:
    engine, _ = open_engine(url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
            return [row[0] for row in rows]
    finally:
        await engine.dispose()


class TestSideBySideHistories:
    """Way (a): casty-sa's migrations and the app's, each with its own version table."""

    async def test_two_histories_in_one_database(
        self, empty_db_url: URL, make_journal: Callable[..., SAJournal]
    ) -> None:
        await run_app_alembic(empty_db_url, command.upgrade, "head")
        await casty_sa.upgrade(empty_db_url)
        assert await app_revision(empty_db_url) == ["a001"]
        assert await casty_sa.current(empty_db_url) == casty_sa.head_revision()

        journal = make_journal(empty_db_url)
        await journal.persist("acct", [ev(1)])
        assert [e.sequence_nr for e in await journal.load("acct")] == [1]

        # the app's autogenerate would drop our tables unless told to leave them alone...
        unfiltered = await autogenerate_diff(empty_db_url, APP_METADATA, None)
        assert {d[1].name for d in unfiltered if d[0] == "remove_table"} >= {
            "casty_sa_events",
            "casty_sa_snapshots",
            "casty_sa_projection_offsets",
        }
        # ...which casty_sa.exclude_journal_tables does
        assert (
            await autogenerate_diff(empty_db_url, APP_METADATA, casty_sa.exclude_journal_tables)
            == []
        )

        # each side downgrades without touching the other
        await run_app_alembic(empty_db_url, command.downgrade, "base")
        assert [e.sequence_nr for e in await journal.load("acct")] == [1]
        await casty_sa.downgrade(empty_db_url, "base")
        await run_app_alembic(empty_db_url, command.upgrade, "head")
        assert await app_revision(empty_db_url) == ["a001"]


class TestAppOwnsTheTables:
    """Way (b): the app's own autogenerate creates casty-sa's tables from casty_sa.metadata."""

    async def test_app_autogenerate_includes_our_tables(
        self,
        empty_db_url: URL,
        tmp_path: Path,
        make_journal: Callable[..., SAJournal],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        scripts = tmp_path / "app_migrations"
        shutil.copytree(APP_SCRIPTS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
        both = [APP_METADATA, casty_sa.metadata]
        await run_app_alembic(empty_db_url, command.upgrade, "head", scripts=scripts)
        await run_app_alembic(
            empty_db_url,
            command.revision,
            scripts=scripts,
            target_metadata=both,
            message="add casty-sa journal tables",
            autogenerate=True,
            rev_id="a002",
        )
        generated = next((scripts / "versions").glob("a002_*.py")).read_text()
        assert "casty_sa_events" in generated and "casty_sa_snapshots" in generated
        # the projections' offsets too, their constraints named as migration 0003 names them
        assert "op.f('ck_casty_sa_projection_offsets_slice_count')" in generated
        await run_app_alembic(empty_db_url, command.upgrade, "head", scripts=scripts)
        assert await app_revision(empty_db_url) == ["a002"]
        assert await casty_sa.current(empty_db_url) is None  # casty-sa's history unused
        assert await autogenerate_diff(empty_db_url, both, None) == []

        # the journal accepts tables it did not create, and migrates nothing over them
        journal = make_journal(empty_db_url, migrate=None)
        await journal.persist("acct", [ev(1), ev(2)])
        await journal.save_snapshot("acct", Snapshot(2, "s", 1.0))
        assert [e.sequence_nr for e in await journal.load("acct")] == [1, 2]
        assert await casty_sa.current(empty_db_url) is None
        # and the read side follows them: the tables' own identity (PostgreSQL) or the
        # writer (SQLite) gives every event its place
        await make_journal(empty_db_url, migrate=None).persist("other", [ev(1)])
        read = [(e.entity_id, e.sequence_nr, e.offset) async for e in journal.events()]
        assert [r[:2] for r in read] == [("acct", 1), ("acct", 2), ("other", 1)]
        assert [r[2] for r in read] == sorted({r[2] for r in read})
        assert [e async for e in journal.entity_ids()] == ["acct", "other"]

        # casty-sa's own migrations over them say what happened, instead of "already exists"
        with pytest.raises(SchemaError, match="application's own migrations made them"):
            await casty_sa.upgrade(empty_db_url)
        code = await asyncio.to_thread(main, ["upgrade", "--url", plain(empty_db_url)])
        err = capsys.readouterr().err
        assert code == ExitCode.DATABASE_ERROR
        assert "application's own migrations made them" in err and "Nothing was changed" in err
        assert "already exists" not in err
        assert await casty_sa.current(empty_db_url) is None
        assert [e.sequence_nr for e in await journal.load("acct")] == [1, 2]

    async def test_tables_of_an_older_casty_sa_say_what_to_generate(
        self,
        empty_db_url: URL,
        tmp_path: Path,
        make_journal: Callable[..., SAJournal],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The app's history made casty-sa's tables before 0003: the journal and `check` say
        the offsets table is missing and that the app's autogenerate adds it."""
        scripts = tmp_path / "app_migrations"
        shutil.copytree(APP_SCRIPTS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
        older = MetaData(naming_convention=casty_sa.metadata.naming_convention)
        for table in casty_sa.metadata.tables.values():
            if table.name != "casty_sa_projection_offsets":
                table.to_metadata(older)
        await run_app_alembic(empty_db_url, command.upgrade, "head", scripts=scripts)
        for rev_id, target in (("a002", older), ("a003", casty_sa.metadata)):
            if rev_id == "a003":
                with pytest.raises(SchemaError) as refused:
                    await make_journal(empty_db_url, migrate=False).persist("acct", [ev(1)])
                words = str(refused.value)
                assert "(casty_sa_projection_offsets missing)" in words
                assert "autogenerate from casty_sa.metadata" in words
                code = await asyncio.to_thread(main, ["check", "--url", plain(empty_db_url)])
                out = capsys.readouterr().out
                assert (
                    code == ExitCode.NOT_AT_HEAD and "(casty_sa_projection_offsets missing)" in out
                )
            await run_app_alembic(
                empty_db_url,
                command.revision,
                scripts=scripts,
                target_metadata=[APP_METADATA, target],
                message=f"casty-sa tables ({rev_id})",
                autogenerate=True,
                rev_id=rev_id,
            )
            await run_app_alembic(empty_db_url, command.upgrade, "head", scripts=scripts)
        journal = make_journal(empty_db_url, migrate=False)
        await journal.persist("acct", [ev(1)])
        assert await asyncio.to_thread(main, ["check", "--url", plain(empty_db_url)]) == 0


async def test_a_transaction_on_a_memory_journals_engine_outlives_the_journal_giving_back() -> None:
    """A memory database is one connection that every checkout shares. When the journal gives
    back the connection it held for writes, no reset ROLLBACK may end the transaction another
    user of ``journal.engine`` has open on it (a suite run once lost a row this way)."""
    async with SAJournal("sqlite://") as journal:
        await journal.persist("acct", [PersistedEvent(1, "opened", 1.0)])
        async with journal.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, "
                    "era, transaction_id, position) VALUES ('app', 1, 1.0, x'00', 0, 0, 2)"
                )
            )
            await journal._backend.release_held()  # the journal's linger ends mid-transaction
        async with journal.engine.connect() as conn:
            stored = (await conn.execute(text("SELECT count(*) FROM casty_sa_events"))).scalar()
        assert stored == 2
