"""The read side's guarantees: every committed event once, in one global order, resumable.

``journal.events()`` on a SQLite file and on PostgreSQL: resuming from any offset gives
every later event exactly once; an event whose transaction took its place early and
committed late is neither passed nor delivered twice; nothing uncommitted is delivered;
each entity's events come in sequence order, also with two OS processes writing 200
entities while a live reader follows; ``live=False`` stops where it started; filters;
hostile arguments; a restored table whose transaction ids are ahead of the server's;
leaving the loop releases every connection and the listening one. Also ``entity_ids``
and ``highest_sequence_nr``.
"""

from __future__ import annotations

import asyncio
import gc
import pickle
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from casty import PersistedEvent
from sqlalchemy import URL

from casty_sa import EventEnvelope, InvalidOffset, JournalClosed, PayloadDecodeError, SAJournal
from casty_sa.ordering import format_offset, notify_channel, parse_offset

from support import dbtools, internals
from support.held_write import HeldWrite
from support.processes import EVENT_WRITER

pytestmark = pytest.mark.shared_database

#: Seconds any one wait of these tests may take.
BOUND = 30.0


async def collect(stream: AsyncIterator[EventEnvelope], count: int | None = None) -> list[Any]:
    """The stream's envelopes: all of them, or the first ``count``; bounded in time."""

    async def run() -> list[Any]:
        got = []
        async for envelope in stream:
            got.append(envelope)
            if count is not None and len(got) == count:
                break
        return got

    return await asyncio.wait_for(run(), BOUND)


def keys(envelopes: list[EventEnvelope]) -> list[tuple[str, int]]:
    return [(e.entity_id, e.sequence_nr) for e in envelopes]


async def persist(journal: SAJournal, entity_id: str, *seqs: int, event: Any = None) -> None:
    await journal.persist(
        entity_id,
        [PersistedEvent(s, f"{entity_id}:{s}" if event is None else event, float(s)) for s in seqs],
    )


# -- order, resumption, stop ------------------------------------------------------------------


async def test_every_event_once_in_order_and_resumable(journal: SAJournal) -> None:
    for round_ in range(3):
        await asyncio.gather(
            *(persist(journal, f"acct-{n}", 2 * round_ + 1, 2 * round_ + 2) for n in range(5))
        )
    everything = await collect(journal.events(batch_size=4))
    assert sorted(keys(everything)) == sorted(
        (f"acct-{n}", s) for n in range(5) for s in range(1, 7)
    )
    offsets = [e.offset for e in everything]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    for n in range(5):  # each entity in sequence order
        assert [e.sequence_nr for e in everything if e.entity_id == f"acct-{n}"] == list(
            range(1, 7)
        )
    first = everything[0]
    assert first.event == f"{first.entity_id}:{first.sequence_nr}" and first.event_type == "str"
    assert first.timestamp == float(first.sequence_nr)
    for i in (0, 7, len(everything) - 1):  # resume after any offset: exactly the rest
        rest = await collect(journal.events(everything[i].offset, batch_size=3))
        assert keys(rest) == keys(everything[i + 1 :])


async def test_live_false_stops_where_it_started(journal: SAJournal) -> None:
    await persist(journal, "a", 1, 2, 3)
    stream = journal.events(batch_size=1)
    first = await collect(stream, 1)
    await persist(journal, "b", 1)  # committed after the stream started
    rest = await collect(stream)
    assert keys(first + rest) == [("a", 1), ("a", 2), ("a", 3)]
    assert keys(await collect(journal.events(rest[-1].offset))) == [("b", 1)]


async def test_live_reader_gets_new_events_and_resumes(journal: SAJournal) -> None:
    await persist(journal, "a", 1)
    async with journal.events(live=True) as stream:
        assert keys(await collect(stream, 1)) == [("a", 1)]
        waiting = asyncio.ensure_future(collect(stream, 2))
        await persist(journal, "b", 1)
        await persist(journal, "a", 2)
        got = await waiting
    assert keys(got) == [("b", 1), ("a", 2)]
    assert await collect(journal.events(got[-1].offset)) == []


# -- entity ids, highest sequence number ------------------------------------------------------


