"""Concurrency faults: mass recovery, cancellation at any await point, group-commit isolation.

Every test runs on both backends. Cancellation tests check the three promises of the
journal: a batch is stored whole or not at all, the journal keeps working, and no pooled
connection is left checked out (``make_journal`` asserts the last one at teardown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from casty import PersistedEvent, Snapshot
from sqlalchemy import URL, event, make_url

import casty_sa
from casty_sa import (
    InvalidEventError,
    PayloadEncodeError,
    SAJournal,
    SequenceConflict,
)

from support import internals

#: Cancellation rounds per test; raise it locally for a longer soak.
CANCEL_ROUNDS = int(os.environ.get("CASTY_SA_CANCEL_ROUNDS", "150"))


def ev(seq: int, event: Any, ts: float = 1.5) -> PersistedEvent[Any]:
    return PersistedEvent(seq, event, ts)


def batch(entity_id: str, first: int, size: int) -> list[PersistedEvent[Any]]:
    """Events that say which batch they belong to, so a partial batch is visible."""
    return [ev(first + i, (entity_id, first, size, i)) for i in range(size)]


def assert_whole_batches(entity_id: str, events: list[PersistedEvent[Any]]) -> None:
    """Every stored batch is complete: its members are all there, in order, and nothing else."""
    i = 0
    while i < len(events):
        owner, first, size, index = events[i].event
        assert owner == entity_id and index == 0, f"{entity_id}: batch starts mid-way at {i}"
        members = events[i : i + size]
        assert [e.event for e in members] == [(entity_id, first, size, k) for k in range(size)], (
            f"{entity_id}: partial batch at sequence number {first}"
        )
        assert [e.sequence_nr for e in members] == list(range(first, first + size))
        i += size


async def wait_until_idle(journal: SAJournal, limit: float = 10.0) -> None:
    """Wait for shielded writes of cancelled callers to finish and give back their connection."""
    pool: Any = journal.engine.pool
    deadline = asyncio.get_running_loop().time() + limit
    while pool.checkedout():
        assert asyncio.get_running_loop().time() < deadline, (
            f"{pool.checkedout()} connection(s) still checked out {limit}s after the "
            "cancellations: a cancelled call leaked its connection"
        )
        await asyncio.sleep(0.01)


# -- concurrent recovery -----------------------------------------------------------------------


async def test_a_thousand_entities_recover_at_once(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """casty activates entities concurrently: each must get exactly its own history."""
    journal = make_journal(db_url)
    entities = [f"acct-{i}" for i in range(1000)]

    def size_of(i: int) -> int:
        return 2 + i % 5

    async def seed(i: int, entity_id: str) -> None:
        size = size_of(i)
        await journal.persist(entity_id, [ev(s, (entity_id, s)) for s in range(1, size + 1)])
        if i % 3 == 0:
            await journal.save_snapshot(entity_id, Snapshot(size - 1, ("state", entity_id), 2.0))

    await asyncio.gather(*(seed(i, e) for i, e in enumerate(entities)))

    async def recover(entity_id: str) -> tuple[Snapshot[Any] | None, list[PersistedEvent[Any]]]:
        snapshot = await journal.load_snapshot(entity_id)
        start = snapshot.sequence_nr + 1 if snapshot is not None else 1
        return snapshot, await journal.load(entity_id, start)

    results = await asyncio.wait_for(asyncio.gather(*(recover(e) for e in entities)), 60)
    for i, (entity_id, (snapshot, events)) in enumerate(zip(entities, results, strict=True)):
        size = size_of(i)
        if i % 3 == 0:
            assert snapshot == Snapshot(size - 1, ("state", entity_id), 2.0)
            assert [e.event for e in events] == [(entity_id, size)]
        else:
            assert snapshot is None
            assert [e.event for e in events] == [(entity_id, s) for s in range(1, size + 1)]


# -- concurrent start-up ----------------------------------------------------------------------


async def test_journals_starting_at_once_each_migrate_their_own_database(
    backend: str,
    tmp_path: Path,
    new_postgres_db: Callable[..., Awaitable[URL]],
    make_journal: Callable[..., SAJournal],
) -> None:
    """Three nodes in one process, each with its own fresh database, start together."""
    urls: list[Any] = (
        [f"sqlite:///{tmp_path / f'node{i}.db'}" for i in range(3)]
        if backend == "sqlite"
        else [await new_postgres_db(migrated=False) for _ in range(3)]
    )
    journals = [make_journal(url, migrate=True) for url in urls]
    results = await asyncio.gather(
        *(j.persist(f"node{i}", batch(f"node{i}", 1, 2)) for i, j in enumerate(journals)),
        return_exceptions=True,
    )
    assert results == [None, None, None], results
    for i, (url, journal) in enumerate(zip(urls, journals, strict=True)):
        assert await casty_sa.current(url) == casty_sa.head_revision()
        assert len(await journal.load(f"node{i}")) == 2
        for other in range(3):
            if other != i:
                assert await journal.load(f"node{other}") == []


# -- cancellation ------------------------------------------------------------------------------


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "own-transaction"])
async def test_cancelled_calls_leave_no_partial_write_and_no_leaked_connection(
    db_url: URL, make_journal: Callable[..., SAJournal], group_commit: bool
) -> None:
    journal = make_journal(db_url, group_commit=group_commit)
    await journal.start()
    rng = random.Random(f"cancel-{group_commit}")
    await journal.persist("reader", batch("reader", 1, 3))
    next_seq: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    cancelled_batches: list[tuple[str, int]] = []

    for round_ in range(CANCEL_ROUNDS):
        entity_id = f"acct-{round_ % 17}"
        first = next_seq.get(entity_id, 1)
        next_seq[entity_id] = first + 8  # a fresh range: the cancelled batch may or may not land
        kind = rng.choice(["persist", "persist", "snapshot", "load", "load_snapshot"])
        call: Awaitable[Any]
        if kind == "persist":
            call = journal.persist(entity_id, batch(entity_id, first, rng.randint(1, 6)))
        elif kind == "snapshot":
            call = journal.save_snapshot(entity_id, Snapshot(first, ("snap", first), 1.0))
        elif kind == "load":
            call = journal.load("reader")
        else:
            call = journal.load_snapshot(entity_id)
        # a few concurrent neighbours that are never cancelled
        neighbours = [
            asyncio.ensure_future(
                journal.persist(f"n-{round_}-{k}", batch(f"n-{round_}-{k}", 1, 2))
            )
            for k in range(rng.randint(0, 3))
        ]
        task = asyncio.ensure_future(call)
        delay = rng.choice([0.0, 0.0, rng.random() * 0.002, rng.random() * 0.01])
        if delay:
            await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)  # cancel at the first await inside the call
        task.cancel()
        try:
            result = await task
        except asyncio.CancelledError:
            outcomes[f"{kind}:cancelled"] = outcomes.get(f"{kind}:cancelled", 0) + 1
            if kind == "persist":
                cancelled_batches.append((entity_id, first))
        else:
            outcomes[f"{kind}:done"] = outcomes.get(f"{kind}:done", 0) + 1
            if kind == "load":
                assert [e.sequence_nr for e in cast(list[Any], result)] == [1, 2, 3]
        await asyncio.gather(*neighbours)  # neighbours must all succeed

    assert any(k.endswith(":cancelled") for k in outcomes), outcomes
    await wait_until_idle(journal)

    for entity_id in {f"acct-{r % 17}" for r in range(CANCEL_ROUNDS)}:
        events = await journal.load(entity_id)
        assert_whole_batches(entity_id, events)
        snapshot = await journal.load_snapshot(entity_id)
        if snapshot is not None:
            assert snapshot.state == ("snap", snapshot.sequence_nr)
    stored_firsts = {
        (e, x.sequence_nr) for e in {b[0] for b in cancelled_batches} for x in await journal.load(e)
    }
    landed = sum(b in stored_firsts for b in cancelled_batches)
    if group_commit:
        # a caller cancelled while queued is dropped; one already in flight completes
        assert landed < len(cancelled_batches), "cancelled queued writes must not be written"
    else:
        # its own transaction is shielded: the cancelled caller's write completes
        assert landed == len(cancelled_batches)
    for round_ in range(CANCEL_ROUNDS):
        for k in range(4):
            assert_whole_batches(f"n-{round_}-{k}", await journal.load(f"n-{round_}-{k}"))

    # every pooled connection still works: more concurrent calls than the pool holds
    async def use(i: int) -> None:
        await journal.persist(f"after-{i}", batch(f"after-{i}", 1, 2))
        assert len(await journal.load(f"after-{i}")) == 2

    await asyncio.wait_for(asyncio.gather(*(use(i) for i in range(40))), 30)
    await wait_until_idle(journal)


async def test_a_cancelled_large_write_never_takes_the_next_acknowledged_one_with_it(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """A persist cut off at any point must not leave its connection inside a transaction.

    A call of more than 1,000 events is an explicit transaction on SQLite. Were its
    ``BEGIN`` to run after its caller was cancelled, with no ``ROLLBACK`` behind it, the
    next acknowledged write would join that transaction and vanish with the pool's reset.
    """
    journal = make_journal(db_url)
    big = [ev(s, s) for s in range(1, 1002)]
    trials = 40
    for trial in range(trials):
        task = asyncio.create_task(journal.persist(f"big-{trial}", big))
        for _ in range(trial % 6):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await journal.persist(f"acked-{trial}", [ev(1, "acknowledged")])
    await wait_until_idle(journal)  # the kept writer connection has gone back to the pool
    reader = make_journal(db_url)
    for trial in range(trials):
        assert [e.event for e in await reader.load(f"acked-{trial}")] == ["acknowledged"], trial
        assert len(await reader.load(f"big-{trial}")) in (0, len(big))


async def test_calls_cancelled_again_and_again_never_cost_the_journal_a_connection(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """Cancelled once more while its clean-up runs (a TaskGroup or an outer timeout cancelling
    again), a call still gives back its connection's place: writers never wait forever."""
    journal = make_journal(db_url)
    await journal.persist("warm", [ev(1, "x")])
    rng = random.Random(1)
    for n in range(150):
        task = asyncio.ensure_future(journal.persist(f"again-{n}", [ev(1, "x" * 100)]))
        await asyncio.sleep(rng.random() * 0.002)
        while not task.done():
            task.cancel()
            await asyncio.sleep(0)
    await wait_until_idle(journal)
    # the permit goes back just after the connection (in the cancelled call's own clean-up
    # task): given until a deadline, a leaked one would never come back
    deadline = asyncio.get_running_loop().time() + 10
    free, capacity = internals.free_permits(journal)
    while free != capacity and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        free, capacity = internals.free_permits(journal)
    assert free == capacity, "a cancelled call kept a pool permit"
    writers = [journal.persist(f"after-{k}", [ev(1, k)]) for k in range(2 * capacity)]
    assert await asyncio.wait_for(asyncio.gather(*writers), 10) == [None] * len(writers)


