"""The physical references: minimal journals straight on the drivers.

All store pickled events in casty-sa's own tables, so a ratio against them
measures casty-sa's code, not a different layout. They do the same job as the
journal: each row gets its event type and its place in the global order (see
``casty_sa.ordering``): on SQLite the next position, computed inside the INSERT
as the journal does; on PostgreSQL the table's server defaults (the writing
transaction's id, the position sequence); on MySQL era and transaction id 0 and
a position from a counter in the process, the analogue of PostgreSQL's
sequence: nothing held until commit, so what the journal's ordering lock costs
(its counter row, locked until commit) is part of ``sa-mariadb``'s ratio.
``RawAiosqliteJournal`` makes one durable commit per ``persist``;
``RawAsyncpgJournal`` one transaction per ``persist`` on a pool with asyncpg's
defaults; ``RawAsyncmyJournal`` one autocommit ``INSERT`` per ``persist`` (all
its rows in one statement) on a pool of as many connections.
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import asyncmy  # type: ignore[import-untyped,unused-ignore]
import asyncpg
from casty import PersistedEvent, Snapshot
from sqlalchemy.dialects import sqlite

from casty_sa.models import metadata
from casty_sa.ordering import event_type_name, numbered_insert

_COLUMNS = ("entity_id", "sequence_nr", "timestamp", "payload", "event_type")
#: PostgreSQL: the table's server defaults give the transaction id and the position
_PG_INSERT = f"INSERT INTO casty_sa_events ({', '.join(_COLUMNS)}) VALUES ($1, $2, $3, $4, $5)"
_SELECT = (
    "SELECT sequence_nr, payload, timestamp FROM casty_sa_events "
    "WHERE entity_id = {0} AND sequence_nr >= {1} ORDER BY sequence_nr"
)
_UPSERT = (
    "INSERT INTO casty_sa_snapshots (entity_id, sequence_nr, timestamp, payload) "
    "VALUES ({0}, {1}, {2}, {3}) ON CONFLICT (entity_id) DO UPDATE SET "
    "sequence_nr = excluded.sequence_nr, timestamp = excluded.timestamp, "
    "payload = excluded.payload WHERE excluded.sequence_nr >= casty_sa_snapshots.sequence_nr"
)
#: MySQL: every column given. Placeholders only, era and transaction id too: asyncmy's
#: ``executemany`` sends the rows as one multi-row INSERT only when VALUES holds nothing else
#: (otherwise it runs one statement per row, each its own autocommit)
_MY_INSERT = (
    f"INSERT INTO casty_sa_events ({', '.join(_COLUMNS)}, era, transaction_id, position) "
    f"VALUES ({', '.join(['%s'] * (len(_COLUMNS) + 3))})"
)
#: MySQL: "never moves backwards" with ON DUPLICATE KEY UPDATE, whose SET list runs left to
#: right: every condition reads the stored sequence_nr, so it is assigned last
_MY_UPSERT = (
    "INSERT INTO casty_sa_snapshots (entity_id, sequence_nr, timestamp, payload) "
    "VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE "
    "timestamp = IF(VALUES(sequence_nr) >= sequence_nr, VALUES(timestamp), timestamp), "
    "payload = IF(VALUES(sequence_nr) >= sequence_nr, VALUES(payload), payload), "
    "sequence_nr = GREATEST(sequence_nr, VALUES(sequence_nr))"
)
_SNAPSHOT = "SELECT sequence_nr, payload, timestamp FROM casty_sa_snapshots WHERE entity_id = {0}"


def _sqlite_insert() -> str:
    """SQLite: one row, its position one more than the highest stored (as the journal's)."""
    return numbered_insert(metadata.tables["casty_sa_events"], sqlite.dialect())


_SQLITE_INSERT = _sqlite_insert()


def _rows(entity_id: str, events: Sequence[PersistedEvent[Any]]) -> list[tuple[Any, ...]]:
    dumps = pickle.dumps
    return [
        (entity_id, e.sequence_nr, e.timestamp, dumps(e.event), event_type_name(e.event))
        for e in events
    ]


class RawAiosqliteJournal:
    """Minimal aiosqlite journal: one connection, one durable commit per ``persist``.

    Same pragmas as casty-sa's engine (WAL, ``synchronous=FULL``, ``BEGIN
    IMMEDIATE``); writes take turns on a lock, so no two persists ever share a
    commit.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = asyncio.Lock()
        self._db: Any = None

    async def open(self) -> None:
        self._db = await aiosqlite.connect(str(self._path), isolation_level="IMMEDIATE")
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=5000"):
            await self._db.execute(f"PRAGMA {pragma}")

    async def close(self) -> None:
        await self._db.close()

    async def persist(self, entity_id: str, events: Sequence[PersistedEvent[Any]]) -> None:
        # step 1 for every row: executemany runs the INSERT once per row, each after the last
        rows = [(*row, 1) for row in _rows(entity_id, events)]
        async with self._lock:
            try:
                await self._db.executemany(_SQLITE_INSERT, rows)
                await self._db.commit()
            except BaseException:
                await self._db.rollback()
                raise

    async def load(self, entity_id: str, from_sequence_nr: int = 0) -> list[PersistedEvent[Any]]:
        rows = await self._db.execute_fetchall(
            _SELECT.format("?", "?"), (entity_id, from_sequence_nr)
        )
        loads = pickle.loads
        return [PersistedEvent(seq, loads(payload), ts) for seq, payload, ts in rows]

    async def save_snapshot(self, entity_id: str, snapshot: Snapshot[Any]) -> None:
        row = (entity_id, snapshot.sequence_nr, snapshot.timestamp, pickle.dumps(snapshot.state))
        async with self._lock:
            await self._db.execute(_UPSERT.format("?", "?", "?", "?"), row)
            await self._db.commit()

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None:
        rows = await self._db.execute_fetchall(_SNAPSHOT.format("?"), (entity_id,))
        if not rows:
            return None
        seq, payload, ts = rows[0]
        return Snapshot(seq, pickle.loads(payload), ts)


class RawAsyncpgJournal:
    """Minimal asyncpg journal: a pool with asyncpg's defaults, one transaction per ``persist``."""

    def __init__(self, connect_args: dict[str, Any]) -> None:
        self._connect_args = connect_args
        self._pool: Any = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(**self._connect_args)

    async def close(self) -> None:
        await self._pool.close()

    async def persist(self, entity_id: str, events: Sequence[PersistedEvent[Any]]) -> None:
        rows = _rows(entity_id, events)
        async with self._pool.acquire() as conn, conn.transaction():
            if len(rows) == 1:
                await conn.execute(_PG_INSERT, *rows[0])
            else:
                await conn.executemany(_PG_INSERT, rows)

    async def load(self, entity_id: str, from_sequence_nr: int = 0) -> list[PersistedEvent[Any]]:
        rows = await self._pool.fetch(_SELECT.format("$1", "$2"), entity_id, from_sequence_nr)
        loads = pickle.loads
        return [PersistedEvent(seq, loads(payload), ts) for seq, payload, ts in rows]

    async def save_snapshot(self, entity_id: str, snapshot: Snapshot[Any]) -> None:
        await self._pool.execute(
            _UPSERT.format("$1", "$2", "$3", "$4"),
            entity_id,
            snapshot.sequence_nr,
            snapshot.timestamp,
            pickle.dumps(snapshot.state),
        )

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None:
        row = await self._pool.fetchrow(_SNAPSHOT.format("$1"), entity_id)
        return None if row is None else Snapshot(row[0], pickle.loads(row[1]), row[2])


class RawAsyncmyJournal:
    """Minimal asyncmy journal: a pool of 10 connections (asyncpg's default) in autocommit,
    one ``INSERT`` per ``persist``."""

    def __init__(self, connect_args: dict[str, Any]) -> None:
        self._connect_args = connect_args
        self._pool: Any = None
        self._positions = itertools.count(1)

    async def open(self) -> None:
        self._pool = await asyncmy.create_pool(
            minsize=10, maxsize=10, autocommit=True, **self._connect_args
        )

    async def close(self) -> None:
        self._pool.close()
        await self._pool.wait_closed()

    async def persist(self, entity_id: str, events: Sequence[PersistedEvent[Any]]) -> None:
        rows = [(*row, 0, 0, next(self._positions)) for row in _rows(entity_id, events)]
        async with self._pool.acquire() as conn, conn.cursor() as cursor:
            if len(rows) == 1:
                await cursor.execute(_MY_INSERT, rows[0])
            else:
                await cursor.executemany(_MY_INSERT, rows)

    async def _fetch(self, statement: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        async with self._pool.acquire() as conn, conn.cursor() as cursor:
            await cursor.execute(statement, args)
            return list(await cursor.fetchall())

    async def load(self, entity_id: str, from_sequence_nr: int = 0) -> list[PersistedEvent[Any]]:
        rows = await self._fetch(_SELECT.format("%s", "%s"), (entity_id, from_sequence_nr))
        loads = pickle.loads
        return [PersistedEvent(seq, loads(payload), ts) for seq, payload, ts in rows]

    async def save_snapshot(self, entity_id: str, snapshot: Snapshot[Any]) -> None:
        row = (entity_id, snapshot.sequence_nr, snapshot.timestamp, pickle.dumps(snapshot.state))
        async with self._pool.acquire() as conn, conn.cursor() as cursor:
            await cursor.execute(_MY_UPSERT, row)

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None:
        rows = await self._fetch(_SNAPSHOT.format("%s"), (entity_id,))
        if not rows:
            return None
        seq, payload, ts = rows[0]
        return Snapshot(seq, pickle.loads(payload), ts)
