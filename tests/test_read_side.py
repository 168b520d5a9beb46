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
import pickle
import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from casty import PersistedEvent
from sqlalchemy import URL

from casty_sa import EventEnvelope, InvalidOffset, JournalClosed, PayloadDecodeError, SAJournal
from casty_sa.ordering import format_offset, parse_offset

from support import dbtools, internals
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


def raw_args(url: URL) -> dict[str, Any]:
    args = {
        "user": url.username,
        "password": url.password,
        "database": url.database,
        "host": url.query.get("host") or url.host,
        "port": url.port,
    }
    return {k: v for k, v in args.items() if v}


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
        with pytest.raises(PayloadDecodeError, match="'a'.*1"):
            await collect(reader.events())
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