async def test_a_call_cancelled_while_its_connection_opens_leaves_no_task_behind(
    tmp_path: Path, make_journal: Callable[..., SAJournal]
) -> None:
    """A caller cancelled again and again while the pool opens its connection cuts the
    opening short nowhere: once the journal is closed, no task is left waiting.

    SQLAlchemy's pool, cut off half-way, closes the connection in a task of its own that
    nobody awaits; on aiosqlite that task then waits forever for the driver's thread (which
    a forced close already stopped), and the event loop's close hung on it. SQLite only: on
    PostgreSQL no caller's task ever reaches the pool (see ``Backend.cancel_safe``).
    """
    url = make_url(f"sqlite+aiosqlite:///{tmp_path / 'journal.db'}")
    await casty_sa.upgrade(url)
    journal = make_journal(url)
    await journal.persist("warm", [ev(1, "x")])
    await wait_until_idle(journal)
    await journal.engine.dispose()  # the next call opens a connection
    opening = asyncio.Event()

    @event.listens_for(journal.engine.sync_engine, "connect")
    def slow_to_open(dbapi_connection: Any, _record: Any) -> None:
        opening.set()
        cursor = dbapi_connection.cursor()  # a statement the driver's thread takes a while on
        cursor.execute(
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n LIMIT 300000) "
            "SELECT count(*) FROM n"
        )
        cursor.close()

    before = asyncio.all_tasks()
    task = asyncio.ensure_future(journal.persist("cut", [ev(1, "x")]))
    await asyncio.wait_for(opening.wait(), 10)
    while not task.done():
        task.cancel()
        await asyncio.sleep(0)
    await journal.close()
    left = asyncio.all_tasks() - before
    if left:
        await asyncio.wait(left, timeout=5)  # a task merely finishing late passes
    assert all(t.done() for t in left), [t for t in left if not t.done()]


