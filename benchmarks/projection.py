"""The projection workloads: P1 (catch-up into a read model) and P2 (live, under W2's load).

Both run a ``casty_sa.Projection`` whose handler keeps a one-row-per-entity
table (``bench_balances``: an upsert of a balance per event, the read model of
a bank), and check it: every balance the fold of its entity's events, each
event handled once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import (
    URL,
    BigInteger,
    Column,
    MetaData,
    String,
    Table,
    delete,
    event,
    select,
    text,
)
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from casty_sa import EventEnvelope, Projection, SAJournal
from casty_sa.models import ProjectionOffsetRecord

from .base import Row, Sample, Sizes, Workload, sample
from .data import WrongAnswer, event_of
from .journals import READ_SIDE, Journal
from .mysql import mysql_execute
from .postgres import asyncpg_args
from .read_side import read_side

BatchHandler = Callable[[AsyncSession, Sequence[EventEnvelope]], Awaitable[None]]
#: how long P2 waits for the read model to hold the last event once the writers are done
_DELIVERY_LIMIT = 60.0

_METADATA = MetaData()
BALANCES = Table(
    "bench_balances",
    _METADATA,
    Column("account", String(255), primary_key=True),
    Column("balance", BigInteger, nullable=False),
    Column("events", BigInteger, nullable=False),
)
_INSERT = "INSERT INTO bench_balances (account, balance, events) VALUES (:account, :amount, :n) "
#: the upsert by dialect name: one text on SQLite (3.24+) and PostgreSQL, another on MySQL
_UPSERTS = {
    "sqlite": text(
        _INSERT + "ON CONFLICT (account) DO UPDATE SET "
        "balance = bench_balances.balance + excluded.balance, "
        "events = bench_balances.events + excluded.events"
    ),
    "mysql": text(
        _INSERT + "ON DUPLICATE KEY UPDATE "
        "balance = balance + VALUES(balance), events = events + VALUES(events)"
    ),
}
_UPSERTS["postgresql"] = _UPSERTS["sqlite"]
_UPSERTS["mariadb"] = _UPSERTS["mysql"]
#: ``session.info`` keys: the events handled in the open transaction, and who hears of commits
_PENDING, _ON_COMMIT = "bench.pending", "bench.on_commit"


async def upsert_balance(session: AsyncSession, envelope: EventEnvelope) -> None:
    """The read model's handler: the entity's row gains the deposit (one statement)."""
    amount = envelope.event.amount
    upsert = _UPSERTS[session.get_bind().dialect.name]
    await session.execute(upsert, {"account": envelope.entity_id, "amount": amount, "n": 1})


async def upsert_totals(session: AsyncSession, envelopes: Sequence[EventEnvelope]) -> None:
    """The batch handler (``Projection.batched``): the batch's totals per entity, one upsert."""
    totals: dict[str, list[int]] = {}
    for envelope in envelopes:
        total = totals.setdefault(envelope.entity_id, [0, 0])
        total[0] += envelope.event.amount
        total[1] += 1
    rows = [{"account": e, "amount": a, "n": n} for e, (a, n) in totals.items()]
    await session.execute(_UPSERTS[session.get_bind().dialect.name], rows)


async def install_read_model(engine: AsyncEngine, *, offsets: bool = False) -> None:
    """Create ``bench_balances`` (and, for a database of its own, the offsets table)."""
    tables = [BALANCES, ProjectionOffsetRecord.__table__] if offsets else [BALANCES]
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: _METADATA.create_all(sync, tables=tables))  # type: ignore[arg-type]


