#!/usr/bin/env python3
"""Side-by-side benchmark of casty event journals.

Runs the same workloads over several journals in one process and prints a
Markdown table of absolute figures and ratios:

``sa-sqlite``
    ``casty_sa.SAJournal`` on a SQLite file (WAL, ``synchronous=FULL``).
``sa-postgresql``
    ``casty_sa.SAJournal`` on PostgreSQL.
``casty-memory``
    casty's ``InMemoryJournal`` (no I/O: the ceiling of the protocol).
``casty-sqlite``
    casty's ``SqliteJournal`` on a SQLite file (WAL, sqlite3's default
    ``synchronous``, reported in the output).
``raw-aiosqlite``
    The physical reference on SQLite: one aiosqlite connection, same pragmas
    as ``sa-sqlite``, one durable commit per ``persist``.
``raw-asyncpg``
    The physical reference on PostgreSQL: an asyncpg pool with its defaults
    (10 connections), one transaction per ``persist``.

Every journal stores pickled events in the same tables (the raw baselines use
casty-sa's schema). Write workloads get a fresh store (file or database) for
every repetition; read workloads write their data once per journal, untimed,
and repeat the reads. Every result is checked: a wrong answer is reported as
``wrong`` with its error, never as a number.

PostgreSQL comes from ``CASTY_SA_BENCH_POSTGRES_URL`` (an admin URL allowed to
create databases) when set; otherwise a throwaway server is started from the
``pgserver`` wheel in a temporary directory and removed afterwards.

Examples
--------
``python benchmarks/run.py`` (everything, about 3 minutes on 2 cores),
``python benchmarks/run.py --quick`` (smoke run),
``python benchmarks/run.py --journals sa-sqlite,casty-sqlite --workloads W1,W2``,
``python benchmarks/run.py --rss-scan 200,2000 --journals sa-sqlite,sa-postgresql``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import os
import pickle
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import asyncpg
from casty import InMemoryJournal, PersistedEvent, Snapshot, SqliteJournal
from sqlalchemy import URL

import casty_sa
from casty_sa import SAJournal
from casty_sa.urls import to_async_url

JOURNALS = (
    "sa-sqlite",
    "sa-postgresql",
    "casty-memory",
    "casty-sqlite",
    "raw-aiosqlite",
    "raw-asyncpg",
)
WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6")
#: journals whose failures are findings about someone else's code, not errors of this run
THIRD_PARTY = frozenset({"casty-memory", "casty-sqlite"})
#: the raw driver each journal is compared with ("vs raw")
RAW_OF = {
    "sa-sqlite": "raw-aiosqlite",
    "casty-sqlite": "raw-aiosqlite",
    "raw-aiosqlite": "raw-aiosqlite",
    "sa-postgresql": "raw-asyncpg",
    "raw-asyncpg": "raw-asyncpg",
}
REFERENCE = "casty-sqlite"
BASE_TS = 1_750_000_000.0


# -- what the workloads write ----------------------------------------------------------------


@dataclass(frozen=True)
class Deposited:
    """The event every workload persists: a small frozen dataclass, as casty's own are."""

    account: str
    amount: int


def event_of(entity_id: str, seq: int) -> PersistedEvent[Any]:
    return PersistedEvent(seq, Deposited(entity_id, seq), BASE_TS + seq / 1000)


def state_of(entity_id: str, seq: int) -> dict[str, Any]:
    """A snapshot state of about 300 bytes pickled."""
    return {
        "account": entity_id,
        "balance": seq * (seq + 1) // 2,
        "recent": list(range(seq, seq + 40)),
    }


class WrongAnswer(Exception):
    """A journal returned something other than what was stored."""


def check_events(entity_id: str, got: Sequence[PersistedEvent[Any]], first: int, last: int) -> None:
    """Raise ``WrongAnswer`` unless ``got`` is exactly events ``first..last`` of the entity."""
    if len(got) != last - first + 1:
        raise WrongAnswer(
            f"{entity_id!r}: expected {last - first + 1} events ({first}..{last}), got {len(got)}"
        )
    for expected_seq, item in zip(range(first, last + 1), got, strict=True):
        if item != event_of(entity_id, expected_seq):
            raise WrongAnswer(f"{entity_id!r}: event {expected_seq} came back as {item!r}")


def check_snapshot(entity_id: str, got: Snapshot[Any] | None, seq: int) -> None:
    if got is None:
        raise WrongAnswer(f"{entity_id!r}: snapshot {seq} is missing")
    if got.sequence_nr != seq or got.state != state_of(entity_id, seq):
        raise WrongAnswer(
            f"{entity_id!r}: expected its snapshot at {seq}, got one at {got.sequence_nr} "
            f"with state of {got.state.get('account') if isinstance(got.state, dict) else got}"
        )


