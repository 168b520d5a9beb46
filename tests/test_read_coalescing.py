"""Read coalescing: concurrent loads share queries and still get exactly their own answer.

The first group drives :class:`casty_sa.coalescing.ReadCoalescer` with an in-process
batch function, to pin down its rules (batching, caps, errors, cancellation). The
second runs the journal on both backends, where a batch is one real query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import create_async_engine

from casty_sa import JournalClosed, SAJournal
from casty_sa.coalescing import ReadCoalescer

from support import dbtools, internals

# -- the coalescer's rules ---------------------------------------------------------------------


class Recorder:
    """A batch function that squares its keys, recording each batch and its overlap."""

    def __init__(self, *, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.in_flight = 0
        self.most_in_flight = 0
        self.fetching = asyncio.Event()  # set once the first batch is in flight

    async def __call__(self, keys: Sequence[int]) -> list[int]:
        self.fetching.set()
        self.batches.append(list(keys))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail_on is not None and self.fail_on in keys:
                raise ConnectionResetError(f"lost while reading key {self.fail_on}")
            return [k * k for k in keys]
        finally:
            self.in_flight -= 1


class TestCoalescerRules:
    async def test_lookups_that_queue_together_share_one_batch_and_duplicates_one_key(
        self,
    ) -> None:
        fetch = Recorder()
        reads: ReadCoalescer[int, int] = ReadCoalescer(fetch, max_keys=100, concurrency=1)
        keys = [5, 1, 5, 2, 3, 1]
        assert await asyncio.gather(*(reads.get(k) for k in keys)) == [k * k for k in keys]
        assert fetch.batches == [[5, 1, 2, 3]]

    async def test_an_uncontended_lookup_goes_alone_and_at_once(self) -> None:
        fetch = Recorder()
        reads: ReadCoalescer[int, int] = ReadCoalescer(fetch, max_keys=100, concurrency=1)
        for k in range(3):
            assert await reads.get(k) == k * k
        assert fetch.batches == [[0], [1], [2]]

    async def test_lookups_arriving_during_a_batch_go_in_the_next_one(self) -> None:
        fetch = Recorder(delay=0.02)
        reads: ReadCoalescer[int, int] = ReadCoalescer(fetch, max_keys=100, concurrency=1)
        first = asyncio.create_task(reads.get(0))
        await fetch.fetching.wait()  # batch [0] is in flight
        later = [asyncio.create_task(reads.get(k)) for k in range(1, 6)]
        assert await first == 0
        assert [await t for t in later] == [1, 4, 9, 16, 25]
        assert fetch.batches == [[0], [1, 2, 3, 4, 5]]

    async def test_batch_size_and_concurrency_stay_within_their_caps(self) -> None:
        fetch = Recorder(delay=0.002)
        reads: ReadCoalescer[int, int] = ReadCoalescer(fetch, max_keys=7, concurrency=3)
        values = await asyncio.gather(*(reads.get(k) for k in range(100)))
        assert values == [k * k for k in range(100)]
        assert max(len(b) for b in fetch.batches) <= 7
        assert fetch.most_in_flight == 3
        assert sorted(k for b in fetch.batches for k in b) == list(range(100))

    async def test_a_failed_batch_fails_its_own_callers_only(self) -> None:
        fetch = Recorder(delay=0.01, fail_on=2)
        reads: ReadCoalescer[int, int] = ReadCoalescer(fetch, max_keys=3, concurrency=1)
        outcomes = await asyncio.gather(*(reads.get(k) for k in range(6)), return_exceptions=True)
        assert fetch.batches == [[0, 1, 2], [3, 4, 5]]
        assert all(isinstance(o, ConnectionResetError) for o in outcomes[:3]), outcomes
        assert outcomes[3:] == [9, 16, 25]
        fetch.fail_on = None
        assert await reads.get(2) == 4  # the failure is not remembered

    async def test_a_batch_function_that_miscounts_fails_its_callers_instead_of_hanging(
        self,
    ) -> None:
        async def short(keys: Sequence[int]) -> list[int]:
            return [k for k in keys][:-1]

        reads: ReadCoalescer[int, int] = ReadCoalescer(short, max_keys=10, concurrency=1)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(reads.get(k) for k in range(4)), return_exceptions=True), 5
        )
        assert all(isinstance(o, AssertionError) and "returned 3" in str(o) for o in outcomes)

    async def test_cancelled_callers_leave_the_others_their_answers(self) -> None:
        fetch = Recorder(delay=0.02)
        started: list[asyncio.Task[Any]] = []
        reads: ReadCoalescer[int, int] = ReadCoalescer(
            fetch, max_keys=100, concurrency=1, track=started.append
        )
        first = asyncio.create_task(reads.get(0))
        await fetch.fetching.wait()
        queued = {k: asyncio.create_task(reads.get(k)) for k in range(1, 7)}
        await asyncio.sleep(0)
        first.cancel()  # its query is in flight: it finishes on its own
        for k in (2, 4):
            queued[k].cancel()  # still queued: never asked for
        outcomes = await asyncio.gather(first, *queued.values(), return_exceptions=True)
        assert isinstance(outcomes[0], asyncio.CancelledError)
        assert [outcomes[k] for k in (1, 3, 5, 6)] == [1, 9, 25, 36]
        assert fetch.batches == [[0], [1, 3, 5, 6]]
        await asyncio.gather(*started)
        assert all(t.done() and not t.cancelled() for t in started)

    async def test_inline_lookups_run_in_the_callers_task_and_hand_over_to_a_batch(
        self,
    ) -> None:
        fetch = Recorder(delay=0.02)
        tasks: list[asyncio.Task[Any]] = []
        reads: ReadCoalescer[int, int] = ReadCoalescer(
            fetch, max_keys=100, concurrency=1, track=tasks.append, inline=True
        )
        assert await reads.get(3) == 9
        assert tasks == []  # uncontended: no task of its own
        first = asyncio.create_task(reads.get(0))
        await fetch.fetching.wait()  # [0] is in flight in the caller's task
        later = [asyncio.create_task(reads.get(k)) for k in (1, 2, 2)]
        await asyncio.sleep(0)
        first.cancel()  # the lookups queued behind it still get a batch
        outcomes = await asyncio.gather(first, *later, return_exceptions=True)
        assert isinstance(outcomes[0], asyncio.CancelledError)
        assert outcomes[1:] == [1, 4, 4]
        assert fetch.batches == [[3], [0], [1, 2]]
        assert len(tasks) == 1

    async def test_a_worker_cancelled_from_outside_strands_no_caller(self) -> None:
        fetch = Recorder(delay=0.05)
        workers: list[asyncio.Task[Any]] = []
        reads: ReadCoalescer[int, int] = ReadCoalescer(
            fetch, max_keys=1, concurrency=1, track=workers.append
        )
        callers = [asyncio.create_task(reads.get(k)) for k in range(3)]
        await fetch.fetching.wait()  # batch [0] in flight, [1] and [2] queued behind it
        workers[0].cancel()  # as the event loop does when it shuts down
        outcomes = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
        await reads.drain()  # nothing left queued or in flight
        assert await reads.get(7) == 49  # and it keeps working

    def test_caps_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="max_keys and concurrency"):
            ReadCoalescer(Recorder(), max_keys=0, concurrency=1)


# -- on the journal, over both backends -------------------------------------------------------

#: Entity ids that a batch carries through JSON (SQLite) or arrays (PostgreSQL).
AWKWARD_IDS = [
    'quote"double',
    "quote'single",
    "back\\slash",
    "[0]",
    "$[1]",
    "ünïcødé-账户-🧾",
    "tab\tand\nnewline",
    "x" * 512,
]


def ev(seq: int, event: Any) -> PersistedEvent[Any]:
    return PersistedEvent(seq, event, float(seq))


class QueryCounter:
    """Counts the read queries a backend runs, batched or single (the real ones still run)."""

    def __init__(self, journal: SAJournal) -> None:
        self.events = 0
        self.snapshots = 0
        self.batched = 0
        backend = internals.backend(journal)
        for name, kind in (
            ("_fetch_events_batch", "events"),
            ("fetch_events", "events"),
            ("_fetch_snapshots_batch", "snapshots"),
            ("fetch_snapshot", "snapshots"),
        ):
            setattr(backend, name, self._counting(getattr(backend, name), kind))

    def _counting(self, query: Callable[..., Any], kind: str) -> Callable[..., Any]:
        async def run(*args: Any) -> Any:
            setattr(self, kind, getattr(self, kind) + 1)
            self.batched += query.__name__.endswith("_batch")
            return await query(*args)

        return run


async def seed(journal: SAJournal, entities: list[str]) -> None:
    """Entity i holds 3 + i % 4 events; every other one a snapshot at its second event."""

    async def one(i: int, entity_id: str) -> None:
        await journal.persist(entity_id, [ev(s, (entity_id, s)) for s in range(1, 4 + i % 4)])
        if i % 2 == 0:
            await journal.save_snapshot(entity_id, Snapshot(2, ("state", entity_id), 9.0))

    await asyncio.gather(*(one(i, e) for i, e in enumerate(entities)))


class TestCoalescedLoads:
    async def test_concurrent_loads_match_loads_made_one_at_a_time(
        self, journal: SAJournal
    ) -> None:
        entities = [f"acct-{i}" for i in range(60)] + AWKWARD_IDS
        await seed(journal, entities)
        # every shape of key at once: each entity from several points, unknown entities,
        # a start past the end, the same key twice
        keys = [(e, start) for e in entities for start in (0, 2, 3, 99)]
        keys += [("never-written", 0), ("never-written", 5), (entities[0], 0), (entities[1], 2)]
        keys += [(entities[2], 2**63 - 1)]
        alone = [await journal.load(e, start) for e, start in keys]
        snapshots_alone = [await journal.load_snapshot(e) for e, _ in keys]
        counter = QueryCounter(journal)
        together, snapshots_together = await asyncio.gather(
            asyncio.gather(*(journal.load(e, start) for e, start in keys)),
            asyncio.gather(*(journal.load_snapshot(e) for e, _ in keys)),
        )
        assert together == alone
        assert snapshots_together == snapshots_alone
        # they were answered together, not one query each
        assert 1 <= counter.events < len(keys) / 4, counter.events
        assert 1 <= counter.snapshots < len(keys) / 4, counter.snapshots
        # the answers are real: spot-check a few against what was written
        i = entities.index("ünïcødé-账户-🧾")
        assert [e.sequence_nr for e in await journal.load(entities[i], 2)] == list(
            range(2, 4 + i % 4)
        )
        assert together[keys.index(("never-written", 0))] == []
        assert snapshots_alone[keys.index((entities[0], 0))] == Snapshot(
            2, ("state", entities[0]), 9.0
        )

    async def test_a_recovery_storm_costs_a_few_queries_not_one_per_entity(
        self, journal: SAJournal
    ) -> None:
        entities = [f"storm-{i}" for i in range(400)]
        await seed(journal, entities)
        counter = QueryCounter(journal)

        async def recover(entity_id: str) -> list[PersistedEvent[Any]]:
            snapshot = await journal.load_snapshot(entity_id)
            return await journal.load(entity_id, 1 if snapshot is None else snapshot.sequence_nr)

        results = await asyncio.gather(*(recover(e) for e in entities))
        for i, (entity_id, events) in enumerate(zip(entities, results, strict=True)):
            first = 2 if i % 2 == 0 else 1
            assert [e.event for e in events] == [(entity_id, s) for s in range(first, 4 + i % 4)]
        # one query per entity would be 400 of each; a pool of n connections runs up to n
        # batches at once (the storm split evenly among them), and loads follow in waves as
        # the snapshot batches finish
        assert 1 <= counter.snapshots <= 40, counter.snapshots
        assert 1 <= counter.events <= 40, counter.events

    async def test_a_load_sees_every_write_committed_before_it_was_asked(
        self, journal: SAJournal
    ) -> None:
        """Loads queued behind a batch in flight still read their caller's own writes."""
        background = [f"bg-{i}" for i in range(200)]
        await seed(journal, background)
        stop = asyncio.Event()

        async def churn() -> None:
            while not stop.is_set():
                await asyncio.gather(*(journal.load(e) for e in background))

        churners = [asyncio.create_task(churn()) for _ in range(2)]
        try:

            async def write_then_read(entity_id: str) -> None:
                for seq in range(1, 6):
                    await journal.persist(entity_id, [ev(seq, seq)])
                    assert [e.sequence_nr for e in await journal.load(entity_id)][-1] == seq
                    await journal.save_snapshot(entity_id, Snapshot(seq, seq, 1.0))
                    snapshot = await journal.load_snapshot(entity_id)
                    assert snapshot is not None and snapshot.sequence_nr == seq

            await asyncio.gather(*(write_then_read(f"rw-{i}") for i in range(50)))
        finally:
            stop.set()
            await asyncio.gather(*churners)

    async def test_cancelled_loaders_leave_correct_answers_and_no_connection_behind(
        self, db_url: URL, make_journal: Callable[..., SAJournal]
    ) -> None:
        journal = make_journal(db_url)
        entities = [f"c-{i}" for i in range(300)]
        await seed(journal, entities)
        for delay in (0.0, 0.001, 0.003, 0.01):
            tasks = [asyncio.create_task(journal.load(e)) for e in entities]
            await asyncio.sleep(delay)
            for task in tasks[::3]:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            for i, (entity_id, outcome) in enumerate(zip(entities, outcomes, strict=True)):
                if isinstance(outcome, asyncio.CancelledError):
                    assert i % 3 == 0
                    continue
                assert not isinstance(outcome, BaseException), outcome
                assert [e.event for e in outcome] == [(entity_id, s) for s in range(1, 4 + i % 4)]
        # make_journal asserts at teardown that no connection is left checked out

    async def test_close_waits_for_a_batch_in_flight(
        self, db_url: URL, make_journal: Callable[..., SAJournal]
    ) -> None:
        journal = make_journal(db_url)
        entities = [f"z-{i}" for i in range(300)]
        await seed(journal, entities)
        loads = asyncio.gather(*(journal.load(e) for e in entities))
        await asyncio.sleep(0)
        await journal.close()
        results = await loads
        assert [len(r) for r in results] == [3 + i % 4 for i in range(300)]
        assert asyncio.all_tasks() == {asyncio.current_task()}, "a read is still running"