async def check_balances(engine: AsyncEngine, expected: dict[str, int]) -> None:
    """Raise ``WrongAnswer`` unless each entity of ``expected`` (name: events) has its fold."""
    wanted = {entity: (n * (n + 1) // 2, n) for entity, n in expected.items()}
    async with engine.connect() as conn:
        rows = await conn.execute(select(BALANCES.c.account, BALANCES.c.balance, BALANCES.c.events))
        got = {account: (balance, events) for account, balance, events in rows}
    wrong = {entity: got.get(entity) for entity in wanted if got.get(entity) != wanted[entity]}
    if wrong:
        sample = dict(itertools.islice(wrong.items(), 3))
        raise WrongAnswer(
            f"{len(wrong)} balances differ from the fold of their events, e.g. {sample} "
            f"(balance, events) where {[wanted[e] for e in sample]} was due"
        )


async def clear_read_model(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(BALANCES))


class _Stamping(Session):
    """A session that tells ``info[_ON_COMMIT]`` which events each commit made visible."""


@event.listens_for(_Stamping, "after_commit")
def _committed(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if pending:
        session.info[_ON_COMMIT](pending)


@event.listens_for(_Stamping, "after_rollback")
def _rolled_back(session: Session) -> None:
    session.info.pop(_PENDING, None)


async def noting_totals(session: AsyncSession, envelopes: Sequence[EventEnvelope]) -> None:
    """``upsert_totals``, noting the events for the commit's listener."""
    await upsert_totals(session, envelopes)
    noted = session.info.setdefault(_PENDING, [])
    noted.extend((envelope.entity_id, envelope.sequence_nr) for envelope in envelopes)


@contextlib.asynccontextmanager
async def other_database(journal: SAJournal) -> AsyncIterator[AsyncEngine]:
    """A database of its own beside the journal's (a file beside it, or a database on the
    same PostgreSQL or MySQL server), holding the read model and its offsets, dropped
    afterwards."""
    url = journal.engine.url
    if url.get_backend_name() == "sqlite":
        path = f"{url.database}-read-model.db"
        engine = create_async_engine(url.set(database=path))
        try:
            yield engine
        finally:
            await engine.dispose()
            _remove_sqlite_files(path)
        return
    name = f"{url.database}_read_model"
    mysql = url.get_backend_name() in ("mysql", "mariadb")
    quoted = f"`{name}`" if mysql else f'"{name}"'
    admin = _admin_mysql if mysql else _admin
    await admin(url, f"CREATE DATABASE {quoted}")
    engine = create_async_engine(url.set(database=name))
    try:
        yield engine
    finally:
        await engine.dispose()
        await admin(url, f"DROP DATABASE IF EXISTS {quoted}" + ("" if mysql else " WITH (FORCE)"))


def _remove_sqlite_files(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def _admin_mysql(url: URL, statement: str) -> None:
    await mysql_execute(url.set(database=None), statement)


async def _admin(url: URL, statement: str) -> None:
    conn = await asyncpg.connect(**asyncpg_args(url))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


class P1(Workload):
    """A projection catching up from the start, against a catch-up read of the same journal."""

    key = "P1"
    fresh_per_rep = False
    journals = READ_SIDE

    def __init__(self, sizes: Sizes) -> None:
        self.per = sizes.p1_per_entity
        self.ids = [f"p1-{i:05d}" for i in range(sizes.p1_entities)]
        self.n = len(self.ids) * self.per + 1  # and the warm-up's event
        self.names = (f"p1-{i}" for i in itertools.count())
        self.rows = (
            Row(
                "P1 read",
                "events/s",
                f"read all {self.n:,} events ({len(self.ids):,} entities, written interleaved) "
                "with journal.events(), counting them (p50: the whole read)",
            ),
            Row(
                "P1 projection",
                "events/s",
                "a Projection catches up over the same events (catch_up(), batches of 1000), its "
                "handler upserting one row per entity (a balance) in the journal's database "
                "(p50: the whole catch-up)",
            ),
            Row(
                "P1 batched",
                "events/s",
                "the same with Projection.batched: its handler gets each batch's events in one "
                "call and writes their totals per entity as one executemany upsert",
            ),
            Row(
                "P1 other db",
                "events/s",
                "the same projection with its read model and offsets in another database "
                "(a second SQLite file; a second database on the same PostgreSQL or MySQL server)",
            ),
        )

    async def prepare(self, journal: Journal) -> None:
        for chunk in range(0, len(self.ids), 200):
            ids = self.ids[chunk : chunk + 200]
            await asyncio.gather(
                *(journal.persist(e, [event_of(e, s) for s in range(1, self.per + 1)]) for e in ids)
            )
        await install_read_model(read_side(journal).engine)

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        journal = read_side(journal)
        clock = time.perf_counter
        start = clock()
        count, last = 0, ""
        async with journal.events() as stream:
            async for envelope in stream:
                count += 1
                last = envelope.offset
        read = clock() - start
        if count != self.n:
            raise WrongAnswer(f"the catch-up read gave {count} events, not {self.n}")
        await clear_read_model(journal.engine)
        projected = await self._project(journal, journal.engine, None, last)
        await clear_read_model(journal.engine)
        batched = await self._project(journal, journal.engine, None, last, upsert_totals)
        async with other_database(journal) as engine:
            await install_read_model(engine, offsets=True)
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            elsewhere = await self._project(journal, engine, sessions, last)
        return {
            "P1 read": Sample(count / read, read * 1000),
            "P1 projection": Sample(count / projected, projected * 1000),
            "P1 batched": Sample(count / batched, batched * 1000),
            "P1 other db": Sample(count / elsewhere, elsewhere * 1000),
        }

    async def _project(
        self,
        journal: SAJournal,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession] | None,
        last: str,
        batch_handler: BatchHandler | None = None,
    ) -> float:
        """Seconds a fresh projection takes to catch up, checked: count, offset, read model."""
        name = next(self.names)
        projection = (
            Projection(name, journal, upsert_balance, sessions=sessions)
            if batch_handler is None
            else Projection.batched(name, journal, batch_handler, sessions=sessions)
        )
        start = time.perf_counter()
        handled = await projection.catch_up()
        elapsed = time.perf_counter() - start
        if handled != self.n:
            raise WrongAnswer(f"the projection handled {handled} events, not {self.n}")
        if (offset := await projection.offset()) != last:
            raise WrongAnswer(f"the projection stopped at {offset}, not at {last}")
        await check_balances(engine, {**dict.fromkeys(self.ids, self.per), "warm-up": 1})
        return elapsed


class P2(Workload):
    """A live projection under W2's load: from a persist's return to the read model's commit."""

    key = "P2"
    journals = READ_SIDE

    def __init__(self, sizes: Sizes) -> None:
        self.ids = [f"p2-{i:05d}" for i in range(sizes.w2_entities)]
        self.per = sizes.w2_persists
        self.rows = (
            Row(
                "P2",
                "events/s",
                f"a Projection.batched runs live (run(), its own journal on the same database) "
                "while "
                f"{len(self.ids):,} entities make {self.per} persists of 1 event each (W2); "
                "rate: events over the time to the last one's read-model commit; p50/p99: from "
                "a persist's return to the commit of the read model holding its event",
            ),
            Row(
                "P2 end lag",
                "ms",
                "the lag at the end: from the last writer's return to the read model holding "
                "every event",
            ),
        )

    async def measure(self, journal: Journal) -> dict[str, Sample]:
        journal = read_side(journal)
        await install_read_model(journal.engine)
        # its own journal, so new events reach it through the database (NOTIFY, polling)
        follower = SAJournal(journal.engine.url)
        await follower.start()
        try:
            return await self._measure(journal, follower)
        finally:
            await follower.close()

    async def _measure(self, journal: SAJournal, follower: SAJournal) -> dict[str, Sample]:
        clock = time.perf_counter
        expected = len(self.ids) * self.per
        persisted: dict[tuple[str, int], float] = {}
        visible: dict[tuple[str, int], float] = {}
        twice: list[tuple[str, int]] = []
        ready, done = asyncio.Event(), asyncio.Event()
        loaded = set(self.ids)

        def on_commit(keys: list[tuple[str, int]]) -> None:
            # runs inside the projection's commit: it notes, and the checks come afterwards
            now = clock()
            for key in keys:
                if key[0] not in loaded:  # the warm-up's event, or the ready one
                    if key[0] == "p2-ready":
                        ready.set()  # committed after the projection began: it follows
                elif key in visible:
                    twice.append(key)
                else:
                    visible[key] = now
            if len(visible) == expected:
                done.set()

        sessions = _stamping_sessions(follower.engine, on_commit)
        projection = Projection.batched("p2", follower, noting_totals, sessions=sessions)

        async def writer(entity: str) -> None:
            for seq in range(1, self.per + 1):
                await journal.persist(entity, [event_of(entity, seq)])
                persisted[(entity, seq)] = clock()

        running = asyncio.create_task(projection.run())
        try:
            await journal.persist("p2-ready", [event_of("p2-ready", 1)])
            await _until(ready, running, _DELIVERY_LIMIT, "the projection was ready")
            start = clock()
            await asyncio.gather(*(writer(entity) for entity in self.ids))
            written = clock()
            await _until(done, running, _DELIVERY_LIMIT, "the read model held every event")
        finally:
            await projection.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(running, _DELIVERY_LIMIT)
        if twice:
            raise WrongAnswer(f"{len(twice)} events committed to the read model twice: {twice[:3]}")
        if set(visible) != set(persisted):
            raise WrongAnswer(f"the read model has {len(visible)} events of {len(persisted)}")
        await check_balances(journal.engine, dict.fromkeys(self.ids, self.per))
        last = max(visible.values())
        # the read model may hold an event before its writer hears of the commit: 0 then
        lags = [max(0.0, visible[key] - at) for key, at in persisted.items()]
        end_lag = max(0.0, last - written) * 1000
        return {
            "P2": sample(expected, last - start, lags),
            "P2 end lag": Sample(end_lag, end_lag),
        }


def _stamping_sessions(
    engine: AsyncEngine, on_commit: Callable[[list[tuple[str, int]]], None]
) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(
        engine, sync_session_class=_Stamping, expire_on_commit=False, info={_ON_COMMIT: on_commit}
    )


async def _until(
    happened: asyncio.Event, running: asyncio.Task[Any], limit: float, what: str
) -> None:
    """Wait for ``happened`` while the projection runs; its failure, or a timeout, raises."""
    waiting = asyncio.create_task(happened.wait())
    try:
        await asyncio.wait({running, waiting}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if happened.is_set():
        return
    if running.done():
        running.result()  # its failure, if it failed
        raise WrongAnswer(f"the projection stopped before {what}")
    raise WrongAnswer(f"no sign within {limit:.0f} s that {what}")
