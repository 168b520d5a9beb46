"""Alembic migrations: from empty, twice, down to base, models == migrations, from a wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import URL, Connection, inspect, text

import casty_sa
from casty_sa import SAJournal, SchemaError, head_revision, metadata
from casty_sa.engine import open_engine

from support.dbtools import execute, plain, table_names

REPO = Path(__file__).resolve().parent.parent
OUR_TABLES = {"casty_sa_events", "casty_sa_snapshots"}


async def test_upgrade_from_empty(empty_db_url: URL) -> None:
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
    # every key by NAMING_CONVENTION ("pk_%(table_name)s"), Alembic's version table too
    assert keys == {t: f"pk_{t}" for t in OUR_TABLES | {casty_sa.VERSION_TABLE}}


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
