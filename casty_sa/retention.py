"""Deleting events for good: up to a sequence number (``delete_events``, ``prune``), or all
of an entity (``forget``).

A deleted sequence number is never used again: each deletion raises the entity's
tombstone (``casty_sa_tombstones``, migration ``0005``) to the highest number it
deleted, and every insert of events refuses a row at or below it in its transaction
(SQLite, PostgreSQL: in the statement that inserts it, :func:`casty_sa.ordering.unless_deleted`;
MySQL: one statement per packet, ``MySQLBackend._refuse_deleted``): the writer's caller gets
``SequenceConflict``, its neighbours in the group are stored.

No write of a deleted number can slip in between: a deleting transaction first takes
the lock every writer of events conflicts with, then reads what is stored, raises the
tombstone, deletes, and commits; a writer waiting for the lock runs its insert (and
its check) after that commit:

- SQLite: ``BEGIN IMMEDIATE`` (one writer at a time anyway);
- MySQL/MariaDB: the counter's row (``SELECT … FOR UPDATE``), which every write of
  events updates first in its transaction;
- PostgreSQL: ``LOCK TABLE casty_sa_events IN SHARE ROW EXCLUSIVE MODE``, which
  conflicts with the writers' ``ROW EXCLUSIVE`` (and with another deleter's lock, so
  two deleters never deadlock), not with readers' ``ACCESS SHARE``; bounded by
  ``lock_timeout``. PostgreSQL takes a statement's snapshot after the statement
  has its locks (``PortalStart`` runs after the plan's locks are acquired in
  ``exec_simple_query``/``exec_bind_message``, postgres.c; in READ COMMITTED each
  statement gets a fresh snapshot, see "Transaction Isolation" in PostgreSQL's
  docs), so a writer that waited sees the new tombstone.

Writers wait while a deletion runs: callers delete in bounded batches (``casty-sa
prune`` does), so the wait is milliseconds.

Examples
--------
>>> import asyncio
>>> from casty import PersistedEvent, Snapshot
>>> from casty_sa import SAJournal
>>> async def main() -> tuple[int, int]:
...     async with SAJournal("sqlite://") as journal:
...         await journal.persist("a", [PersistedEvent(n, "e", 1.0) for n in (1, 2, 3)])
...         await journal.save_snapshot("a", Snapshot(2, "state", 1.0))
...         deleted = await journal.delete_events("a", 2)
...         return deleted, await journal.highest_sequence_nr("a")
>>> asyncio.run(main())
(2, 3)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from casty_sa.backends.base import Backend
from casty_sa.backends.postgresql_drivers import driver_for
from casty_sa.calls import Inflight
from casty_sa.codec import check_entity_id
from casty_sa.diagnosis import Diagnosis
from casty_sa.dialects import Timeouts
from casty_sa.engine import AUTOCOMMIT_ENGINES
from casty_sa.errors import (
    CommitOutcomeUnknown,
    DeletionRefused,
    InvalidEventError,
    JournalError,
    SchemaError,
)
from casty_sa.models import journal_tables, tombstone_table
from casty_sa.urls import safe_url

__all__ = ["LOCK_TIMEOUT", "Cut", "Forgotten", "RetentionCalls", "delete_up_to", "forget"]

#: Seconds a deletion waits for writers to let it in (PostgreSQL's ``lock_timeout``).
LOCK_TIMEOUT = 10.0

type Turn = Callable[[], AbstractAsyncContextManager[None]]


@dataclass(frozen=True, slots=True)
class Cut:
    """What one entity's deletion did: the highest sequence number deleted, and how many.

    ``upto`` is ``None`` when nothing was deleted (no events at or below the number asked).
    """

    entity_id: str
    upto: int | None
    deleted: int


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What :func:`forget` removed of one entity: its events and its snapshot (0 or 1).

    Its tombstone went too: nothing of the entity is left in casty-sa's tables.
    """

    entity_id: str
    events: int
    snapshots: int


