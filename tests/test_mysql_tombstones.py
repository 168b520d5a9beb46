"""MySQL/MariaDB's tombstone check (``MySQLBackend._refuse_deleted``) on the real server.

The check is a few statements after the counter's ``UPDATE``, not part of the insert: it
must cover every row of a group however many statements and packets the group takes,
match hostile entity ids exactly (quotes, backslashes, unicode, 512 characters, ids
MariaDB's default collation would call equal), on both drivers, and fail only the
caller of a deleted number.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from casty import PersistedEvent
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import create_async_engine

import casty_sa
from casty_sa import SAJournal, SequenceConflict
from casty_sa.backends.failures import WriteRefused

from support import dbtools, pools
from support.mariadb import MariaDBServer

pytestmark = pytest.mark.timeout(120)

NewDb = Callable[..., Awaitable[URL]]

#: ids the check's ``IN`` list and ``CASE`` must match exactly, each to itself alone
HOSTILE = [
    "a'b",
    "a\\b",
    "ü€😀",
    "x" * 512,
    "'" * 512,
    "\\" * 512,
    "a",
    "a ",
    "A",
    "😀" * 512,
    "%s %(x)s",
    "a'); DROP TABLE casty_sa_tombstones; --",
]


def ev(*numbers: int, tag: str = "e") -> list[PersistedEvent[Any]]:
    return [PersistedEvent(n, f"{tag}{n}", float(n)) for n in numbers]


async def highest(journal: SAJournal, ids: list[str]) -> list[int]:
    return [await journal.highest_sequence_nr(entity_id) for entity_id in ids]


@pytest.mark.parametrize("driver", ["asyncmy", "aiomysql"])
async def test_hostile_ids_and_many_entities_conflict_each_alone(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal], driver: str
) -> None:
    """Hostile ids among 300 others (more than one check statement): the callers writing a
    deleted number conflict, every neighbour is stored, whatever the id's bytes."""
    url = (await new_mysql_db()).set(drivername=f"mysql+{driver}")
    journal = make_journal(url)
    ids = HOSTILE + [f"n{k:03d}" for k in range(300)]
    await asyncio.gather(*(journal.persist(entity_id, ev(1, 2, 3)) for entity_id in ids))
    deleted = set(ids[::2])
    for entity_id in deleted:
        await journal.delete_events(entity_id, 2, force=True)
    # one group: the deleted ones write 2 again, the others 4; "x" writes twice (two calls)
    calls = [journal.persist(e, ev(2, tag="stale") if e in deleted else ev(4)) for e in ids]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for entity_id, outcome in zip(ids, outcomes, strict=True):
        if entity_id in deleted:
            assert isinstance(outcome, SequenceConflict), (entity_id, outcome)
            assert outcome.entity_id == entity_id
        else:
            assert outcome is None, (entity_id, outcome)
    assert await highest(journal, ids) == [3 if e in deleted else 4 for e in ids]
    # several calls of one entity in one group: the later call's number is not deleted
    first, second = journal.persist("a", ev(4)), journal.persist("a", ev(5))
    assert list(await asyncio.gather(first, second, return_exceptions=True)) == [None, None]
    assert [e.sequence_nr for e in await journal.load("a")] == [3, 4, 5]


@pytest.fixture(scope="module")
def small_packet_maria() -> Iterator[MariaDBServer]:
    """A MariaDB taking packets of 64 KiB at most: a few hundred rows fill several."""
    directory = Path(tempfile.mkdtemp(prefix="casty-sa-smallpacket-"))
    server = MariaDBServer.start(directory, "--max-allowed-packet=65536")
    try:
        yield server
    finally:
        server.stop()


async def test_a_group_over_several_packets_is_checked_whole(
    small_packet_maria: MariaDBServer, make_journal: Callable[..., SAJournal]
) -> None:
    """100 entities of 512-character ids in one write: the check of all of them is over
    the server's max_allowed_packet in one statement (it was refused whole, 1153); split,
    it is stored whole, and a deleted number of the 90th entity fails the whole write."""
    await dbtools.mysql_execute(small_packet_maria.url, "CREATE DATABASE packets")
    url = small_packet_maria.url.set(database="packets")
    await casty_sa.upgrade(url)
    journal = make_journal(url)
    await journal.start()
    ids = [f"{k:03d}" + "'" * 509 for k in range(100)]
    await journal._backend.write([(e, 1, 1.0, b"p", "p") for e in ids], [])
    assert await highest(journal, ids) == [1] * 100
    await journal.delete_events(ids[90], 1, force=True)
    rows = [(e, 1 if e == ids[90] else 2, 2.0, b"q", "q") for e in ids]
    with pytest.raises(WriteRefused) as refused:
        await journal._backend.write(rows, [])
    assert refused.value.duplicate, refused.value
    assert await highest(journal, ids) == [1] * 100  # nothing of it stored
    calls = [journal.persist(e, ev(1 if e == ids[90] else 2)) for e in ids]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(outcomes[90], SequenceConflict)
    assert outcomes[:90] + outcomes[91:] == [None] * 99


async def test_a_deleted_number_is_a_conflict_in_any_language(
    new_mysql_db: NewDb, make_journal: Callable[..., SAJournal]
) -> None:
    """A server (or session) answering in German says "Feld 'id' darf nicht NULL sein":
    still a sequence conflict, not a refusal of the values."""
    url = await new_mysql_db()
    settings = "SET SESSION lc_messages = 'de_DE', sql_mode = 'STRICT_ALL_TABLES'"
    app = create_async_engine(url, connect_args={"init_command": settings})
    pools.watch(app)
    try:
        journal = make_journal(app)
        await journal.persist("a", ev(1, 2))
        await journal.delete_events("a", 1, force=True)
        with pytest.raises(SequenceConflict):
            await journal.persist("a", ev(1))
        await journal.persist("a", ev(3))
        await journal.close()
    finally:
        await app.dispose()