# -- sizes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How much each workload does, and how many repetitions."""

    reps: int = 5
    w1_persists: int = 2_000
    w2_entities: int = 200
    w2_persists: int = 20
    w3_persists: int = 200
    w3_batch: int = 100
    w4_events: int = 20_000
    w4_tail: int = 1_000
    w4_tail_calls: int = 10
    w5_entities: int = 1_000
    w5_snapshot_at: int = 10
    w5_after: int = 10
    w6_entities: int = 500


QUICK = Sizes(
    reps=1,
    w1_persists=50,
    w2_entities=20,
    w2_persists=5,
    w3_persists=5,
    w3_batch=100,
    w4_events=2_000,
    w4_tail=100,
    w4_tail_calls=2,
    w5_entities=50,
    w6_entities=25,
)


# -- journals under test -------------------------------------------------------------------------


class Journal(Protocol):
    """casty's ``EventJournal`` methods, as the workloads use them."""

    async def persist(self, entity_id: str, events: Sequence[PersistedEvent[Any]]) -> None: ...

    async def load(
        self, entity_id: str, from_sequence_nr: int = 0
    ) -> list[PersistedEvent[Any]]: ...

    async def save_snapshot(self, entity_id: str, snapshot: Snapshot[Any]) -> None: ...

    async def load_snapshot(self, entity_id: str) -> Snapshot[Any] | None: ...


_INSERT = "INSERT INTO casty_sa_events (entity_id, sequence_nr, timestamp, payload) VALUES "
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
_SNAPSHOT = "SELECT sequence_nr, payload, timestamp FROM casty_sa_snapshots WHERE entity_id = {0}"


def _rows(entity_id: str, events: Sequence[PersistedEvent[Any]]) -> list[tuple[Any, ...]]:
    dumps = pickle.dumps
    return [(entity_id, e.sequence_nr, e.timestamp, dumps(e.event)) for e in events]


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
        rows = _rows(entity_id, events)
        async with self._lock:
            try:
                await self._db.executemany(_INSERT + "(?, ?, ?, ?)", rows)
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
                await conn.execute(_INSERT + "($1, $2, $3, $4)", *rows[0])
            else:
                await conn.executemany(_INSERT + "($1, $2, $3, $4)", rows)

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


# -- stores --------------------------------------------------------------------------------------


def asyncpg_args(url: URL) -> dict[str, Any]:
    """asyncpg ``connect`` arguments of a SQLAlchemy URL (a unix socket rides in ``?host=``)."""
    args = {
        "user": url.username,
        "password": url.password,
        "database": url.database,
        "host": url.query.get("host") or url.host,
        "port": url.port,
    }
    return {key: value for key, value in args.items() if value}


