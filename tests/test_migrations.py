"""Alembic migrations: from empty, twice, down to base, models == migrations, from a wheel."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from casty import PersistedEvent
from sqlalchemy import URL, CheckConstraint, Connection, inspect, text

import casty_sa
from casty_sa import SAJournal, SchemaError, head_revision, metadata
from casty_sa.engine import open_engine

from support.dbtools import execute, plain, query, table_names
from support.offsets import install
from support.old_rows import check_old_rows_numbered, ordered_rows, run_script, write_old_rows

REPO = Path(__file__).resolve().parent.parent
OUR_TABLES = {
    "casty_sa_events",
    "casty_sa_snapshots",
    "casty_sa_projection_offsets",
    "casty_sa_event_counter",
    "casty_sa_tombstones",
}


async def test_upgrade_from_empty(empty_db_url: URL, backend: str) -> None:
    assert await casty_sa.current(empty_db_url) is None
    await casty_sa.upgrade(empty_db_url)
    assert await casty_sa.current(empty_db_url) == head_revision()
    assert OUR_TABLES | {casty_sa.VERSION_TABLE} <= await table_names(empty_db_url)
    engine, _ = open_engine(empty_db_url)
    try:
        async with engine.connect() as conn:
            keys = await conn.run_sync(
                lambda c: {
                    t: inspect(c).get_pk_constraint(t)["name"] for t in inspect(c).get_table_names()
                }
            )
    finally:
        await engine.dispose()
    # every key by NAMING_CONVENTION ("pk_%(table_name)s"), Alembic's version table too (a
    # MySQL primary key is always called PRIMARY)
    named = (lambda t: None) if backend == "mysql" else (lambda t: f"pk_{t}")
    assert keys == {t: named(t) for t in OUR_TABLES | {casty_sa.VERSION_TABLE}}


async def test_upgrade_twice_is_harmless(empty_db_url: URL) -> None:
    await casty_sa.upgrade(empty_db_url)
    await casty_sa.upgrade(empty_db_url)
    assert await casty_sa.current(empty_db_url) == head_revision()


async def test_downgrade_to_base_removes_only_our_tables(empty_db_url: URL) -> None:
    await execute(
        empty_db_url,
        "CREATE TABLE events (id INTEGER PRIMARY KEY)",
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)",
        "INSERT INTO alembic_version VALUES ('app_rev_1')",
    )
    await casty_sa.upgrade(empty_db_url)
    await casty_sa.downgrade(empty_db_url, "base")
    remaining = await table_names(empty_db_url)
    assert not (remaining & (OUR_TABLES | {casty_sa.VERSION_TABLE}))  # nothing of ours left
    assert {"events", "alembic_version"} <= remaining
    assert await casty_sa.current(empty_db_url) is None
    engine, _ = open_engine(empty_db_url)
    try:
        async with engine.connect() as conn:
            app_rev = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    finally:
        await engine.dispose()
    assert app_rev == [("app_rev_1",)]
    await casty_sa.upgrade(empty_db_url)  # and back up again
    assert await casty_sa.current(empty_db_url) == head_revision()


async def test_models_match_migrations(empty_db_url: URL) -> None:
    await casty_sa.upgrade(empty_db_url)

    def diff(conn: Connection) -> list[object]:
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_object": lambda obj, name, type_, reflected, compare_to: (
                    type_ != "table" or name in metadata.tables
                ),
            },
        )
        return list(compare_metadata(context, metadata))

    engine, _ = open_engine(empty_db_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
            pk_names = await conn.run_sync(
                lambda c: {t: inspect(c).get_pk_constraint(t)["name"] for t in sorted(OUR_TABLES)}
            )
    finally:
        await engine.dispose()
    if empty_db_url.get_backend_name() == "postgresql":  # SQLite does not keep PK names
        assert pk_names == {t: f"pk_{t}" for t in OUR_TABLES}


async def test_sqlite_is_migrated_on_first_use(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    async with SAJournal(url) as journal:
        assert await journal.load("x") == []
    assert await casty_sa.current(url) == head_revision()


async def test_server_database_is_never_altered_implicitly(
    new_postgres_db: Callable[..., Awaitable[URL]],
) -> None:
    empty_db_url = await new_postgres_db(migrated=False)
    journal = SAJournal(empty_db_url)
    try:
        with pytest.raises(SchemaError, match="casty-sa upgrade"):
            await journal.start()
        assert await casty_sa.current(empty_db_url) is None
    finally:
        await journal.close()
    async with SAJournal(empty_db_url, migrate=True) as journal:
        assert await journal.load("x") == []
    assert await casty_sa.current(empty_db_url) == head_revision()


async def test_sqlite_can_refuse_to_migrate(tmp_path: Path) -> None:
    journal = SAJournal(f"sqlite:///{tmp_path / 'f.db'}", migrate=False)
    try:
        with pytest.raises(SchemaError, match="has no casty-sa tables"):
            await journal.start()
    finally:
        await journal.close()


def test_alembic_command_line_from_checkout(empty_db_url: URL) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["upgrade", "head"], ["current"], ["downgrade", "base"], ["upgrade", "head"]):
        run = subprocess.run(
            [sys.executable, "-m", "alembic", "-x", f"url={plain(empty_db_url)}", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
    assert (
        "casty_sa_events"
        in subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head", "--sql"],
            cwd=REPO,
            env={**env, "CASTY_SA_URL": "postgresql://nobody@nowhere.invalid/db"},
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    )


def test_upgrade_runs_from_an_installed_wheel(tmp_path: Path) -> None:
    """Build the wheel, unpack it outside the repo, and migrate with it."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("casty_sa-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    assert "casty_sa/migrations/env.py" in names
    assert any(n.startswith("casty_sa/migrations/versions/0001") for n in names)
    script = (
        "import asyncio, casty_sa, casty_sa.revisions as m, sys\n"
        "assert casty_sa.__file__.startswith(sys.argv[1]), casty_sa.__file__\n"
        "assert str(m.script_location()).startswith(sys.argv[1]), m.script_location()\n"
        "url = 'sqlite:///' + sys.argv[2]\n"
        "asyncio.run(casty_sa.upgrade(url))\n"
        "print(asyncio.run(casty_sa.current(url)))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(site), str(tmp_path / "w.db")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == head_revision()


class TestCheckedEngine:
    """``migrate.checked_engine``: what import, export and inspect open a database with."""

    async def test_it_takes_the_journals_options(self, db_url: URL) -> None:
        """The journal's settings pass through as the journal takes them: ``None`` is the
        default, and the write and read settings have nothing to configure here."""
        from casty_sa import inspection

        summary = await inspection.summarize(
            db_url,
            busy_timeout=None,
            sqlite_synchronous=None,
            connect_timeout=None,
            read_retries=1,
            group_commit=False,
        )
        assert (summary.entities, summary.events, summary.revision) == (0, 0, head_revision())

    async def test_a_cancelled_open_finishes_its_migration(self, tmp_path: Path) -> None:
        """A caller cancelled (again and again) once the schema check has begun (the file
        exists) leaves the schema created whole, as a journal's start does: the migration
        runs to its end."""
        import asyncio

        from casty_sa.migrate import checked_engine

        path = tmp_path / "new.db"

        async def open_it() -> None:
            async with checked_engine(f"sqlite:///{path}", migrate=True):
                await asyncio.Event().wait()  # held open until cancelled

        task = asyncio.ensure_future(open_it())
        async with asyncio.timeout(30):
            while not path.exists():  # noqa: ASYNC110 (a file appearing sets no event)
                await asyncio.sleep(0)
        for _ in range(3):  # cancelled again while it waits for the migration, too
            task.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        assert await casty_sa.current(f"sqlite:///{path}") == head_revision()


class TestUpgradeOfStoredEvents:
    """0002 on a database 0001 filled: the rows stored before get their place, first."""

    ENTITIES: ClassVar[dict[str, int]] = {"b-acct": 3, "a-acct": 4, "c-acct": 2, "a": 1}

    async def test_rows_are_numbered_in_key_order_and_new_writes_follow(
        self, empty_db_url: URL
    ) -> None:
        async with asyncio.timeout(60):
            await casty_sa.upgrade(empty_db_url, "0001")
            await write_old_rows(empty_db_url, self.ENTITIES)
            await casty_sa.upgrade(empty_db_url)
            assert check_old_rows_numbered(await ordered_rows(empty_db_url)) == 10
            async with SAJournal(empty_db_url, migrate=False) as journal:
                await journal.persist("a-acct", [PersistedEvent(5, "a-acct-5", 9.0)])
                loaded = await journal.load("a-acct")
            assert [e.event for e in loaded] == [f"a-acct-{n}" for n in range(1, 6)]
            rows = await ordered_rows(empty_db_url)
            assert rows[-1][:2] == ("a-acct", 5)  # after every row stored before
            assert check_old_rows_numbered(rows) == 10

    async def test_downgrade_and_upgrade_again(self, empty_db_url: URL) -> None:
        async with asyncio.timeout(60):
            await casty_sa.upgrade(empty_db_url, "0001")
            await write_old_rows(empty_db_url, self.ENTITIES)
            await casty_sa.upgrade(empty_db_url)
            await casty_sa.downgrade(empty_db_url, "0001")
            assert await casty_sa.current(empty_db_url) == "0001"
            columns = await query(empty_db_url, "SELECT * FROM casty_sa_events LIMIT 1")
            assert len(columns[0]) == 4  # the 0001 columns, the events kept
            await write_old_rows(empty_db_url, {"d": 2})
            await casty_sa.upgrade(empty_db_url)
            assert check_old_rows_numbered(await ordered_rows(empty_db_url)) == 12
            async with SAJournal(empty_db_url, migrate=False) as journal:
                assert [e.event for e in await journal.load("d")] == ["d-1", "d-2"]


class TestSqlScript:
    """``casty-sa upgrade --sql``: the reviewable script of the same steps."""

    def script(self, url: str, revision: str = "0001:head", **options: Any) -> str:
        out = io.StringIO()
        casty_sa.migrate.write_sql(url, revision, out, **options)
        return out.getvalue()

    @pytest.mark.parametrize("schema", [None, "app"])
    def test_postgresql(self, schema: str | None) -> None:
        script = self.script("postgresql://nobody@nowhere.invalid/db", schema=schema)
        events = "app.casty_sa_events" if schema else "casty_sa_events"
        assert "SET LOCAL lock_timeout = '1s'" in script
        assert f"ALTER TABLE {events} ADD COLUMN IF NOT EXISTS event_type" in script
        assert "EXCEPTION WHEN lock_not_available" in script
        assert "ALTER COLUMN position ADD GENERATED BY DEFAULT AS IDENTITY" in script
        # the numbering commits per batch, outside the script's transactions
        before, numbering = script.split("DO $numbering$")
        assert before.split(";\n\n")[-2].strip() == "COMMIT"
        assert "COMMIT;" in numbering and f"UPDATE {events} AS e SET position" in numbering
        assert (
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ix_casty_sa_events_global_order "
            f"ON {events} (era, transaction_id, position)"
        ) in script
        down = self.script(
            "postgresql://nobody@nowhere.invalid/db", "head:0001", down=True, schema=schema
        )
        index = "app.ix_casty_sa_events_global_order" if schema else "ix_casty_sa_events"
        assert f"DROP INDEX CONCURRENTLY IF EXISTS {index}" in down
        assert f"ALTER TABLE {events} DROP COLUMN IF EXISTS position" in down

    def test_sqlite(self) -> None:
        script = self.script("sqlite:///nowhere.db")
        assert "ALTER TABLE casty_sa_events ADD COLUMN position BIGINT DEFAULT 0 NOT NULL" in script
        assert "UPDATE casty_sa_events SET position = -numbered.k" in script
        assert "CREATE UNIQUE INDEX ix_casty_sa_events_global_order" in script
        assert "CONCURRENTLY" not in script and "DO $" not in script

    @pytest.mark.parametrize("schema", [None, "app"])
    async def test_the_postgresql_script_runs_statement_by_statement(
        self, schema: str | None, new_postgres_db: Callable[..., Awaitable[URL]]
    ) -> None:
        """As psql runs it (each statement on its own): it numbers and indexes as online."""
        url = await new_postgres_db(migrated=False)
        async with asyncio.timeout(60):
            await casty_sa.upgrade(url, "0001", schema=schema)
            await write_old_rows(url, TestUpgradeOfStoredEvents.ENTITIES, schema)
            script = self.script(plain(url), "0001:0002", schema=schema)
            await run_script(url, script)
            assert await casty_sa.current(url, schema=schema) == "0002"
            assert check_old_rows_numbered(await ordered_rows(url, schema)) == 10
            await run_script(url, script.replace("'0001'", "'0002'"))  # again: nothing to do
            assert check_old_rows_numbered(await ordered_rows(url, schema)) == 10


class TestOnlineUpgradeOfABigTable:
    """PostgreSQL: 0002 (on 200,000 rows) while an older casty-sa keeps writing."""

    ROWS = 200_000

    async def filled(self, new_postgres_db: Callable[..., Awaitable[URL]]) -> URL:
        url = await new_postgres_db(migrated=False)
        await casty_sa.upgrade(url, "0001")
        await execute(
            url,
            "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload) "
            "SELECT 'e' || (g % 1000), g / 1000 + 1, g, '\\x00'::bytea "
            f"FROM generate_series(0, {self.ROWS - 1}) AS g",
        )
        return url

    async def test_writers_never_stall_and_every_row_gets_its_place(
        self, new_postgres_db: Callable[..., Awaitable[URL]]
    ) -> None:
        url = await self.filled(new_postgres_db)
        migrated, warmed_up = asyncio.Event(), asyncio.Event()
        stalls: list[float] = []
        written = 0

        async def old_writer() -> None:
            """Inserts as casty-sa 0001 does, one autocommit row at a time, until after the
            migration: its longest wait is how long the migration held writers up."""
            nonlocal written
            engine, _ = open_engine(url)
            try:
                async with engine.connect() as connection:
                    await connection.execution_options(isolation_level="AUTOCOMMIT")
                    loop = asyncio.get_running_loop()
                    while not migrated.is_set() or written < 5:
                        started = loop.time()
                        await connection.execute(
                            text(
                                "INSERT INTO casty_sa_events"
                                " (entity_id, sequence_nr, timestamp, payload)"
                                " VALUES ('writer', :nr, 0.0, '\\x01'::bytea)"
                            ),
                            {"nr": written + 1},
                        )
                        stalls.append(loop.time() - started)
                        written += 1
                        if written == 5:
                            warmed_up.set()
            finally:
                await engine.dispose()

        async with asyncio.timeout(120):
            writer = asyncio.ensure_future(old_writer())
            await warmed_up.wait()  # some rows before the migration
            # its own thread and loop: the migration's Python work does not stall the writer's
            await asyncio.to_thread(asyncio.run, casty_sa.upgrade(url))
            migrated.set()
            before = written
            await writer
        assert written > before  # and some after it
        assert max(stalls) < 1.0, f"a writer waited {max(stalls):.3f}s"
        rows = await ordered_rows(url)
        assert check_old_rows_numbered(rows) >= self.ROWS
        positions = {row[:2]: row[2:] for row in rows}
        for nr in range(1, written + 1):
            era, transaction_id, position = positions["writer", nr]
            assert era == 0 and (position < 0) == (transaction_id == 0)
        valid = await query(
            url,
            "SELECT indisvalid FROM pg_index "
            "WHERE indexrelid = 'ix_casty_sa_events_global_order'::regclass",
        )
        assert valid == [(True,)]

    async def test_a_run_killed_half_way_is_resumed(
        self, new_postgres_db: Callable[..., Awaitable[URL]]
    ) -> None:
        """A trigger makes the numbering wait at a row in the middle of the key range (for
        an advisory lock the test holds); the migration's backend is terminated there, as a
        crash would end it, and the next run takes up where the committed batches stopped."""
        url = await self.filled(new_postgres_db)
        await execute(
            url,
            "CREATE FUNCTION hold_numbering() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.entity_id = 'e500' THEN PERFORM pg_advisory_xact_lock(4242); END IF; "
            "RETURN NEW; END $$",
            "CREATE TRIGGER hold BEFORE UPDATE ON casty_sa_events FOR EACH ROW "
            "EXECUTE FUNCTION hold_numbering()",
        )
        engine, _ = open_engine(url)
        try:
            async with asyncio.timeout(120), engine.connect() as holder:
                await holder.execute(text("SELECT pg_advisory_lock(4242)"))
                run = asyncio.ensure_future(casty_sa.upgrade(url))
                waiting: list[Any] = []
                while not waiting:  # the numbering reached entity e500
                    waiting = await query(
                        url,
                        "SELECT pid FROM pg_locks WHERE NOT granted AND locktype = 'advisory'",
                    )
                    await asyncio.sleep(0.02)
                await query(url, f"SELECT pg_terminate_backend({waiting[0][0]})")
                with pytest.raises(casty_sa.JournalError):
                    await run
                await holder.execute(text("SELECT pg_advisory_unlock(4242)"))
        finally:
            await engine.dispose()
        assert await casty_sa.current(url) == "0001"
        [(numbered, left)] = await query(
            url,
            "SELECT count(*) FILTER (WHERE position < 0), count(*) FILTER (WHERE position = 0)"
            " FROM casty_sa_events",
        )
        assert numbered > 0 and left > 0 and numbered + left == self.ROWS
        await execute(url, "DROP TRIGGER hold ON casty_sa_events")
        async with asyncio.timeout(120):
            await casty_sa.upgrade(url)
        assert await casty_sa.current(url) == head_revision()
        assert check_old_rows_numbered(await ordered_rows(url)) == self.ROWS

    async def test_a_long_transaction_in_the_way_holds_no_writer_up_and_stops_it_clearly(
        self, new_postgres_db: Callable[..., Awaitable[URL]]
    ) -> None:
        """A transaction that holds the table (here ACCESS SHARE, as a long report would): the
        migration's lock request waits at most a second at a time, so a writer queued behind
        it goes on after that second; after five attempts the migration stops, saying why,
        with nothing changed."""
        url = await new_postgres_db(migrated=False)
        await casty_sa.upgrade(url, "0001")
        engine, _ = open_engine(url)
        try:
            async with asyncio.timeout(60), engine.connect() as holder, engine.connect() as writer:
                await holder.execute(text("LOCK TABLE casty_sa_events IN ACCESS SHARE MODE"))
                run = asyncio.ensure_future(casty_sa.upgrade(url))
                waiting: list[Any] = []
                while not waiting:  # the migration asks for its lock
                    waiting = await query(
                        url,
                        "SELECT pid FROM pg_locks WHERE NOT granted"
                        " AND mode = 'AccessExclusiveLock'"
                        " AND relation = 'casty_sa_events'::regclass",
                    )
                    await asyncio.sleep(0.02)
                loop = asyncio.get_running_loop()
                started = loop.time()
                await writer.execute(
                    text(
                        "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload)"
                        " VALUES ('w', 1, 0.0, '\\x00'::bytea)"
                    )
                )
                await writer.commit()
                assert loop.time() - started < 2.0  # one attempt's second, and some slack
                with pytest.raises(casty_sa.JournalError, match="stayed locked") as stopped:
                    await run
                assert "nothing of this step was changed" in str(stopped.value)
                await holder.rollback()
        finally:
            await engine.dispose()
        assert await casty_sa.current(url) == "0001"
        assert len((await query(url, "SELECT * FROM casty_sa_events"))[0]) == 4  # no new column
        await casty_sa.upgrade(url)  # with the way clear
        assert check_old_rows_numbered(await ordered_rows(url)) == 1


class TestProjectionOffsets:
    """0003: ``casty_sa_projection_offsets``, up and down, online and as a script."""

    OFFSETS = "casty_sa_projection_offsets"

    async def test_up_and_down_leave_the_journal_alone(self, empty_db_url: URL) -> None:
        async with asyncio.timeout(60):
            await casty_sa.upgrade(empty_db_url, "0002")
            assert self.OFFSETS not in await table_names(empty_db_url)
            await casty_sa.upgrade(empty_db_url)
            assert await casty_sa.current(empty_db_url) == head_revision()
            async with SAJournal(empty_db_url, migrate=False) as journal:
                await journal.persist("acct", [PersistedEvent(1, "opened", 1.0)])
            await install(empty_db_url, ("balances", 3))
            rows = await query(empty_db_url, f"SELECT projection, slice FROM {self.OFFSETS}")
            assert sorted(rows) == [("balances", 0), ("balances", 1), ("balances", 2)]
            # the models' constraints, under the models' names (the migration names them so)
            assert await self._check_names(empty_db_url) == self._model_check_names()
            # a slice out of range is refused (MariaDB: "CONSTRAINT `ck_…_slice` failed")
            with pytest.raises(Exception, match=r"(?i)check|ck_casty_sa_projection_offsets_slice"):
                await execute(
                    empty_db_url,
                    f"INSERT INTO {self.OFFSETS} (projection, slice, slice_count, handled, "
                    "fence, updated_ms) VALUES ('x', 2, 2, 0, 0, 0)",
                )
            await casty_sa.downgrade(empty_db_url, "0002")
            assert await casty_sa.current(empty_db_url) == "0002"
            assert self.OFFSETS not in await table_names(empty_db_url)
            events = await query(empty_db_url, "SELECT entity_id FROM casty_sa_events")
            assert events == [("acct",)]
            await casty_sa.upgrade(empty_db_url)  # up again: a new, empty table
            assert await query(empty_db_url, f"SELECT count(*) FROM {self.OFFSETS}") == [(0,)]
            async with SAJournal(empty_db_url, migrate=False) as journal:
                assert [e.event for e in await journal.load("acct")] == ["opened"]

    @pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
    def test_the_script_creates_and_drops_only_the_offsets_table(self, dialect: str) -> None:
        url = f"{dialect}://" if dialect == "postgresql" else "sqlite:///nowhere.db"
        out = io.StringIO()
        casty_sa.migrate.write_sql(url, "0002:0003", out)
        up = out.getvalue()
        assert f"CREATE TABLE {self.OFFSETS} (" in up
        for name in self._model_check_names():
            assert f"CONSTRAINT {name} CHECK" in up
        assert f"CONSTRAINT pk_{self.OFFSETS} PRIMARY KEY (projection, slice)" in up
        assert "casty_sa_events" not in up and "version_num='0003'" in up
        out = io.StringIO()
        casty_sa.migrate.write_sql(url, "0003:0002", out, down=True)
        down = out.getvalue()
        assert f"DROP TABLE {self.OFFSETS}" in down and "casty_sa_events" not in down

    async def test_the_postgresql_script_runs(
        self, new_postgres_db: Callable[..., Awaitable[URL]]
    ) -> None:
        url = await new_postgres_db(migrated=False)
        async with asyncio.timeout(60):
            await casty_sa.upgrade(url, "0002", schema="app")
            out = io.StringIO()
            casty_sa.migrate.write_sql(plain(url), "0002:0003", out, schema="app")
            await run_script(url, out.getvalue())
            assert await casty_sa.current(url, schema="app") == "0003"
            await install(url, ("balances", 1), schema="app")
            stored = await query(url, f"SELECT projection FROM app.{self.OFFSETS}")
            assert stored == [("balances",)]

    def _model_check_names(self) -> set[str]:
        table = metadata.tables[self.OFFSETS]
        return {str(c.name) for c in table.constraints if isinstance(c, CheckConstraint)}

    async def _check_names(self, url: URL) -> set[str]:
        engine, _ = open_engine(url)
        try:
            async with engine.connect() as conn:
                checks = await conn.run_sync(
                    lambda c: inspect(c).get_check_constraints(self.OFFSETS)
                )
        finally:
            await engine.dispose()
        return {str(check["name"]) for check in checks}
