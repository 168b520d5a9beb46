"""Retention: ``delete_events`` and ``forget`` on every backend (see casty_sa.retention).

What is deleted is exactly what was asked and allowed; a deleted sequence number is never
used again (its write is a ``SequenceConflict`` for that caller alone, its neighbours in the
same group stored); deletions under concurrent writers and readers lose nothing they should
keep; ``forget`` leaves nothing of the entity behind; and a real casty entity whose old
events were deleted recovers to the same state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from casty import PersistedEvent, Snapshot

from casty_sa import (
    DeletionRefused,
    Forgotten,
    InvalidEventError,
    SAJournal,
    SequenceConflict,
    metadata,
)
from casty_sa.models import tombstone_table
from casty_sa.retention import delete_up_to

pytestmark = pytest.mark.timeout(120)


def events(*numbers: int, tag: str = "e") -> list[PersistedEvent[Any]]:
    return [PersistedEvent(n, f"{tag}{n}", float(n)) for n in numbers]


async def numbers(journal: SAJournal, entity_id: str) -> list[int]:
    return [event.sequence_nr for event in await journal.load(entity_id)]


async def rows_of(journal: SAJournal, entity_id: str) -> dict[str, int]:
    """How many rows of ``entity_id`` each casty-sa table holds (tables without an entity
    column: none of it can be there)."""
    from sqlalchemy import func, select

    counts: dict[str, int] = {}
    async with journal.engine.connect() as conn:
        for table in metadata.tables.values():
            if "entity_id" in table.c:
                found = select(func.count()).where(table.c.entity_id == entity_id)
                counts[table.name] = (await conn.execute(found)).scalar_one()
    return counts


async def test_delete_below_the_snapshot(new_journal: Callable[..., SAJournal]) -> None:
    journal = new_journal()
    await journal.persist("a", events(1, 2, 3, 4, 5))
    await journal.persist("b", events(1, 2, 3))
    await journal.save_snapshot("a", Snapshot(3, "state-3", 3.0))
    assert await journal.delete_events("a", 3) == 3
    assert await numbers(journal, "a") == [4, 5]
    assert await numbers(journal, "b") == [1, 2, 3]  # another entity is never touched
    assert await journal.highest_sequence_nr("a") == 5
    # asking again, or below, deletes nothing more and never lowers the tombstone
    assert await journal.delete_events("a", 3) == 0
    assert await journal.delete_events("a", 1) == 0
    await journal.persist("a", events(6))
    assert await numbers(journal, "a") == [4, 5, 6]


async def test_refused_beyond_the_snapshot_without_force(
    new_journal: Callable[..., SAJournal],
) -> None:
    journal = new_journal()
    await journal.persist("a", events(1, 2, 3, 4))
    with pytest.raises(DeletionRefused) as no_snapshot:
        await journal.delete_events("a", 2)
    assert no_snapshot.value.snapshot_sequence_nr is None
    await journal.save_snapshot("a", Snapshot(2, "state-2", 2.0))
    with pytest.raises(DeletionRefused, match="latest snapshot is at sequence number 2"):
        await journal.delete_events("a", 3)
    assert await numbers(journal, "a") == [1, 2, 3, 4]  # nothing deleted
    # a whole batch is refused when one of its cuts is: nothing of it deleted
    await journal.persist("b", events(1, 2))
    await journal.save_snapshot("b", Snapshot(2, "s", 2.0))
    with pytest.raises(DeletionRefused):
        await delete_up_to(journal.engine, [("b", 2), ("a", 4)], turn=journal._backend.turn)
    assert await numbers(journal, "b") == [1, 2]
    # beyond what is stored counts as the highest stored
    assert await journal.delete_events("a", 2) == 2
    with pytest.raises(InvalidEventError):
        await journal.delete_events("a", "2")  # type: ignore[arg-type]


async def test_force_deletes_beyond_the_snapshot(new_journal: Callable[..., SAJournal]) -> None:
    journal = new_journal()
    await journal.persist("a", events(1, 2, 3, 4))
    assert await journal.delete_events("a", 10**20, force=True) == 4
    assert await journal.load("a") == []
    # an entity whose events were all deleted still has its highest number
    assert await journal.highest_sequence_nr("a") == 4
    with pytest.raises(SequenceConflict):
        await journal.persist("a", events(4))
    await journal.persist("a", events(5))
    assert await numbers(journal, "a") == [5]
    assert await journal.delete_events("nobody", 3, force=True) == 0  # makes no tombstone
    assert (await rows_of(journal, "nobody"))["casty_sa_tombstones"] == 0


async def test_a_deleted_number_is_a_conflict_for_its_caller_alone(
    new_journal: Callable[..., SAJournal],
) -> None:
    journal = new_journal()
    await journal.persist("a", events(1, 2, 3))
    await journal.delete_events("a", 2, force=True)
    # one group (queued together): the caller of a deleted number fails, its neighbours
    # are stored
    calls = [
        journal.persist("n1", events(1)),
        journal.persist("a", events(2, tag="again")),
        journal.persist("n2", events(1, 2)),
        journal.persist("a", events(4)),
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None and outcomes[3] is None
    assert isinstance(outcomes[1], SequenceConflict)
    assert (outcomes[1].entity_id, outcomes[1].sequence_nr) == ("a", 2)
    assert "deleted" in str(outcomes[1])
    assert await numbers(journal, "a") == [3, 4]
    assert await numbers(journal, "n1") == [1]
    assert await numbers(journal, "n2") == [1, 2]


async def test_forget_leaves_nothing_of_the_entity(
    new_journal: Callable[..., SAJournal],
) -> None:
    journal = new_journal()
    await journal.persist("gone", events(1, 2, 3))
    await journal.save_snapshot("gone", Snapshot(2, "s", 2.0))
    await journal.delete_events("gone", 2)
    await journal.persist("kept", events(1))
    assert (await rows_of(journal, "gone"))["casty_sa_tombstones"] == 1
    assert await journal.forget("gone") == Forgotten("gone", events=1, snapshots=1)
    assert set((await rows_of(journal, "gone")).values()) == {0}
    assert await journal.highest_sequence_nr("gone") == 0
    assert await journal.load_snapshot("gone") is None
    assert await numbers(journal, "kept") == [1]
    assert await journal.forget("gone") == Forgotten("gone", events=0, snapshots=0)
    # the id is free again: nothing kept it (see docs/operations.md)
    await journal.persist("gone", events(1))
    assert await numbers(journal, "gone") == [1]
    assert tombstone_table().name in metadata.tables


@pytest.mark.shared_database
async def test_deleting_under_writers_and_readers(new_journal: Callable[..., SAJournal]) -> None:
    """Writers persist, readers load, deleters delete below each entity's snapshot, all at
    once on two journals: every event above a deletion is kept, every number below it is
    gone, no number is ever stored twice, and a write of a deleted number fails."""
    writer, deleter = new_journal(), new_journal()
    entities = [f"acct-{k}" for k in range(4)]
    rounds = 12
    deleted_to: dict[str, int] = dict.fromkeys(entities, 0)

    async def write(entity: str) -> None:
        for n in range(1, rounds + 1):
            await writer.persist(entity, events(n))
            if n % 3 == 0:
                await writer.save_snapshot(entity, Snapshot(n, f"s{n}", float(n)))

    async def delete(entity: str) -> None:
        for _ in range(rounds):
            snapshot = await deleter.load_snapshot(entity)
            if snapshot is not None:
                await deleter.delete_events(entity, snapshot.sequence_nr)
                deleted_to[entity] = max(deleted_to[entity], snapshot.sequence_nr)
            await asyncio.sleep(0)

    async def read(entity: str) -> None:
        for _ in range(rounds):
            loaded = await numbers(deleter, entity)
            assert loaded == sorted(set(loaded))  # never a number twice, always in order
            if loaded:  # what a load returns is contiguous: nothing missing in between
                assert loaded == list(range(loaded[0], loaded[-1] + 1))

    async def stale(entity: str) -> None:
        # a write of a number at or below a deletion is refused, whatever the timing
        for _ in range(rounds):
            low = deleted_to[entity]
            if low:
                with pytest.raises(SequenceConflict):
                    await writer.persist(entity, events(low))
            await asyncio.sleep(0)

    work = [f(entity) for entity in entities for f in (write, delete, read, stale)]
    await asyncio.wait_for(asyncio.gather(*work), 90)
    for entity in entities:
        # exactly what no deletion covered is kept, every write of the writer stored once
        assert await numbers(writer, entity) == list(range(deleted_to[entity] + 1, rounds + 1))
        snapshot = await writer.load_snapshot(entity)
        assert snapshot is not None and snapshot.sequence_nr == rounds
        await writer.delete_events(entity, rounds)  # the last snapshot covers everything
        assert await numbers(writer, entity) == []
        assert await writer.highest_sequence_nr(entity) == rounds
        await writer.persist(entity, events(rounds + 1))  # never a number used twice
        assert await numbers(writer, entity) == [rounds + 1]


async def run_account(journal: SAJournal, deposits: list[int]) -> Any:
    """One system's life with the example's bank account: deposits, then its state."""
    from casty import ActorSystem

    import bank_account as bank

    async with asyncio.timeout(30), ActorSystem(name="bank") as system:
        ref = system.spawn(bank.account_behavior("acct-1", journal), "acct-1")
        for amount in deposits:
            await system.ask(ref, lambda r, a=amount: bank.Deposit(a, r), timeout=5)
        return await system.ask(ref, bank.GetBalance, timeout=5)


@pytest.mark.shared_database
async def test_a_casty_entity_recovers_after_its_old_events_are_deleted(
    new_journal: Callable[..., SAJournal],
) -> None:
    """A real casty account, stopped; the events its latest snapshot covers deleted; a new
    system on a new journal recovers the same state and goes on with the next numbers."""
    import bank_account as bank

    first = new_journal()
    deposits = list(range(1, 2 * bank.SNAPSHOT_EVERY + 3))
    before = await run_account(first, deposits)
    snapshot = await first.load_snapshot("acct-1")
    assert snapshot is not None and 0 < snapshot.sequence_nr < len(deposits)
    assert await first.delete_events("acct-1", snapshot.sequence_nr) == snapshot.sequence_nr
    assert (await first.load("acct-1"))[0].sequence_nr == snapshot.sequence_nr + 1
    await first.close()

    second = new_journal()
    after = await run_account(second, [])
    assert after == before == bank.Account(sum(deposits), len(deposits))
    again = await run_account(second, [1000])
    assert again == bank.Account(sum(deposits) + 1000, len(deposits) + 1)
    stored = [e.sequence_nr for e in await second.load("acct-1")]
    assert stored == list(range(snapshot.sequence_nr + 1, len(deposits) + 2))


async def _writer_waits(journal: SAJournal) -> bool:
    """Whether a transaction on the journal's server waits for a lock (SQLite: no one can
    tell; its writers are serialized by the file's lock or the memory database's turn)."""
    from sqlalchemy import text

    name = journal.engine.dialect.name
    if name == "sqlite":
        return True
    query = (
        "SELECT COUNT(*) FROM pg_locks WHERE NOT granted"
        if name == "postgresql"
        else "SELECT COUNT(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'"
    )
    async with journal.engine.connect() as conn:
        return bool((await conn.execute(text(query))).scalar())


@pytest.mark.shared_database
async def test_a_write_that_waited_for_a_deletion_meets_its_tombstone(
    new_journal: Callable[..., SAJournal],
) -> None:
    """A deletion holds its lock (tombstone raised, rows deleted, not yet committed) while
    another journal writes the deleted number and a neighbour: the write waits on the
    server, then its check sees the committed tombstone (``SequenceConflict``, never a
    deleted number stored again); the neighbour is stored."""
    from casty_sa import retention

    writer, deleter = new_journal(), new_journal()
    await writer.persist("a", events(1, 2, 3))
    await writer.load("a")  # the writer's connections are open before the lock is taken
    options = deleter._retention()
    bounds = (retention.LOCK_TIMEOUT, None)
    async with retention._locked(
        deleter.engine, deleter.schema, options["turn"], None, "delete", bounds
    ) as conn:
        assert (await retention._cut(conn, deleter.schema, "a", 2, force=True)).deleted == 2
        stale = asyncio.ensure_future(writer.persist("a", events(2, tag="stale")))
        fresh = asyncio.ensure_future(writer.persist("b", events(1)))
        for _ in range(3000):  # 30 s at most
            if await _writer_waits(deleter) or stale.done():
                break
            await asyncio.sleep(0.01)
        assert not stale.done()
    outcomes = await asyncio.wait_for(asyncio.gather(stale, fresh, return_exceptions=True), 30)
    assert isinstance(outcomes[0], SequenceConflict), outcomes
    assert outcomes[1] is None, outcomes
    assert await numbers(writer, "a") == [3]
    assert await numbers(writer, "b") == [1]


async def test_a_cancelled_deletion_leaves_a_memory_journal_whole(
    make_journal: Callable[..., SAJournal],
) -> None:
    """REVIEW (revd): the caller of ``delete_events`` on a memory journal is cancelled while
    the DELETE runs on the database's one connection. SQLAlchemy dropped (invalidated) a
    connection whose statement was cut off by a cancel, and the StaticPool opened a new one:
    an empty memory database, every entity's events and the tables gone ("no such table").
    The deletion now runs to its end on its own, as a write does: the journal stays whole."""
    import threading

    journal = make_journal("sqlite://")
    await journal.persist("a", events(1, 2, 3))
    await journal.persist("kept", events(1))
    await journal.save_snapshot("a", Snapshot(2, "s", 2.0))
    entered, release = threading.Event(), threading.Event()

    def hold() -> int:  # runs on aiosqlite's thread, inside the DELETE statement
        entered.set()
        release.wait(30)
        return 0

    async with journal._backend.turn(), journal.engine.begin() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.create_function("casty_sa_test_hold", 0, hold)
        await conn.exec_driver_sql(
            "CREATE TEMP TRIGGER held AFTER DELETE ON casty_sa_events "
            "BEGIN SELECT casty_sa_test_hold(); END"
        )
    deletion = asyncio.ensure_future(journal.delete_events("a", 2))
    try:
        assert await asyncio.to_thread(entered.wait, 30), "the DELETE never ran"
        deletion.cancel()  # (the statement's future is cancelled at once)
    finally:
        release.set()
    await asyncio.wait_for(asyncio.gather(deletion, return_exceptions=True), 30)
    assert await asyncio.wait_for(numbers(journal, "kept"), 30) == [1]
    assert await numbers(journal, "a") in ([1, 2, 3], [3])
    await journal.persist("a", events(4))
    assert (await numbers(journal, "a"))[-1] == 4