async def test_a_conflict_flushed_by_close_still_names_the_stored_sequence_number(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """close() writes what is queued; a conflict among those calls reports the number that
    is really stored, although the journal no longer takes new calls by then."""
    journal = make_journal(db_url)
    await journal.persist("taken", [ev(5, "stored")])
    neighbours = [asyncio.ensure_future(journal.persist(f"n-{k}", [ev(1, k)])) for k in range(10)]
    late = asyncio.ensure_future(journal.persist("taken", [ev(3, "a"), ev(4, "b"), ev(5, "c")]))
    await asyncio.sleep(0)  # every call is queued (or being written)
    await journal.close()
    assert await asyncio.gather(*neighbours) == [None] * 10
    conflict = (await asyncio.gather(late, return_exceptions=True))[0]
    assert isinstance(conflict, SequenceConflict), conflict
    assert conflict.sequence_nr == 5


async def test_cancelling_the_first_call_of_a_fresh_journal(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """Cancellation while the journal connects and checks its schema."""
    rng = random.Random("first-call")
    for i in range(12):
        journal = make_journal(db_url)
        task = asyncio.ensure_future(journal.persist(f"fresh-{i}", batch(f"fresh-{i}", 1, 3)))
        await asyncio.sleep(rng.random() * 0.02)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await wait_until_idle(journal)
        assert_whole_batches(f"fresh-{i}", await journal.load(f"fresh-{i}"))
        stored = len(await journal.load(f"fresh-{i}"))
        await journal.persist(f"fresh-{i}", batch(f"fresh-{i}", stored + 1, 2))
        assert len(await journal.load(f"fresh-{i}")) == stored + 2


async def test_timeouts_around_calls_behave_like_cancellation(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """``asyncio.timeout`` around journal calls (a common pattern) cuts nothing in half."""
    journal = make_journal(db_url)
    await journal.start()
    timed_out = 0
    for i in range(60):
        entity_id = f"t-{i % 5}"
        first = 1 + (i // 5) * 10
        try:
            async with asyncio.timeout(0.0005 * (i % 7)):
                await journal.persist(entity_id, batch(entity_id, first, 1 + i % 4))
        except TimeoutError:
            timed_out += 1
    assert timed_out > 0
    await wait_until_idle(journal)
    for k in range(5):
        assert_whole_batches(f"t-{k}", await journal.load(f"t-{k}"))
    await journal.persist("t-after", batch("t-after", 1, 2))


# -- group commit isolation --------------------------------------------------------------------


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this event refuses to be pickled")


@pytest.mark.parametrize("round_", range(3))
async def test_one_bad_caller_in_a_group_fails_alone(
    db_url: URL,
    make_journal: Callable[..., SAJournal],
    caplog: pytest.LogCaptureFixture,
    round_: int,
) -> None:
    journal = make_journal(db_url)
    await journal.persist("taken", batch("taken", 1, 5))
    rng = random.Random(round_)
    good = [f"good-{i}" for i in range(60)]
    calls: dict[str, Awaitable[None]] = {e: journal.persist(e, batch(e, 1, 3)) for e in good}
    calls["conflict"] = journal.persist("taken", batch("taken", 4, 3))  # 4 and 5 are stored
    calls["unpicklable"] = journal.persist("bad-payload", [ev(1, "fine"), ev(2, _Unpicklable())])
    calls["bad-seq"] = journal.persist("bad-seq", [ev(2, "x"), ev(1, "y")])
    names = list(calls)
    rng.shuffle(names)

    caplog.set_level(logging.DEBUG, logger="casty_sa.batching")
    results = await asyncio.gather(*(calls[n] for n in names), return_exceptions=True)
    outcome = dict(zip(names, results, strict=True))

    conflict = outcome.pop("conflict")
    assert isinstance(conflict, SequenceConflict) and conflict.sequence_nr == 4
    assert isinstance(outcome.pop("unpicklable"), PayloadEncodeError)
    assert isinstance(outcome.pop("bad-seq"), InvalidEventError)
    assert all(r is None for r in outcome.values()), outcome
    for e in good:
        assert_whole_batches(e, await journal.load(e))
        assert len(await journal.load(e)) == 3
    assert [e.sequence_nr for e in await journal.load("taken")] == [1, 2, 3, 4, 5]
    assert await journal.load("bad-payload") == []
    # the conflicting call really shared a transaction with its neighbours
    sizes = [int(m) for m in re.findall(r"group commit: (\d+) calls", caplog.text)]
    assert sizes and max(sizes) > 10, caplog.text[-2000:]


async def test_one_stale_caller_costs_its_group_a_few_transactions_not_one_per_call(
    db_url: URL, make_journal: Callable[..., SAJournal]
) -> None:
    """1,000 concurrent persists and one stale call: the group that carries the stale call
    is split in halves to find it, so every bystander is stored in a handful of
    transactions (not one each), and the stale caller alone gets ``SequenceConflict``
    naming the first sequence number already stored."""
    journal = make_journal(db_url)
    await journal.persist("stale", batch("stale", 1, 5))
    db = internals.backend(journal)
    write = db.write
    transactions = 0

    async def counted(events: Any, snapshots: Any) -> None:
        nonlocal transactions
        transactions += 1
        await write(events, snapshots)

    db.write = counted
    n = 1000
    entities = [f"n-{i}" for i in range(n)]
    calls = [journal.persist(e, batch(e, 1, 2)) for e in entities]
    calls.insert(n // 3, journal.persist("stale", batch("stale", 3, 4)))  # 3, 4, 5 stored
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)
    stale = results.pop(n // 3)
    assert isinstance(stale, SequenceConflict) and stale.sequence_nr == 3, repr(stale)
    assert results == [None] * n, [r for r in results if r is not None][:3]
    assert transactions <= 2 * math.log2(n) + 4, transactions
    for e in entities[::50]:
        assert_whole_batches(e, await journal.load(e))
        assert len(await journal.load(e)) == 2
    assert [e.event for e in await journal.load("stale")] == [e.event for e in batch("stale", 1, 5)]


async def test_same_sequence_nr_twice_in_one_group_first_caller_wins(
    journal: SAJournal,
) -> None:
    first = journal.persist("acct", [ev(1, "first"), ev(2, "first")])
    second = journal.persist("acct", [ev(2, "second"), ev(3, "second")])
    third = journal.persist("acct", [ev(3, "third")])
    results = await asyncio.gather(first, second, third, return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], SequenceConflict) and results[1].sequence_nr == 2
    assert results[2] is None
    assert [(e.sequence_nr, e.event) for e in await journal.load("acct")] == [
        (1, "first"),
        (2, "first"),
        (3, "third"),
    ]


async def test_groups_in_flight_side_by_side_never_share_an_entity(
    journal: SAJournal, backend: str
) -> None:
    """PostgreSQL and MySQL keep two groups in flight; one entity's calls still go one group
    at a time.

    Every entity queues three calls at once, made round-robin across the entities so
    that any cut of the queue separates them: two claiming the same sequence number (the
    first made must win) and one for the next. Whatever the groups, no two writes in
    flight may carry the same entity, and each entity ends with the first call's events.
    """
    db = internals.backend(journal)
    write = db.write
    in_flight: list[set[str]] = []
    shared: list[set[str]] = []
    most = 0

    async def watched(events: Any, snapshots: Any) -> None:
        nonlocal most
        entities = {row[0] for row in [*events, *snapshots]}
        shared.extend(entities & other for other in in_flight if entities & other)
        in_flight.append(entities)
        most = max(most, len(in_flight))
        try:
            await write(events, snapshots)
        finally:
            in_flight.remove(entities)

    db.write = watched
    entities = [f"pipe-{i}" for i in range(300)]
    for round_ in range(3):
        base = 2 * round_
        firsts = [journal.persist(e, [ev(base + 1, ("first", round_))]) for e in entities]
        seconds = [journal.persist(e, [ev(base + 1, ("second", round_))]) for e in entities]
        nexts = [journal.persist(e, [ev(base + 2, ("next", round_))]) for e in entities]
        results = await asyncio.gather(*firsts, *seconds, *nexts, return_exceptions=True)
        n = len(entities)
        assert results[:n] == [None] * n, [r for r in results[:n] if r is not None][:3]
        assert all(isinstance(r, SequenceConflict) for r in results[n : 2 * n])
        assert results[2 * n :] == [None] * n
    assert shared == [], f"writes in flight at once shared entities: {shared[:3]}"
    assert most == (2 if backend in ("postgresql", "mysql") else 1), most
    for e in entities[::37]:
        assert [(x.sequence_nr, x.event[0]) for x in await journal.load(e)] == [
            (s, "first" if s % 2 else "next") for s in range(1, 7)
        ]


async def test_order_per_entity_is_preserved_under_concurrency(journal: SAJournal) -> None:
    """Calls of one entity issued in order are stored in order, interleaved with others."""

    async def actor(entity_id: str, batches: int) -> None:
        seq = 1
        for b in range(batches):
            size = 1 + b % 3
            await journal.persist(entity_id, batch(entity_id, seq, size))
            seq += size

    entities = [f"ordered-{i}" for i in range(40)]
    await asyncio.gather(*(actor(e, 15) for e in entities))
    # many calls of one entity queued at once, without waiting for each other
    pending = [journal.persist("burst", batch("burst", 1 + 2 * k, 2)) for k in range(100)]
    assert await asyncio.gather(*pending) == [None] * 100
    for e in [*entities, "burst"]:
        events = await journal.load(e)
        assert_whole_batches(e, events)
        seqs = [x.sequence_nr for x in events]
        assert seqs == list(range(1, len(seqs) + 1))
    assert len(await journal.load("burst")) == 200
