"""What docs/projections.md promises and the other projection tests do not show.

- A projection started with another number of slices than stored refuses
  (``SliceCountChanged``) until a reset makes the rows again.
- A database error is retried with backoff even with ``on_error="stop"``, which stops on
  a handler's failure only.
- The DBA's steps for a read model in another PostgreSQL database, run as written: the
  offsets table from ``casty-sa upgrade --sql 0002:0003``, the documented grants, and a
  role holding only those running a projection, resetting it and watching it with
  ``casty-sa projections``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import ClassVar

import pytest
from casty import PersistedEvent
from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from casty_sa import EventEnvelope, Projection, ProjectionStatus, SAJournal, SliceCountChanged
from casty_sa.cli import ExitCode, main
from casty_sa.projections import LEASE_KEY

from support.dbtools import execute, plain, query
from support.projections import add_to

#: Seconds any one test may take.
BOUND = 60.0
DOC = Path(__file__).resolve().parents[1] / "docs" / "projections.md"
ENTITIES = ("acct-1", "acct-2", "acct-3", "acct-4", "acct-5")
BALANCES = "CREATE TABLE balances (account VARCHAR(100) PRIMARY KEY, balance BIGINT NOT NULL)"


async def fill(journal: SAJournal, start: int = 1, count: int = 2) -> None:
    """``count`` events per entity from ``start``, each event's amount its sequence number."""
    for entity in ENTITIES:
        events = [PersistedEvent(n, n, float(n)) for n in range(start, start + count)]
        await journal.persist(entity, events)


async def add(session: AsyncSession, envelope: EventEnvelope) -> None:
    dialect = session.get_bind().dialect.name
    await session.execute(
        text(add_to("balances", "account", "balance", dialect)),
        {"k": envelope.entity_id, "n": envelope.event},
    )


async def clear(session: AsyncSession) -> None:
    await session.execute(text("DELETE FROM balances"))


