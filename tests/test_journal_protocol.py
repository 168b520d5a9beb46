"""casty's EventJournal protocol, on every setup of ``conftest.MATRIX`` (SQLite file and memory,
an application's engine, PostgreSQL; group commit on and off)."""

from __future__ import annotations

import asyncio
import inspect
import math
import pickle
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from casty import EventJournal, InMemoryJournal, JournalKind, PersistedEvent, Snapshot
from sqlalchemy import insert, select, text
from sqlalchemy.exc import StatementError

from casty_sa import InvalidEventError, SAJournal
from casty_sa.models import journal_tables

pytestmark = pytest.mark.matrix


def ev(seq: int, event: Any = None, ts: float | None = None) -> PersistedEvent[Any]:
    return PersistedEvent(
        seq, event if event is not None else f"e{seq}", ts if ts is not None else seq + 0.5
    )


def test_satisfies_casty_protocol(journal: SAJournal) -> None:
    as_protocol: EventJournal = journal  # mypy --strict checks the structure
    for name in ("persist", "load", "save_snapshot", "load_snapshot"):
        ours = inspect.signature(getattr(SAJournal, name))
        theirs = inspect.signature(getattr(EventJournal, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        assert inspect.iscoroutinefunction(getattr(SAJournal, name)), name
        assert callable(getattr(as_protocol, name))
    assert isinstance(as_protocol.kind, JournalKind)


async def test_persist_then_load_returns_events_in_order(journal: SAJournal) -> None:
    events = [ev(1, {"amount": 10}), ev(2, ("tuple", 2)), ev(3, b"bytes")]
    await journal.persist("acct", events)
    loaded = await journal.load("acct")
    assert loaded == events
    assert all(type(e) is PersistedEvent for e in loaded)


async def test_load_from_sequence_nr_is_inclusive(journal: SAJournal) -> None:
    await journal.persist("acct", [ev(i) for i in range(1, 6)])
    assert [e.sequence_nr for e in await journal.load("acct", 3)] == [3, 4, 5]
    assert [e.sequence_nr for e in await journal.load("acct", 5)] == [5]
    assert await journal.load("acct", 6) == []
    assert [e.sequence_nr for e in await journal.load("acct", 0)] == [1, 2, 3, 4, 5]
    assert [e.sequence_nr for e in await journal.load("acct", -7)] == [1, 2, 3, 4, 5]


async def test_persist_appends_across_calls(journal: SAJournal) -> None:
    await journal.persist("acct", [ev(1), ev(2)])
    await journal.persist("acct", (ev(3),))  # casty's replicas pass a tuple
    assert [e.sequence_nr for e in await journal.load("acct")] == [1, 2, 3]


async def test_unknown_entity_loads_nothing(journal: SAJournal) -> None:
    assert await journal.load("nobody") == []
    assert await journal.load_snapshot("nobody") is None


async def test_empty_persist_is_a_noop(journal: SAJournal) -> None:
    await journal.persist("acct", [])
    await journal.persist("acct", ())
    assert await journal.load("acct") == []


async def test_entities_are_isolated(journal: SAJournal) -> None:
    await journal.persist("a", [ev(1, "a1")])
    await journal.persist("b", [ev(1, "b1"), ev(2, "b2")])
    assert [e.event for e in await journal.load("a")] == ["a1"]
    assert [e.event for e in await journal.load("b")] == ["b1", "b2"]


def _bits(stamps: Sequence[float]) -> list[bytes]:
    """Floats as their IEEE 754 bytes: ``-0.0 == 0.0``, but their bits differ."""
    return [struct.pack(">d", stamp) for stamp in stamps]


#: Floats a database may bend: the sign of zero (SQLite stores whole-number REALs as integers),
#: subnormals, the extremes, whole numbers past 2**53, infinities.
_STAMPS = [
    time.time(),
    1.0000000000000002,
    1e-300,
    1.7976931348623157e308,
    0.1 + 0.2,
    -0.0,
    0.0,
    5e-324,
    -5e-324,
    3.0,
    -3.0,
    2.0**53 + 2,
    -(2.0**63),
    math.inf,
    -math.inf,
]


#: What MySQL's DOUBLE cannot hold as it is: it stores -0.0 as 0.0 and has no infinities.
_NOT_ON_MYSQL = _bits([-0.0, math.inf, -math.inf])


def _stamps(backend: str) -> list[float]:
    """The timestamps a backend stores bit for bit (on MySQL the others are refused)."""
    if backend != "mysql":
        return _STAMPS
    return [stamp for stamp in _STAMPS if _bits([stamp])[0] not in _NOT_ON_MYSQL]


async def test_timestamps_round_trip_bit_for_bit(journal: SAJournal, backend: str) -> None:
    stamps = _stamps(backend)
    await journal.persist("t", [ev(i + 1, i, ts) for i, ts in enumerate(stamps)])
    assert _bits([e.timestamp for e in await journal.load("t")]) == _bits(stamps)
    for seq, stamp in enumerate(stamps, start=1):
        await journal.save_snapshot(f"s{seq}", Snapshot(seq, "s", stamp))
        snapshot = await journal.load_snapshot(f"s{seq}")
        assert snapshot is not None and _bits([snapshot.timestamp]) == _bits([stamp])
    # many loads at once go as one batched query per kind
    entities = [f"s{seq}" for seq in range(1, len(stamps) + 1)]
    snapshots = await asyncio.gather(*(journal.load_snapshot(e) for e in entities))
    assert _bits([s.timestamp for s in snapshots if s is not None]) == _bits(stamps)
    loads = await asyncio.gather(*(journal.load("t", seq) for seq in range(1, 6)))
    assert [_bits([e.timestamp for e in events]) for events in loads] == [
        _bits(stamps[seq - 1 :]) for seq in range(1, 6)
    ]


@pytest.mark.only_backends("mysql")
@pytest.mark.parametrize("stamp", [-0.0, math.inf, -math.inf])
async def test_timestamps_mysql_cannot_hold_are_refused(journal: SAJournal, stamp: float) -> None:
    """MySQL's DOUBLE turns -0.0 into 0.0 and holds no infinity: such a timestamp is refused
    with its reason, and nothing of the call is stored, never stored changed (NaN is
    refused on every database)."""
    with pytest.raises(InvalidEventError, match="cannot be stored on MySQL/MariaDB"):
        await journal.persist("t", [ev(1, "a", 1.0), ev(2, "b", stamp)])
    with pytest.raises(InvalidEventError, match="cannot be stored on MySQL/MariaDB"):
        await journal.save_snapshot("t", Snapshot(1, "s", stamp))
    assert await journal.load("t") == []
    assert await journal.load_snapshot("t") is None
    events, _ = journal_tables()
    async with journal.engine.begin() as conn:
        with pytest.raises(StatementError, match="cannot be stored on MySQL/MariaDB"):
            await conn.execute(
                insert(events),
                [{"entity_id": "app", "sequence_nr": 1, "timestamp": stamp, "payload": b"x"}],
            )


async def test_timestamps_are_the_same_through_sqlalchemy(journal: SAJournal, backend: str) -> None:
    """casty-sa's tools (import, export, inspect) run SQLAlchemy statements on
    ``journal_tables()``, whose ``Timestamp`` type keeps timestamps bit for bit too,
    both ways."""
    events, _ = journal_tables()
    zero = 5e-324 if backend == "mysql" else -0.0  # (MySQL refuses -0.0: see above)
    await journal.persist("journal", [ev(1, "a", zero), ev(2, "b", 2.0)])
    async with journal.engine.begin() as conn:
        rows = (
            await conn.execute(
                select(events.c.timestamp)
                .where(events.c.entity_id == "journal")
                .order_by(events.c.sequence_nr)
            )
        ).scalars()
        assert _bits(list(rows)) == _bits([zero, 2.0])
        await conn.execute(
            insert(events),
            [
                {
                    "entity_id": "app",
                    "sequence_nr": 1,
                    "timestamp": zero,
                    "payload": pickle.dumps("x"),
                }
            ],
        )
    async with journal.engine.connect() as conn:
        stored = (await conn.execute(text("SELECT count(*) FROM casty_sa_events"))).scalar()
    assert stored == 3
    # and the journal's own reads, on the driver's connection, see what SQLAlchemy wrote
    [row] = await journal.load("app")
    assert _bits([row.timestamp]) == _bits([zero])


async def test_snapshot_round_trip_and_replace(journal: SAJournal) -> None:
    await journal.save_snapshot("acct", Snapshot(3, {"balance": 30}, 1.0))
    assert await journal.load_snapshot("acct") == Snapshot(3, {"balance": 30}, 1.0)
    await journal.save_snapshot("acct", Snapshot(6, {"balance": 60}, 2.0))
    assert await journal.load_snapshot("acct") == Snapshot(6, {"balance": 60}, 2.0)


async def test_snapshot_at_same_sequence_nr_replaces(journal: SAJournal) -> None:
    await journal.save_snapshot("acct", Snapshot(3, "first", 1.0))
    await journal.save_snapshot("acct", Snapshot(3, "second", 2.0))
    assert await journal.load_snapshot("acct") == Snapshot(3, "second", 2.0)


async def test_older_snapshot_never_replaces_newer(journal: SAJournal) -> None:
    await journal.save_snapshot("acct", Snapshot(10, "new", 2.0))
    await journal.save_snapshot("acct", Snapshot(4, "late write of a deposed node", 3.0))
    assert await journal.load_snapshot("acct") == Snapshot(10, "new", 2.0)


async def test_snapshots_kept_per_entity(journal: SAJournal) -> None:
    await journal.save_snapshot("a", Snapshot(1, "A", 1.0))
    await journal.save_snapshot("b", Snapshot(2, "B", 1.0))
    assert await journal.load_snapshot("a") == Snapshot(1, "A", 1.0)
    assert await journal.load_snapshot("b") == Snapshot(2, "B", 1.0)


@pytest.mark.parametrize(
    "entity_id",
    [
        "plain",
        "üñíçødé-名前-🙂",
        'quote\'s "double" `back`',
        "100%_like_%",
        "x" * 255,
        "x" * 512,
        "a;DROP TABLE casty_sa_events;--",
        " leading and trailing ",
        "\\backslash\\",
    ],
)
async def test_entity_ids_are_opaque(journal: SAJournal, entity_id: str) -> None:
    await journal.persist(entity_id, [ev(1, entity_id)])
    await journal.save_snapshot(entity_id, Snapshot(1, entity_id, 1.0))
    assert [e.event for e in await journal.load(entity_id)] == [entity_id]
    snapshot = await journal.load_snapshot(entity_id)
    assert snapshot is not None and snapshot.state == entity_id


async def test_entity_ids_never_match_by_pattern_or_prefix(journal: SAJournal) -> None:
    await journal.persist("a_c", [ev(1, "underscore")])
    await journal.persist("a%", [ev(1, "percent")])
    await journal.persist("abc", [ev(1, "abc")])
    await journal.persist("ab", [ev(1, "ab")])
    assert [e.event for e in await journal.load("a_c")] == ["underscore"]
    assert [e.event for e in await journal.load("a%")] == ["percent"]
    assert [e.event for e in await journal.load("ab")] == ["ab"]
    assert await journal.load("a") == []
    assert await journal.load("ABC") == []  # case matters
    assert await journal.load("abc ") == []  # trailing space matters


async def test_sequence_numbers_are_64_bit(journal: SAJournal) -> None:
    top = 2**63 - 1
    await journal.persist("big", [ev(top - 1), ev(top)])
    assert [e.sequence_nr for e in await journal.load("big", top)] == [top]
    assert await journal.load("big", 2**64) == []
    await journal.save_snapshot("big", Snapshot(top, "s", 1.0))
    snapshot = await journal.load_snapshot("big")
    assert snapshot is not None and snapshot.sequence_nr == top


async def test_large_payloads_round_trip(journal: SAJournal) -> None:
    blob = bytes(range(256)) * (8 * 4096)  # 8 MiB
    await journal.persist("big", [ev(1, blob)])
    await journal.save_snapshot("big", Snapshot(1, blob, 1.0))
    assert (await journal.load("big"))[0].event == blob
    snapshot = await journal.load_snapshot("big")
    assert snapshot is not None and snapshot.state == blob


async def test_same_answers_as_casty_in_memory_journal(journal: SAJournal) -> None:
    reference = InMemoryJournal()
    script: list[tuple[str, Any]] = [
        ("persist", ("a", [ev(1), ev(2)])),
        ("persist", ("b", [ev(1)])),
        ("snap", ("a", Snapshot(2, "s2", 1.0))),
        ("persist", ("a", [ev(3)])),
        ("persist", ("a", [])),
    ]
    for op, (entity, arg) in script:
        for j in (reference, journal):
            if op == "persist":
                await j.persist(entity, arg)
            else:
                await j.save_snapshot(entity, arg)
    for entity in ("a", "b", "zzz"):
        for start in (0, 1, 2, 3, 4):
            assert await journal.load(entity, start) == await reference.load(entity, start)
        assert await journal.load_snapshot(entity) == await reference.load_snapshot(entity)


def test_kind_follows_the_database(new_journal: Callable[..., SAJournal], backend: str) -> None:
    expected = JournalKind.local if backend == "sqlite" else JournalKind.centralized
    assert new_journal().kind is expected
    assert new_journal(kind=JournalKind.local).kind is JournalKind.local
