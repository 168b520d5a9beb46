"""Write semantics: atomic calls, conflicts, serializer failures, cancellation, sharing.

Every test runs on each setup of ``conftest.MATRIX``: SQLite file and memory, an application's
engine, PostgreSQL, each with group commit on and off.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import create_async_engine

from casty_sa import (
    JournalClosed,
    JournalError,
    PayloadEncodeError,
    SAJournal,
    SequenceConflict,
)

from support import pools

pytestmark = pytest.mark.matrix


def ev(seq: int, event: Any = None) -> PersistedEvent[Any]:
    return PersistedEvent(seq, event if event is not None else f"e{seq}", float(seq))


async def seqs(journal: SAJournal, entity_id: str) -> list[int]:
    return [e.sequence_nr for e in await journal.load(entity_id)]


class TestAtomicPersist:
    async def test_conflict_stores_nothing_of_the_call(self, journal: SAJournal) -> None:
        await journal.persist("acct", [ev(1), ev(2), ev(3)])
        with pytest.raises(SequenceConflict) as info:
            await journal.persist("acct", [ev(3, "dup"), ev(4), ev(5)])
        assert (info.value.entity_id, info.value.sequence_nr) == ("acct", 3)
        assert await seqs(journal, "acct") == [1, 2, 3]
        assert (await journal.load("acct", 3))[0].event == "e3"

    async def test_conflict_in_the_middle_names_the_stored_number(self, journal: SAJournal) -> None:
        await journal.persist("acct", [ev(5)])
        with pytest.raises(SequenceConflict) as info:
            await journal.persist("acct", [ev(4), ev(5), ev(6)])
        assert info.value.sequence_nr == 5
        assert await seqs(journal, "acct") == [5]

    async def test_serializer_failure_stores_nothing(self, journal: SAJournal) -> None:
        with pytest.raises(PayloadEncodeError) as info:
            await journal.persist("acct", [ev(1), ev(2, lambda: None), ev(3)])
        assert info.value.entity_id == "acct" and info.value.sequence_nr == 2
        assert await journal.load("acct") == []
        await journal.persist("acct", [ev(1)])  # still usable
        assert await seqs(journal, "acct") == [1]

    async def test_serializer_returning_non_bytes_is_refused(
        self, new_journal: Callable[..., SAJournal]
    ) -> None:
        journal = new_journal(serialize=str)
        with pytest.raises(PayloadEncodeError, match="not bytes"):
            await journal.persist("acct", [ev(1)])
        with pytest.raises(PayloadEncodeError):
            await journal.save_snapshot("acct", Snapshot(1, "s", 1.0))
        assert await journal.load("acct") == []
        assert await journal.load_snapshot("acct") is None

    async def test_conflict_is_a_journal_error(self) -> None:
        assert issubclass(SequenceConflict, JournalError)


class TestSharedDatabase:
    @pytest.mark.shared_database
    async def test_two_journals_see_each_other_and_conflict(
        self, new_journal: Callable[..., SAJournal]
    ) -> None:
        first, second = new_journal(), new_journal()
        await first.persist("acct", [ev(1, "from first")])
        assert [e.event for e in await second.load("acct")] == ["from first"]
        with pytest.raises(SequenceConflict):
            await second.persist("acct", [ev(1, "from second")])
        await second.persist("acct", [ev(2, "from second")])
        assert [e.event for e in await first.load("acct")] == ["from first", "from second"]
        await second.save_snapshot("acct", Snapshot(2, "snap", 1.0))
        assert await first.load_snapshot("acct") == Snapshot(2, "snap", 1.0)

    @pytest.mark.shared_database
    async def test_racing_writers_of_one_sequence_number_one_wins(
        self, new_journal: Callable[..., SAJournal]
    ) -> None:
        journals = [new_journal() for _ in range(4)]
        results = await asyncio.gather(
            *(j.persist("acct", [ev(1, i), ev(2, i)]) for i, j in enumerate(journals)),
            return_exceptions=True,
        )
        winners = [i for i, r in enumerate(results) if r is None]
        assert len(winners) == 1
        assert all(isinstance(r, SequenceConflict) for r in results if r is not None)
        assert [e.event for e in await journals[0].load("acct")] == [winners[0]] * 2

    async def test_application_engine_is_shared_and_left_open(self, db_url: URL) -> None:
        engine = create_async_engine(db_url)
        pools.watch(engine)
        try:
            journal = SAJournal(engine)
            assert journal.engine is engine
            await journal.persist("acct", [ev(1)])
            await journal.close()
            async with engine.connect() as conn:  # still usable: not disposed
                assert (await conn.exec_driver_sql("select 1")).scalar() == 1
            async with SAJournal(engine) as again:
                assert await seqs(again, "acct") == [1]
            assert pools.checked_out(engine) == 0
        finally:
            await engine.dispose()


class TestConcurrency:
    async def test_many_concurrent_writers(self, journal: SAJournal) -> None:
        async def writer(n: int) -> None:
            for seq in range(1, 11):
                await journal.persist(f"e{n}", [ev(seq, n)])

        await asyncio.gather(*(writer(n) for n in range(100)))
        loaded = await asyncio.gather(*(journal.load(f"e{n}") for n in range(100)))
        for n, events in enumerate(loaded):
            assert [e.sequence_nr for e in events] == list(range(1, 11))
            assert {e.event for e in events} == {n}

    async def test_group_commit_off_behaves_the_same(
        self, new_journal: Callable[..., SAJournal]
    ) -> None:
        journal = new_journal(group_commit=False)
        await asyncio.gather(*(journal.persist(f"e{n}", [ev(1), ev(2)]) for n in range(50)))
        with pytest.raises(SequenceConflict):
            await journal.persist("e0", [ev(2)])
        assert all([await seqs(journal, f"e{n}") == [1, 2] for n in range(50)])

    async def test_memory_database_is_one_database(self) -> None:
        async with SAJournal("sqlite://") as journal:
            await asyncio.gather(*(journal.persist(f"e{n}", [ev(1)]) for n in range(50)))
            loaded = await asyncio.gather(*(journal.load(f"e{n}") for n in range(50)))
            assert all(len(events) == 1 for events in loaded)


class TestCancellation:
    async def test_cancelled_persist_is_all_or_nothing(
        self, new_journal: Callable[..., SAJournal]
    ) -> None:
        journal = new_journal()
        await journal.start()
        rng = random.Random(7)
        batch = 20
        for round_ in range(30):
            task = asyncio.create_task(
                journal.persist(f"e{round_}", [ev(s, b"x" * 1000) for s in range(1, batch + 1)])
            )
            await asyncio.sleep(rng.uniform(0, 0.004))  # a random point of the call
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # a cancelled caller's write still runs to its end: wait until no task is left
        for _ in range(250):
            if asyncio.all_tasks() <= {asyncio.current_task()}:
                break
            await asyncio.sleep(0.02)
        assert asyncio.all_tasks() <= {asyncio.current_task()}
        for round_ in range(30):
            stored = await seqs(journal, f"e{round_}")
            assert stored in ([], list(range(1, batch + 1))), stored
            # the journal keeps working for that entity
            nxt = (stored[-1] if stored else 0) + 1
            await journal.persist(f"e{round_}", [ev(nxt)])
            assert (await seqs(journal, f"e{round_}"))[-1] == nxt


class TestLifecycle:
    async def test_closed_journal_refuses_calls(
        self, new_journal: Callable[..., SAJournal]
    ) -> None:
        journal = new_journal()
        await journal.persist("acct", [ev(1)])
        await journal.close()
        await journal.close()  # idempotent
        with pytest.raises(JournalClosed):
            await journal.persist("acct", [ev(2)])
        with pytest.raises(JournalClosed):
            await journal.load("acct")

    @pytest.mark.shared_database
    async def test_close_waits_for_queued_writes(
        self, new_journal: Callable[..., SAJournal]
    ) -> None:
        """Writes already handed to the journal when close() runs are written before it
        returns (a write that comes during the first start is refused instead: see below)."""
        journal = new_journal()
        await journal.start()
        tasks = [asyncio.create_task(journal.persist(f"e{n}", [ev(1)])) for n in range(50)]
        for _ in range(3):
            await asyncio.sleep(0)  # every call is past start() and queued or in flight
        await journal.close()
        assert all(task.done() for task in tasks), "close() returned before queued writes"
        assert [task.result() for task in tasks] == [None] * 50
        async with new_journal() as again:
            assert all([await seqs(again, f"e{n}") == [1] for n in range(50)])

    @pytest.mark.parametrize("call", ["persist", "load"])
    async def test_close_during_the_first_start_leaves_nothing_running(
        self, new_journal: Callable[..., SAJournal], call: str
    ) -> None:
        """A call still inside the journal's first start() when close() runs either ends
        before close() returns or is refused: nothing runs on the engine after close."""
        journal = new_journal()
        task: asyncio.Future[Any]
        if call == "persist":
            task = asyncio.ensure_future(journal.persist("late", [ev(1)]))
        else:
            task = asyncio.ensure_future(journal.load("late"))
        await asyncio.sleep(0)  # the call now waits for the schema check
        await journal.close()
        done_when_closed = task.done()
        outcome: Any = (await asyncio.gather(task, return_exceptions=True))[0]
        assert done_when_closed or isinstance(outcome, JournalClosed), outcome
        assert outcome in (None, []) or isinstance(outcome, JournalClosed), outcome
        assert pools.checked_out(journal.engine) == 0

    @pytest.mark.shared_database
    async def test_a_close_cancelled_half_way_is_finished_by_the_next(
        self, new_journal: Callable[..., SAJournal]
    ) -> None:
        journal = new_journal()
        await journal.persist("acct", [ev(1)])
        writes = [asyncio.ensure_future(journal.persist(f"q{n}", [ev(1)])) for n in range(20)]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(journal.close())
        await asyncio.sleep(0)
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
        await asyncio.wait_for(journal.close(), 10)  # completes what the first one began
        assert await asyncio.gather(*writes) == [None] * 20
        assert pools.checked_out(journal.engine) == 0
        async with new_journal() as again:
            assert all([await seqs(again, f"q{n}") == [1] for n in range(20)])