async def balances(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    async with sessions() as session:
        rows = await session.execute(text("SELECT account, balance FROM balances"))
        return {row[0]: row[1] for row in rows}


def folded(events_per_entity: int) -> dict[str, int]:
    """The balances once every entity's events 1..n are applied once each."""
    return {entity: sum(range(1, events_per_entity + 1)) for entity in ENTITIES}


async def until(holds: Callable[[ProjectionStatus], bool], projection: Projection) -> None:
    """Wait (the caller bounds it) until the projection's status satisfies ``holds``."""
    while not holds(await projection.status()):  # noqa: ASYNC110 - a row sets no event
        await asyncio.sleep(0.02)


@pytest.fixture
async def journal(new_journal: Callable[..., SAJournal]) -> AsyncIterator[SAJournal]:
    journal = new_journal()
    async with journal.engine.begin() as conn:
        await conn.execute(text(BALANCES))
    yield journal


@pytest.mark.shared_database
async def test_another_number_of_slices_is_refused_until_a_reset(journal: SAJournal) -> None:
    sessions = async_sessionmaker(journal.engine)
    async with asyncio.timeout(BOUND):
        await fill(journal)
        assert await Projection("sliced", journal, add, slices=2).catch_up() == 10
        three = Projection("sliced", journal, add, slices=3)
        with pytest.raises(SliceCountChanged, match="stored with 2 slices, not 3"):
            await three.catch_up()
        with pytest.raises(SliceCountChanged):
            await three.run()
        assert await balances(sessions) == folded(2)  # nothing applied twice meanwhile

        await three.reset(clear)
        assert await three.catch_up() == 10
        assert [s.slice for s in (await three.status()).slices] == [0, 1, 2]
        assert await balances(sessions) == folded(2)
        with pytest.raises(SliceCountChanged, match="stored with 3 slices, not 2"):
            await Projection("sliced", journal, add, slices=2).catch_up()


class _CommitFailsOnce(AsyncSession):
    """A session whose first batch commit is lost (a database error, not the handler's)."""

    failures: ClassVar[list[str]] = []

    async def commit(self) -> None:
        if LEASE_KEY in self.info and self.failures:
            raise ConnectionResetError(self.failures.pop())
        await super().commit()


@pytest.mark.shared_database
async def test_a_database_error_is_retried_even_with_on_error_stop(
    journal: SAJournal, caplog: pytest.LogCaptureFixture
) -> None:
    async with asyncio.timeout(BOUND):
        await fill(journal)
        _CommitFailsOnce.failures = ["connection lost at commit"]
        flaky = async_sessionmaker(journal.engine, class_=_CommitFailsOnce)
        projection = Projection(
            "flaky", journal, add, sessions=flaky, on_error="stop", retry_delay=0.01
        )
        caplog.set_level(logging.WARNING, logger="casty_sa.projections")
        assert await projection.catch_up() == 10
        assert _CommitFailsOnce.failures == []
        assert await balances(async_sessionmaker(journal.engine)) == folded(2)
        said = [r.getMessage() for r in caplog.records]
        assert any("a database or journal error" in m and "attempt 1" in m for m in said), said


# -- the DBA's steps ------------------------------------------------------------------------


def _section_sql() -> list[str]:
    """The SQL blocks of the page's "A read model in another database", in order."""
    page = DOC.read_text()
    start = page.index("## A read model in another database")
    section = page[start : page.index("\n## ", start + 1)]
    return [
        re.sub(r"^ {4}", "", body, flags=re.M)
        for body in re.findall(r"^ *```sql\n(.*?)^ *```", section, re.S | re.M)
    ]


def _offsets_ddl() -> str:
    """Step 1: the table's statements, cut from ``casty-sa upgrade --sql`` as the page says."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["upgrade", "--sql", "--url", "postgresql://", "0002:0003"]) == ExitCode.OK
    script = out.getvalue()
    start = script.index("Running upgrade 0002 -> 0003")
    return script[script.index("\n", start) : script.index("UPDATE casty_sa_alembic_version")]


def _statements(block: str) -> list[str]:
    return [s.strip() for s in re.sub(r"--[^\n]*", "", block).split(";") if s.strip()]


@pytest.mark.only_backends("postgresql")
def test_the_dba_steps_for_a_read_model_in_another_database(
    db_url: URL,
    new_postgres_db: Callable[..., Awaitable[URL]],
    postgres_server_url: URL,
    capsys: pytest.CaptureFixture[str],
) -> None:
    suffix = uuid.uuid4().hex[:8]
    roles = {name: f"{name}_{suffix}" for name in ("casty_app", "casty_reader")}
    readmodel = asyncio.run(_bare(new_postgres_db))

    def named(sql: str) -> list[str]:
        return _statements(re.sub(r"\b(casty_app|casty_reader)\b", lambda m: roles[m[1]], sql))

    def as_role(url: URL, role: str) -> URL:
        return url.set(username=roles[role], password="change-me")

    on_readmodel, on_journal, watch_readmodel, watch_journal = _section_sql()
    creates = [f"CREATE ROLE {role} LOGIN PASSWORD 'change-me'" for role in roles.values()]
    asyncio.run(execute(postgres_server_url, *creates))
    try:
        asyncio.run(execute(readmodel, _offsets_ddl(), BALANCES))  # step 1, and the app's table
        asyncio.run(execute(readmodel, *named(on_readmodel), *named(watch_readmodel)))
        asyncio.run(execute(db_url, *named(on_journal), *named(watch_journal)))
        asyncio.run(
            _project_as(db_url, as_role(db_url, "casty_app"), as_role(readmodel, "casty_app"))
        )

        # step 4: watched by the reader; reset by the application with its read model
        code = main(
            [
                "projections",
                "--json",
                "--url",
                plain(as_role(db_url, "casty_reader")),
                "--offsets-url",
                plain(as_role(readmodel, "casty_reader")),
            ]
        )
        out, err = capsys.readouterr()
        assert code == ExitCode.OK, err
        [row] = json.loads(out)["slices"]
        assert (row["projection"], row["handled"], row["lag_events"]) == ("balances", 15, 0)
        argv = ["projections", "reset", "balances", "--yes", "--clear", "DELETE FROM balances"]
        code = main([*argv, "--offsets-url", plain(as_role(readmodel, "casty_app"))])
        assert code == ExitCode.OK, capsys.readouterr().err
        assert asyncio.run(query(readmodel, "SELECT count(*) FROM balances")) == [(0,)]
        code = main([*argv, "--offsets-url", plain(as_role(readmodel, "casty_reader"))])
        assert code == ExitCode.DATABASE_ERROR
        assert "permission denied" in capsys.readouterr().err
    finally:
        drop = f"DROP OWNED BY {', '.join(roles.values())}"
        asyncio.run(execute(readmodel, drop))
        asyncio.run(execute(db_url, drop))
        asyncio.run(execute(postgres_server_url, f"DROP ROLE {', '.join(roles.values())}"))


async def _bare(new_postgres_db: Callable[..., Awaitable[URL]]) -> URL:
    return await new_postgres_db(migrated=False)


async def _project_as(owner: URL, journal_url: URL, readmodel_url: URL) -> None:
    """Steps 2 and 3 are enough: the role catches up, follows, records a failure, resets."""
    async with asyncio.timeout(BOUND), SAJournal(owner) as writer:
        await fill(writer)
        engine = create_async_engine(readmodel_url)
        sessions = async_sessionmaker(engine)
        broken = [True]

        async def handler(session: AsyncSession, envelope: EventEnvelope) -> None:
            if broken[0] and envelope.sequence_nr == 3:
                raise ValueError("no such account")
            await add(session, envelope)

        try:
            async with SAJournal(journal_url) as journal:
                projection = Projection("balances", journal, handler, sessions=sessions)
                assert await projection.catch_up() == 10
                running = asyncio.create_task(projection.run())
                await fill(writer, start=3, count=1)
                await until(lambda s: s.last_error is not None, projection)  # stored
                broken[0] = False
                await until(lambda s: s.lag_events == 0, projection)
                await projection.stop()
                await running
                assert await balances(sessions) == folded(3)
                await projection.reset(clear)
                assert await projection.catch_up() == 15
                assert await balances(sessions) == folded(3)
        finally:
            await engine.dispose()
