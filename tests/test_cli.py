"""The ``casty-sa`` command: migrations, secrecy of passwords, usage errors, inspect, the docs.

Commands run through the real entry point: ``casty_sa.cli.main([...])`` in-process, and the
installed script and ``python -m casty_sa.cli`` in subprocesses. Databases are real (SQLite files
and the suite's PostgreSQL), parametrized over both backends by the ``db_url`` fixtures.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pickle
import pty
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar

import pytest
from casty import PersistedEvent, Snapshot, SqliteJournal
from sqlalchemy import URL, make_url
from sqlalchemy.ext.asyncio import AsyncSession

from casty_sa import EventEnvelope, Projection, ProjectionFailed, SAJournal, head_revision
from casty_sa.cli import ExitCode, main
from casty_sa.migration_runs import PROJECTION_OFFSETS_REVISION
from casty_sa.revisions import revision_ids

from support.dbtools import execute, plain, query, table_names
from support.offsets import install
from support.processes import free_port
from support.retention import maintainer_deletes

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "_sections" / "cli.md"
PASSWORD = "Pa55-w0rd_unique-9f3k"
TIMEOUT = 60


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``casty-sa argv`` in-process; return the exit code, stdout and stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def fill(url: URL | str, entities: dict[str, int], snapshots: dict[str, int]) -> None:
    """Persist ``n`` events ``{"n": i}`` per entity and a snapshot at the given positions."""
    async with SAJournal(url) as journal:
        for entity, count in entities.items():
            events = [PersistedEvent(i, {"n": i}, 1767225600.0 + i) for i in range(1, count + 1)]
            await journal.persist(entity, events)
        for entity, seq in snapshots.items():
            await journal.save_snapshot(entity, Snapshot(seq, {"upto": seq}, 1767225700.0))


def make_casty_file(path: Path, entities: dict[str, int]) -> Path:
    """A journal file written by casty's own SqliteJournal."""
    journal = SqliteJournal(path)

    async def write() -> None:
        for entity, count in entities.items():
            await journal.persist(
                entity, [PersistedEvent(i, ("ev", i), 1.5 * i) for i in range(1, count + 1)]
            )

    try:
        asyncio.run(write())
    finally:
        journal.close()
    return path


# -- migrations --------------------------------------------------------------------------------