class RetentionCalls:
    """The retention calls of :class:`~casty_sa.SAJournal`: ``delete_events``, ``forget``."""

    _engine: AsyncEngine
    _schema: str | None
    _backend: Backend
    _diagnosis: Diagnosis
    _timeouts: Timeouts | None
    _inflight: Inflight

    async def start(self) -> None:  # SAJournal's
        raise NotImplementedError

    async def delete_events(
        self, entity_id: str, to_sequence_nr: int, *, force: bool = False
    ) -> int:
        """Delete the entity's events up to and including ``to_sequence_nr``; how many.

        Never beyond the latest snapshot unless ``force`` (:class:`DeletionRefused`,
        nothing deleted). A deleted sequence number is never used again: a later
        ``persist`` of it is a ``SequenceConflict``, and ``highest_sequence_nr`` still
        counts it. Writers wait while it runs (see :mod:`casty_sa.retention`). A caller
        cancelled meanwhile leaves the deletion to finish (or fail) on its own, as a write.
        """
        check_entity_id(entity_id)
        await self.start()
        # on its own task, as a write: a caller cancelled mid-statement would leave the
        # connection dropped by SQLAlchemy (a memory database's one connection: all of it)
        cuts = await self._inflight.shielded(
            delete_up_to(
                self._engine, [(entity_id, to_sequence_nr)], force=force, **self._retention()
            )
        )
        return cuts[0].deleted

    async def forget(self, entity_id: str) -> Forgotten:
        """Remove every event, the snapshot and the tombstone of ``entity_id``.

        Nothing of the entity is left in casty-sa's tables. Stop (passivate) the entity
        first: a casty entity still running keeps its state in memory, and its next
        ``persist`` would be stored with nothing before it (see docs/operations.md).
        """
        check_entity_id(entity_id)
        await self.start()
        return await self._inflight.shielded(forget(self._engine, entity_id, **self._retention()))

    def _retention(self) -> dict[str, Any]:
        timeouts = self._timeouts
        return {
            "schema": self._schema,
            "turn": self._backend.turn,
            "diagnosis": self._diagnosis,
            "statement_timeout": None if timeouts is None else timeouts.statement,
        }


async def delete_up_to(
    engine: AsyncEngine,
    cuts: Sequence[tuple[str, int]],
    *,
    schema: str | None = None,
    force: bool = False,
    turn: Turn | None = None,
    diagnosis: Diagnosis | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
    statement_timeout: float | None = None,
) -> list[Cut]:
    """Delete each entity's events up to a sequence number, in one transaction.

    For each ``(entity_id, to_sequence_nr)``: the events with ``sequence_nr <=
    min(to_sequence_nr, highest stored)``; the entity's tombstone rises to that number
    (never lowered). Without ``force``, a number beyond the entity's latest snapshot
    (or any number, without one) refuses the whole call, nothing deleted: recovery
    would start from nothing. An entity with no events there is left as it is (no
    tombstone is made for an id the journal does not hold).

    Parameters
    ----------
    engine : AsyncEngine
        The journal's database (its tables at head).
    cuts : Sequence[tuple[str, int]]
        ``(entity_id, to_sequence_nr)`` pairs; an entity at most once.
    schema : str | None
        PostgreSQL schema of the tables.
    force : bool
        Delete beyond the latest snapshot too.
    turn : Callable | None
        The backend's ``turn`` (a memory database's one connection is shared).
    diagnosis : Diagnosis | None
        How driver errors are worded (secrets masked); the engine's URL's by default.
    lock_timeout : float
        PostgreSQL: seconds to wait for the lock against writers.
    statement_timeout : float | None
        Seconds the client waits for each statement's answer (the lock's: ``lock_timeout``
        more), so a server that stopped answering fails the call instead of hanging it;
        ``None``: no bound of the client's.

    Returns
    -------
    list[Cut]
        One per entity, in the order given.

    Raises
    ------
    DeletionRefused
        Without ``force``, a cut beyond the entity's latest snapshot; nothing deleted.
    DatabaseUnavailable, SchemaError
        The database failed before the commit (nothing deleted: the transaction rolled back).
    CommitOutcomeUnknown
        The commit was sent and got no answer: the deletion may have happened.
    """
    entities = [entity_id for entity_id, _ in cuts]
    for entity_id, to in cuts:
        check_entity_id(entity_id)
        if type(to) is not int:
            raise InvalidEventError(f"to_sequence_nr must be an int, not {type(to).__name__}")
    if len(set(entities)) != len(entities):
        raise InvalidEventError("an entity may appear once in the cuts of one deletion")
    what = (
        f"delete events of {entities[0]!r}"
        if len(cuts) == 1
        else (f"delete events of {len(cuts)} entities")
    )
    bounds = (lock_timeout, statement_timeout)
    async with _locked(engine, schema, turn, diagnosis, what, bounds) as conn:
        return [await _cut(conn, schema, entity, to, force=force) for entity, to in cuts]


