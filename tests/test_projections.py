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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from casty import PersistedEvent
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from casty_sa import (
    EventEnvelope,
    Projection,
    ProjectionBusy,
    SAJournal,
)
from casty_sa.projections import LEASE_KEY, slice_of

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


async def fold(journal: SAJournal) -> list[tuple[str, int]]:
    """Every event of the journal, as the read model should hold it (each once)."""
    return sorted([(e.entity_id, e.sequence_nr) async for e in journal.events()])


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    """Wait (bounded) until ``check()`` holds: a condition, looked at every 20 ms."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 (a row in a table sets no event)
            await asyncio.sleep(0.02)


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
            projection = Projection("cancelled", journal, add_applied, batch_size=9)
            for moment in range(0, 400, 7):
                task = asyncio.create_task(projection.run())
                for _ in range(moment):
                    await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                if moment % 5 == 0:
                    await persist(journal, 10, 1, start=13 + moment // 5 // 7)
            assert await projection.catch_up() >= 0
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