class PostgresStores:
    """Fresh databases on one server, cloned from a template migrated to casty-sa's head."""

    def __init__(self, admin: URL) -> None:
        self.admin = admin
        self._template = f"casty_sa_bench_tpl_{os.getpid()}"
        self._counter = itertools.count()
        self._made: set[str] = set()

    async def _admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(**asyncpg_args(self.admin))
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def setup(self) -> None:
        await self._admin(
            f'DROP DATABASE IF EXISTS "{self._template}"', f'CREATE DATABASE "{self._template}"'
        )
        await casty_sa.upgrade(self.admin.set(database=self._template))

    async def fresh(self) -> URL:
        name = f"casty_sa_bench_{os.getpid()}_{next(self._counter)}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self._template}"')
        self._made.add(name)
        with contextlib.suppress(asyncpg.PostgresError):
            await self._admin("CHECKPOINT")  # so no checkpoint of the copy lands in a timing
        return self.admin.set(database=name)

    async def drop(self, url: URL) -> None:
        assert url.database is not None
        await self._admin(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        self._made.discard(url.database)

    async def teardown(self) -> None:
        for name in [*self._made, self._template]:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def describe(self) -> dict[str, str]:
        conn = await asyncpg.connect(**asyncpg_args(self.admin))
        try:
            settings = {}
            for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method"):
                settings[name] = str(await conn.fetchval(f"SHOW {name}"))
            return settings
        finally:
            await conn.close()


@contextlib.contextmanager
def postgres_server() -> Iterator[URL]:
    """The benchmark's PostgreSQL admin URL: the environment's, or a throwaway pgserver."""
    given = os.environ.get("CASTY_SA_BENCH_POSTGRES_URL")
    if given:
        yield to_async_url(given)
        return
    data = Path(tempfile.mkdtemp(prefix="casty-sa-bench-pg-"))
    progress("starting a throwaway PostgreSQL (pgserver) in", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgserver's and platformdirs' deprecation chatter
        import pgserver  # type: ignore[import-untyped,unused-ignore]

        server = pgserver.get_server(data, cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        yield to_async_url(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


@dataclass
class Opened:
    """A journal on a fresh store, and how to dispose of both."""

    journal: Journal
    close: Callable[[], Awaitable[None]]
    synchronous: str | None = None


class Stores:
    """Makes a fresh store for each journal name."""

    def __init__(self, root: Path, postgres: PostgresStores | None) -> None:
        self._root = root
        self._postgres = postgres
        self._counter = itertools.count()

    def _file(self) -> Path:
        return self._root / f"journal-{next(self._counter)}.db"

    def _remover(self, path: Path) -> Callable[[], None]:
        def remove() -> None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

        return remove

    def _pg(self) -> PostgresStores:
        if self._postgres is None:
            raise RuntimeError("PostgreSQL was not started")
        return self._postgres

    async def open(self, name: str) -> Opened:
        opened = await self._open(name)
        journal = opened.journal  # warm up: connections, caches, compiled statements
        await journal.persist("warm-up", [event_of("warm-up", 1)])
        check_events("warm-up", await journal.load("warm-up"), 1, 1)
        await journal.save_snapshot("warm-up", Snapshot(1, state_of("warm-up", 1), BASE_TS))
        check_snapshot("warm-up", await journal.load_snapshot("warm-up"), 1)
        return opened

    async def _open(self, name: str) -> Opened:
        if name == "casty-memory":

            async def nothing() -> None:
                return None

            return Opened(InMemoryJournal(), nothing)
        if name == "sa-sqlite":
            path = self._file()
            sa = SAJournal(f"sqlite:///{path}")
            await sa.start()
            return Opened(sa, _then(sa.close, self._remover(path)), await _sa_synchronous(sa))
        if name == "casty-sqlite":
            path = self._file()
            casty = SqliteJournal(path)
            sync = _SYNCHRONOUS.get(casty._conn.execute("PRAGMA synchronous").fetchone()[0])
            remove = self._remover(path)

            async def close_casty() -> None:
                casty.close()
                remove()

            return Opened(casty, close_casty, sync)
        if name == "raw-aiosqlite":
            path = self._file()
            await casty_sa.upgrade(f"sqlite:///{path}")  # the same tables as sa-sqlite
            raw = RawAiosqliteJournal(path)
            await raw.open()
            return Opened(raw, _then(raw.close, self._remover(path)), "FULL")
        if name == "sa-postgresql":
            pg = self._pg()
            url = await pg.fresh()
            sa = SAJournal(url)
            await sa.start()
            return Opened(sa, _then(sa.close, lambda: pg.drop(url)))
        if name == "raw-asyncpg":
            pg = self._pg()
            url = await pg.fresh()
            rawpg = RawAsyncpgJournal(asyncpg_args(url))
            await rawpg.open()
            return Opened(rawpg, _then(rawpg.close, lambda: pg.drop(url)))
        raise ValueError(f"unknown journal {name!r}")


_SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


async def _sa_synchronous(journal: SAJournal) -> str | None:
    async with journal.engine.connect() as conn:
        value = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar()
    return _SYNCHRONOUS.get(int(value)) if value is not None else None


def _then(
    first: Callable[[], Awaitable[None]], second: Callable[[], Awaitable[None] | None]
) -> Callable[[], Awaitable[None]]:
    async def both() -> None:
        try:
            await first()
        finally:
            result = second()
            if result is not None:
                await result

    return both


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class Sample:
    """One repetition of one table row."""

    rate: float
    p50_ms: float | None = None
    p99_ms: float | None = None


def sample(count: int, seconds: float, latencies: Sequence[float] | None) -> Sample:
    if not latencies:
        return Sample(count / seconds)
    ordered = sorted(latencies)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return Sample(count / seconds, statistics.median(ordered) * 1000, p99 * 1000)


@dataclass(frozen=True)
class Row:
    key: str
    unit: str
    description: str


class Workload(Protocol):
    key: str
    rows: tuple[Row, ...]
    #: write workloads get a fresh store per repetition; read workloads prepare once
    fresh_per_rep: bool

    async def prepare(self, journal: Journal) -> None: ...

    async def measure(self, journal: Journal) -> dict[str, Sample]: ...


class W1:
    key = "W1"
    rows: tuple[Row, ...]
    fresh_per_rep = True

    def __init__(self, sizes: Sizes) -> None:
        self.n = sizes.w1_persists
        self.rows = (
            Row("W1", "events/s", f"one entity, {self.n:,} persists of 1 event, sequential"),
        )

    async def prepare(self, journal: Journal) -> None:
        return None

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        entity = "w1"
        batches = [[event_of(entity, seq)] for seq in range(1, self.n + 1)]
        latencies: list[float] = []
        clock = time.perf_counter
        start = clock()
        for batch in batches:
            t = clock()
            await journal.persist(entity, batch)
            latencies.append(clock() - t)
        elapsed = clock() - start
        check_events(entity, await journal.load(entity), 1, self.n)
        return {"W1": sample(self.n, elapsed, latencies)}


class W2:
    key = "W2"
    rows: tuple[Row, ...]
    fresh_per_rep = True

    def __init__(self, sizes: Sizes) -> None:
        self.entities = sizes.w2_entities
        self.per = sizes.w2_persists
        self.rows = (
            Row(
                "W2",
                "events/s",
                f"{self.entities:,} entities at once, {self.per} persists of 1 event each "
                "(sequential per entity)",
            ),
        )

    async def prepare(self, journal: Journal) -> None:
        return None

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        ids = [f"w2-{i:05d}" for i in range(self.entities)]
        latencies: list[float] = []
        clock = time.perf_counter

        async def writer(entity: str) -> None:
            for seq in range(1, self.per + 1):
                batch = [event_of(entity, seq)]  # made as needed: memory is part of the figure
                t = clock()
                await journal.persist(entity, batch)
                latencies.append(clock() - t)

        start = clock()
        await asyncio.gather(*(writer(entity) for entity in ids))
        elapsed = clock() - start
        for entity in ids:
            check_events(entity, await journal.load(entity), 1, self.per)
        return {"W2": sample(self.entities * self.per, elapsed, latencies)}


class W3:
    key = "W3"
    rows: tuple[Row, ...]
    fresh_per_rep = True

    def __init__(self, sizes: Sizes) -> None:
        self.n = sizes.w3_persists
        self.batch = sizes.w3_batch
        self.rows = (
            Row("W3", "events/s", f"one entity, {self.n} persists of {self.batch} events"),
        )

    async def prepare(self, journal: Journal) -> None:
        return None

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        entity = "w3"
        b = self.batch
        batches = [
            [event_of(entity, seq) for seq in range(i * b + 1, (i + 1) * b + 1)]
            for i in range(self.n)
        ]
        latencies: list[float] = []
        clock = time.perf_counter
        start = clock()
        for batch in batches:
            t = clock()
            await journal.persist(entity, batch)
            latencies.append(clock() - t)
        elapsed = clock() - start
        check_events(entity, await journal.load(entity), 1, self.n * b)
        return {"W3": sample(self.n * b, elapsed, latencies)}


class W4:
    key = "W4"
    rows: tuple[Row, ...]
    fresh_per_rep = False

    def __init__(self, sizes: Sizes) -> None:
        self.n = sizes.w4_events
        self.tail = sizes.w4_tail
        self.tail_calls = sizes.w4_tail_calls
        self.rows = (
            Row("W4 all", "events/s", f"replay {self.n:,} events of one entity (p50: the load)"),
            Row(
                "W4 tail",
                "events/s",
                f"replay the last {self.tail:,} of them, {self.tail_calls} loads in a row",
            ),
        )

    async def prepare(self, journal: Journal) -> None:
        for first in range(1, self.n + 1, 1000):
            last = min(first + 999, self.n)
            await journal.persist("w4", [event_of("w4", s) for s in range(first, last + 1)])

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        clock = time.perf_counter
        start = clock()
        everything = await journal.load("w4")
        full = clock() - start
        check_events("w4", everything, 1, self.n)
        del everything
        first = self.n - self.tail + 1
        tails: list[list[PersistedEvent[Any]]] = []
        latencies: list[float] = []
        start = clock()
        for _ in range(self.tail_calls):
            t = clock()
            tails.append(await journal.load("w4", first))
            latencies.append(clock() - t)
        partial = clock() - start
        for tail in tails:
            check_events("w4", tail, first, self.n)
        return {
            "W4 all": Sample(self.n / full, full * 1000),
            "W4 tail": sample(self.tail * self.tail_calls, partial, latencies),
        }


class W5:
    key = "W5"
    rows: tuple[Row, ...]
    fresh_per_rep = False

    def __init__(self, sizes: Sizes) -> None:
        self.entities = sizes.w5_entities
        self.snap = sizes.w5_snapshot_at
        self.last = sizes.w5_snapshot_at + sizes.w5_after
        self.ids = [f"w5-{i:05d}" for i in range(self.entities)]
        self.rows = (
            Row(
                "W5",
                "entities/s",
                f"recover {self.entities:,} entities at once: snapshot at {self.snap} + "
                f"{sizes.w5_after} events each, verified",
            ),
        )

    async def prepare(self, journal: Journal) -> None:
        async def store(entity: str) -> None:
            await journal.persist(entity, [event_of(entity, s) for s in range(1, self.last + 1)])
            snapshot = Snapshot(self.snap, state_of(entity, self.snap), BASE_TS + self.snap)
            await journal.save_snapshot(entity, snapshot)

        for chunk in range(0, self.entities, 100):
            await asyncio.gather(*(store(e) for e in self.ids[chunk : chunk + 100]))

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        clock = time.perf_counter
        latencies: list[float] = []

        async def recover(entity: str) -> None:
            t = clock()
            snapshot = await journal.load_snapshot(entity)
            after = 0 if snapshot is None else snapshot.sequence_nr
            events = await journal.load(entity, after + 1)
            latencies.append(clock() - t)
            check_snapshot(entity, snapshot, self.snap)
            check_events(entity, events, self.snap + 1, self.last)

        start = clock()
        outcomes = await asyncio.gather(*(recover(e) for e in self.ids), return_exceptions=True)
        elapsed = clock() - start
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            wrong = sum(isinstance(o, WrongAnswer) for o in failed)
            kinds = sorted({f"{type(o).__name__}: {o}"[:140] for o in failed})[:3]
            raise WrongAnswer(
                f"{len(failed)} of {self.entities} recoveries failed ({wrong} returned wrong "
                f"data, {len(failed) - wrong} raised); e.g. {'; '.join(kinds)}"
            )
        return {"W5": sample(self.entities, elapsed, latencies)}


class W6:
    key = "W6"
    rows: tuple[Row, ...]
    fresh_per_rep = True

    def __init__(self, sizes: Sizes) -> None:
        self.entities = sizes.w6_entities
        self.ids = [f"w6-{i:05d}" for i in range(self.entities)]
        self.rows = (
            Row(
                "W6 save",
                "snapshots/s",
                f"{self.entities:,} entities, each snapshot saved twice (insert, then "
                "replace), sequential",
            ),
            Row("W6 load", "snapshots/s", f"load those {self.entities:,} snapshots, sequential"),
        )

    async def prepare(self, journal: Journal) -> None:
        return None

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        clock = time.perf_counter
        snapshots = [
            (entity, Snapshot(seq, state_of(entity, seq), BASE_TS + seq))
            for seq in (10, 20)
            for entity in self.ids
        ]
        saves: list[float] = []
        start = clock()
        for entity, snapshot in snapshots:
            t = clock()
            await journal.save_snapshot(entity, snapshot)
            saves.append(clock() - t)
        saved = clock() - start
        loads: list[float] = []
        loaded: list[Snapshot[Any] | None] = []
        start = clock()
        for entity in self.ids:
            t = clock()
            loaded.append(await journal.load_snapshot(entity))
            loads.append(clock() - t)
        elapsed = clock() - start
        for entity, got in zip(self.ids, loaded, strict=True):
            check_snapshot(entity, got, 20)
        return {
            "W6 save": sample(len(snapshots), saved, saves),
            "W6 load": sample(self.entities, elapsed, loads),
        }


def make_workloads(sizes: Sizes) -> dict[str, Workload]:
    return {w.key: w for w in (W1(sizes), W2(sizes), W3(sizes), W4(sizes), W5(sizes), W6(sizes))}


# -- memory --------------------------------------------------------------------------------------


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def peak_rss_mb(since_reset: bool) -> float:
    """Peak RSS since the last reset, or over the process's life when resets are unsupported."""
    if since_reset:
        hwm = _status_kb("VmHWM")
        if hwm is not None:
            return hwm / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the run -------------------------------------------------------------------------------------


def progress(*parts: object) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


@dataclass
class Cell:
    """Everything measured for one row of one journal."""

    samples: list[Sample] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    failure: str | None = None

    def median(self, name: str) -> float | None:
        values = [getattr(s, name) for s in self.samples if getattr(s, name) is not None]
        return statistics.median(values) if values else None


@dataclass
class Results:
    machine: dict[str, Any]
    sizes: Sizes
    journals: list[str]
    workloads: list[str]
    rows: list[Row]
    cells: dict[tuple[str, str], Cell]  # (row key, journal)
    seconds: float = 0.0
    rss_method: str = ""

    def rate(self, row: str, journal: str) -> float | None:
        cell = self.cells.get((row, journal))
        return None if cell is None or cell.failure else cell.median("rate")


async def run_benchmark(
    sizes: Sizes, journals: list[str], workload_keys: list[str], limit: float
) -> Results:
    started = time.perf_counter()
    workloads = make_workloads(sizes)
    selected = [workloads[key] for key in workload_keys]
    rows = [row for workload in selected for row in workload.rows]
    cells = {(row.key, name): Cell() for row in rows for name in journals}
    needs_pg = any(name in ("sa-postgresql", "raw-asyncpg") for name in journals)
    resettable = reset_peak_rss()
    load_at_start = _load_average()
    if load_at_start > 0.5 * (os.cpu_count() or 1):
        progress(
            f"warning: load average {load_at_start:.2f} on {os.cpu_count()} cores: other "
            "processes are busy, so the figures will be noisy"
        )
    synchronous: dict[str, str | None] = {}
    with contextlib.ExitStack() as exits:
        postgres: PostgresStores | None = None
        pg_settings: dict[str, str] = {}
        if needs_pg:
            postgres = PostgresStores(exits.enter_context(postgres_server()))
            await postgres.setup()
            pg_settings = await postgres.describe()
        root = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="casty-sa-bench-")))
        stores = Stores(root, postgres)
        try:
            total = sum(
                sizes.reps * len(journals) + (0 if w.fresh_per_rep else len(journals))
                for w in selected
            )
            step = itertools.count(1)
            for workload in selected:
                await _run_workload(
                    workload, journals, sizes, stores, cells, limit, resettable,
                    synchronous, step, total,
                )  # fmt: skip
        finally:
            if postgres is not None:
                await postgres.teardown()
        machine = describe_machine(root, pg_settings, synchronous)
        machine["load_average"] = {"start": load_at_start, "end": _load_average()}
    return Results(
        machine,
        sizes,
        journals,
        workload_keys,
        rows,
        cells,
        time.perf_counter() - started,
        "peak RSS of this process during the measurement (kernel VmHWM, reset before it)"
        if resettable
        else "peak RSS of this process since it started (getrusage ru_maxrss)",
    )


async def _run_workload(
    workload: Workload,
    journals: list[str],
    sizes: Sizes,
    stores: Stores,
    cells: dict[tuple[str, str], Cell],
    limit: float,
    resettable: bool,
    synchronous: dict[str, str | None],
    step: Iterator[int],
    total: int,
) -> None:
    prepared: dict[str, Opened] = {}
    failed: set[str] = set()

    def fail(name: str, exc: BaseException) -> None:
        failed.add(name)
        label = "wrong" if isinstance(exc, WrongAnswer) else "error"
        if isinstance(exc, TimeoutError):
            label, exc = "timeout", TimeoutError(f"no answer within {limit:.0f} s")
        message = f"{label}: {type(exc).__name__}: {exc}"
        for row in workload.rows:
            cells[(row.key, name)].failure = message
        progress(f"[{next(step)}/{total}] {workload.key} {name}: {message}")

    try:
        if not workload.fresh_per_rep:
            for name in journals:
                progress(
                    f"[{next(step)}/{total}] {workload.key} {name}: writing the data (untimed)"
                )
                try:
                    async with asyncio.timeout(limit):
                        opened = await stores.open(name)
                        prepared[name] = opened
                        await workload.prepare(opened.journal)
                except Exception as exc:  # noqa: BLE001 - any failure is reported in the table
                    fail(name, exc)
        for rep in range(1, sizes.reps + 1):
            for name in journals:
                if name in failed:
                    continue
                t0 = time.perf_counter()
                try:
                    async with asyncio.timeout(limit):
                        opened = prepared.get(name) or await stores.open(name)
                        synchronous.setdefault(name, opened.synchronous)
                        try:
                            gc.collect()
                            reset_peak_rss()
                            result = await workload.measure(opened.journal)
                            peak = peak_rss_mb(resettable)
                        finally:
                            if name not in prepared:
                                await opened.close()
                except Exception as exc:  # noqa: BLE001 - any failure is reported in the table
                    fail(name, exc)
                    continue
                for key, measured in result.items():
                    cell = cells[(key, name)]
                    cell.samples.append(measured)
                    cell.peak_rss_mb = max(cell.peak_rss_mb, peak)
                shown = ", ".join(f"{k} {s.rate:,.0f}/s" for k, s in result.items())
                progress(
                    f"[{next(step)}/{total}] {workload.key} rep {rep}/{sizes.reps} {name}: "
                    f"{shown} ({time.perf_counter() - t0:.1f} s)"
                )
    finally:
        for opened in prepared.values():
            with contextlib.suppress(Exception):
                await opened.close()


# -- the machine ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _filesystem(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], f"{parts[2]} on {parts[0]}"
    return kind


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _load_average() -> float:
    """The 1-minute load average (how busy the machine was besides this run)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def describe_machine(
    root: Path, pg_settings: dict[str, str], synchronous: dict[str, str | None]
) -> dict[str, Any]:
    memory_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlite_files": f"{root.parent} ({_filesystem(root)})",
        "sqlite_synchronous": {k: v for k, v in synchronous.items() if v is not None},
        "postgresql": pg_settings,
        "packages": {
            name: _version(name)
            for name in ("casty", "casty-sa", "sqlalchemy", "aiosqlite", "asyncpg", "greenlet")
        },
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    description: str
    row: str
    journal: str
    reference: str
    minimum: float


TARGETS = (
    Target("SQLite W2 >= 15x casty SqliteJournal", "W2", "sa-sqlite", "casty-sqlite", 15.0),
    Target("SQLite W1 >= 0.9x casty SqliteJournal", "W1", "sa-sqlite", "casty-sqlite", 0.9),
    Target("SQLite W3 >= 1.0x casty SqliteJournal", "W3", "sa-sqlite", "casty-sqlite", 1.0),
    Target("SQLite W4 all >= 1.0x casty SqliteJournal", "W4 all", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W4 tail >= 1.0x casty SqliteJournal", "W4 tail", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W6 save >= 1.0x casty SqliteJournal", "W6 save", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W6 load >= 1.0x casty SqliteJournal", "W6 load", "sa-sqlite", REFERENCE, 1.0),
    Target("SQLite W5 correct and >= 1.0x raw aiosqlite", "W5", "sa-sqlite", "raw-aiosqlite", 1.0),
    Target("PostgreSQL W2 >= 10x raw asyncpg", "W2", "sa-postgresql", "raw-asyncpg", 10.0),
    Target("PostgreSQL W1 >= 0.9x raw asyncpg", "W1", "sa-postgresql", "raw-asyncpg", 0.9),
    Target("PostgreSQL W3 >= 0.9x raw asyncpg", "W3", "sa-postgresql", "raw-asyncpg", 0.9),
    Target("PostgreSQL W4 all >= 0.8x raw asyncpg", "W4 all", "sa-postgresql", "raw-asyncpg", 0.8),
    Target(
        "PostgreSQL W4 tail >= 0.8x raw asyncpg", "W4 tail", "sa-postgresql", "raw-asyncpg", 0.8
    ),
)


def ratio(results: Results, row: str, journal: str, reference: str | None) -> float | None:
    if reference is None or reference not in results.journals:
        return None
    mine, theirs = results.rate(row, journal), results.rate(row, reference)
    return None if mine is None or not theirs else mine / theirs


def evaluate_targets(results: Results) -> list[dict[str, Any]]:
    evaluated = []
    for target in TARGETS:
        if (target.row, target.journal) not in results.cells or target.reference not in (
            results.journals
        ):
            continue
        cell = results.cells[(target.row, target.journal)]
        measured = ratio(results, target.row, target.journal, target.reference)
        if cell.failure:
            status = f"NOT met ({target.journal} {cell.failure})"
        elif measured is None:
            reference = results.cells[(target.row, target.reference)].failure
            status = f"n/a (reference {reference or 'missing'})"
        else:
            status = "met" if measured >= target.minimum else "NOT met"
        evaluated.append({**asdict(target), "ratio": measured, "status": status})
    return evaluated


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def render_table(results: Results) -> str:
    m = results.machine
    pg = m["postgresql"]
    lines = [
        f"casty journal benchmark: median of {results.sizes.reps} repetition(s), "
        f"{results.seconds:.0f} s in all",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['os']}",
        f"- Python {m['python']}, SQLite {m['sqlite']}"
        + (
            f", PostgreSQL {pg['server_version']} (fsync={pg['fsync']}, "
            f"synchronous_commit={pg['synchronous_commit']}, "
            f"wal_sync_method={pg['wal_sync_method']})"
            if pg
            else ""
        ),
        "- packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        f"- SQLite files in {m['sqlite_files']}; synchronous: "
        + (", ".join(f"{k} {v}" for k, v in m["sqlite_synchronous"].items()) or "—"),
        f"- peak RSS: {results.rss_method}",
        f"- {m['date']}; load average (1 min) at start {m['load_average']['start']}, "
        f"at end {m['load_average']['end']}",
        "",
        "| workload | journal | rate | p50 ms | p99 ms | vs casty-sqlite | vs raw driver "
        "| spread | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results.rows:
        for name in results.journals:
            cell = results.cells[(row.key, name)]
            if cell.failure:
                verdict = cell.failure.split(":", 1)[0]
                lines.append(f"| {row.key} | {name} | **{verdict}** | | | | | | |")
                continue
            rate = cell.median("rate")
            rates = [s.rate for s in cell.samples]
            spread = (max(rates) - min(rates)) / rate * 100 if rate and len(rates) > 1 else None
            lines.append(
                f"| {row.key} | {name} | {_fmt(rate, ',.0f')} {row.unit} "
                f"| {_fmt(cell.median('p50_ms'), '.2f')} | {_fmt(cell.median('p99_ms'), '.2f')} "
                f"| {_fmt(ratio(results, row.key, name, REFERENCE), '.2f', 'x')} "
                f"| {_fmt(ratio(results, row.key, name, RAW_OF.get(name)), '.2f', 'x')} "
                f"| {_fmt(spread, '.0f', '%')} | {cell.peak_rss_mb:.0f} |"
            )
    lines += ["", "Workloads:"]
    lines += [f"- {row.key}: {row.description} ({row.unit})" for row in results.rows]
    targets = evaluate_targets(results)
    if targets:
        lines += ["", "Targets of issue 4 (ratios of medians in this run):"]
        lines += [
            f"- {t['description']}: {_fmt(t['ratio'], '.2f', 'x')} -> {t['status']}"
            for t in targets
        ]
    failures = [
        (row.key, name, results.cells[(row.key, name)].failure)
        for row in results.rows
        for name in results.journals
        if results.cells[(row.key, name)].failure
    ]
    if failures:
        lines += ["", "Failures (a wrong answer is reported, never a number):"]
        lines += [f"- {row} {name}: {failure}" for row, name, failure in failures]
    return "\n".join(lines)


def to_json(results: Results) -> dict[str, Any]:
    rows = []
    for row in results.rows:
        for name in results.journals:
            cell = results.cells[(row.key, name)]
            rows.append(
                {
                    "workload": row.key,
                    "journal": name,
                    "unit": row.unit,
                    "rate": None if cell.failure else cell.median("rate"),
                    "p50_ms": cell.median("p50_ms"),
                    "p99_ms": cell.median("p99_ms"),
                    "vs_casty_sqlite": ratio(results, row.key, name, REFERENCE),
                    "vs_raw_driver": ratio(results, row.key, name, RAW_OF.get(name)),
                    "samples": [asdict(s) for s in cell.samples],
                    "peak_rss_mb": cell.peak_rss_mb,
                    "failure": cell.failure,
                }
            )
    return {
        "machine": results.machine,
        "sizes": asdict(results.sizes),
        "seconds": results.seconds,
        "rss_method": results.rss_method,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workloads": {row.key: f"{row.description} ({row.unit})" for row in results.rows},
        "results": rows,
        "targets": evaluate_targets(results),
    }


# -- peak RSS against the number of entities ------------------------------------------------------


def rss_scan(counts: list[int], journals: list[str], reps: int, as_json: bool) -> dict[str, Any]:
    """Run W2 alone in a fresh process per journal and entity count; compare peak RSS."""
    scans = []
    with contextlib.ExitStack() as exits:
        env = dict(os.environ)
        if any(name in ("sa-postgresql", "raw-asyncpg") for name in journals):
            url = exits.enter_context(postgres_server())
            env["CASTY_SA_BENCH_POSTGRES_URL"] = url.render_as_string(hide_password=False)
        for name in journals:
            for count in counts:
                progress(f"rss scan: {name}, W2 with {count:,} entities, in a fresh process")
                command = [
                    sys.executable, __file__, "--journals", name, "--workloads", "W2",
                    "--entities", str(count), "--reps", str(reps), "--json", "-",
                ]  # fmt: skip
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.stderr.write(done.stderr)
                    raise SystemExit(f"rss scan: {name} at {count} entities failed")
                child = json.loads(done.stdout)
                (result,) = child["results"]
                scans.append(
                    {
                        "journal": name,
                        "entities": count,
                        "events": count * Sizes().w2_persists,
                        "rate": result["rate"],
                        "process_peak_rss_mb": child["process_peak_rss_mb"],
                        "w2_peak_rss_mb": result["peak_rss_mb"],
                    }
                )
    report = {"scan": scans, "method": "ru_maxrss of a fresh process running only W2"}
    if not as_json:
        print("| journal | W2 entities | events | events/s | process peak RSS MB |")
        print("|---|---:|---:|---:|---:|")
        for s in scans:
            print(
                f"| {s['journal']} | {s['entities']:,} | {s['events']:,} | {s['rate']:,.0f} "
                f"| {s['process_peak_rss_mb']:.0f} |"
            )
    return report


# -- command line --------------------------------------------------------------------------------


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}"
        )
    return [n for n in allowed if n in names]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Side-by-side benchmark of casty event journals (see the module docstring)."
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition (smoke)")
    parser.add_argument(
        "--journals",
        type=lambda t: _names(t, JOURNALS, "journal"),
        default=list(JOURNALS),
        help=f"comma-separated, from {','.join(JOURNALS)} (default: all)",
    )
    parser.add_argument(
        "--workloads",
        type=lambda t: _names(t.upper(), WORKLOADS, "workload"),
        default=list(WORKLOADS),
        help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument("--reps", type=int, help="repetitions per measurement (default 5)")
    parser.add_argument("--entities", type=int, help="W2: number of concurrent entities (200)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds before one measurement is failed"
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the results as JSON to PATH ('-' or no value: stdout, instead of the table)",
    )
    parser.add_argument(
        "--rss-scan",
        metavar="N,N",
        help="instead: W2 alone in a fresh process per journal and entity count, "
        "reporting each process's peak RSS (e.g. 200,2000)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    overrides: dict[str, int] = {}
    if args.reps is not None:
        overrides["reps"] = max(1, args.reps)
    if args.entities is not None:
        overrides["w2_entities"] = max(1, args.entities)
    sizes = Sizes(**{**asdict(sizes), **overrides})
    if args.rss_scan:
        counts = [int(n) for n in args.rss_scan.split(",") if n.strip()]
        report = rss_scan(counts, args.journals, sizes.reps, args.json is not None)
        if args.json is not None:
            _write_json(report, args.json)
        return 0
    results = asyncio.run(run_benchmark(sizes, args.journals, args.workloads, args.timeout))
    if args.json != "-":
        print(render_table(results))
    if args.json is not None:
        _write_json(to_json(results), args.json)
    ours_failed = [
        key for key, cell in results.cells.items() if cell.failure and key[1] not in THIRD_PARTY
    ]
    return 1 if ours_failed else 0


def _write_json(report: dict[str, Any], path: str) -> None:
    text = json.dumps(report, indent=2, default=str)
    if path == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
