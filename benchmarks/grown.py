"""G: W1, W2, W4 tail and W5 on a table that already holds millions of events, and on an empty one.

Opt-in (``--grown N``, 10 million in the README's run), on casty-sa's journals
on SQLite and PostgreSQL. Each gets two stores: one filled once with ``N``
events (``G build``, timed for the report), 100 events per entity, written
interleaved (entity ``i % E``, in position order) as a journal under load
stores them, so the primary key's b-tree is as scattered as a real one; and an
empty one beside it. The fill is one ``INSERT … SELECT`` per million rows from
a recursive CTE (SQLite) or ``generate_series`` (PostgreSQL, then ``VACUUM
ANALYZE``, which autovacuum would otherwise run in the middle of a
measurement), then a ``CHECKPOINT`` (PostgreSQL) and a ``sync`` of the file
system, so that no write-back of the fill lands in a timing. The events carry
a payload of the size the workloads' own events have.

Every repetition runs W1 and W2 (under fresh entity ids, a prefix per
repetition, as the stores are not fresh), W4's tail and W5 (over data they
wrote once into both stores, after the fill) on both stores, in turn (the
empty one first in odd repetitions, the grown one first in even ones), so the
machine's slow minutes fall on both alike. The target: each row on the grown
table at least 0.85x the same row on the empty one.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from casty import PersistedEvent, Snapshot
from sqlalchemy import text

from casty_sa import SAJournal

from .base import Row, Sample, Sizes, Workload
from .data import event_of
from .journals import Journal
from .progress import progress

_ROOT = Path(__file__).resolve().parent.parent
#: events per entity of the grown table
PER_ENTITY = 100
#: rows per INSERT … SELECT (and per transaction) of the fill
CHUNK = 1_000_000
#: the rows of the workloads G runs again, and their units
RERUN = {"W1": "events/s", "W2": "events/s", "W4 tail": "events/s", "W5": "entities/s"}
#: the pairs of rows: (on the grown table, on the empty table beside it)
GROWN_ROWS = {f"{row} grown": f"{row} empty" for row in RERUN}


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
        conn.execute("PRAGMA cache_size = -262144")  # 256 MB: the scattered key fits
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


async def _sqlite_fill_apart(path: str, first: int, last: int, entities: int) -> None:
    """``_sqlite_fill`` in a process of its own: the memory SQLite's page cache took
    (hundreds of MB) is never part of the benchmark's own resident set."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.grown", path, str(first), str(last), str(entities),
        env={**os.environ, "PYTHONPATH": str(_ROOT)},
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the fill of {path} failed: {err.decode()[-800:]}")


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
            await _sqlite_fill_apart(path, first, last, entities)
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
            await autocommit.execute(text("CHECKPOINT"))
    await asyncio.to_thread(os.sync)  # the fill's dirty pages written back now, not in W1
    return time.perf_counter() - start


class G(Workload):
    key = "G"
    fresh_per_rep = False
    two_stores = True
    journals = frozenset({"sa-sqlite", "sa-postgresql"})

    def __init__(self, sizes: Sizes) -> None:
        from .workloads import W1, W2, W4, W5  # here: workloads imports this module

        self.events = sizes.grown_events
        self.inner = {"W1": W1(sizes), "W2": W2(sizes), "W4": W4(sizes), "W5": W5(sizes)}
        self.build: dict[int, float] = {}
        self.empty: dict[int, Journal] = {}
        self.rep = 0
        described = {"W1": "W1", "W2": "W2", "W4 tail": "W4's tail", "W5": "W5"}
        self.rows = (
            Row(
                "G build",
                "events/s",
                f"fill a table with {self.events:,} events ({PER_ENTITY} per entity, "
                "interleaved), one INSERT … SELECT per million (p50: the seconds, in ms)",
            ),
            *(
                Row(f"{row} {kind}", unit, f"{described[row]} on {what}")
                for row, unit in RERUN.items()
                for kind, what in (
                    ("grown", f"that table of {self.events:,} events"),
                    ("empty", "an empty table beside it"),
                )
            ),
        )

    def prepare_limit(self, limit: float) -> float:
        return limit + self.events / 5_000  # the fill: a second per 5,000 rows at most

    async def prepare_beside(self, journal: Journal, other: Journal) -> None:
        self.build[id(journal)] = await grow(journal, self.events)
        self.empty[id(journal)] = other
        for store in (journal, other):
            await self.inner["W4"].prepare(store)
            await self.inner["W5"].prepare(store)

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        self.rep += 1
        stores = [("grown", journal), ("empty", self.empty[id(journal)])]
        if self.rep % 2:
            stores.reverse()
        result = {}
        for kind, store in stores:
            for row, sample in (await self._once(store)).items():
                result[f"{row} {kind}"] = sample
        seconds = self.build[id(journal)]
        return {"G build": Sample(self.events / seconds, seconds * 1000), **result}

    async def _once(self, journal: Journal) -> dict[str, Sample]:
        """W1, W2, W4's tail and W5 once on ``journal``."""
        fresh = Prefixed(journal, f"g{self.rep}/")  # W1 and W2 write: new ids each time
        w4 = await self.inner["W4"].measure(journal)
        return {
            "W1": (await self.inner["W1"].measure(fresh))["W1"],
            "W2": (await self.inner["W2"].measure(fresh))["W2"],
            "W4 tail": w4["W4 tail"],
            "W5": (await self.inner["W5"].measure(journal))["W5"],
        }


if __name__ == "__main__":  # the SQLite fill's own process (see _sqlite_fill_apart)
    _sqlite_fill(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