async def test_entity_ids_and_highest_sequence_nr(journal: SAJournal) -> None:
    names = ["b", "a%", "a_1", "ab", "a", "c-2", "c-10"]
    for name in names:
        await persist(journal, name, 1, 2)
    await persist(journal, "ab", 3)
    listed = [i async for i in journal.entity_ids()]
    assert sorted(listed) == sorted(names) and len(listed) == len(names)
    after_first = [i async for i in journal.entity_ids(listed[0])]
    assert after_first == listed[1:]
    assert sorted([i async for i in journal.entity_ids(prefix="a%")]) == ["a%"]
    assert sorted([i async for i in journal.entity_ids(prefix="a_")]) == ["a_1"]
    assert sorted([i async for i in journal.entity_ids(prefix="a")]) == ["a", "a%", "a_1", "ab"]
    assert [i async for i in journal.entity_ids(prefix="zz")] == []
    assert await journal.highest_sequence_nr("ab") == 3
    assert await journal.highest_sequence_nr("nobody") == 0


# -- filters ----------------------------------------------------------------------------------


class Deposited:
    def __init__(self, amount: int) -> None:
        self.amount = amount


async def test_prefix_is_text_not_a_pattern(journal: SAJournal) -> None:
    for name in ("a%b-1", "a_b-1", "axb-1", "a%bc", "A%b-1", "za%b"):
        await persist(journal, name, 1)
    got = await collect(journal.events(entity_prefix="a%b"))
    assert sorted(e.entity_id for e in got) == ["a%b-1", "a%bc"]
    got = await collect(journal.events(entity_prefix="a_b"))
    assert [e.entity_id for e in got] == ["a_b-1"]


async def test_event_types_also_for_rows_without_a_type(
    journal: SAJournal, db_url: URL, backend: str
) -> None:
    await persist(journal, "a", 1, 2)  # str
    await journal.persist("a", [PersistedEvent(3, Deposited(5), 3.0)])
    await journal.persist("b", [PersistedEvent(1, 7, 1.0), PersistedEvent(2, Deposited(1), 2.0)])
    # rows stored before migration 0002, or copied from a casty file: no type
    await dbtools.execute(
        db_url, "UPDATE casty_sa_events SET event_type = NULL WHERE entity_id = 'b'"
    )
    name = f"{Deposited.__module__}.Deposited"
    got = await collect(journal.events(event_types={name}))
    assert keys(got) == [("a", 3), ("b", 2)]
    assert {e.event_type for e in got} == {name}
    got = await collect(journal.events(event_types=["int", "str"]))
    assert sorted(keys(got)) == [("a", 1), ("a", 2), ("b", 1)]
    untyped = [e for e in await collect(journal.events()) if e.entity_id == "b"]
    assert [e.event_type for e in untyped] == ["int", name]  # decoded to tell


async def test_undecodable_payload_names_entity_and_sequence(journal: SAJournal) -> None:
    await journal.persist("a", [PersistedEvent(1, "fine", 1.0)])
    reader = SAJournal(journal.engine, deserialize=lambda b: 1 / 0)
    try:
        with pytest.raises(PayloadDecodeError, match=r"'a'.*1"):
            await collect(reader.events())
    finally:
        await reader.close()


async def test_a_page_that_fails_to_decode_is_never_passed(journal: SAJournal) -> None:
    """The stream reads the next page while it decodes a full one: a page that fails to
    decode is read again on the next step, its events are never skipped."""
    await journal.persist("a", [PersistedEvent(n, f"e{n}", 1.0) for n in range(1, 7)])
    failing = True

    def deserialize(payload: bytes) -> Any:
        event = pickle.loads(payload)
        if failing and event == "e4":
            raise ValueError("not now")
        return event

    reader = SAJournal(journal.engine, deserialize=deserialize)
    try:
        stream = reader.events(batch_size=2)
        got = [await asyncio.wait_for(anext(stream), BOUND) for _ in range(2)]  # e1, e2
        for _ in range(2):  # the page of e3 and e4 fails, and fails again
            with pytest.raises(PayloadDecodeError, match=r"'a'.*4"):
                await asyncio.wait_for(anext(stream), BOUND)
        failing = False
        got += await collect(stream)
        assert [e.event for e in got] == [f"e{n}" for n in range(1, 7)]
    finally:
        await reader.close()


# -- hostile arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "after",
    [
        12,
        b"0" * 36,
        "0" * 35,
        "0" * 37,
        "G" * 36,
        "A" * 36,
        " " + "0" * 35,
        "ffff" + "0" * 32,  # era beyond SMALLINT
        "0000" + "f" * 16 + "0" * 16,  # transaction id beyond BIGINT
    ],
)
async def test_bad_offsets_refused_before_any_io(journal: SAJournal, after: Any) -> None:
    with pytest.raises(InvalidOffset):
        journal.events(after)


