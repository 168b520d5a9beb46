"""``casty-sa`` on MySQL and MariaDB: the DDL it prints, the commands on the suite's MariaDB,
refused logins and privileges, and passwords never shown.

The printed DDL is run as a DBA would, statement by statement (``mysql < script``),
against a fresh database on the suite's MariaDB. MySQL 8 itself is not installed here:
its DDL is checked for what differs (the collation ``utf8mb4_0900_bin``) and run on
MariaDB with MariaDB's collation in its place, which proves the rest of it parses and
builds the tables.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL

from casty_sa import SAJournal, head_revision
from casty_sa.cli import ExitCode, main

from support.dbtools import mysql_script, mysql_statements, plain, query, table_names
from support.processes import free_port

PASSWORD = "My-Pw_5e2b-casty"
COLLATION = {"mysql": "utf8mb4_0900_bin", "mariadb": "utf8mb4_nopad_bin"}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def offline(scheme: str) -> str:
    """A URL of a server that does not listen: any connection would fail."""
    return f"{scheme}://casty:{PASSWORD}@127.0.0.1:{free_port()}/app"


class TestPrintedDDL:
    @pytest.mark.parametrize("scheme", ["mysql", "mariadb"])
    def test_sql_prints_mysql_ddl_and_connects_to_nothing(
        self, scheme: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = offline(scheme)
        code, ddl, err = run(capsys, "upgrade", "--sql", "--url", url)
        assert code == ExitCode.OK, err
        for table in ("casty_sa_events", "casty_sa_snapshots", "casty_sa_event_counter"):
            assert f"CREATE TABLE {table}" in ddl, table
        assert "LONGBLOB" in ddl and "ENGINE=InnoDB" in ddl
        assert f"COLLATE {COLLATION[scheme]}" in ddl
        other = COLLATION["mariadb" if scheme == "mysql" else "mysql"]
        assert other not in ddl
        for foreign in ("ON CONFLICT", "BYTEA", "::", "SERIAL", "search_path"):
            assert foreign not in ddl, foreign
        # MySQL has no RETURNING; MariaDB has it since 10.5, and SQLAlchemy's offline
        # mariadb dialect lets Alembic use it for its version row
        returning = [line for line in ddl.splitlines() if "RETURNING" in line]
        assert all("casty_sa_alembic_version" in line for line in returning), returning
        assert scheme == "mariadb" or not returning, returning
        assert PASSWORD not in ddl + err
        code, down, err = run(capsys, "downgrade", "--sql", "--url", url)
        assert code == ExitCode.OK, err
        assert "DROP TABLE casty_sa_events" in down and "CREATE TABLE" not in down

    @pytest.mark.parametrize("scheme", ["mysql", "mariadb"])
    def test_the_printed_ddl_runs_statement_by_statement(
        self,
        scheme: str,
        new_mysql_db: Callable[..., Awaitable[URL]],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        database = asyncio.run(_bare(new_mysql_db))
        url = plain(database.set(drivername=f"{scheme}+asyncmy"))
        code, ddl, err = run(capsys, "upgrade", "--sql", "--url", url)
        assert code == ExitCode.OK, err
        assert asyncio.run(table_names(database)) == set()  # printed, not run
        if scheme == "mysql":  # MySQL 8's collation, which MariaDB 10 does not have
            ddl = ddl.replace(COLLATION["mysql"], COLLATION["mariadb"])
        asyncio.run(mysql_script(database, mysql_statements(ddl)))
        code, out, err = run(capsys, "check", "--url", plain(database))
        assert code == ExitCode.OK and "at head" in out, out + err
        asyncio.run(_round_trip(database))

        code, down, err = run(capsys, "downgrade", "--sql", "--url", url)
        assert code == ExitCode.OK, err
        asyncio.run(mysql_script(database, mysql_statements(down)))
        assert asyncio.run(table_names(database)) == set()


async def _bare(factory: Callable[..., Awaitable[URL]]) -> URL:
    return await factory(migrated=False)


async def _round_trip(url: URL) -> None:
    async with SAJournal(url) as journal:
        for entity in ("alice", "Alice", "alice "):  # three entities on a binary key
            await journal.persist(entity, [PersistedEvent(1, entity, 1.0)])
        await journal.save_snapshot("alice", Snapshot(1, "state", 1.0))
        for entity in ("alice", "Alice", "alice "):
            assert [e.event for e in await journal.load(entity)] == [entity]
        assert [e.entity_id async for e in journal.events()] == ["alice", "Alice", "alice "]


# -- the commands on the suite's MariaDB -------------------------------------------------------


@pytest.fixture
def account(new_mysql_db: Callable[..., Awaitable[URL]], mysql_server_url: URL) -> URL:
    """A fresh database (no tables) and an account with a password that owns it."""
    database = asyncio.run(_bare(new_mysql_db))
    user = f"casty_{uuid.uuid4().hex[:8]}"
    asyncio.run(
        mysql_script(
            mysql_server_url,
            [
                f"CREATE USER '{user}'@'%' IDENTIFIED BY '{PASSWORD}'",
                f"GRANT ALL ON `{database.database}`.* TO '{user}'@'%'",
            ],
        )
    )
    return database.set(username=user, password=PASSWORD)


class TestCommands:
    def test_every_command_works_and_never_shows_the_password(
        self, account: URL, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = plain(account)
        outputs = []
        code, out, err = run(capsys, "-v", "upgrade", "--url", url)
        assert code == ExitCode.OK, err
        assert f"to {head_revision()} (head)" in out
        outputs.append(out + err)
        asyncio.run(_fill(account))
        for argv in (
            ["check"],
            ["current"],
            ["history"],
            ["inspect"],
            ["inspect", "acct-1", "--json"],
            ["events", "--json"],
            ["projections"],
            ["export", "--to", str(tmp_path / "out.db")],
            ["import", "--from", str(tmp_path / "out.db")],
        ):
            code, out, err = run(capsys, "-v", *argv, "--url", url)
            assert code == ExitCode.OK, (argv, err)
            outputs.append(out + err)
        assert PASSWORD not in "\n".join(outputs)
        summary = json.loads(run(capsys, "inspect", "--url", url, "--json")[1])
        assert (summary["entities"], summary["events"], summary["snapshots"]) == (3, 6, 1)
        lines = run(capsys, "events", "--url", url, "--json")[1].splitlines()
        assert [json.loads(line)["entity_id"] for line in lines] == ["acct-1"] * 3 + [
            "Acct-1",
            "acct-1 ",
            "acct-1 ",
        ]
        code, _, err = run(capsys, "downgrade", "--url", url)
        assert code == ExitCode.USAGE and "holds 6 events" in err

    def test_the_reset_script_runs_with_the_mysql_client(
        self, account: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = plain(account)
        assert run(capsys, "upgrade", "--url", url)[0] == ExitCode.OK
        asyncio.run(_fill(account))
        asyncio.run(_project(account))
        code, script, err = run(
            capsys, "projections", "reset", "counts", "--sql", "--url", url, "--clear",
            "DELETE FROM rm_counts",
        )  # fmt: skip
        assert code == ExitCode.OK, err
        asyncio.run(mysql_script(account, mysql_statements(script)))
        rows = asyncio.run(query(account, "SELECT last_offset, handled FROM "
                                 "casty_sa_projection_offsets"))  # fmt: skip
        assert rows == [(None, 0)]
        assert asyncio.run(query(account, "SELECT count(*) FROM rm_counts")) == [(0,)]


async def _fill(url: URL) -> None:
    async with SAJournal(url) as journal:
        await journal.persist("acct-1", [PersistedEvent(i, {"n": i}, 1.0 + i) for i in (1, 2, 3)])
        await journal.persist("Acct-1", [PersistedEvent(1, "upper", 1.0)])
        await journal.persist("acct-1 ", [PersistedEvent(i, "spaced", 1.0) for i in (1, 2)])
        await journal.save_snapshot("acct-1", Snapshot(3, {"upto": 3}, 2.0))


async def _project(url: URL) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession

    from casty_sa import EventEnvelope, Projection

    async def count(session: AsyncSession, envelope: EventEnvelope) -> None:
        await session.execute(
            text("INSERT INTO rm_counts VALUES (:id, 1) ON DUPLICATE KEY UPDATE n = n + 1"),
            {"id": envelope.entity_id},
        )

    async with asyncio.timeout(60), SAJournal(url) as journal:
        async with journal.engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE TABLE rm_counts (id VARCHAR(40) COLLATE utf8mb4_bin PRIMARY KEY, n INT)"
                )
            )
        assert await Projection("counts", journal, count).catch_up() == 6


# -- refusals ----------------------------------------------------------------------------------


class TestRefusals:
    def test_an_unreachable_server_never_shows_the_password(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = offline("mysql")
        for command in (("current",), ("check",), ("upgrade",), ("inspect",), ("events",)):
            code, out, err = run(capsys, "-v", *command, "--url", url, "--connect-timeout", "3")
            assert code == ExitCode.DATABASE_ERROR, (command, err)
            assert PASSWORD not in out + err, command
            assert "casty:***@127.0.0.1" in err, (command, err)

    def test_a_wrong_password_and_a_missing_database_are_said_plainly(
        self, account: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        wrong = plain(account.set(password=PASSWORD + "-wrong"))
        code, out, err = run(capsys, "check", "--url", wrong)
        assert code == ExitCode.DATABASE_ERROR, err
        assert "check the user name and password" in err and PASSWORD not in out + err
        root = plain(
            URL.create(account.drivername, "root", None, account.host, account.port, "nodb")
        )
        code, _, err = run(capsys, "check", "--url", root)
        assert code == ExitCode.DATABASE_ERROR and "create the database" in err, err

    def test_the_journals_own_privileges_run_it_and_cannot_migrate(
        self,
        account: URL,
        mysql_server_url: URL,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The privileges the migration error names are enough for the journal, its import
        and its projections' offsets, and an account holding only those cannot change the
        tables: the error says which account can."""
        assert run(capsys, "upgrade", "--url", plain(account))[0] == ExitCode.OK
        db = account.database
        user = f"app_{uuid.uuid4().hex[:8]}"
        grants = {
            "casty_sa_events": "SELECT, INSERT",
            "casty_sa_event_counter": "SELECT, UPDATE",
            "casty_sa_snapshots": "SELECT, INSERT, UPDATE",
            "casty_sa_alembic_version": "SELECT",
            "casty_sa_projection_offsets": "SELECT, INSERT, UPDATE, DELETE",
            "casty_sa_tombstones": "SELECT",
        }
        asyncio.run(
            mysql_script(
                mysql_server_url,
                [
                    f"CREATE USER '{user}'@'%' IDENTIFIED BY '{PASSWORD}'",
                    *(
                        f"GRANT {what} ON `{db}`.`{t}` TO '{user}'@'%'"
                        for t, what in grants.items()
                    ),
                ],
            )
        )
        app = account.set(username=user)
        asyncio.run(_fill(app))
        code, out, err = run(capsys, "downgrade", "--yes", "--url", plain(app))
        assert code == ExitCode.DATABASE_ERROR, out + err
        assert "may not change casty-sa's tables" in err and PASSWORD not in out + err
        assert "SELECT and UPDATE on casty_sa_event_counter" in err
        assert "casty_sa_events" in asyncio.run(table_names(account))
