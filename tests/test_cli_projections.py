"""``casty-sa projections``: the list per slice (offset, handled, lag, lease, last error), the
read model in another database, and ``projections reset NAME`` (``--yes``, ``--clear``, ``--sql``).

Projections' rows are made and moved through ``OffsetTable`` (``support.offsets``), as a
running projection moves them; the journal is a real ``SAJournal`` on a SQLite file or the
suite's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from casty import PersistedEvent
from sqlalchemy import URL, make_url, text
from sqlalchemy.ext.asyncio import AsyncSession

import casty_sa
from casty_sa import EventEnvelope, Projection, SAJournal
from casty_sa.cli import ExitCode, main
from casty_sa.errors import ProjectionFailed, ProjectionLeaseLost
from casty_sa.projections.offsets import OffsetTable

from support.dbtools import execute, mysql_script, plain, query, run_script
from support.offsets import advance, install, on_offsets
from support.processes import free_port
from support.projections import add_to

ENTITIES = ("acct-1", "acct-2", "acct-3", "acct-4", "acct-5", "acct-6")
PER_ENTITY = 3
PASSWORD = "Pr0j-pa55_unique-7c1d"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def fill(url: URL, since: float) -> list[tuple[str, str, float]]:
    """Three events per entity, one second apart from ``since``; ``(offset, entity, time)``
    of each in the global order."""
    async with SAJournal(url) as journal:
        tick = since
        for entity in ENTITIES:
            events = []
            for n in range(1, PER_ENTITY + 1):
                events.append(PersistedEvent(n, n, tick))
                tick += 1.0
            await journal.persist(entity, events)
        return [(e.offset, e.entity_id, e.timestamp) async for e in journal.events()]


def slices(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [row for row in rows if row["projection"] == name]


async def other_database(
    backend: str, tmp_path: Path, new_server_db: Callable[..., Awaitable[URL]]
) -> URL:
    """A second database at head: the read model's (on the test's server)."""
    if backend == "sqlite":
        url = make_url(f"sqlite+aiosqlite:///{tmp_path / 'readmodel.db'}")
        await casty_sa.upgrade(url)
        return url
    return await new_server_db(migrated=True)


async def with_password(url: URL, password: str) -> URL:
    """``url`` with a password the server takes: the suite's PostgreSQL trusts local logins
    (any password); on MySQL, an account of its own with every privilege on the database."""
    if url.get_backend_name() != "mysql":
        return url.set(password=password)
    user = f"pw_{uuid.uuid4().hex[:8]}"
    await mysql_script(
        url.set(database=None),
        [
            f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'",
            f"GRANT ALL ON `{url.database}`.* TO '{user}'@'%'",
        ],
    )
    return url.set(username=user, password=password)


async def _bare(new_server_db: Callable[..., Awaitable[URL]]) -> URL:
    return await new_server_db(migrated=False)


@pytest.mark.shared_database
class TestList:
    def test_each_slice_with_its_offset_and_lag(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        since = time.time() - 1000.0
        events = asyncio.run(fill(db_url, since))
        asyncio.run(install(db_url, ("balances", 2), ("search", 1)))
        handled = 10
        offset, _entity, _when = events[handled - 1]
        asyncio.run(advance(db_url, "search", 0, offset, handled))

        before = time.time()
        code, out, err = run(capsys, "projections", "--url", plain(db_url), "--json")
        after = time.time()
        assert code == ExitCode.OK, err
        rows = json.loads(out)["slices"]
        [search] = slices(rows, "search")
        assert (search["offset"], search["handled"], search["lag_events"]) == (offset, 10, 8)
        oldest = events[handled][2]  # the first event not handled
        assert before - oldest - 1.0 <= float(search["lag_seconds"]) <= after - oldest + 1.0
        assert search["owner"] is None and search["held"] is False

        # a slice's offset moves over every event, so each slice's lag is all that follows it
        balances = slices(rows, "balances")
        assert [row["lag_events"] for row in balances] == [len(events)] * 2
        assert [(row["slice"], row["slice_count"]) for row in balances] == [(0, 2), (1, 2)]

        code, out, err = run(capsys, "projections", "--url", plain(db_url))
        assert code == ExitCode.OK, err
        header, *lines = out.splitlines()
        assert header.split()[:5] == ["PROJECTION", "SLICE", "OFFSET", "HANDLED", "LAG"]
        assert lines[2].split()[:5] == ["search", "0/1", offset, "10", "8"]

        code, out, _ = run(capsys, "projections", "--url", plain(db_url), "--no-lag", "--json")
        assert code == ExitCode.OK
        assert {row["lag_events"] for row in json.loads(out)["slices"]} == {None}

    def test_the_owner_its_lease_and_the_last_error(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        events = asyncio.run(fill(db_url, time.time()))
        asyncio.run(install(db_url, ("search", 1)))
        failure = "ValueError: no account for 'acct-4' (entity acct-4, seq 1)\x1b[2J"
        asyncio.run(
            advance(
                db_url,
                "search",
                0,
                events[0][0],
                1,
                owner="web-1:42:ab",
                release=False,
                error=failure,
            )
        )
        code, out, err = run(capsys, "projections", "--url", plain(db_url), "--json")
        assert code == ExitCode.OK, err
        [row] = json.loads(out)["slices"]
        assert (row["owner"], row["held"], row["last_error"]) == ("web-1:42:ab", True, failure)
        assert 0 < float(row["lease_left"]) <= 60.0 and row["last_error_at"] is not None
        code, out, _ = run(capsys, "projections", "--url", plain(db_url), "--color", "never")
        assert "web-1:42:ab  live " in out
        assert "\x1b" not in out and "\\x1b[2J" in out  # stored text never drives the terminal

    def test_no_projections_and_no_url(
        self, db_url: URL, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        code, out, _ = run(capsys, "projections", "--url", plain(db_url))
        assert code == ExitCode.OK and out.startswith("no projections in ")
        monkeypatch.delenv("CASTY_SA_URL", raising=False)
        code, _, err = run(capsys, "projections")
        assert code == ExitCode.USAGE and "no database URL" in err
        for argv in (["projections", "bogus"], ["projections", "--yes"], ["projections", "reset"]):
            code, _, err = run(capsys, *argv, "--url", plain(db_url))
            assert code == ExitCode.USAGE, argv


@pytest.mark.shared_database
class TestReadModelElsewhere:
    def test_offsets_in_another_database(
        self,
        db_url: URL,
        backend: str,
        tmp_path: Path,
        new_server_db: Callable[..., Awaitable[URL]],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        events = asyncio.run(fill(db_url, time.time()))
        readmodel = asyncio.run(other_database(backend, tmp_path, new_server_db))
        asyncio.run(install(readmodel, ("balances", 1)))
        asyncio.run(advance(readmodel, "balances", 0, events[4][0], 5))
        code, out, err = run(
            capsys,
            "projections",
            "--url",
            plain(db_url),
            "--offsets-url",
            plain(readmodel),
            "--json",
        )
        assert code == ExitCode.OK, err
        [row] = json.loads(out)["slices"]
        assert (row["handled"], row["lag_events"]) == (5, len(events) - 5)
        # the journal's database holds no projection
        code, out, _ = run(capsys, "projections", "--url", plain(db_url))
        assert out.startswith("no projections")
        code, out, err = run(
            capsys,
            "projections",
            "reset",
            "balances",
            "--yes",
            "--offsets-url",
            plain(readmodel),
        )
        assert code == ExitCode.OK, err
        assert asyncio.run(query(readmodel, "SELECT handled FROM casty_sa_projection_offsets")) == [
            (0,)
        ]

    @pytest.mark.only_backends("postgresql", "mysql")
    def test_a_database_without_the_table_and_no_password_shown(
        self,
        db_url: URL,
        new_server_db: Callable[..., Awaitable[URL]],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        bare = asyncio.run(_bare(new_server_db))
        secret = asyncio.run(with_password(bare, PASSWORD))
        code, out, err = run(
            capsys, "projections", "--url", plain(db_url), "--offsets-url", plain(secret)
        )
        assert code == ExitCode.DATABASE_ERROR
        assert PASSWORD not in out + err
        assert "casty-sa upgrade" in err, err


@pytest.mark.shared_database
class TestReset:
    READ_MODEL = "CREATE TABLE rm_balances (entity_id VARCHAR(40) PRIMARY KEY, balance INTEGER)"

    def test_needs_yes_and_clears_the_read_model_in_the_same_transaction(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        events = asyncio.run(fill(db_url, time.time()))
        asyncio.run(install(db_url, ("balances", 2)))
        lease = asyncio.run(advance(db_url, "balances", 1, events[2][0], 3, release=False))
        asyncio.run(
            execute(db_url, self.READ_MODEL, "INSERT INTO rm_balances VALUES ('acct-1', 6)")
        )
        code, _, err = run(capsys, "projections", "reset", "balances", "--url", plain(db_url))
        assert code == ExitCode.USAGE
        assert "--yes" in err and "--clear" in err and "--sql" in err
        assert self._offsets(db_url)[1] == (events[2][0], 3)

        # a clear statement that fails: the reset is rolled back with it
        code, _, err = run(
            capsys,
            "projections",
            "reset",
            "balances",
            "--yes",
            "--url",
            plain(db_url),
            "--clear",
            "DELETE FROM rm_balances",
            "--clear",
            "DELETE FROM no_such_table",
        )
        assert code == ExitCode.DATABASE_ERROR, err
        assert self._offsets(db_url)[1] == (events[2][0], 3)
        assert asyncio.run(query(db_url, "SELECT count(*) FROM rm_balances")) == [(1,)]

        code, out, err = run(
            capsys,
            "projections",
            "reset",
            "balances",
            "--yes",
            "--url",
            plain(db_url),
            "--clear",
            "DELETE FROM rm_balances",
        )
        assert code == ExitCode.OK, err
        assert "2 slice(s) start over" in out and "(1 rows)" in out and "warning" not in err
        assert self._offsets(db_url) == [(None, 0), (None, 0)]
        assert asyncio.run(query(db_url, "SELECT count(*) FROM rm_balances")) == [(0,)]
        # the worker of the old run can commit nothing more
        with pytest.raises(ProjectionLeaseLost):
            asyncio.run(self._advance_with(db_url, lease, events[3][0]))

        code, _, err = run(capsys, "projections", "reset", "nope", "--yes", "--url", plain(db_url))
        assert code == ExitCode.NO_SUCH_PROJECTION and "no projection 'nope'" in err
        code, _, err = run(
            capsys, "projections", "reset", "balances", "--yes", "--url", plain(db_url)
        )
        assert code == ExitCode.OK and "warning: no --clear given" in err

    def test_the_sql_script_resets_and_clears(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        events = asyncio.run(fill(db_url, time.time()))
        asyncio.run(install(db_url, ("balances", 1)))
        asyncio.run(advance(db_url, "balances", 0, events[5][0], 6))
        asyncio.run(
            execute(db_url, self.READ_MODEL, "INSERT INTO rm_balances VALUES ('acct-1', 6)")
        )
        code, bare, _ = run(
            capsys, "projections", "reset", "balances", "--sql", "--url", plain(db_url)
        )
        assert code == ExitCode.OK and "-- DELETE FROM <the read model's tables>;" in bare
        code, script, err = run(
            capsys,
            "projections",
            "reset",
            "balances",
            "--sql",
            "--url",
            plain(db_url),
            "--clear",
            "DELETE FROM rm_balances;",
        )
        assert code == ExitCode.OK, err
        assert "BEGIN;\nDELETE FROM rm_balances;\nUPDATE casty_sa_projection_offsets" in script
        asyncio.run(run_script(db_url, script))
        assert self._offsets(db_url) == [(None, 0)]
        assert asyncio.run(query(db_url, "SELECT count(*) FROM rm_balances")) == [(0,)]
        fence = asyncio.run(query(db_url, "SELECT fence FROM casty_sa_projection_offsets"))
        assert fence == [(2,)]  # taken once (1), reset once (2)

    @staticmethod
    def _offsets(url: URL) -> list[tuple[str | None, int]]:
        return [
            (row[0], row[1])
            for row in asyncio.run(
                query(
                    url,
                    "SELECT last_offset, handled FROM casty_sa_projection_offsets ORDER BY slice",
                )
            )
        ]

    @staticmethod
    async def _advance_with(url: URL, lease: object, to: str) -> None:
        async def move(session: AsyncSession, table: OffsetTable) -> None:
            await table.advance(session, lease, None, to, 1, 60_000)  # type: ignore[arg-type]

        await on_offsets(url, move)


@pytest.mark.shared_database
class TestWithAProjection:
    """What a real ``Projection`` stores, as the command shows and resets it."""

    def test_a_failed_event_shows_and_a_reset_rebuilds(
        self, db_url: URL, capsys: pytest.CaptureFixture[str]
    ) -> None:
        events = asyncio.run(fill(db_url, time.time()))
        asyncio.run(execute(db_url, TestReset.READ_MODEL))
        asyncio.run(self._project(db_url, failing="acct-4"))
        code, out, err = run(capsys, "projections", "--url", plain(db_url), "--json")
        assert code == ExitCode.OK, err
        [row] = json.loads(out)["slices"]
        # everything before acct-4's first event is stored, and acct-4 is named
        assert row["handled"] == 9 and row["lag_events"] == len(events) - 9
        assert row["offset"] == events[8][0]
        assert "acct-4" in row["last_error"] and row["owner"] is None

        code, out, err = run(
            capsys,
            "projections",
            "reset",
            "balances",
            "--yes",
            "--url",
            plain(db_url),
            "--clear",
            "DELETE FROM rm_balances",
        )
        assert code == ExitCode.OK, err
        assert asyncio.run(self._project(db_url, failing=None)) == len(events)
        balances = asyncio.run(query(db_url, "SELECT * FROM rm_balances ORDER BY entity_id"))
        assert balances == [(entity, 6) for entity in ENTITIES]  # 1 + 2 + 3, once each

    @staticmethod
    async def _project(url: URL, failing: str | None) -> int:
        async def handler(session: AsyncSession, envelope: EventEnvelope) -> None:
            if envelope.entity_id == failing:
                raise ValueError(f"no account {envelope.entity_id}")
            dialect = session.get_bind().dialect.name
            await session.execute(
                text(add_to("rm_balances", "entity_id", "balance", dialect)),
                {"k": envelope.entity_id, "n": envelope.event},
            )

        async with asyncio.timeout(30), SAJournal(url) as journal:
            projection = Projection("balances", journal, handler, on_error="stop")
            if failing is None:
                return await projection.catch_up()
            with pytest.raises(ProjectionFailed, match=failing):
                await projection.catch_up()
            return 0


def test_no_password_is_printed_when_the_read_models_database_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unreachable = f"postgresql://casty:{PASSWORD}@127.0.0.1:{free_port()}/reports"
    journal = f"sqlite:///{tmp_path / 'journal.db'}"
    asyncio.run(casty_sa.upgrade(journal))
    for argv in (
        ["projections", "--url", journal, "--offsets-url", unreachable],
        ["projections", "reset", "balances", "--yes", "--offsets-url", unreachable],
        ["projections", "reset", "balances", "--sql", f"--offsets-url={unreachable}"],
    ):
        code, out, err = run(capsys, *argv, "--connect-timeout", "2")
        assert code in (ExitCode.OK, ExitCode.DATABASE_ERROR), (argv, err)
        assert PASSWORD not in out + err, argv
        if "--sql" not in argv:
            assert code == ExitCode.DATABASE_ERROR and "casty:***@127.0.0.1" in err, err