@pytest.mark.parametrize("batch_size", [0, -1, 100_001, 10**30, True, 1.5, "10", None])
async def test_bad_batch_sizes_refused(journal: SAJournal, batch_size: Any) -> None:
    with pytest.raises((ValueError, TypeError), match="batch_size"):
        journal.events(batch_size=batch_size)


@pytest.mark.parametrize(
    "options",
    [
        {"entity_prefix": 5},
        {"entity_prefix": "a\x00"},
        {"entity_prefix": "x" * 513},
        {"entity_prefix": "\ud800"},
        {"event_types": "str"},
        {"event_types": []},
        {"event_types": [3]},
        {"live": 1},
    ],
)
async def test_bad_filters_refused(journal: SAJournal, options: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        journal.events(**options)


async def test_offset_ahead_of_the_database_refused(journal: SAJournal, backend: str) -> None:
    await persist(journal, "a", 1)
    [only] = await collect(journal.events())
    era, transaction_id, position = parse_offset(only.offset)
    # PostgreSQL: a transaction id the server has not handed out yet; SQLite: a place past
    # the newest event stored
    ahead = (
        format_offset(era, transaction_id + 10**12, position)
        if backend == "postgresql"
        else format_offset(era, transaction_id, position + 1)
    )
    with pytest.raises(InvalidOffset, match="ahead"):
        await collect(journal.events(ahead))
    with pytest.raises(InvalidOffset, match="ahead"):
        await collect(journal.events(format_offset(era + 1, 0, 0)))


async def test_closed_journal_refuses_and_wakes_live_readers(
    new_journal: Callable[..., SAJournal],
) -> None:
    journal = new_journal()
    await persist(journal, "a", 1)
    stream = journal.events(live=True)
    assert keys(await collect(stream, 1)) == [("a", 1)]
    waiting = asyncio.ensure_future(collect(stream))
    await asyncio.sleep(0)  # let it start waiting (the outcome does not depend on it)
    await journal.close()
    with pytest.raises(JournalClosed):
        await waiting
    with pytest.raises(JournalClosed):
        await collect(journal.events())
    with pytest.raises(JournalClosed):
        await journal.highest_sequence_nr("a")


# -- late commits, rollbacks ------------------------------------------------------------------


@pytest.mark.parametrize("commit", [True, False], ids=["committed-late", "rolled-back"])
async def test_a_late_commit_is_never_passed_and_a_rollback_never_seen(
    new_journal: Callable[..., SAJournal], db_url: URL, backend: str, commit: bool
) -> None:
    journal = new_journal(busy_timeout=BOUND)
    await persist(journal, "before", 1)
    live = journal.events(live=True)
    assert keys(await collect(live, 1)) == [("before", 1)]
    held = HeldWrite(db_url, "late")
    await held.begin()
    try:
        # other writers commit after the held one took its place; on SQLite they wait for
        # its lock, on PostgreSQL they commit at once, with later transaction ids
        later = asyncio.ensure_future(
            asyncio.gather(*(persist(journal, f"after-{n}", 1) for n in range(3)))
        )
        if backend == "postgresql":
            await asyncio.wait_for(later, BOUND)
        # nothing is delivered past the held row: a reader started now sees nothing new
        snapshot = await collect(journal.events())
        assert keys(snapshot) == [("before", 1)]
    finally:
        await held.end(commit=commit)
    await asyncio.wait_for(later, BOUND)
    expected = [("late", 1)] if commit else []
    got = await collect(live, len(expected) + 3)
    assert sorted(keys(got)) == sorted(expected + [(f"after-{n}", 1) for n in range(3)])
    if commit:
        assert keys(got)[0] == ("late", 1)  # it took its place first
    everything = await collect(journal.events())
    assert len(everything) == len(set(keys(everything))) == 1 + len(expected) + 3


# -- two processes, 200 entities, a live reader ---------------------------------------------


async def test_two_processes_200_entities_followed_live(journal: SAJournal, db_url: URL) -> None:
    per_entity = 5
    async with journal.events(live=True, batch_size=50) as stream:
        follow = asyncio.ensure_future(collect(stream, 200 * per_entity))
        writers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(EVENT_WRITER),
                dbtools.plain(db_url),
                prefix,
                "100",
                str(per_entity),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for prefix in ("p", "q")
        ]
        outputs = [await asyncio.wait_for(w.communicate(), 120) for w in writers]
        assert [w.returncode for w in writers] == [0, 0], outputs
        got = await asyncio.wait_for(follow, 120)
    assert len(set(keys(got))) == len(got) == 200 * per_entity  # each exactly once
    offsets = [e.offset for e in got]
    assert offsets == sorted(offsets)
    by_entity: dict[str, list[int]] = {}
    for envelope in got:
        by_entity.setdefault(envelope.entity_id, []).append(envelope.sequence_nr)
        assert envelope.event == f"{envelope.entity_id}:{envelope.sequence_nr}"
    assert len(by_entity) == 200
    assert all(seqs == list(range(1, per_entity + 1)) for seqs in by_entity.values())
    # and a reader from scratch reads the same, in the same order
    assert keys(await collect(journal.events())) == keys(got)