async def test_loads_through_an_applications_engine_are_coalesced_too(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """An app's engine (implicit transactions on SQLite, its own pool) batches the same way."""
    engine = create_async_engine(db_url)
    try:
        journal = make_journal(engine)
        entities = [f"app-{i}" for i in range(200)]
        await seed(journal, entities)
        counter = QueryCounter(journal)
        results = await asyncio.gather(*(journal.load(e, 2) for e in entities))
        for i, (entity_id, events) in enumerate(zip(entities, results, strict=True)):
            assert [e.event for e in events] == [(entity_id, s) for s in range(2, 4 + i % 4)]
        assert 1 <= counter.events < len(entities) / 4, counter.events
    finally:
        await journal.close()
        await engine.dispose()


async def test_without_sqlite_json_functions_each_load_runs_alone_and_correctly(
    tmp_path: Any, make_journal: Callable[..., SAJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite builds without json_each fall back to one query per load, with the same answers."""
    internals.without_sqlite_json(monkeypatch)
    journal = make_journal(f"sqlite:///{tmp_path / 'nojson.db'}")
    entities = [f"nj-{i}" for i in range(100)]
    await seed(journal, entities)
    counter = QueryCounter(journal)
    results = await asyncio.gather(*(journal.load(e) for e in entities))
    for i, (entity_id, events) in enumerate(zip(entities, results, strict=True)):
        assert [e.event for e in events] == [(entity_id, s) for s in range(1, 4 + i % 4)]
    assert counter.events == len(entities)
    assert counter.batched == 0


@pytest.mark.parametrize("turns", [0, 1, 3])
async def test_close_waits_for_a_read_under_way_and_leaves_no_reader_behind(
    db_url: URL, make_journal: Callable[..., SAJournal], turns: int
) -> None:
    """A load racing close() (even an uncontended one, run in its caller's task) finishes
    before close() returns, and no connection is opened after close."""
    journal = make_journal(db_url)
    await journal.persist("e", [ev(1, "x")])
    load = asyncio.create_task(journal.load("e"))
    for _ in range(turns):
        await asyncio.sleep(0)
    await journal.close()
    finished_with_close = load.done()
    outcome = (await asyncio.gather(load, return_exceptions=True))[0]
    if turns:  # the load was under way: close() waited for it
        assert finished_with_close
        assert not isinstance(outcome, BaseException), outcome
        assert [e.event for e in outcome] == ["x"]
    else:  # it had not begun: it finds the journal closed
        assert isinstance(outcome, JournalClosed)
    assert await dbtools.open_connections(db_url) == 0, "a connection outlived close()"
    with pytest.raises(JournalClosed):
        await journal.load("e")
