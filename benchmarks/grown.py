"""G: W1, W2, W4 tail and W5 again, on a table that already holds millions of events.

Opt-in (``--grown N``, 10 million in the README's run): the store of each of
casty-sa's journals on SQLite and PostgreSQL is filled once, untimed for the
rows but timed for the report (``G build``), with ``N`` events of 100 events
per entity, written interleaved (entity ``i % E``, in position order) as a
journal under load stores them, so the primary key's b-tree is as scattered
as a real one. The fill is one ``INSERT … SELECT`` per million rows from a
recursive CTE (SQLite) or ``generate_series`` (PostgreSQL, then ``VACUUM
ANALYZE``, which autovacuum would otherwise run in the middle of a
measurement). The events carry a payload of the size the workloads' own events
have.

Then every repetition runs W1 and W2 (under fresh entity ids, a prefix per
repetition, as the store is not fresh), and W4's tail and W5 over data they
wrote once on top of the grown table. Each row is compared with the same
workload's row of the same run on an empty table (``W1`` … ``W5``): the
target is at most 15% slower (>= 0.85x).
"""

from __future__ import annotations

import asyncio
import pickle
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from casty import PersistedEvent, Snapshot
from sqlalchemy import text

from casty_sa import SAJournal

from .base import Row, Sample, Sizes, Workload
from .data import event_of
from .journals import Journal
from .progress import progress

#: events per entity of the grown table
PER_ENTITY = 100
#: rows per INSERT … SELECT (and per transaction) of the fill
CHUNK = 1_000_000
#: the pairs of rows: (on the grown table, on an empty table of the same run)
GROWN_ROWS = {
    "W1 grown": "W1",
    "W2 grown": "W2",
    "W4 tail grown": "W4 tail",
    "W5 grown": "W5",
}


class Prefixed:
    """A journal whose entity ids all carry ``prefix`` (fresh ids on a store that is not)."""

    def __init__(self, journal: Journal, prefix: str) -> None:
        self.journal = journal
        self.prefix = prefix

    async def persist(self, entity_id: str, events: Sequence[PersistedEvent[Any]]) -> None:
        await self.journal.persist(self.prefix + entity_id, events)

    async def load(self, entity_id: str, from_sequence_nr: int = 0) -> list[PersistedEvent[Any]]:
        return await self.journal.load(self.prefix + entity_id, from_sequence_nr)

    async def save_snapshot(self, entity_id: str, snapshot: Snapshot[Any]) -> None:
        await self.journal.save_snapshot(self.prefix + entity_id, snapshot)

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None:
        return await self.journal.load_snapshot(self.prefix + entity_id)


def _payload() -> bytes:
    """A payload as long as the workloads' own events' (they are pickled)."""
    return pickle.dumps(event_of("g-000000", 50).event)


def _sqlite_fill(path: str, first: int, last: int, entities: int) -> None:
    """Rows ``first..last`` (0-based) of the grown table, in one transaction."""
    conn = sqlite3.connect(path, timeout=60)
    try:
        conn.execute("PRAGMA cache_size = -1000000")  # 1 GB: the scattered key fits
        conn.execute("PRAGMA synchronous = OFF")  # set-up, not a measurement
        conn.execute("BEGIN IMMEDIATE")
        (top,) = conn.execute("SELECT coalesce(max(position), 0) FROM casty_sa_events").fetchone()
        conn.execute(
            "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, "
            "event_type, era, transaction_id, position) "
            "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "SELECT printf('g-%07d', i % ?), i / ? + 1, 1750000000.0 + i / 1000.0, ?, "
            "'benchmarks.data.Deposited', 0, 0, ? + i - ? + 1 FROM n",
            (first, last, entities, entities, _payload(), top, first),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def _postgres_fill(journal: SAJournal, first: int, last: int, entities: int) -> None:
    async with journal.engine.begin() as conn:
        await conn.execute(text("SET LOCAL synchronous_commit = off"))
        await conn.execute(
            text(
                "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload, "
                "event_type) SELECT 'g-' || lpad((i % :e)::text, 7, '0'), i / :e + 1, "
                "1750000000.0 + i / 1000.0, :p, 'benchmarks.data.Deposited' "
                "FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) AS i"
            ),
            {"e": entities, "p": _payload(), "a": first, "b": last},
        )


async def grow(journal: Journal, events: int) -> float:
    """Fill ``journal``'s store with ``events`` events; the seconds it took."""
    if not isinstance(journal, SAJournal):
        raise TypeError(f"G runs on casty-sa's journals, not {type(journal).__name__}")
    dialect = journal.engine.dialect.name
    entities = max(1, events // PER_ENTITY)
    start = time.perf_counter()
    for first in range(0, events, CHUNK):
        last = min(first + CHUNK, events) - 1
        if dialect == "sqlite":
            path = journal.engine.url.database
            assert path is not None
            await asyncio.to_thread(_sqlite_fill, path, first, last, entities)
        elif dialect == "postgresql":
            await _postgres_fill(journal, first, last, entities)
        else:
            raise TypeError(f"G has no fill for {dialect}")
        progress(
            f"G: {last + 1:,} of {events:,} events stored ({time.perf_counter() - start:.0f} s)"
        )
    if dialect == "postgresql":
        async with journal.engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(text("VACUUM ANALYZE casty_sa_events"))
    return time.perf_counter() - start


class G(Workload):
    key = "G"
    fresh_per_rep = False
    journals = frozenset({"sa-sqlite", "sa-postgresql"})

    def __init__(self, sizes: Sizes) -> None:
        from .workloads import W1, W2, W4, W5

        self.events = sizes.grown_events
        self.inner = {"W1": W1(sizes), "W2": W2(sizes), "W4": W4(sizes), "W5": W5(sizes)}
        self.build: dict[int, float] = {}
        self.rep = 0
        self.rows = (
            Row(
                "G build",
                "events/s",
                f"fill the table with {self.events:,} events ({PER_ENTITY} per entity, "
                "interleaved), one INSERT … SELECT per million (p50: the seconds, in ms)",
            ),
            *(
                Row(grown, "events/s" if empty != "W5" else "entities/s", f"{empty} with "
                    f"{self.events:,} events already stored (against {empty} on an empty table)")
                for grown, empty in GROWN_ROWS.items()
            ),
        )  # fmt: skip

    def prepare_limit(self, limit: float) -> float:
        return limit + self.events / 5_000  # the fill: a second per 5,000 rows at most

    async def prepare(self, journal: Journal) -> None:
        self.build[id(journal)] = await grow(journal, self.events)
        await self.inner["W4"].prepare(journal)
        await self.inner["W5"].prepare(journal)

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        self.rep += 1
        fresh = Prefixed(journal, f"g{self.rep}/")  # W1 and W2 write: new ids each time
        w1 = await self.inner["W1"].measure(fresh)
        w2 = await self.inner["W2"].measure(fresh)
        w4 = await self.inner["W4"].measure(journal)
        w5 = await self.inner["W5"].measure(journal)
        seconds = self.build[id(journal)]
        return {
            "G build": Sample(self.events / seconds, seconds * 1000),
            "W1 grown": w1["W1"],
            "W2 grown": w2["W2"],
            "W4 tail grown": w4["W4 tail"],
            "W5 grown": w5["W5"],
        }