async def forget(
    engine: AsyncEngine,
    entity_id: str,
    *,
    schema: str | None = None,
    turn: Turn | None = None,
    diagnosis: Diagnosis | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
    statement_timeout: float | None = None,
) -> Forgotten:
    """Remove every event, the snapshot and the tombstone of ``entity_id``, in one
    transaction: nothing of it is left in casty-sa's tables (see
    :meth:`casty_sa.SAJournal.forget` for a casty entity still running)."""
    events, snapshots = journal_tables(schema)
    tombstones = tombstone_table(schema)
    bounds = (lock_timeout, statement_timeout)
    async with _locked(engine, schema, turn, diagnosis, f"forget {entity_id!r}", bounds) as conn:
        removed = [
            (await conn.execute(delete(table).where(table.c.entity_id == entity_id))).rowcount
            for table in (events, snapshots, tombstones)
        ]
    return Forgotten(entity_id, removed[0], removed[1])


class _Steps:
    """Each statement of a deletion answered within ``each`` seconds (``None``: no bound):
    the call's timeout moved on before each one. On PostgreSQL the connection is aborted
    at the bound (a statement waiting on it fails at once): psycopg answers a cancelled
    await by asking the server to cancel, and waits for an answer it never gets."""

    def __init__(self, timer: asyncio.Timeout, each: float | None) -> None:
        self._timer = timer
        self._each = each
        self._abort: Callable[[], None] | None = None
        self._aborting: asyncio.TimerHandle | None = None

    def arm(self, more: float = 0.0) -> None:
        """The next statement's bound: ``each``, and ``more`` seconds."""
        if self._each is None:
            return
        loop = asyncio.get_running_loop()
        bound = self._each + more
        if self._aborting is not None:
            self._aborting.cancel()
        if self._abort is not None:
            self._aborting = loop.call_later(bound, self._abort)
            bound += 1.0  # the abort fails the statement first; the timeout is a backstop
        self._timer.reschedule(loop.time() + bound)

    def disarm(self) -> None:
        if self._aborting is not None:
            self._aborting.cancel()

    def on(self, conn: AsyncConnection) -> _Bounded:
        if conn.dialect.name == "postgresql" and self._abort is None:
            raw = (
                conn.sync_connection.connection.driver_connection if conn.sync_connection else None
            )
            driver = driver_for(conn.dialect.driver)
            self._abort = lambda: driver.abort(raw)
        return _Bounded(conn, self)


class _Bounded:
    """The deletion's connection, its statements bounded by :class:`_Steps`."""

    def __init__(self, conn: AsyncConnection, steps: _Steps) -> None:
        self.dialect = conn.dialect
        self._conn = conn
        self._steps = steps

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        self._steps.arm()
        return await self._conn.execute(statement, parameters)

    async def exec_driver_sql(self, sql: str, *, waits: float = 0.0) -> Any:
        """``sql``, bounded by the statement's bound and ``waits`` more (a lock's wait)."""
        self._steps.arm(waits)
        return await self._conn.exec_driver_sql(sql)


async def _cut(conn: _Bounded, schema: str | None, entity_id: str, to: int, *, force: bool) -> Cut:
    """One entity's deletion, inside the locked transaction."""
    events, snapshots = journal_tables(schema)
    stored = select(func.max(events.c.sequence_nr)).where(events.c.entity_id == entity_id)
    highest = (await conn.execute(stored)).scalar()
    upto = min(to, highest or 0)
    if upto < 1:
        return Cut(entity_id, None, 0)  # no events there (none at all, or none that low)
    if not force:
        held = select(snapshots.c.sequence_nr).where(snapshots.c.entity_id == entity_id)
        snapshot = (await conn.execute(held)).scalar()
        if snapshot is None or upto > snapshot:
            raise DeletionRefused(entity_id, upto, snapshot)
    await conn.execute(_raise_tombstone(conn, schema), {"entity_id": entity_id, "n": upto})
    gone = delete(events).where(events.c.entity_id == entity_id, events.c.sequence_nr <= upto)
    deleted = (await conn.execute(gone)).rowcount
    return Cut(entity_id, upto if deleted else None, deleted)