class TestMigrations:
    def test_upgrade_from_empty_then_check_and_current(
        self, empty_db_url: URL, backend: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = plain(empty_db_url)
        code, out, err = run(capsys, "check", "--url", url)
        if backend == "sqlite":  # the file does not exist yet, and check does not create it
            assert code == ExitCode.DATABASE_ERROR
            assert "no such SQLite file" in err
        else:
            assert code == ExitCode.NOT_AT_HEAD
            assert "no casty-sa tables" in out and "casty-sa upgrade" in out

        code, out, _ = run(capsys, "upgrade", "--url", url)
        assert code == ExitCode.OK
        assert f"upgraded from base (no casty-sa tables) to {head_revision()} (head)" in out

        assert run(capsys, "check", "--url", url)[:2] == (
            ExitCode.OK,
            f"{_where(empty_db_url)}: at head ({head_revision()})\n",
        )
        assert run(capsys, "current", "--url", url)[:2] == (0, f"{head_revision()} (head)\n")
        code, out, _ = run(capsys, "upgrade", "--url", url)
        assert code == 0 and f"already at {head_revision()} (head)" in out
        code, out, _ = run(capsys, "history", "--url", url)
        assert code == 0 and f" -> {head_revision()} (head) (current), " in out
        assert "<base> -> 0001, " in out
        assert run(capsys, "heads")[:2] == (0, f"{head_revision()} (head)\n")

    def test_downgrade_to_base_removes_only_casty_sa_tables(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        asyncio.run(
            execute(
                db_url,
                "CREATE TABLE orders (id INTEGER PRIMARY KEY, item VARCHAR(20))",
                "INSERT INTO orders VALUES (1, 'book')",
                "CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)",
                "INSERT INTO alembic_version VALUES ('app_0007')",
            )
        )
        code, out, _ = run(capsys, "downgrade", "--url", plain(db_url))
        assert code == ExitCode.OK
        assert "to base (no casty-sa tables)" in out
        tables = asyncio.run(table_names(db_url))
        assert {"orders", "alembic_version"} <= tables
        # at base nothing of casty-sa is left, its version table neither
        assert not {"casty_sa_events", "casty_sa_snapshots", "casty_sa_alembic_version"} & tables
        assert asyncio.run(query(db_url, "SELECT * FROM orders")) == [(1, "book")]
        assert asyncio.run(query(db_url, "SELECT * FROM alembic_version")) == [("app_0007",)]
        assert run(capsys, "check", "--url", plain(db_url))[0] == ExitCode.NOT_AT_HEAD
        assert run(capsys, "upgrade", "--url", plain(db_url))[0] == ExitCode.OK
        assert run(capsys, "check", "--url", plain(db_url))[0] == ExitCode.OK

    def test_downgrade_of_tables_holding_events_needs_yes(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        asyncio.run(fill(db_url, {"acct-1": 3}, {}))
        code, _, err = run(capsys, "downgrade", "--url", plain(db_url))
        assert code == ExitCode.USAGE
        assert "holds 3 events" in err and "--yes" in err
        assert "casty_sa_events" in asyncio.run(table_names(db_url))
        # -N that reaches base is refused as well
        steps = f"-{len(revision_ids())}"
        code, _, err = run(capsys, "downgrade", steps, "--url", plain(db_url))
        assert code == ExitCode.USAGE and "--yes" in err
        assert run(capsys, "downgrade", "--yes", "--url", plain(db_url))[0] == ExitCode.OK
        assert "casty_sa_events" not in asyncio.run(table_names(db_url))

    def test_downgrade_dropping_projection_offsets_needs_yes(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        asyncio.run(fill(db_url, {"acct-1": 2}, {}))
        asyncio.run(install(db_url, ("balances", 2), ("search", 1)))
        for below in (PROJECTION_OFFSETS_REVISION, "0001"):
            code, _, err = run(capsys, "downgrade", f"{below}", "--url", plain(db_url))
            if below == PROJECTION_OFFSETS_REVISION:  # 0003 itself stays: nothing dropped
                assert code == ExitCode.OK, err
                continue
            assert code == ExitCode.USAGE
            # the events stay at 0001: only the offsets are said
            assert "holds the offsets of 2 projections;" in err and "--yes" in err
        code, _, err = run(capsys, "downgrade", "-1", "--url", plain(db_url))
        assert code == ExitCode.USAGE and "the offsets of 2 projections" in err
        assert "casty_sa_projection_offsets" in asyncio.run(table_names(db_url))
        # to base: both are said
        code, _, err = run(capsys, "downgrade", "--url", plain(db_url))
        assert code == ExitCode.USAGE
        assert "holds 2 events and the offsets of 2 projections" in err
        code, _, err = run(capsys, "downgrade", "-1", "--yes", "--url", plain(db_url))
        assert code == ExitCode.OK, err
        assert "casty_sa_projection_offsets" not in asyncio.run(table_names(db_url))
        # below 0003 there are no offsets left to guard; the events still are
        code, _, err = run(capsys, "downgrade", "--url", plain(db_url))
        assert code == ExitCode.USAGE and "holds 2 events;" in err

    def test_downgrade_of_empty_projection_offsets_needs_no_yes(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        asyncio.run(execute(db_url, "SELECT 1"))  # the database exists (SQLite: the file)
        assert run(capsys, "upgrade", "--url", plain(db_url))[0] == ExitCode.OK
        code, out, err = run(capsys, "downgrade", "0002", "--url", plain(db_url))
        assert code == ExitCode.OK, err
        assert "to 0002" in out

    @pytest.mark.parametrize(("dialect", "binary"), [("postgresql", "BYTEA"), ("sqlite", "BLOB")])
    def test_sql_prints_the_ddl_and_connects_to_nothing(
        self, dialect: str, binary: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # a server that does not listen and a folder that does not exist: any connection fails
        missing = tmp_path / "no" / "such" / "folder" / "journal.db"
        url = (
            f"postgresql://casty:{PASSWORD}@127.0.0.1:{free_port()}/app"
            if dialect == "postgresql"
            else f"sqlite:///{missing}"
        )
        code, out, err = run(capsys, "upgrade", "--sql", "--url", url)
        assert code == ExitCode.OK, err
        assert "CREATE TABLE casty_sa_events" in out and "CREATE TABLE casty_sa_snapshots" in out
        assert binary in out
        assert "casty_sa_alembic_version" in out
        # the version table's key follows NAMING_CONVENTION too ("pk_%(table_name)s")
        assert "CONSTRAINT pk_casty_sa_alembic_version PRIMARY KEY" in out and "_pkc" not in out
        code, out, err = run(capsys, "downgrade", "--sql", "--url", url)
        assert code == ExitCode.OK, err
        assert "DROP TABLE casty_sa_events" in out and "CREATE TABLE" not in out
        assert "DROP TABLE casty_sa_alembic_version" in out
        code, out, _ = run(capsys, "downgrade", "--sql", f"{head_revision()}:base", "--url", url)
        assert code == ExitCode.OK and "DROP TABLE casty_sa_snapshots" in out
        assert not missing.parent.exists()
        assert PASSWORD not in out + err

    @pytest.mark.parametrize(
        ("command", "revision", "says"),
        [
            ("upgrade", "head:base", "goes down"),  # Alembic printed DROP TABLE … version
            ("upgrade", "0001:base", "goes down"),
            ("downgrade", "base:head", "goes up"),
            ("upgrade", ":0001", "not FROM:TO"),  # was an internal error (70)
            ("downgrade", "head:", "not FROM:TO"),
            ("upgrade", "base:0001:head", "not FROM:TO"),
        ],
    )
    def test_a_sql_range_the_wrong_way_or_half_given_is_a_usage_error(
        self, capsys: pytest.CaptureFixture[str], command: str, revision: str, says: str
    ) -> None:
        """An upgrade's range goes up and a downgrade's goes down, from one end to the
        other: anything else is refused before a line of SQL is printed."""
        code, out, err = run(capsys, command, "--sql", revision, "--url", "sqlite://")
        assert code == ExitCode.USAGE, err
        assert says in err and out == ""

    def test_unknown_revision_is_a_usage_error(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, _, err = run(capsys, "upgrade", "nosuchrev", "--url", plain(db_url))
        assert code == ExitCode.USAGE and "unknown revision 'nosuchrev'" in err
        code, _, err = run(capsys, "upgrade", f"postgresql://a:{PASSWORD}@db/x")
        assert code == ExitCode.USAGE and "--url" in err and PASSWORD not in err


class TestSchema:
    def test_sql_with_schema_is_the_ddl_a_dba_runs(
        self,
        new_postgres_db: Callable[..., Awaitable[URL]],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        database = asyncio.run(_new_db(new_postgres_db))
        url = plain(database)
        code, ddl, err = run(capsys, "upgrade", "--sql", "--schema", "ledger", "--url", url)
        assert code == ExitCode.OK, err
        assert "CREATE SCHEMA IF NOT EXISTS ledger" in ddl
        assert "SET LOCAL search_path TO ledger" in ddl
        assert asyncio.run(table_names(database)) == set()  # printed, not run

        asyncio.run(_run_script(url, ddl))  # as a DBA would, with psql -f
        code, out, _ = run(capsys, "check", "--schema", "ledger", "--url", url)
        assert code == ExitCode.OK and "at head" in out
        assert asyncio.run(table_names(database)) == set()  # nothing in public
        asyncio.run(_journal_round_trip_in(url, "ledger"))

        code, ddl, err = run(capsys, "downgrade", "--sql", "--schema", "ledger", "--url", url)
        assert code == ExitCode.OK, err
        assert "CREATE SCHEMA" not in ddl
        asyncio.run(_run_script(url, ddl))
        left = asyncio.run(
            query(
                database,
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'ledger'",
            )
        )
        assert left == []  # the version table went too

    def test_every_command_honours_schema(
        self,
        new_postgres_db: Callable[..., Awaitable[URL]],
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        url = plain(asyncio.run(_new_db(new_postgres_db)))
        assert run(capsys, "upgrade", "--url", url, "--schema", "journal")[0] == ExitCode.OK
        assert run(capsys, "check", "--url", url, "--schema", "journal")[0] == ExitCode.OK
        assert run(capsys, "check", "--url", url)[0] == ExitCode.NOT_AT_HEAD  # public is empty
        monkeypatch.setenv("CASTY_SA_SCHEMA", "journal")
        casty = make_casty_file(tmp_path / "casty.db", {"acct-1": 4, "acct-2": 1})
        code, out, err = run(capsys, "import", "--from", str(casty), "--url", url, "--json")
        assert code == ExitCode.OK, err
        assert json.loads(out)["events_copied"] == 5
        found = json.loads(run(capsys, "inspect", "--url", url, "--json")[1])
        assert (found["entities"], found["events"]) == (2, 5)
        assert asyncio.run(query(url, "SELECT count(*) FROM journal.casty_sa_events")) == [(5,)]
        code, out, err = run(capsys, "upgrade", "--sql", "--url", url)  # the DDL, for it
        assert code == ExitCode.OK and "SET LOCAL search_path TO journal" in out, err
        assert run(capsys, "downgrade", "--yes", "--url", url)[0] == ExitCode.OK
        assert asyncio.run(query(url, "SELECT to_regclass('journal.casty_sa_events')")) == [(None,)]

    def test_a_migrator_may_use_a_schema_made_for_it(
        self,
        new_postgres_db: Callable[..., Awaitable[URL]],
        postgres_server_url: URL,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        database = asyncio.run(_new_db(new_postgres_db))
        role = f"casty_migrator_{uuid.uuid4().hex[:8]}"
        asyncio.run(
            execute(
                database, f"CREATE ROLE {role} LOGIN", f"CREATE SCHEMA journal AUTHORIZATION {role}"
            )
        )
        try:
            url = plain(database.set(username=role))
            code, _, err = run(capsys, "upgrade", "--url", url, "--schema", "journal")
            assert code == ExitCode.OK, err
        finally:
            asyncio.run(execute(database, f"DROP OWNED BY {role}"))
            asyncio.run(execute(postgres_server_url, f"DROP ROLE {role}"))


def _where(url: URL) -> str:
    return url.render_as_string(hide_password=True)


# -- URLs and passwords ------------------------------------------------------------------------


class TestPasswords:
    COMMANDS: tuple[tuple[str, ...], ...] = (
        ("current",),
        ("check",),
        ("upgrade",),
        ("downgrade", "--yes"),
        ("history",),
        ("inspect",),
        ("inspect", "acct-1"),
        ("import", "--from", "{casty}"),
        ("export", "--to", "{out}"),
    )

    def test_unreachable_server_never_shows_the_password(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        casty = make_casty_file(tmp_path / "casty.db", {"acct-1": 2})
        url = f"postgresql://casty:{PASSWORD}@127.0.0.1:{free_port()}/app"
        for command in self.COMMANDS:
            argv = [arg.format(casty=casty, out=tmp_path / "out.db") for arg in command]
            code, out, err = run(capsys, "-v", *argv, "--url", url, "--connect-timeout", "3")
            assert code == ExitCode.DATABASE_ERROR, (command, err)
            assert PASSWORD not in out + err, command
            assert "casty:***@127.0.0.1" in err, (command, err)
            assert err.strip().splitlines()[-1].startswith("casty-sa: error: ")

    def test_real_postgresql_errors_never_show_the_password(
        self, postgres_server_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # the suite's server trusts local logins, so a wrong password is not refused; a
        # database that does not exist is, by the server itself
        url = plain(postgres_server_url.set(password=PASSWORD, database="no_such_database"))
        for command in (("current",), ("check",), ("upgrade",), ("inspect",)):
            code, out, err = run(capsys, "-v", *command, "--url", url)
            assert code == ExitCode.DATABASE_ERROR, (command, err)
            assert "no_such_database" in err and "does not exist" in err
            assert PASSWORD not in out + err, command

    def test_successful_commands_never_show_the_password(
        self,
        new_postgres_db: Callable[..., Awaitable[URL]],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        encoded = "p@ss:w/rd%" + PASSWORD
        database = asyncio.run(_new_db(new_postgres_db))
        url = plain(database.set(password=encoded))
        assert encoded not in url  # it is percent-encoded in the URL text
        casty = make_casty_file(tmp_path / "casty.db", {"acct-1": 2})
        outputs = []
        for argv in (
            ["-v", "upgrade"],
            ["current"],
            ["check"],
            ["history"],
            ["import", "--from", str(casty)],
            ["inspect"],
            ["inspect", "acct-1", "--json"],
            ["export", "--to", str(tmp_path / "out.db")],
        ):
            code, out, err = run(capsys, *argv, "--url", url)
            assert code == ExitCode.OK, (argv, err)
            outputs.append(out + err)
        text_out = "\n".join(outputs)
        assert PASSWORD not in text_out
        assert "***" in text_out

    def test_query_string_secrets_never_show_with_v(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = (
            f"postgresql://casty@127.0.0.1:{free_port()}/app"
            f"?password={PASSWORD}&sslpassword={PASSWORD}-key"
        )
        for command in (("current",), ("check",), ("upgrade",), ("inspect",)):
            code, out, err = run(capsys, "-v", *command, "--url", url, "--connect-timeout", "3")
            assert code == ExitCode.DATABASE_ERROR, (command, err)
            assert PASSWORD not in out + err, (command, err)
            assert "casty@127.0.0.1" in err, (command, err)

    def test_query_string_secrets_from_the_environment_never_show(self, tmp_path: Path) -> None:
        script = Path(sys.executable).with_name("casty-sa")
        url = f"postgresql://casty@127.0.0.1:{free_port()}/app?password={PASSWORD}"
        env = {**os.environ, "CASTY_SA_URL": url}
        for command in (["-v", "check"], ["-v", "current"], ["-v", "upgrade"]):
            failed = subprocess.run(
                [str(script), *command, "--connect-timeout", "3"],
                capture_output=True,
                text=True,
                env=env,
                timeout=TIMEOUT,
            )
            assert failed.returncode == ExitCode.DATABASE_ERROR, failed.stderr
            assert PASSWORD not in failed.stdout + failed.stderr, failed.stderr
            assert "password=***" in failed.stderr

    def test_query_string_password_of_successful_commands_never_shows(
        self,
        new_postgres_db: Callable[..., Awaitable[URL]],
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        database = asyncio.run(_new_db(new_postgres_db))
        # the suite's server trusts local logins: the password is sent and ignored
        url = plain(database.set(password=None).update_query_dict({"password": PASSWORD}))
        outputs = []
        for argv in (["-v", "upgrade", "--url", url], ["-v", "check", "--url", url]):
            code, out, err = run(capsys, *argv)
            assert code == ExitCode.OK, (argv, err)
            outputs.append(out + err)
        monkeypatch.setenv("CASTY_SA_URL", url)
        for argv in (["-v", "current"], ["-v", "inspect"]):
            code, out, err = run(capsys, *argv)
            assert code == ExitCode.OK, (argv, err)
            outputs.append(out + err)
        assert PASSWORD not in "\n".join(outputs)

    def test_libpq_parameters_in_the_url_work_or_are_refused_by_name(
        self, new_postgres_db: Callable[..., Awaitable[URL]], capsys: pytest.CaptureFixture[str]
    ) -> None:
        database = asyncio.run(_new_db(new_postgres_db))
        hosted = {
            "sslmode": "disable",
            "application_name": "ops-console",
            "connect_timeout": "5",
            "options": "-c lock_timeout=2s",
        }
        url = plain(database.update_query_dict(hosted))
        for argv in (["upgrade"], ["check"], ["inspect"]):
            code, _, err = run(capsys, *argv, "--url", url)
            assert code == ExitCode.OK, (argv, err)
        unknown = plain(database.update_query_dict({"keepalives": "1", "sslpassword": PASSWORD}))
        code, out, err = run(capsys, "check", "--url", unknown)
        assert code == ExitCode.DATABASE_ERROR, err
        assert "'keepalives'" in err and out == ""
        assert PASSWORD not in out + err

    def test_missing_url_is_a_usage_error(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.delenv("CASTY_SA_URL", raising=False)
        for argv in (
            ["current"],
            ["check"],
            ["upgrade"],
            ["upgrade", "--sql"],
            ["downgrade"],
            ["inspect"],
            ["import", "--from", "x.db"],
            ["export", "--to", "x.db"],
        ):
            code, out, err = run(capsys, *argv)
            assert code == ExitCode.USAGE, argv
            assert "no database URL" in err and "--url" in err and "CASTY_SA_URL" in err
            assert out == ""
        monkeypatch.setenv("CASTY_SA_URL", f"sqlite:///{tmp_path / 'env.db'}")
        assert run(capsys, "upgrade")[0] == ExitCode.OK
        assert run(capsys, "check")[0] == ExitCode.OK

    def test_bad_arguments_are_usage_errors_without_passwords(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, _, err = run(capsys, "current", f"postgresql://u:{PASSWORD}@db/app")
        assert code == ExitCode.USAGE and "unrecognized arguments" in err
        assert PASSWORD not in err and "u:***@db" in err
        assert run(capsys, "frobnicate")[0] == ExitCode.USAGE
        code, _, err = run(capsys, "current", "--url", f"postgresql://u:{PASSWORD}@db:port/x")
        assert code == ExitCode.USAGE and "does not parse" in err and PASSWORD not in err
        code, _, err = run(capsys, "current", "--url", "oracle://u@db/app")
        assert code == ExitCode.DATABASE_ERROR and "not supported" in err
        code, _, err = run(capsys, "upgrade", "--url", "sqlite:///x.db", "--schema", "casty")
        assert code == ExitCode.USAGE and "needs PostgreSQL" in err
        code, out, _ = run(capsys, "--help")
        assert code == ExitCode.OK and "exit codes:" in out and "130" in out


async def _new_db(factory: Callable[..., Awaitable[URL]]) -> URL:
    return await factory(migrated=False)


async def _new_migrated_db(factory: Callable[..., Awaitable[URL]]) -> URL:
    return await factory()


# -- the console entry point -------------------------------------------------------------------


class TestEntryPoint:
    def test_installed_script_and_python_m(self, tmp_path: Path) -> None:
        script = Path(sys.executable).with_name("casty-sa")
        assert script.exists(), "casty-sa is not installed next to this Python"
        url = f"postgresql://casty:{PASSWORD}@127.0.0.1:{free_port()}/app"
        env = {**os.environ, "CASTY_SA_URL": url}
        failed = subprocess.run(
            [str(script), "check", "--connect-timeout", "3"],
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT,
        )
        assert failed.returncode == ExitCode.DATABASE_ERROR, failed.stderr
        assert PASSWORD not in failed.stdout + failed.stderr
        assert "Traceback" not in failed.stderr
        ddl = subprocess.run(
            [sys.executable, "-m", "casty_sa.cli", "upgrade", "--sql", "--url", "postgresql://"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=tmp_path,
        )
        assert ddl.returncode == 0, ddl.stderr
        assert "CREATE TABLE casty_sa_events" in ddl.stdout

    def test_colour_only_on_a_terminal_without_no_color(self, tmp_path: Path) -> None:
        url = f"sqlite:///{tmp_path / 'journal.db'}"
        asyncio.run(fill(url, {"acct-1": 2}, {}))

        def on_terminal(**extra_env: str) -> str:
            env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
            env.update(TERM="xterm", COLUMNS="120", **extra_env)
            leader, follower = pty.openpty()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "casty_sa.cli", "inspect", "--url", url],
                    stdout=follower,
                    stderr=subprocess.PIPE,
                    env=env,
                )
                os.close(follower)
                chunks = []
                while True:
                    try:
                        chunk = os.read(leader, 4096)
                    except OSError:  # the terminal closes when the process ends
                        break
                    if not chunk:
                        break
                    chunks.append(chunk)
                assert proc.wait(timeout=TIMEOUT) == 0
            finally:
                os.close(leader)
            return b"".join(chunks).decode()

        assert "\x1b[1m" in on_terminal()
        plain_out = on_terminal(NO_COLOR="1")
        assert "\x1b[" not in plain_out and "acct-1" in plain_out


# -- inspect -----------------------------------------------------------------------------------


class TestInspect:
    ENTITIES: ClassVar[dict[str, int]] = {"acct-1": 5, "acct-2": 2, "evil\x1b[2J": 1}

    @pytest.fixture
    def url(self, db_url: URL) -> str:
        asyncio.run(fill(db_url, self.ENTITIES, {"acct-1": 3}))
        return plain(db_url)

    def test_summary_text_and_json(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, _ = run(capsys, "inspect", "--url", url)
        assert code == ExitCode.OK
        assert "\x1b" not in out  # no colour when piped, and the hostile id is escaped
        lines = out.splitlines()
        assert f"revision   {head_revision()} (head)" in lines
        assert "entities   3" in lines and "events     8" in lines and "snapshots  1" in lines
        rows = {line.split()[0]: line.split()[1:] for line in lines[lines.index("") + 2 :]}
        assert rows["acct-1"] == ["5", "5", "3"]
        assert rows["acct-2"] == ["2", "2", "-"]
        assert rows["evil\\x1b[2J"] == ["1", "1", "-"]

        code, out, _ = run(capsys, "inspect", "--url", url, "--json")
        found = json.loads(out)
        assert (found["entities"], found["events"], found["snapshots"]) == (3, 8, 1)
        assert found["page"][0] == {
            "entity_id": "acct-1",
            "events": 5,
            "highest_sequence_nr": 5,
            "snapshot_sequence_nr": 3,
        }
        assert [e["entity_id"] for e in found["page"]] == list(self.ENTITIES)
        assert found["next_after"] is None

    def test_summary_pages(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, _ = run(capsys, "inspect", "--url", url, "--limit", "2")
        assert code == 0 and "next page: --after 'acct-2'" in out
        first = json.loads(run(capsys, "inspect", "--url", url, "--limit", "2", "--json")[1])
        assert [e["entity_id"] for e in first["page"]] == ["acct-1", "acct-2"]
        assert first["next_after"] == "acct-2"
        rest = json.loads(run(capsys, "inspect", "--url", url, "--after", "acct-2", "--json")[1])
        assert [e["entity_id"] for e in rest["page"]] == ["evil\x1b[2J"]
        assert rest["next_after"] is None and rest["entities"] == 3

    def test_entity_events_decoded_paged_and_raw(
        self, url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, out, _ = run(capsys, "inspect", "--url", url, "acct-1", "--json")
        found = json.loads(out)
        assert code == 0 and (found["events"], found["highest_sequence_nr"]) == (5, 5)
        assert found["snapshot"]["sequence_nr"] == 3
        assert found["snapshot"]["state"] == repr({"upto": 3})
        assert [e["event"] for e in found["page"]] == [repr({"n": i}) for i in range(1, 6)]
        assert found["page"][0]["timestamp"] == 1767225601.0
        # each event's type and place in the global order (journal.events' offset)
        assert {e["event_type"] for e in found["page"]} == {"dict"}
        positions = [e["position"] for e in found["page"]]
        assert positions == sorted(positions) and len(set(positions)) == 5
        offsets = [e["offset"] for e in found["page"]]
        assert offsets == sorted(offsets) and all(len(o) == 36 for o in offsets)

        code, out, _ = run(capsys, "inspect", "--url", url, "acct-1", "--from", "2", "--limit", "2")
        lines = out.splitlines()
        header = next(line for line in lines if line.startswith("SEQ"))
        assert header.split()[:4] == ["SEQ", "POSITION", "TIMESTAMP", "(UTC)"]
        assert header.split()[4:] == ["TYPE", "BYTES", "EVENT"]
        table = lines[lines.index(header) + 1 :]
        shown = [line.split() for line in table if line and line[0] == " "]
        assert [row[0] for row in shown] == ["2", "3"]
        assert [int(row[1]) for row in shown] == positions[1:3]
        assert all(" dict " in line for line in table if line and line[0] == " ")
        assert "{'n': 2}" in out and "{'n': 4}" not in out
        assert "next page: --from 4" in out

        raw = json.loads(run(capsys, "inspect", "--url", url, "acct-1", "--raw", "--json")[1])
        assert base64.b64decode(raw["page"][0]["payload_base64"]) == pickle.dumps({"n": 1})
        assert "event" not in raw["page"][0]

    def test_undecodable_payloads_and_other_decoders(
        self, url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, out, _ = run(capsys, "inspect", "--url", url, "acct-2", "--decoder", "json:loads")
        assert code == 0 and "cannot decode: " in out
        code, _, err = run(capsys, "inspect", "--url", url, "acct-2", "--decoder", "nope:loads")
        assert code == ExitCode.USAGE and "--decoder" in err
        code, out, _ = run(
            capsys, "inspect", "--url", url, "acct-2", "--decoder", "pickle:loads", "--json"
        )
        assert json.loads(out)["page"][1]["event"] == repr({"n": 2})

    def test_colour_on_request_and_unknown_entity(
        self, url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert "\x1b[1m" in run(capsys, "inspect", "--url", url, "--color", "always")[1]
        code, out, err = run(capsys, "inspect", "--url", url, "nobody")
        assert code == ExitCode.NO_SUCH_ENTITY and "no events or snapshot" in err
        assert "events    0" in out

    def test_inspect_never_creates_or_migrates(
        self, empty_db_url: URL, backend: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, _, err = run(capsys, "inspect", "--url", plain(empty_db_url))
        assert code == ExitCode.DATABASE_ERROR
        assert ("no such SQLite file" if backend == "sqlite" else "casty-sa upgrade") in err
        if backend == "sqlite":
            assert not Path(str(empty_db_url.database)).exists()

    # -- the documentation -------------------------------------------------------------------------

    def test_totals_of_big_postgresql_tables_are_estimates(
        self, new_postgres_db: Callable[..., Awaitable[URL]], capsys: pytest.CaptureFixture[str]
    ) -> None:
        database = asyncio.run(_new_migrated_db(new_postgres_db))
        asyncio.run(
            execute(
                database,
                "INSERT INTO casty_sa_events SELECT 'e' || (i % 1000), i, 1.0, '\\x00'::bytea "
                "FROM generate_series(1, 120000) AS i",
                "INSERT INTO casty_sa_snapshots VALUES ('e1', 1, 1.0, '\\x00'::bytea)",
            )
        )
        asyncio.run(_run_script(plain(database), "ANALYZE"))
        url = plain(database)
        code, out, _ = run(capsys, "inspect", "--url", url)
        assert code == ExitCode.OK
        assert re.search(r"^events +~1[12]\d,\d{3}$", out, re.M), out  # the planner's figure
        assert "totals are PostgreSQL's estimates" in out and "--exact" in out
        assert json.loads(run(capsys, "inspect", "--url", url, "--json")[1])["estimated"]

        code, out, _ = run(capsys, "inspect", "--url", url, "--exact")
        assert code == ExitCode.OK and "estimates" not in out
        assert re.search(r"^entities +1,000$", out, re.M) and re.search(
            r"^events +120,000$", out, re.M
        )
        found = json.loads(run(capsys, "inspect", "--url", url, "--exact", "--json")[1])
        assert (found["entities"], found["events"], found["snapshots"]) == (1000, 120000, 1)
        assert not found["estimated"]

    def test_classes_of_a_scripts_main_get_a_hint(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = f"sqlite:///{tmp_path / 'journal.db'}"
        script = tmp_path / "app.py"
        script.write_text(
            "import asyncio, sys\n"
            "from dataclasses import dataclass\n"
            "from casty import PersistedEvent\n"
            "from casty_sa import SAJournal\n"
            "@dataclass(frozen=True)\n"
            "class Deposited:\n"
            "    amount: int\n"
            "async def main() -> None:\n"
            "    async with SAJournal(sys.argv[1]) as journal:\n"
            "        await journal.persist('acct', [PersistedEvent(1, Deposited(5), 1.0)])\n"
            "asyncio.run(main())\n"
        )
        subprocess.run([sys.executable, str(script), url], check=True, timeout=60)
        code, out, _ = run(capsys, "inspect", "--url", url, "acct")
        assert code == ExitCode.OK
        assert "cannot decode: AttributeError" in out
        assert "__main__" in out and "--decoder MODULE:FUNCTION" in out
        assert "move the classes into a module" in out


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", DOC.read_text(), re.S | re.M)


def _normalized(output: str) -> list[str]:
    return [re.sub(r"\b\d+\.\d+s\b", "…s", line.rstrip()) for line in output.splitlines()]


class TestDocumentation:
    def test_the_session_runs_as_shown(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("CASTY_SA_URL", raising=False)
        (python,) = _blocks("python")
        exec(compile(python, str(DOC), "exec"), {"__name__": "cli_doc"})
        (session,) = _blocks("console")
        last = 0
        expected: list[str] = []
        got: list[str] = []
        for line in session.splitlines():
            if not line.startswith("$ "):
                expected.append(line)
                continue
            words = shlex.split(line[2:])
            got.append(line)
            expected.append(line)
            if words[0] == "export":
                name, _, value = words[1].partition("=")
                monkeypatch.setenv(name, value)
            elif words == ["echo", "$?"]:
                got.append(str(last))
            else:
                assert words[0] == "casty-sa", line
                last, out, err = run(capsys, *words[1:])
                got += (out + err).splitlines()
        assert _normalized("\n".join(got)) == _normalized("\n".join(expected))
        copy = SqliteJournal(tmp_path / "casty-copy.db")
        try:
            events = asyncio.run(copy.load("alice"))
        finally:
            copy.close()
        assert [e.event for e in events] == [{"deposit": 100}, {"withdraw": 30}, {"deposit": 5}]

    def test_the_documented_privileges_are_enough_and_needed(
        self,
        new_postgres_db: Callable[..., Awaitable[URL]],
        postgres_server_url: URL,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        before_upgrade, after_upgrade = _blocks("sql")
        suffix = uuid.uuid4().hex[:8]
        jobs = ("migrator", "app", "reader", "maintainer")
        roles = {name: f"casty_{name}_{suffix}" for name in jobs}

        def named(sql: str) -> str:
            return re.sub(r"\bcasty_(migrator|app|reader|maintainer)\b", lambda m: roles[m[1]], sql)

        database = asyncio.run(_new_db(new_postgres_db))

        def as_role(name: str) -> str:
            return plain(database.set(username=roles[name], password="change-me"))

        asyncio.run(execute(database, *_statements(named(before_upgrade))))
        try:
            assert run(capsys, "upgrade", "--url", as_role("migrator"))[0] == ExitCode.OK
            # each statement as the role the documentation names, and none merely warns
            # (a GRANT on a schema the role does not own only warns on PostgreSQL 15+)
            notices = asyncio.run(
                _execute_noting(as_role("migrator"), _statements(named(after_upgrade)))
            )
            assert notices == []

            asyncio.run(_journal_round_trip(as_role("app")))
            casty = make_casty_file(tmp_path / "casty.db", {"imported": 3})
            code, _, err = run(capsys, "import", "--from", str(casty), "--url", as_role("app"))
            assert code == ExitCode.OK, err
            # a projection run, its failure stored, reset by the application; listed by the reader
            asyncio.run(_projection_round_trip(as_role("app")))
            code, _, err = run(
                capsys, "projections", "reset", "balances", "--yes", "--url", as_role("app")
            )
            assert code == ExitCode.OK, err
            reads = (
                ["inspect"],
                ["events"],
                ["projections"],
                ["check"],
                ["current"],
                ["export", "--to", "o.db"],
            )
            for argv in reads:
                argv = [str(tmp_path / a) if a == "o.db" else a for a in argv]
                code, _, err = run(capsys, *argv, "--url", as_role("reader"))
                assert code == ExitCode.OK, (argv, err)

            # and no more than that: the reader cannot write, the application cannot drop
            casty2 = make_casty_file(tmp_path / "casty2.db", {"other": 1})
            code, _, err = run(capsys, "import", "--from", str(casty2), "--url", as_role("reader"))
            assert code == ExitCode.DATABASE_ERROR and "permission denied" in err
            code, _, err = run(
                capsys, "projections", "reset", "balances", "--yes", "--url", as_role("reader")
            )
            assert code == ExitCode.DATABASE_ERROR and "permission denied" in err
            code, _, err = run(capsys, "downgrade", "--yes", "--url", as_role("app"))
            assert code == ExitCode.DATABASE_ERROR and "must be owner" in err
            assert (  # what the journal needs, exactly as the table above says
                "the journal itself needs only SELECT and INSERT on casty_sa_events, SELECT, "
                "INSERT and UPDATE on casty_sa_snapshots, and SELECT on casty_sa_tombstones and "
                "casty_sa_alembic_version"
            ) in err
            # deleting is the maintainer's alone
            asyncio.run(maintainer_deletes(as_role("app"), as_role("maintainer")))
            code, _, err = run(capsys, "downgrade", "--yes", "--url", as_role("migrator"))
            assert code == ExitCode.OK, err
        finally:
            asyncio.run(execute(database, f"DROP OWNED BY {', '.join(roles.values())}"))
            asyncio.run(execute(postgres_server_url, f"DROP ROLE {', '.join(roles.values())}"))


def _statements(block: str) -> list[str]:
    """The statements of a documented SQL block, without their ``--`` comments."""
    return [s.strip() for s in re.sub(r"--[^\n]*", "", block).split(";") if s.strip()]


async def _execute_noting(url: str, statements: list[str]) -> list[str]:
    """Run statements on a raw asyncpg connection; return the server's warnings and notices."""
    import asyncpg

    heard: list[str] = []
    target = make_url(url)
    dsn = target.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        connection.add_log_listener(lambda _c, message: heard.append(str(message)))
        for statement in statements:
            await connection.execute(statement)
        await asyncio.sleep(0)  # let the listener run
    finally:
        await connection.close()
    return heard


async def _run_script(url: str, script: str) -> None:
    """Run a printed DDL script on a raw asyncpg connection, as ``psql -f`` would: statement
    by statement (``CONCURRENTLY`` and a ``DO`` block that commits need that)."""
    import asyncpg

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        for statement in script.split(";\n\n"):
            if statement.strip():
                await connection.execute(statement)
    finally:
        await connection.close()


async def _projection_round_trip(url: str) -> None:
    """A projection (whose read model writes nothing) catches up, stores a failure, resets."""
    broken = [True]

    async def handler(session: AsyncSession, envelope: EventEnvelope) -> None:
        if broken[0]:
            raise ValueError("read model down")

    async with asyncio.timeout(60), SAJournal(url) as journal:
        total = len([e async for e in journal.events()])
        projection = Projection("balances", journal, handler, slices=2, on_error="stop")
        with pytest.raises(ProjectionFailed):
            await projection.catch_up()
        assert (await projection.status()).last_error is not None
        broken[0] = False
        assert await projection.catch_up() == total
        await projection.reset()
        assert await projection.offset() is None


async def _journal_round_trip_in(url: str, schema: str) -> None:
    async with SAJournal(url, schema=schema) as journal:
        await journal.persist("acct-9", [PersistedEvent(1, "opened", 1.0)])
        assert [e.event for e in await journal.load("acct-9")] == ["opened"]


async def _journal_round_trip(url: str) -> None:
    async with SAJournal(url) as journal:
        await journal.persist("acct-9", [PersistedEvent(1, "opened", 1.0)])
        await journal.save_snapshot("acct-9", Snapshot(1, "open", 1.0))
        await journal.save_snapshot("acct-9", Snapshot(1, "open again", 2.0))
        assert [e.event for e in await journal.load("acct-9")] == ["opened"]
        snapshot = await journal.load_snapshot("acct-9")
        assert snapshot is not None and snapshot.state == "open again"
        # the read side, a live reader's LISTEN included, needs no grant beyond these
        (first,) = [envelope async for envelope in journal.events()]
        assert [e async for e in journal.entity_ids()] == ["acct-9"]

        async def next_live() -> object:
            async for envelope in journal.events(after=first.offset, live=True):
                return envelope.event
            raise AssertionError("the live reader ended")

        reader = asyncio.create_task(next_live())
        await asyncio.sleep(0)  # let it start waiting (it reads again once listening)
        await journal.persist("acct-9", [PersistedEvent(2, "closed", 2.0)])
        assert await asyncio.wait_for(reader, 10) == "closed"
