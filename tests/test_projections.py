"""Projections: a read model updated exactly once, in one transaction with its offset.

On a SQLite file and on PostgreSQL: ``catch_up`` applies every committed event once
and counts them; ``run`` follows new events until ``stop``; cancelling ``run`` at
many different moments of a batch and starting again ends with a read model equal
to the fold of all events; slices shared by two ``Projection`` objects of one
process, spread by ``max_slices``, taken over after ``stop()`` and after a lease
expires; ``reset`` clears the read model in the same transaction, also while
another object runs; status (lag, last error); a failing handler (rolled back,
visible, resumed after the fix; ``on_error="stop"``); the at-least-once mode; a read
model in another database than the journal; a commit whose outcome is unknown;
hostile constructor arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from casty import PersistedEvent
from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

import casty_sa
from casty_sa import (
    EventEnvelope,
    Projection,
    ProjectionBusy,
    ProjectionFailed,
    SAJournal,
)
from casty_sa.projections import LEASE_KEY, slice_of

from support.projections import eventually, fold

pytestmark = pytest.mark.shared_database

#: Seconds any one test may take.
BOUND = 60.0

APPLIED = (
    "CREATE TABLE applied (entity_id VARCHAR(255) NOT NULL, sequence_nr BIGINT NOT NULL, "
    "amount BIGINT NOT NULL, fence BIGINT NOT NULL)"
)


async def persist(journal: SAJournal, entities: int, per_entity: int, start: int = 1) -> None:
    """``per_entity`` events (amounts = sequence numbers) for each of ``entities`` entities."""
    for seq in range(start, start + per_entity):
        await asyncio.gather(
            *(
                journal.persist(f"acct-{n}", [PersistedEvent(seq, seq, float(seq))])
                for n in range(entities)
            )
        )


async def add_applied(session: AsyncSession, envelope: EventEnvelope) -> None:
    """The test handler: one row per event applied (no key: a duplicate shows)."""
    await session.execute(
        text("INSERT INTO applied VALUES (:entity_id, :seq, :amount, :fence)"),
        {
            "entity_id": envelope.entity_id,
            "seq": envelope.sequence_nr,
            "amount": envelope.event,
            "fence": session.info[LEASE_KEY].fence,
        },
    )


async def applied(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[str, int]]:
    async with sessions() as session:
        rows = await session.execute(
            text("SELECT entity_id, sequence_nr FROM applied ORDER BY entity_id, sequence_nr")
        )
        return [(row[0], row[1]) for row in rows]


@pytest.fixture
async def journal(new_journal: Callable[..., SAJournal]) -> AsyncIterator[SAJournal]:
    journal = new_journal()
    async with journal.engine.begin() as conn:
        await conn.execute(text(APPLIED))
    yield journal


@pytest.fixture
def sessions(journal: SAJournal) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(journal.engine)


class TestCatchUp:
    async def test_applies_every_event_once_and_counts_them(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 7, 5)
            projection = Projection("totals", journal, add_applied, batch_size=4)
            assert await projection.offset() is None
            assert await projection.catch_up() == 35
            assert await applied(sessions) == await fold(journal)
            last = [e async for e in journal.events()][-1]
            assert await projection.offset() == last.offset
            assert await projection.catch_up() == 0
            await persist(journal, 7, 1, start=6)
            assert await projection.catch_up() == 7
            assert await applied(sessions) == await fold(journal)
            status = await projection.status()
            assert [s.handled for s in status.slices] == [42]
            assert status.state == "stopped" and not status.slices[0].held

    async def test_each_slice_applies_its_own_entities(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 20, 3)
            projection = Projection("sliced", journal, add_applied, slices=3, batch_size=7)
            assert await projection.catch_up() == 60
            assert await applied(sessions) == await fold(journal)
            status = await projection.status()
            expected = [0, 0, 0]
            for n in range(20):
                expected[slice_of(f"acct-{n}", 3)] += 3
            assert [s.handled for s in status.slices] == expected
            last = [e async for e in journal.events()][-1].offset
            assert [await projection.offset(i) for i in range(3)] == [last] * 3

    async def test_refuses_while_a_live_worker_holds_a_slice(self, journal: SAJournal) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 2, 2)
            runner = Projection("busy", journal, add_applied)
            task = asyncio.create_task(runner.run())
            await eventually(lambda: _held(runner))
            with pytest.raises(ProjectionBusy, match=runner.owner):
                await Projection("busy", journal, add_applied).catch_up()
            await runner.stop()
            await task


@contextlib.asynccontextmanager
async def running(projection: Projection) -> AsyncIterator[asyncio.Task[None]]:
    """``projection.run()`` in a task, stopped (and its failure raised) on the way out."""
    task = asyncio.create_task(projection.run())
    try:
        yield task
    finally:
        await projection.stop()
        await task


async def _mine(projection: Projection, count: int) -> bool:
    return sum(s.mine for s in (await projection.status()).slices) == count


async def _count(sessions: async_sessionmaker[AsyncSession], count: int) -> bool:
    return len(await applied(sessions)) == count


async def _held(projection: Projection) -> bool:
    slices = (await projection.status()).slices
    return bool(slices) and all(s.held and s.mine for s in slices)


class TestRun:
    async def test_follows_new_events_until_stopped(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 3, 2)
            projection = Projection("live", journal, add_applied)
            task = asyncio.create_task(projection.run())
            await persist(journal, 3, 4, start=3)

            async def caught_up() -> bool:
                return len(await applied(sessions)) == 18

            await eventually(caught_up)
            assert (await projection.status()).state == "running"
            await projection.stop()
            await task
            assert await applied(sessions) == await fold(journal)
            status = await projection.status()
            assert status.state == "stopped" and not status.slices[0].held
            assert status.lag_events == 0 and status.lag_seconds == 0.0
            await persist(journal, 1, 1, start=7)  # after stop(): not applied
            assert len(await applied(sessions)) == 18
            assert (await projection.status()).lag_events == 1

    async def test_cancelled_at_any_moment_then_restarted_applies_each_event_once(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND * 2):
            await persist(journal, 10, 12)
            calls = 0
            cut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def counting(session: AsyncSession, envelope: EventEnvelope) -> None:
                nonlocal calls
                calls += 1
                if calls == target and not cut.done():
                    cut.set_result(None)
                await add_applied(session, envelope)

            projection = Projection("cancelled", journal, counting, batch_size=9)
            progress = []
            for moment in range(60):
                remaining = len(await fold(journal)) - len(await applied(sessions))
                if remaining == 0:
                    await persist(journal, 10, 1, start=13 + moment)
                    remaining = 10
                # the cut comes after the handler's call number ``target``, a few steps later
                target, calls = 1 + moment * 3 % remaining, 0
                cut = asyncio.get_running_loop().create_future()
                task = asyncio.create_task(projection.run())
                await asyncio.wait([cut, task], return_when=asyncio.FIRST_COMPLETED)
                for _ in range(moment % 7):
                    await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                assert task.cancelled() or task.exception() is None
                progress.append(len(await applied(sessions)))
            assert len(set(progress)) > 5  # cut at many different points of the work
            await projection.catch_up()
            assert await applied(sessions) == await fold(journal)

    async def test_run_twice_at_once_is_refused(self, journal: SAJournal) -> None:
        async with asyncio.timeout(BOUND):
            projection = Projection("twice", journal, add_applied)
            task = asyncio.create_task(projection.run())
            await eventually(lambda: _held(projection))
            with pytest.raises(RuntimeError, match="already running"):
                await projection.catch_up()
            await projection.stop()
            await task


class TestSlices:
    async def test_two_objects_share_the_slices_and_apply_each_event_once(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 30, 2)
            options: dict[str, Any] = {"slices": 4, "batch_size": 5}
            one = Projection("shared", journal, add_applied, max_slices=2, **options)
            two = Projection("shared", journal, add_applied, **options)
            async with running(one):
                await eventually(lambda: _mine(one, 2))
                async with running(two):
                    await persist(journal, 30, 3, start=3)
                    await eventually(lambda: _mine(two, 2))  # max_slices left it two
                    await eventually(lambda: _count(sessions, 150))
                    status = await one.status()
                    assert {s.owner for s in status.slices} == {one.owner, two.owner}
                    # takeover after stop(): within a poll, nothing applied twice
                    await one.stop()
                    await eventually(lambda: _mine(two, 4))
                    await persist(journal, 30, 1, start=6)
                    await eventually(lambda: _count(sessions, 180))
            assert await applied(sessions) == await fold(journal)

    async def test_an_abandoned_lease_is_taken_over_once_it_expires(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 5, 2)
            options: dict[str, Any] = {"lease_seconds": 0.6}
            abandoned = Projection("abandoned", journal, add_applied, **options)
            # holds the lease, then its process "dies": no stop(), no release, no renewal
            await abandoned.reset()  # makes the projection's rows
            assert await abandoned._leases.acquire(0) is not None
            survivor = Projection("abandoned", journal, add_applied, **options)
            with pytest.raises(ProjectionBusy):
                await survivor.catch_up()
            task = asyncio.create_task(survivor.run())

            async def done() -> bool:
                return len(await applied(sessions)) == 10

            await eventually(done)
            status = await survivor.status()
            assert status.slices[0].owner == survivor.owner and status.slices[0].held
            await survivor.stop()
            await task


class TestReset:
    async def test_reset_clears_the_read_model_in_the_same_transaction(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 4, 3)
            projection = Projection("rebuilt", journal, add_applied)
            assert await projection.catch_up() == 12

            async def failing_clear(session: AsyncSession) -> None:
                await session.execute(text("DELETE FROM applied"))
                raise RuntimeError("clear failed")

            with pytest.raises(RuntimeError, match="clear failed"):
                await projection.reset(failing_clear)
            assert len(await applied(sessions)) == 12  # nothing of that reset happened
            assert await projection.offset() is not None

            async def clear(session: AsyncSession) -> None:
                await session.execute(text("DELETE FROM applied"))

            await projection.reset(clear)
            assert await projection.offset() is None
            assert await applied(sessions) == []
            assert await projection.catch_up() == 12
            assert await applied(sessions) == await fold(journal)

    async def test_reset_while_another_object_runs_starts_it_over(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 6, 4)
            runner = Projection("reset-live", journal, add_applied, batch_size=3, slices=2)
            task = asyncio.create_task(runner.run())

            async def all_applied() -> bool:
                return len(await applied(sessions)) == 24

            await eventually(all_applied)
            fences = await _fences(sessions)

            async def clear(session: AsyncSession) -> None:
                await session.execute(text("DELETE FROM applied"))

            await Projection("reset-live", journal, add_applied, slices=2).reset(clear)
            await eventually(all_applied)
            await runner.stop()
            await task
            assert await applied(sessions) == await fold(journal)
            assert min(await _fences(sessions)) > max(fences)  # applied again, by the new run


async def _fences(sessions: async_sessionmaker[AsyncSession]) -> list[int]:
    async with sessions() as session:
        return [row[0] for row in await session.execute(text("SELECT fence FROM applied"))]


class TestStatus:
    async def test_lag_in_events_and_seconds(self, journal: SAJournal) -> None:
        async with asyncio.timeout(BOUND):
            projection = Projection("lagging", journal, add_applied, slices=2)
            await projection.reset()
            status = await projection.status()
            assert (status.lag_events, status.lag_seconds, status.last_error) == (0, 0.0, None)
            await journal.persist("old-1", [PersistedEvent(1, 1, 1000.0)])  # long ago
            await persist(journal, 3, 1, start=1)
            status = await projection.status()
            assert [s.lag_events for s in status.slices] == [4, 4]  # every slice reads all
            assert status.lag_seconds > 1e9  # since 1970 + 1000 s
            assert await projection.catch_up() == 4
            status = await projection.status()
            assert (status.lag_events, status.lag_seconds) == (0, 0.0)


def failing_on(entity_id: str, sequence_nr: int, broken: list[bool]) -> Any:
    """A handler that fails on one event while ``broken[0]`` holds."""

    async def handler(session: AsyncSession, envelope: EventEnvelope) -> None:
        await add_applied(session, envelope)
        if broken[0] and (envelope.entity_id, envelope.sequence_nr) == (entity_id, sequence_nr):
            raise ValueError(f"cannot apply {entity_id} {sequence_nr}")

    return handler


class TestFailingHandler:
    async def test_rolls_back_blocks_visibly_and_resumes_after_the_fix(
        self,
        journal: SAJournal,
        sessions: async_sessionmaker[AsyncSession],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 4, 3)
            broken = [True]
            handler = failing_on("acct-2", 2, broken)
            options: dict[str, Any] = {"batch_size": 100, "retry_delay": 0.01}
            projection = Projection("failing", journal, handler, **options)
            everything = [e async for e in journal.events()]
            failing = next(e for e in everything if (e.entity_id, e.sequence_nr) == ("acct-2", 2))
            before = everything[: everything.index(failing)]
            caplog.set_level(logging.WARNING, logger="casty_sa.projections")
            async with running(projection):

                async def blocked() -> bool:
                    status = await projection.status()
                    return status.last_error is not None and len(caplog.records) >= 3

                await eventually(blocked)
                # the events before the failing one committed as a batch of their own; the
                # failing one is retried alone and nothing after it is applied
                assert await projection.offset() == before[-1].offset
                assert await applied(sessions) == sorted((e[1], e[2]) for e in before)
                status = await projection.status()
                assert status.lag_events == len(everything) - len(before)
                for text in ("'acct-2'", "sequence number 2", failing.offset, "ValueError"):
                    assert text in (status.last_error or "")
                    assert text in caplog.records[-1].getMessage()
                assert "attempt" in caplog.records[-1].getMessage()
                broken[0] = False
                await eventually(lambda: _count(sessions, len(everything)))
            assert await applied(sessions) == await fold(journal)
            assert (await projection.status()).last_error is None

    async def test_on_error_stop_raises_naming_the_event(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 3, 2)
            broken = [True]
            handler = failing_on("acct-1", 2, broken)
            projection = Projection("stopping", journal, handler, on_error="stop")
            everything = [e async for e in journal.events()]
            failing = next(e for e in everything if (e.entity_id, e.sequence_nr) == ("acct-1", 2))
            with pytest.raises(ProjectionFailed, match="'acct-1' sequence number 2") as raised:
                await projection.run()
            assert failing.offset in str(raised.value)
            assert isinstance(raised.value.__cause__, ValueError)
            status = await projection.status()
            assert status.state == "failed" and not status.slices[0].held
            assert await projection.offset() == everything[everything.index(failing) - 1].offset
            with pytest.raises(ProjectionFailed):
                await projection.catch_up()
            broken[0] = False
            assert await projection.catch_up() == len(everything) - everything.index(failing)
            assert await applied(sessions) == await fold(journal)


def batch_adding(calls: list[int], broken: tuple[str, int] | None = None) -> Any:
    """A batch handler: one ``executemany`` per call; fails on ``broken`` while it is set."""

    async def handler(session: AsyncSession, envelopes: Sequence[EventEnvelope]) -> None:
        calls.append(len(envelopes))
        fence = session.info[LEASE_KEY].fence
        rows = [
            {"entity_id": e.entity_id, "seq": e.sequence_nr, "amount": e.event, "fence": fence}
            for e in envelopes
        ]
        await session.execute(
            text("INSERT INTO applied VALUES (:entity_id, :seq, :amount, :fence)"), rows
        )
        if broken and any((e.entity_id, e.sequence_nr) == broken for e in envelopes):
            raise ValueError(f"cannot apply {broken}")

    return handler


class TestBatched:
    async def test_one_call_per_batch_applies_every_event_once(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 6, 5)
            calls: list[int] = []
            projection = Projection.batched("batched", journal, batch_adding(calls), batch_size=8)
            assert await projection.catch_up() == 30
            assert await applied(sessions) == await fold(journal)
            assert sum(calls) == 30 and max(calls) == 8 and len(calls) == 4

    async def test_a_failing_batch_is_split_to_its_event_and_resumes_after_the_fix(
        self,
        journal: SAJournal,
        sessions: async_sessionmaker[AsyncSession],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 4, 3)
            everything = [e async for e in journal.events()]
            failing = next(e for e in everything if (e.entity_id, e.sequence_nr) == ("acct-2", 2))
            before = everything[: everything.index(failing)]
            calls: list[int] = []
            handler = batch_adding(calls, ("acct-2", 2))
            options: dict[str, Any] = {"batch_size": 100, "retry_delay": 0.01}
            projection = Projection.batched("split", journal, handler, **options)
            caplog.set_level(logging.INFO, logger="casty_sa.projections")
            async with running(projection):

                async def blocked() -> bool:
                    return (await projection.status()).last_error is not None

                await eventually(blocked)
                assert await projection.offset() == before[-1].offset
                assert await applied(sessions) == sorted((e[1], e[2]) for e in before)
                status = await projection.status()
                for part in ("'acct-2'", "sequence number 2", failing.offset, "ValueError"):
                    assert part in (status.last_error or "")
                assert calls[0] == len(everything)  # the whole batch first, then one at a time
                assert set(calls[1:]) == {1}
                assert any("one at a time" in r.getMessage() for r in caplog.records)
                projection_fixed = Projection.batched("split", journal, batch_adding(calls))
            assert await projection_fixed.catch_up() == len(everything) - len(before)
            assert await applied(sessions) == await fold(journal)
            assert (await projection_fixed.status()).last_error is None

    async def test_a_batch_handler_that_commits_is_a_failure_and_nothing_is_applied(
        self, journal: SAJournal, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 3, 2)
            calls: list[int] = []
            adding = batch_adding(calls)

            async def commits(session: AsyncSession, envelopes: Sequence[EventEnvelope]) -> None:
                await adding(session, envelopes)
                await session.commit()  # the projection's transaction is not the handler's

            projection = Projection.batched("commits", journal, commits, on_error="stop")
            with pytest.raises(ProjectionFailed, match="must not commit"):
                await projection.catch_up()
            assert await applied(sessions) == [] and await projection.offset() is None
            fixed = Projection.batched("commits", journal, adding)
            assert await fixed.catch_up() == 6
            assert await applied(sessions) == await fold(journal)


class TestAtLeastOnce:
    async def test_handler_outside_the_database_sees_every_event(self, journal: SAJournal) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 5, 4)
            seen: list[tuple[str, int]] = []
            broken = [True]

            async def handler(envelope: EventEnvelope) -> None:
                if broken[0] and (envelope.entity_id, envelope.sequence_nr) == ("acct-3", 3):
                    raise ConnectionError("broker down")
                seen.append((envelope.entity_id, envelope.sequence_nr))

            projection = Projection.at_least_once(
                "mailer", journal, handler, batch_size=6, retry_delay=0.01, slices=2
            )
            async with running(projection):
                await eventually(lambda: _has_error(projection))
                broken[0] = False
                await eventually(lambda: _caught_up(projection))
            # the events before the failing one were not handed out again
            assert sorted(seen) == await fold(journal)
            assert len(seen) == len(set(seen))


async def _has_error(projection: Projection) -> bool:
    return (await projection.status()).last_error is not None


async def _caught_up(projection: Projection) -> bool:
    status = await projection.status()
    return status.lag_events == 0 and bool(status.slices)


class TestAnotherDatabase:
    async def test_read_model_in_another_database_than_the_journal(
        self,
        journal: SAJournal,
        backend: str,
        tmp_path: Path,
        new_server_db: Callable[..., Awaitable[URL]],
    ) -> None:
        async with asyncio.timeout(BOUND):
            if backend == "sqlite":
                url: URL | str = f"sqlite+aiosqlite:///{tmp_path / 'readmodel.db'}"
                await casty_sa.upgrade(url)
            else:
                url = await new_server_db(migrated=True)
            engine = create_async_engine(url)
            try:
                async with engine.begin() as conn:
                    await conn.execute(text(APPLIED))
                other = async_sessionmaker(engine)
                await persist(journal, 4, 3)
                projection = Projection("elsewhere", journal, add_applied, sessions=other)
                assert await projection.catch_up() == 12
                assert await applied(other) == await fold(journal)
                async with journal.engine.connect() as conn:
                    rows = await conn.execute(text("SELECT count(*) FROM applied"))
                    assert rows.scalar() == 0  # nothing in the journal's database
                    offsets = await conn.execute(
                        text("SELECT count(*) FROM casty_sa_projection_offsets")
                    )
                    assert offsets.scalar() == 0
            finally:
                await engine.dispose()


class _CommitFails(AsyncSession):
    """A session whose commit raises after (``landed``) or instead of committing, once."""

    plan: ClassVar[list[bool]] = []

    async def commit(self) -> None:
        if LEASE_KEY in self.info and self.plan:
            landed = self.plan.pop(0)
            if landed:
                await super().commit()
            raise ConnectionResetError(f"connection lost at commit (landed: {landed})")
        await super().commit()


class TestUnknownCommitOutcome:
    @pytest.mark.parametrize("landed", [True, False])
    async def test_resolved_by_reading_the_offset_again(
        self,
        journal: SAJournal,
        sessions: async_sessionmaker[AsyncSession],
        landed: bool,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        async with asyncio.timeout(BOUND):
            await persist(journal, 3, 3)
            failing = async_sessionmaker(journal.engine, class_=_CommitFails)
            _CommitFails.plan = [landed]
            projection = Projection(
                "unknown", journal, add_applied, sessions=failing, retry_delay=0.01, batch_size=4
            )
            caplog.set_level(logging.WARNING, logger="casty_sa.projections")
            assert await projection.catch_up() == 9
            assert await applied(sessions) == await fold(journal)
            said = "landed" if landed else "did not land"
            assert any(f"shows it {said}" in r.getMessage() for r in caplog.records)


class TestHostileInput:
    @pytest.mark.parametrize(
        ("options", "error"),
        [
            ({"name": ""}, "name must be"),
            ({"name": "x" * 256}, "name must be"),
            ({"name": "a\x00b"}, "NUL"),
            ({"name": 7}, "name must be"),
            ({"handler": "not callable"}, "handler must be"),
            ({"batch_size": 0}, "batch_size"),
            ({"batch_size": True}, "batch_size"),
            ({"slices": 0}, "slices"),
            ({"slices": 40000}, "slices"),
            ({"slices": 2, "max_slices": 3}, "max_slices"),
            ({"on_error": "ignore"}, "on_error"),
            ({"retry_delay": float("nan")}, "retry_delay"),
            ({"retry_delay": 1.0, "max_retry_delay": 0.5}, "max_retry_delay"),
            ({"lease_seconds": 0}, "lease_seconds"),
            ({"lease_seconds": float("inf")}, "lease_seconds"),
            ({"entity_prefix": 5}, "entity_prefix"),
            ({"event_types": "app.Deposited"}, "event_types"),
            ({"sessions": "sqlite://"}, "sessions"),
            ({"journal": "sqlite://"}, "journal must be"),
        ],
    )
    async def test_refused_at_construction(
        self, journal: SAJournal, options: dict[str, Any], error: str
    ) -> None:
        arguments: dict[str, Any] = {"name": "p", "journal": journal, "handler": add_applied}
        arguments.update(options)
        with pytest.raises((TypeError, ValueError), match=error):
            Projection(**arguments)

    async def test_a_slice_out_of_range_and_a_bad_clear(self, journal: SAJournal) -> None:
        projection = Projection("p", journal, add_applied, slices=2)
        with pytest.raises(ValueError, match="slice"):
            await projection.offset(2)
        with pytest.raises(TypeError, match="clear"):
            await projection.reset("DELETE FROM applied")  # type: ignore[arg-type]