def _raise_tombstone(conn: _Bounded, schema: str | None) -> Any:
    """The upsert that raises an entity's tombstone to ``:n``, never lowering it."""
    table = tombstone_table(schema)
    values: dict[str, Any] = {"entity_id": bindparam("entity_id"), "sequence_nr": bindparam("n")}
    if conn.dialect.name in ("mysql", "mariadb"):
        insert = mysql.insert(table).values(values)
        higher = func.greatest(table.c.sequence_nr, insert.inserted.sequence_nr)
        return insert.on_duplicate_key_update(sequence_nr=higher)
    module = postgresql if conn.dialect.name == "postgresql" else sqlite
    upsert = module.insert(table).values(values)
    return upsert.on_conflict_do_update(
        index_elements=[table.c.entity_id],
        set_={"sequence_nr": upsert.excluded.sequence_nr},
        where=upsert.excluded.sequence_nr > table.c.sequence_nr,
    )


@asynccontextmanager
async def _locked(
    engine: AsyncEngine,
    schema: str | None,
    turn: Turn | None,
    diagnosis: Diagnosis | None,
    what: str,
    bounds: tuple[float, float | None],
) -> AsyncIterator[_Bounded]:
    """A transaction holding the lock every writer of events conflicts with (see the
    module's docstring); committed when the block ends, rolled back on any failure.

    A ``COMMIT`` that fails may have committed (the connection lost with it on its way):
    :class:`CommitOutcomeUnknown`, never "nothing deleted". A deletion is safe to repeat.
    ``bounds``: the lock's wait (PostgreSQL) and each statement's answer on the client
    (``None``: unbounded): a server that stops answering fails the call (its connection
    dropped, never reset over the wire) instead of hanging it.
    """
    diagnosis = diagnosis or Diagnosis(engine.url, schema=schema)
    lock_timeout, each = bounds
    committing = committed = False
    try:
        async with (turn or nullcontext)(), asyncio.timeout(None) as timer:
            step = _Steps(timer, each)
            step.arm(each or 0.0)  # a checkout may open a connection
            try:
                async with engine.connect() as conn, conn.begin() as transaction:
                    bounded = step.on(conn)
                    await _lock(bounded, engine, schema, lock_timeout)
                    yield bounded
                    committing = True
                    step.arm()
                    await transaction.commit()
                    committed = True
            finally:
                step.disarm()
    except Exception as exc:
        if committed:
            # the bound fired while the connection went back to the pool (it is dropped, not
            # reset): the deletion is committed, and that is the caller's answer
            return
        if isinstance(exc, JournalError):
            raise
        if committing:
            raise CommitOutcomeUnknown(
                f"could not {what} on {safe_url(diagnosis.url)}: "
                f"{diagnosis.describe(exc)}, after the commit was sent. The events may or may "
                "not be deleted; run the same deletion again (it is safe to repeat)"
            ) from exc
        raise diagnosis.error(exc, what, "nothing was deleted") from exc


async def _lock(
    conn: _Bounded, engine: AsyncEngine, schema: str | None, lock_timeout: float
) -> None:
    """Take the writers' lock, first in the transaction (see the module's docstring)."""
    events, _ = journal_tables(schema)
    name = conn.dialect.name
    preparer = conn.dialect.identifier_preparer
    if name == "sqlite":
        if engine.sync_engine not in AUTOCOMMIT_ENGINES:
            # an application's engine: the driver begins a deferred transaction before the
            # first write only; begin it now, as a writer, before anything is read
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        return  # casty-sa's engines begin every transaction with BEGIN IMMEDIATE
    if name == "postgresql":
        milliseconds = max(1, round(lock_timeout * 1000))
        await conn.exec_driver_sql(f"SET LOCAL lock_timeout = {milliseconds}")
        table = preparer.format_table(events)
        lock = f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"
        await conn.exec_driver_sql(lock, waits=lock_timeout)
        return
    counter = preparer.quote("casty_sa_event_counter")
    if schema is not None:
        counter = f"{preparer.quote_schema(schema)}.{counter}"
    position = preparer.quote("position")
    found = await conn.exec_driver_sql(f"SELECT {position} FROM {counter} WHERE id = 1 FOR UPDATE")
    if found.first() is None:
        raise SchemaError(
            f"casty_sa_event_counter on {safe_url(engine.url)} has no row, which a deletion "
            "locks against writers: run `casty-sa upgrade` (migration 0004 makes it), or "
            "write one event through SAJournal first; nothing was deleted"
        )