# -- eras: a table restored into a server whose transaction ids are behind -------------------


@pytest.mark.only_backends("postgresql")  # SQLite numbers positions from its newest row
async def test_rows_restored_from_a_server_ahead_come_before_new_ones(
    new_journal: Callable[..., SAJournal], db_url: URL
) -> None:
    first = new_journal()
    await persist(first, "old", 1)
    await first.close()
    # rows a dump carried from a server whose transaction ids are far ahead of this one's
    huge = 2**50
    await dbtools.execute(
        db_url,
        *(
            "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, event_type,"
            f" era, transaction_id, position) VALUES ('restored', {n}, 1.0, "
            f"'\\x{pickle.dumps(n).hex()}'::bytea, 'int', 0, {huge + n}, {10**6 + n})"
            for n in (1, 2)
        ),
    )
    journal = new_journal()
    before = await collect(journal.events())
    assert keys(before) == [("old", 1), ("restored", 1), ("restored", 2)]
    live = journal.events(before[-1].offset, live=True)
    await persist(journal, "new", 1)  # written after the restore: a new era, after them
    [new] = await collect(live, 1)
    assert new.entity_id == "new" and new.offset > before[-1].offset
    assert parse_offset(new.offset)[0] == 1
    assert keys(await collect(journal.events())) == [*keys(before), ("new", 1)]
    # an offset of the old server is still a place here: nothing after it is missed
    assert keys(await collect(journal.events(before[1].offset))) == [("restored", 2), ("new", 1)]


@pytest.mark.only_backends("postgresql")
async def test_a_journal_running_on_across_a_restore_writes_after_the_restored_rows(
    new_journal: Callable[..., SAJournal], db_url: URL
) -> None:
    """The database is replaced under a running journal by one restored from a server whose
    transaction ids are ahead: its next write still sorts after every restored row."""
    journal = new_journal()
    await persist(journal, "w", 1)
    await dbtools.execute(
        db_url,
        "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, event_type,"
        f" era, transaction_id, position) VALUES ('restored', 1, 1.0, "
        f"'\\x{pickle.dumps(1).hex()}'::bytea, 'int', 0, {2**50}, {10**6})",
    )
    live = journal.events(live=True)
    assert keys(await collect(live, 2)) == [("w", 1), ("restored", 1)]
    await persist(journal, "w", 2)
    [new] = await collect(live, 1)
    assert (new.entity_id, new.sequence_nr) == ("w", 2)
    assert keys(await collect(journal.events())) == [("w", 1), ("restored", 1), ("w", 2)]


@pytest.mark.only_backends("postgresql")
async def test_a_reader_waits_in_the_restored_era_until_a_row_of_the_next_one_is_stored(
    new_journal: Callable[..., SAJournal], db_url: URL
) -> None:
    # restored rows a little ahead of this server's transaction ids: a live reader follows
    # them, then the server's ids pass them before anything is written, so the first
    # writer writes in their era (after them), not in the next one
    [[following]] = await dbtools.query(
        db_url, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    )
    ahead = 200
    await dbtools.execute(
        db_url,
        "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, event_type,"
        " era, transaction_id, position) VALUES ('restored', 1, 1.0, "
        f"'\\x{pickle.dumps(1).hex()}'::bytea, 'int', 0, {following + ahead}, 1)",
    )
    live = new_journal().events(live=True)
    [restored] = await collect(live, 1)
    conn = await asyncpg.connect(**dbtools.asyncpg_args(db_url))
    try:
        for _ in range(ahead + 1):  # one transaction id each
            await conn.fetchval("SELECT pg_current_xact_id()")
    finally:
        await conn.close()
    writer = new_journal()
    await persist(writer, "new", 1)
    new = await asyncio.wait_for(live.__anext__(), BOUND)
    assert new.entity_id == "new" and new.offset > restored.offset
    assert parse_offset(new.offset)[0] == 0  # the restored era: the ids had passed them
    await live.aclose()


@pytest.mark.only_backends("postgresql")
async def test_another_journals_commit_wakes_a_live_reader_through_notify(
    new_journal: Callable[..., SAJournal],
) -> None:
    """A reader of one journal learns of another journal's commit from its NOTIFY (polling
    stays the guarantee; the notification is what makes the live tail fast)."""
    reader, writer = new_journal(), new_journal()
    await persist(writer, "a", 1)
    notified = internals.notifications(reader)
    listening = internals.listener_opened(reader)
    live = reader.events(live=True)
    assert keys(await collect(live, 1)) == [("a", 1)]
    waiting = asyncio.ensure_future(collect(live, 1))
    await asyncio.wait_for(listening.wait(), BOUND)  # caught up, waiting on the LISTEN
    await persist(writer, "a", 2)
    await asyncio.wait_for(notified.wait(), BOUND)
    assert keys(await waiting) == [("a", 2)]


@pytest.mark.only_backends("postgresql")
async def test_a_write_just_before_close_is_still_announced(
    new_journal: Callable[..., SAJournal], db_url: URL
) -> None:
    """A process that writes and closes at once (a job, a CLI) still tells other processes'
    live readers: the last NOTIFY goes out before close() returns."""
    listener = await asyncpg.connect(**dbtools.asyncpg_args(db_url))
    heard = asyncio.Event()
    try:
        await listener.add_listener(notify_channel(None), lambda *_: heard.set())
        for n in range(1, 4):
            heard.clear()
            journal = new_journal()
            await persist(journal, "job", n)
            await journal.close()
            await asyncio.wait_for(heard.wait(), BOUND)
    finally:
        await listener.close()


# -- leaving the loop -----------------------------------------------------------------------


async def test_leaving_the_loop_releases_connections_and_the_listener(
    new_journal: Callable[..., SAJournal], db_url: URL, backend: str
) -> None:
    journal = new_journal()
    await persist(journal, "a", 1)

    async def follow_then_break() -> list[Any]:
        got = []
        async for envelope in journal.events(live=True):
            got.append(envelope)
            if len(got) == 2:
                break
        return got

    listening = internals.listener_opened(journal)
    reader = asyncio.ensure_future(follow_then_break())
    if backend == "postgresql":
        # the reader caught up and waits on the shared LISTEN connection
        await asyncio.wait_for(listening.wait(), BOUND)
        assert internals.listening(journal)
        listening.clear()
    await persist(journal, "a", 2)
    assert keys(await asyncio.wait_for(reader, BOUND)) == [("a", 1), ("a", 2)]
    assert not internals.listening(journal)  # the last live reader left
    # a reader cancelled while it waits leaves nothing behind either
    waiting = asyncio.ensure_future(collect(journal.events(live=True)))
    if backend == "postgresql":
        await asyncio.wait_for(listening.wait(), BOUND)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not internals.listening(journal)
    await journal.close()  # the fixture checks the pool: no connection left checked out
    assert await dbtools.open_connections(db_url) == 0


@pytest.mark.only_backends("postgresql")  # the listening connection is PostgreSQL's
async def test_a_reader_collected_in_another_thread_releases_the_listener(
    new_journal: Callable[..., SAJournal], db_url: URL
) -> None:
    journal = new_journal()
    await persist(journal, "a", 1)
    listening = internals.listener_opened(journal)

    class Holder:  # a reference cycle: only the cyclic garbage collector frees it
        pass

    gc.disable()  # so that it runs in the thread below, not wherever it happens to
    try:
        holder = Holder()
        holder.cycle, holder.stream = holder, journal.events(live=True)  # type: ignore[attr-defined]
        follow = asyncio.ensure_future(collect(holder.stream, 2))  # type: ignore[attr-defined]
        await asyncio.wait_for(listening.wait(), BOUND)  # caught up, waiting on the LISTEN
        await persist(journal, "a", 2)
        assert keys(await asyncio.wait_for(follow, BOUND)) == [("a", 1), ("a", 2)]
        del holder, follow  # left without aclose, still one of the live readers
        # the collector's thread hands the leaving to the loop before to_thread returns
        await asyncio.to_thread(gc.collect)
    finally:
        gc.enable()
    assert not internals.listening(journal)
    await journal.close()
    assert await dbtools.open_connections(db_url) == 0
