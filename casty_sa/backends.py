"""The journal's hot paths: Core statements compiled once, run on the pooled driver connection.

Every statement here is a SQLAlchemy Core construct built from the declarative
tables and compiled once per dialect (and schema) when the journal starts. At
call time the rows go straight to the driver connection that SQLAlchemy's pool
hands out, so a ``persist`` pays for the database work and little else: no
per-call compilation, ORM session or greenlet hop per statement. The pool,
its checkout and the connect-time pragmas stay SQLAlchemy's.

SQLite (``aiosqlite``)
    On engines casty-sa creates, the driver runs in autocommit mode and a
    write group is one multi-row ``INSERT`` (or snapshot upsert) that SQLite
    commits on its own: one trip to the driver's thread. Larger or mixed
    groups use ``BEGIN IMMEDIATE`` … ``COMMIT``. Reads go to one reader
    connection the journal keeps; a batch of reads is one query joining the
    keys of a JSON parameter (``json_each``).
PostgreSQL (``asyncpg``)
    One statement per write group in autocommit: the rows travel as four
    arrays and are inserted from ``unnest(...)``, so a group of any size costs
    one round trip and is atomic. A group that also carries snapshots uses an
    explicit transaction. A batch of reads joins ``unnest(...) WITH
    ORDINALITY`` of the keys' arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import operator
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    String,
    Table,
    and_,
    bindparam,
    case,
    event,
    func,
    insert,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.compiler import Compiled
from sqlalchemy.util import greenlet_spawn

from casty_sa.coalescing import SharedAttempt
from casty_sa.engine import AUTOCOMMIT_ENGINES, Timeouts
from casty_sa.errors import DatabaseFileReplaced, JournalClosed
from casty_sa.models import SQLITE_NEGATIVE_ZERO, is_negative_zero, journal_tables
from casty_sa.urls import is_memory_sqlite

__all__ = [
    "PING_AFTER",
    "PING_TIMEOUT",
    "Backend",
    "ConnectionLost",
    "Contended",
    "Row",
    "WriteRefused",
    "backend_for",
    "classify_write_failure",
]

#: Seconds a pooled connection may sit unused before a checkout proves it alive.
PING_AFTER = 0.005
#: Seconds a liveness ping may take by default (the journal passes its own, from its timeouts).
PING_TIMEOUT = 10.0
_CHECKOUT_ATTEMPTS = 3
_RELEASED = "casty_sa_released"

#: (entity_id, sequence_nr, timestamp, payload), the column order of both tables
Row = tuple[str, int, float, bytes]
#: (sequence_nr, payload, timestamp) of a stored event or snapshot, as reads return it
Stored = tuple[int, bytes, float]


class WriteRefused(Exception):
    """The database refused the rows themselves (a duplicate key, a bad value).

    Nothing of the transaction was stored. ``duplicate`` tells a primary-key
    violation (a sequence number already stored) from other refusals.
    """

    def __init__(self, cause: BaseException, *, duplicate: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.duplicate = duplicate


class Contended(Exception):
    """The database rolled the whole transaction back to break a deadlock or a
    serialization conflict with another transaction.

    Nothing of it was stored, and the same write may well succeed when sent again.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ConnectionLost(Exception):
    """The write failed in a way the database did not answer for.

    ``during_commit`` False: nothing reached the database (the driver refused to
    send it), so the write may go again on another connection. True: the
    statement that commits had been sent (an autocommit statement or
    ``COMMIT``) when the connection broke, timed out or the database hit an
    I/O error, so it may be stored.
    """

    def __init__(self, cause: BaseException, *, during_commit: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.during_commit = during_commit


class Backend:
    """Statements of one dialect and the code that runs them on a driver connection."""

    dialect_name = ""

    def __init__(
        self, engine: AsyncEngine, schema: str | None, *, ping_timeout: float = PING_TIMEOUT
    ) -> None:
        self._engine = engine
        # callers beyond what the pool holds wait here, cheaply, instead of in the pool
        self.capacity = _pool_capacity(engine)
        self._gate = asyncio.Semaphore(self.capacity)
        self.hold_writes = False
        #: seconds a kept writer connection may sit unused before it goes back to the pool
        self.hold_linger = 0.01
        #: seconds a liveness ping may take: a server that does not answer ``SELECT 1``
        #: by then is taken for gone (see :meth:`_alive`)
        self.ping_timeout = ping_timeout
        self._held: Any = None
        self._idle_check: asyncio.TimerHandle | None = None
        self._giving_back: set[asyncio.Task[None]] = set()
        events, snapshots = journal_tables(schema)
        self.events, self.snapshots = events, snapshots
        dialect = engine.dialect
        self._load_events = self._compile(
            select(events.c.sequence_nr, events.c.payload, self._timestamp(events))
            .where(events.c.entity_id == bindparam("entity_id"))
            .where(events.c.sequence_nr >= bindparam("from_nr"))
            .order_by(events.c.sequence_nr)
        )
        self._load_snapshot = self._compile(
            select(snapshots.c.sequence_nr, snapshots.c.payload, self._timestamp(snapshots)).where(
                snapshots.c.entity_id == bindparam("entity_id")
            )
        )
        self._min_stored = self._compile(
            select(func.min(events.c.sequence_nr))
            .where(events.c.entity_id == bindparam("entity_id"))
            .where(events.c.sequence_nr >= bindparam("low"))
            .where(events.c.sequence_nr <= bindparam("high"))
        )
        self._dialect = dialect

    def _timestamp(self, table: Table) -> Any:
        """The ``timestamp`` column of ``table`` as reads select it (a float)."""
        return table.c.timestamp

    def _compile(self, statement: Any) -> str:
        compiled: Compiled = statement.compile(dialect=self._engine.dialect)
        return compiled.string

    def _newer_snapshot_wins(self, upsert: Any) -> str:
        """``upsert`` (the dialect's ``INSERT``) made to replace only an older snapshot."""
        return self._compile(
            upsert.on_conflict_do_update(
                index_elements=[self.snapshots.c.entity_id],
                set_={k: upsert.excluded[k] for k in ("sequence_nr", "timestamp", "payload")},
                where=upsert.excluded.sequence_nr >= self.snapshots.c.sequence_nr,
            )
        )

    def _events_of_keys(self, keys: Any, number: Any, entity_id: Any, from_nr: Any) -> str:
        """The events of every ``(entity_id, from_nr)`` row of ``keys``, led by its ``number``."""
        events = self.events
        return self._compile(
            select(number, events.c.sequence_nr, events.c.payload, self._timestamp(events))
            .join_from(
                keys,
                events,
                and_(events.c.entity_id == entity_id, events.c.sequence_nr >= from_nr),
            )
            .order_by(number, events.c.sequence_nr)
        )

    def _snapshots_of_keys(self, keys: Any, number: Any, entity_id: Any) -> str:
        """The snapshot of each ``entity_id`` row of ``keys`` that has one, led by ``number``."""
        snapshots = self.snapshots
        return self._compile(
            select(
                number, snapshots.c.sequence_nr, snapshots.c.payload, self._timestamp(snapshots)
            ).join_from(keys, snapshots, snapshots.c.entity_id == entity_id)
        )

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A live driver connection from SQLAlchemy's pool, returned on exit.

        A connection that failed at the transport level is invalidated, so the
        pool replaces it instead of handing it out again.
        """
        async with self._gate:
            fairy = await self._checkout()
            try:
                yield fairy.driver_connection
            except BaseException as exc:
                await self._release(fairy, exc if self.is_disconnect(exc) else None)
                raise
            await self._release(fairy, None)

    async def take_writer(self) -> Any:
        """The pooled connection (fairy) a write uses; hand it back with :meth:`give_back_writer`.

        With ``hold_writes`` on, the connection is kept between groups: group
        commit has one flusher, so consecutive groups share one connection
        instead of a pool checkout each. :meth:`release_held` gives it back
        once the flusher goes idle, and it goes back at once whenever every
        other connection is in use (readers never starve behind it). The pair
        is two plain calls rather than a context manager because it sits on
        every write's path.
        """
        fairy = None
        if self.hold_writes:
            fairy, self._held = self._held, None
            if fairy is not None:
                try:
                    alive = await self._alive(fairy)
                except BaseException:
                    self._gate.release()  # _alive gave the connection back; its permit too
                    raise
                if not alive:
                    fairy = None
                    self._gate.release()
        if fairy is None:
            await self._gate.acquire()
            try:
                fairy = await self._checkout()
            except BaseException:
                self._gate.release()
                raise
        return fairy

    async def give_back_writer(self, fairy: Any, exc: BaseException | None) -> None:
        """Return (or keep) the writer's connection; ``exc``: how the write failed, if it did.

        A write cut off by cancellation may still be running on the connection, so the
        connection goes back to the pool, whose reset (a rollback queued behind that
        statement) leaves it clean, instead of being kept for the next write.
        """
        if exc is not None and self.is_disconnect(exc):
            await self._give_back(fairy, exc)
        elif self.hold_writes and (exc is None or isinstance(exc, Exception)):
            await self._keep(fairy)
        else:
            await self._give_back(fairy, None)

    async def _give_back(self, fairy: Any, exc: BaseException | None) -> None:
        """Return a connection to the pool and its permit to the gate, even if cancelled.

        A caller cancelled again while the pool resets the connection (its rollback)
        still gives the permit back; SQLAlchemy invalidates a connection whose reset was
        cut off, so the pool's own count stays right too.
        """
        try:
            await self._release(fairy, exc)
        finally:
            self._gate.release()

    async def _keep(self, fairy: Any) -> None:
        """Hold on to the writer's connection, unless readers are waiting for one.

        With groups in flight side by side, one connection is kept; the others
        go back to the pool.
        """
        fairy.info[_RELEASED] = time.monotonic()
        if self._gate.locked() or self._held is not None:
            await self._give_back(fairy, None)
        else:
            self._held = fairy
            if self._idle_check is None:
                loop = asyncio.get_running_loop()
                self._idle_check = loop.call_later(self.hold_linger, self._check_idle)

    def _check_idle(self) -> None:
        """Give the kept connection back once it sat unused for ``hold_linger``."""
        self._idle_check = None
        fairy = self._held
        if fairy is None:
            return
        loop = asyncio.get_running_loop()
        unused = time.monotonic() - fairy.info[_RELEASED]
        if unused < self.hold_linger:
            self._idle_check = loop.call_later(self.hold_linger - unused, self._check_idle)
            return
        task = loop.create_task(self.release_held(), name="casty_sa-release-writer")
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def release_held(self) -> None:
        """Return the connection kept for writes to the pool."""
        fairy, self._held = self._held, None
        if fairy is not None:
            await self._give_back(fairy, None)

    async def _checkout(self) -> Any:
        """A pooled connection, checked to be alive when it sat unused for a while.

        A connection the server ended is replaced by the next one; a ping that timed
        out fails the checkout (see :meth:`_alive`).
        """
        for _ in range(_CHECKOUT_ATTEMPTS):
            fairy = await self._engine.raw_connection()
            if await self._alive(fairy):
                return fairy
        return await self._engine.raw_connection()  # its error, if any, surfaces on use

    async def _alive(self, fairy: Any) -> bool:
        """False (and the connection invalidated) when the connection is gone.

        A connection used a moment ago is trusted; one that sat idle longer than
        :data:`PING_AFTER` gets one round trip (where the backend needs it), the
        job SQLAlchemy's ``pool_pre_ping`` does in three on asyncpg.

        A ping that gets no answer within :attr:`ping_timeout` raises its
        ``TimeoutError``: the server itself (not this one connection) is most
        likely hung or unreachable, and pinging the pool's other connections
        one after another would multiply the wait.
        """
        driver = fairy.driver_connection
        try:
            if not self.usable(driver):
                raise ConnectionLost(OSError("connection closed"), during_commit=False)
            idle = time.monotonic() - fairy.info.get(_RELEASED, 0.0)
            if idle > PING_AFTER:
                await self.ping(driver)
            return True
        except BaseException as exc:
            # whatever failed ``SELECT 1`` (a server that ended the session, a protocol left
            # mid-way, a caller cancelled mid-ping) makes this connection one not to reuse
            if isinstance(exc, TimeoutError):
                # nor wait for a server that does not answer to acknowledge a goodbye
                # (SQLAlchemy's invalidation tries a graceful close first); a ping leaves
                # nothing on the server that a cancel request would have to stop
                self.abort(driver)
            await self._release(fairy, exc)
            if not isinstance(exc, Exception) or isinstance(exc, TimeoutError):
                raise
            return False

    async def _release(self, fairy: Any, exc: BaseException | None) -> None:
        """Back to the pool, or invalidated first when ``exc`` says it is broken."""
        fairy.info[_RELEASED] = time.monotonic()
        if exc is not None:
            await greenlet_spawn(fairy.invalidate, exc if isinstance(exc, Exception) else None)
        await greenlet_spawn(fairy.close)

    async def ping(self, driver_connection: Any) -> None:
        """Prove the connection alive with one round trip (no-op where not needed)."""

    def abort(self, driver_connection: Any) -> None:
        """Close a connection at once, without a word to the server (no-op where not needed)."""

    #: Write groups in flight at once (see :mod:`casty_sa.batching`): 1 where the database
    #: has a single writer anyway.
    write_pipeline = 1

    #: Whether a statement whose caller is cancelled still runs to its end on its own (the
    #: driver finishes it on the connection's thread), so callers may run reads and writes
    #: in their own task; otherwise the journal runs them in a task that cannot be cut off
    #: half-way (see ``SAJournal._shielded``), since that could leave the connection unusable.
    cancel_safe = False

    async def close(self) -> None:
        """Release what the backend holds outside the pool (the writer's kept connection)."""
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        await self.release_held()
        if self._giving_back:
            await asyncio.gather(*self._giving_back, return_exceptions=True)

    def usable(self, driver_connection: Any) -> bool:
        """Whether a held connection may be used again without asking the pool."""
        return True

    def is_disconnect(self, exc: BaseException) -> bool:
        """True when ``exc`` means the connection itself is gone."""
        return isinstance(exc, OSError | ConnectionLost)

    async def write(self, events: Sequence[Row], snapshots: Sequence[Row]) -> None:
        """Store events and snapshot upserts atomically (all or nothing)."""
        raise NotImplementedError

    async def fetch_events(self, entity_id: str, from_nr: int) -> list[Stored]:
        """``(sequence_nr, payload, timestamp)`` rows, ascending."""
        raise NotImplementedError

    async def fetch_snapshot(self, entity_id: str) -> Stored | None:
        """The snapshot row of an entity, if any."""
        raise NotImplementedError

    @property
    def read_concurrency(self) -> int:
        """Most batched reads in flight at once (see :mod:`casty_sa.coalescing`)."""
        return self.capacity

    def reads_pending(self) -> Awaitable[object] | None:
        """What every read must wait for before it is queued (``None``: nothing).

        Awaited by each read on its own, before read coalescing, so that reads
        arriving together share one outcome (see :class:`SqliteBackend`).
        """
        return None

    async def reads_settled(self) -> None:
        """Wait until what :meth:`reads_pending` returned is over (for ``close()``).

        The reads that waited for it are woken first, so by the time this
        returns they are queued for coalescing, where ``close()`` waits for them.
        """

    #: Most entities one batched read asks for (1: every read is sent alone).
    max_read_keys = 500

    async def fetch_events_of(self, keys: Sequence[tuple[str, int]]) -> list[list[Stored]]:
        """:meth:`fetch_events` of many ``(entity_id, from_nr)`` keys in one query."""
        if len(keys) == 1:
            return [await self.fetch_events(*keys[0])]
        return _split(await self._fetch_events_batch(keys), len(keys), self._ordinal_base)

    async def fetch_snapshots_of(self, entity_ids: Sequence[str]) -> list[Stored | None]:
        """:meth:`fetch_snapshot` of many entities in one query."""
        if len(entity_ids) == 1:
            return [await self.fetch_snapshot(entity_ids[0])]
        found: list[Stored | None] = [None] * len(entity_ids)
        base = self._ordinal_base
        for k, seq, payload, ts in await self._fetch_snapshots_batch(entity_ids):
            found[k - base] = (seq, payload, ts)
        return found

    #: Number of the first key in a batch query's rows (0 on SQLite, 1 on PostgreSQL).
    _ordinal_base = 0

    async def _fetch_events_batch(
        self, keys: Sequence[tuple[str, int]]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        """``(key number, sequence_nr, payload, timestamp)`` rows, by key and sequence."""
        raise NotImplementedError

    async def _fetch_snapshots_batch(
        self, entity_ids: Sequence[str]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        """``(key number, sequence_nr, payload, timestamp)`` of the entities with one."""
        raise NotImplementedError

    async def min_stored(self, entity_id: str, low: int, high: int) -> int | None:
        """Lowest stored sequence number of ``entity_id`` within ``[low, high]``."""
        raise NotImplementedError


#: SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_CANTOPEN: do not reuse the connection
_STALE_SQLITE_CODES = frozenset({8, 10, 11, 14})
#: SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE: a sequence number already stored
_SQLITE_DUPLICATE = frozenset({1555, 2067})


class SqliteBackend(Backend):
    """aiosqlite: a write group is one multi-row statement when it can be.

    On engines casty-sa creates, the driver runs in autocommit mode (no
    implicit transactions), so a group of events (or of snapshots) is a
    single ``INSERT … VALUES (…), (…)`` that SQLite commits atomically on its
    own: one trip to the driver's thread instead of three. Larger or mixed
    groups use an explicit ``BEGIN IMMEDIATE`` … ``COMMIT``. On an
    application's engine, whose driver opens transactions implicitly, each
    group is ``executemany`` and ``COMMIT``.
    """

    dialect_name = "sqlite"

    def __init__(self, engine: AsyncEngine, schema: str | None) -> None:
        super().__init__(engine, schema)
        self._memory = is_memory_sqlite(engine.url)
        self._autocommit = engine.sync_engine in AUTOCOMMIT_ENGINES
        # On casty-sa's own file engines every read goes to one reader connection that
        # the journal keeps (detached from the pool): aiosqlite queues calls on that
        # connection's thread, which serves a thousand concurrent recoveries several
        # times faster than a pool of threads taking turns on the GIL. A read abandoned
        # by a cancelled caller just finishes on that thread, so no shield is needed.
        self._share_reader = self._autocommit and not self._memory
        self.cancel_safe = self._share_reader
        self._reader: Any = None
        # every read that needs the reader while it is being opened shares that attempt (a
        # failure fails them all together, instead of each read retrying the open after the
        # previous one failed); a caller cancelled half-way leaves the connection to the
        # attempt, which keeps it as the reader (close() waits for it, then closes it)
        self._reader_opening = SharedAttempt(self._open_reader_once, "casty_sa-open-reader")
        self._closed = False
        # the file's identity (device, inode), checked after every write and after a failed
        # read (see _check_file): recorded when the first connection opens it, since the
        # file at the path before then is not one the journal opened
        self._path = None if self._memory else _sqlite_path(engine.url.database)
        self._identity: tuple[int, int] | None = None
        # the -wal file's identity, recorded when the shared reader opens (see _wal_changed)
        self._wal_identity: tuple[int, int] | None = None
        #: where SQLite keeps the -wal: beside the file it opened, symbolic links resolved
        #: (set again when the first connection opens the file)
        self._wal_path = f"{self._path}-wal"
        self._folder = os.path.dirname(self._path) if self._path is not None else ""
        #: the directory (device, inode, ctime) and writer's -wal when both files were last
        #: found in place: see _file_changed
        self._folder_seen: tuple[Any, ...] | None = None
        self._file_gone: str | None = None
        if self._path is not None:
            event.listen(engine.sync_engine, "do_connect", self._refuse_other_file)
            event.listen(engine.sync_engine, "connect", self._note_file)
        self._insert = self._compile(insert(self.events))
        self._upsert = self._newer_snapshot_wins(sqlite.insert(self.snapshots))
        # batched reads name their keys in one JSON parameter: [[entity_id, from_nr], ...]
        # for events, [entity_id, ...] for snapshots; json_each numbers them from 0
        keys = func.json_each(bindparam("keys")).table_valued("key", "value")
        self._load_events_batch = self._events_of_keys(
            keys,
            keys.c.key,
            func.json_extract(keys.c.value, literal_column("'$[0]'")),
            func.json_extract(keys.c.value, literal_column("'$[1]'")),
        )
        self._load_snapshots_batch = self._snapshots_of_keys(keys, keys.c.key, keys.c.value)
        if not _SQLITE_HAS_JSON:
            self.max_read_keys = 1

    def _timestamp(self, table: Table) -> Any:
        # -0.0 is stored as a BLOB (see casty_sa.models.SQLITE_NEGATIVE_ZERO); SQLite turns the
        # literal back into the float, sign included, in its own loop over the rows
        column = table.c.timestamp
        return case(
            (func.typeof(column) == literal_column("'blob'"), literal_column("-0.0")),
            else_=column,
        )

    @property
    def read_concurrency(self) -> int:
        # the shared reader is one connection on one thread: batches take turns on it
        return 1 if self._share_reader else self.capacity

    def reads_pending(self) -> Awaitable[object] | None:
        # The shared reader is opened before reads queue up for it: every read that comes
        # while it is being opened waits for that one attempt and shares its outcome,
        # instead of queued batches failing one attempt after another.
        return self._open_reader() if self._share_reader and self._reader is None else None

    async def reads_settled(self) -> None:
        await self._reader_opening.settled()

    async def _fetch_events_batch(
        self, keys: Sequence[tuple[str, int]]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        return await self._read(self._load_events_batch, (json.dumps(keys, ensure_ascii=False),))

    async def _fetch_snapshots_batch(
        self, entity_ids: Sequence[str]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        ids = json.dumps(entity_ids, ensure_ascii=False)
        return await self._read(self._load_snapshots_batch, (ids,))

    def is_disconnect(self, exc: BaseException) -> bool:
        if isinstance(exc, OSError | ConnectionLost | sqlite3.InterfaceError):
            return True
        # a connection opened while the file was read-only (or unreadable) stays that way:
        # let the pool replace it, except the one connection that *is* a memory database
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _STALE_SQLITE_CODES and not self._memory

    async def write(self, events: Sequence[Row], snapshots: Sequence[Row]) -> None:
        self._check_file_kept()
        events = _keep_negative_zero(events)
        snapshots = _keep_negative_zero(_latest_per_entity(snapshots))
        fairy = await self.take_writer()
        if self._on_other_file(fairy):  # opened after the file was replaced: do not use it
            await self.give_back_writer(fairy, ConnectionLost(OSError(), during_commit=False))
            raise self._gone(
                self._file_changed() or _REPLACED,
                f"this write ({len(events)} events and {len(snapshots)} snapshots) was not "
                f"sent; nothing of it is stored at {self._path}",
            )
        conn = fairy.driver_connection
        # the -wal this connection has held open since it connected (see _wal_changed)
        wal = fairy.info.get(_WAL_FILE)
        autocommit = self._autocommit
        committing = False
        try:
            if autocommit and not snapshots and len(events) <= _SQLITE_MAX_ROWS:
                committing = True  # one statement in autocommit: it commits on its own
                how = await self._commit(
                    conn, _multi_row(self._insert, len(events)), _flat(events), wal
                )
            elif autocommit and not events and len(snapshots) <= _SQLITE_MAX_ROWS:
                committing = True
                how = await self._commit(
                    conn, _multi_row(self._upsert, len(snapshots)), _flat(snapshots), wal
                )
            else:
                await self._write_transaction(conn, events, snapshots)
                committing = True
                try:
                    if autocommit:
                        how = await self._commit(conn, "COMMIT", (), wal)
                    else:
                        await conn.commit()
                        how = self._file_changed(wal)
                except BaseException:
                    # a COMMIT that failed before committing leaves the transaction open
                    await _quietly(conn.execute("ROLLBACK") if autocommit else conn.rollback())
                    raise
        except BaseException as exc:
            # a payload over SQLite's length limit fails its binding, before anything runs;
            # the limit, for the message, is read only then (and before the connection goes)
            max_length = _length_limit(conn)
            await self.give_back_writer(fairy, exc)
            if isinstance(exc, Exception):
                self._check_file(exc, (len(events), len(snapshots)))
            failure = classify_write_failure(
                exc, committing=committing, dialect="sqlite", max_length=max_length
            )
            if failure is exc:
                raise
            raise failure from exc
        await self.give_back_writer(fairy, None)
        if self._reader is None and self._share_reader and not self._closed:
            await self._keep_wal()
        if how is not None:
            self._check_file(None, (len(events), len(snapshots)), how)

    async def _commit(
        self, conn: Any, sql: str, params: Sequence[Any], wal: tuple[int, int] | None
    ) -> str | None:
        """Run the statement that commits, then look at the file: both on the driver's thread.

        Returns how the path stopped naming the journal's file, if it did (see
        :meth:`_file_changed`: two ``stat`` calls). Looked at from the loop's thread
        instead, right after the driver's thread finished, each ``stat`` hands the
        GIL back and forth between the two threads: about 30 µs a write at
        ``synchronous=FULL``, against a few µs here. (aiosqlite's ``_execute`` runs
        a function on its thread; ``execute`` is the same call with a cursor.) ``wal``:
        the ``-wal`` the connection opened, if recorded.
        """
        return await conn._execute(  # type: ignore[no-any-return]
            _run_and_look, conn._conn, sql, params, self._file_changed, wal
        )

    async def _keep_wal(self) -> None:
        """Open the shared reader after the first write, if no read opened it yet.

        While it is open SQLite never deletes the ``-wal``, which makes the ``-wal``
        checkable (see :meth:`_wal_changed`). Not at start: a file system that is
        read-only then would leave the reader unable to see a writable file later.
        The write is committed: failing to open the reader only leaves this to the
        next read.
        """
        with contextlib.suppress(Exception):
            await self._open_reader()

    async def _write_transaction(
        self, conn: Any, events: Sequence[Row], snapshots: Sequence[Row]
    ) -> None:
        """The rows of a transaction, up to (not including) its COMMIT; rolled back on failure."""
        try:
            if not self._autocommit:  # the driver begins the transaction on its own
                if events:
                    await conn.executemany(self._insert, events)
                if snapshots:
                    await conn.executemany(self._upsert, snapshots)
                return
            # inside the try: a caller cancelled while BEGIN is queued on the driver's thread
            # must still queue the ROLLBACK behind it, or the connection stays in a transaction
            await conn.execute("BEGIN IMMEDIATE")
            for start in range(0, len(events), _SQLITE_MAX_ROWS):
                chunk = events[start : start + _SQLITE_MAX_ROWS]
                await conn.execute(_multi_row(self._insert, len(chunk)), _flat(chunk))
            for start in range(0, len(snapshots), _SQLITE_MAX_ROWS):
                chunk = snapshots[start : start + _SQLITE_MAX_ROWS]
                await conn.execute(_multi_row(self._upsert, len(chunk)), _flat(chunk))
        except BaseException:
            await _quietly(conn.execute("ROLLBACK") if self._autocommit else conn.rollback())
            raise

    # -- the file under the journal ------------------------------------------------------------

    def _check_file_kept(self) -> None:
        """Refuse at once once the file was found replaced: every connection has the old one."""
        if self._file_gone is not None:
            raise DatabaseFileReplaced(
                f"{self._file_gone}; this call was refused and nothing of it was stored. {_RESTART}"
            )

    def _refuse_other_file(self, *_args: Any) -> None:
        """Open no new connection once the file is gone: SQLite would create an empty one."""
        self._check_file_kept()
        if self._identity is not None and (how := self._file_changed()) is not None:
            raise self._gone(how, "this call was refused before anything was sent")

    def _note_file(self, _dbapi_connection: Any, record: Any) -> None:
        """Record the file a new connection opened (the journal's, unless it was replaced)."""
        try:
            identity = self._stat_path()
        except OSError:
            return  # cannot tell (permissions): the statements themselves will say
        if identity is None:
            return
        if self._identity is None:
            self._identity = identity  # the first connection: the file the journal opened
            # SQLite names the -wal after the file's real path: a path that is a symbolic
            # link has its -wal beside the link's target, not beside the link
            self._wal_path = f"{os.path.realpath(str(self._path))}-wal"
        record.info[_FILE] = identity
        if self._share_reader:
            # the -wal it opened (the connect-time journal_mode pragma ran before this
            # listener): SQLite keeps it while this connection is open, so the connection's
            # commits can be checked from its first one on, not only once the shared
            # reader is open (the schema check's connection holds the -wal from start())
            with contextlib.suppress(OSError):
                record.info[_WAL_FILE] = _stat(self._wal_path)

    def _on_other_file(self, fairy: Any) -> bool:
        """Whether a connection opened a file other than the journal's (one at the path later)."""
        opened: tuple[int, int] | None = fairy.info.get(_FILE, self._identity)
        return opened != self._identity

    def _stat_path(self) -> tuple[int, int] | None:
        """(device, inode) of the file now at the path; None when there is none."""
        return None if self._path is None else _stat(self._path)

    def _file_changed(self, wal: tuple[int, int] | None = None) -> str | None:
        """How the path stopped naming the file the journal opened, if it did (one ``stat``).

        ``wal``: the ``-wal`` a writer's connection opened (see :meth:`_wal_changed`).
        """
        if self._path is None:
            return None
        if self._identity is None:
            return None  # not opened yet: whatever file is at the path is the one it will open
        # Deleting, renaming or creating a file changes its directory's ctime (so does
        # setting its times back, as a restore with rsync -a does; nothing sets ctime
        # itself). While the directory is as it was when both files were last found in
        # place (for this writer's -wal), one stat of it stands for the two of the files.
        try:
            folder = os.stat(self._folder)
        except FileNotFoundError:
            return "was deleted (or its directory removed)"
        except OSError:
            return None  # cannot tell (permissions): the statements themselves will say
        seen = (folder.st_dev, folder.st_ino, folder.st_ctime_ns, wal)
        if seen == self._folder_seen:
            return None
        try:
            identity = self._stat_path()
        except OSError:
            return None
        if identity is None:
            return "was deleted (or its directory removed)"
        if identity != self._identity:
            return _REPLACED
        how = self._wal_changed(wal)
        # a path that is a symbolic link names an entry of another directory (and its -wal
        # is there too), whose changes leave this one's ctime alone: no shortcut for it
        if how is None and _settled(folder.st_ctime_ns) and not os.path.islink(self._path):
            self._folder_seen = seen
        return how

    def _wal_changed(self, wal: tuple[int, int] | None = None) -> str | None:
        """Whether the ``-wal`` file the journal writes into is gone from beside the file.

        SQLite itself deletes the ``-wal`` when the last connection to the database
        closes (and the next one creates a new file), so a missing or different
        ``-wal`` only means tampering while a connection has stayed open since its
        identity was recorded: the shared reader, kept from the start until
        ``close()`` (its replacement records the identity anew), or the writer's
        connection, whose ``-wal`` is ``wal`` (recorded when it connected, so a
        ``-wal`` deleted before the shared reader opens is caught too). Without a
        shared reader (an application's engine) there is no such record, and no
        check. A checkpoint truncates the file in place, which keeps its identity.
        """
        expected = wal if wal is not None else self._wal_identity
        if expected is None or self._path is None:
            return None
        try:
            found = _stat(self._wal_path)
        except OSError:
            return None
        return None if found == expected else _WAL_LOST

    def _check_file(
        self,
        failure: Exception | None,
        written: tuple[int, int] | None,
        how: str | None = None,
    ) -> None:
        """Before a call is answered: is the file still at its path? (One ``stat``.)

        ``written``: the events and snapshots of a write, None for a read.
        Connections keep the file they opened. Once it is deleted or replaced (a
        backup restored over it), their commits go into a file no later process
        will open, so an acknowledgement would be a lie. From then on every call
        fails: opening new connections would silently start a new, empty journal
        at the path.
        """
        if isinstance(failure, DatabaseFileReplaced):
            return  # the failure already says so
        self._check_file_kept()
        how = how or self._file_changed()
        if how is None:
            return
        if written is None:
            what, done = "this read", "failed"
        else:
            what = f"this write ({written[0]} events and {written[1]} snapshots)"
            done = (
                "was committed into the old file, which the path no longer names and no "
                f"later process will open: it is NOT stored at {self._path}"
            )
            if how == _WAL_LOST:
                done = (
                    "was committed into that deleted write-ahead log, which no later process "
                    f"will read: it is NOT durably stored at {self._path} (a crash loses it)"
                )
        if failure is not None:
            done = f"failed ({type(failure).__name__}: {failure})"
            if written is not None:
                done += f"; nothing of it is stored at {self._path}"
        raise self._gone(how, f"{what} {done}") from failure

    def _gone(self, how: str, outcome: str) -> DatabaseFileReplaced:
        """The error for the call that found the file gone; every later call fails too."""
        old = "deleted write-ahead log" if how == _WAL_LOST else "old file"
        self._file_gone = (
            f"the SQLite file {self._path} that this journal opened {how} while the journal "
            f"was running. The journal's connections still write to the {old}"
        )
        return DatabaseFileReplaced(f"{self._file_gone}; {outcome}. {_RESTART}")

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """Rows of one query, on the shared reader (or a pooled connection elsewhere)."""
        self._check_file_kept()
        try:
            return await self._query(sql, params)
        except Exception as exc:
            # a read that failed may have met a file recreated at the path; a read that
            # worked answered from the file the journal wrote, so it needs no stat (one
            # costs ~10 µs on the loop, as the driver's thread takes the GIL meanwhile)
            self._check_file(exc, None)
            raise

    async def _query(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        if not self._share_reader:
            async with self.connection() as conn:
                return list(await conn.execute_fetchall(sql, params))
        reader = self._reader or await self._open_reader()
        try:
            return list(await reader[1].execute_fetchall(sql, params))
        except BaseException as exc:
            if self.is_disconnect(exc) and self._reader is reader:
                self._reader = None  # the next read opens a fresh one
                self._wal_identity = None  # which records the -wal's identity anew
                await _quietly(greenlet_spawn(reader[0].close))
            raise

    async def _open_reader(self) -> tuple[Any, Any]:
        if self._closed:
            raise JournalClosed()
        return await self._reader_opening()

    async def _open_reader_once(self) -> tuple[Any, Any]:
        fairy = await self._engine.raw_connection()
        driver = fairy.driver_connection
        await greenlet_spawn(fairy.detach)  # ours until close(), not the pool's
        self._reader = (fairy, driver)
        # its connection opened the -wal (the connect-time journal_mode pragma reads the
        # file), and SQLite keeps that -wal while any connection is open
        if self._path is not None and self._identity is not None:
            try:
                self._wal_identity = _stat(self._wal_path)
            except OSError:
                self._wal_identity = None
        return self._reader  # type: ignore[no-any-return]

    async def close(self) -> None:
        self._closed = True
        if self._path is not None:
            for name, listener in (
                ("do_connect", self._refuse_other_file),
                ("connect", self._note_file),
            ):
                if event.contains(self._engine.sync_engine, name, listener):
                    event.remove(self._engine.sync_engine, name, listener)
        await super().close()
        await self._reader_opening.settled()  # a reader being opened is the pool's until then
        reader, self._reader = self._reader, None
        self._wal_identity = None
        if reader is not None:
            await _quietly(greenlet_spawn(reader[0].close))

    async def fetch_events(self, entity_id: str, from_nr: int) -> list[Stored]:
        return await self._read(self._load_events, (entity_id, from_nr))

    async def fetch_snapshot(self, entity_id: str) -> Stored | None:
        rows = await self._read(self._load_snapshot, (entity_id,))
        return tuple(rows[0]) if rows else None

    async def min_stored(self, entity_id: str, low: int, high: int) -> int | None:
        rows = await self._read(self._min_stored, (entity_id, low, high))
        return rows[0][0] if rows else None


class PostgresBackend(Backend):
    """asyncpg: a whole group in one ``INSERT … SELECT FROM unnest(…)`` round trip."""

    dialect_name = "postgresql"
    # the server commits transactions of several connections in parallel (and groups their
    # WAL flushes), so a second group in flight overlaps the client's work with the server's
    write_pipeline = 2

    def __init__(self, engine: AsyncEngine, schema: str | None, timeouts: Timeouts) -> None:
        super().__init__(engine, schema, ping_timeout=timeouts.ping)
        # every statement carries the journal's statement timeout, so it is bounded on an
        # application's engine too (whose connections may have no command_timeout)
        self._timeout = timeouts.statement
        columns = [c.name for c in self.events.columns]

        def from_arrays(table: Table) -> Any:
            arrays = [bindparam(c.name, type_=ARRAY(c.type)) for c in table.columns]
            rows = func.unnest(*arrays).table_valued(*columns).render_derived()
            return select(*(rows.c[name] for name in columns))

        self._insert = self._compile(
            insert(self.events).from_select(columns, from_arrays(self.events))
        )
        self._upsert = self._newer_snapshot_wins(
            postgresql.insert(self.snapshots).from_select(columns, from_arrays(self.snapshots))
        )
        # batched reads: the keys travel as arrays, numbered from 1 by WITH ORDINALITY
        ids = bindparam("entity_ids", type_=ARRAY(String))
        pairs = (
            func.unnest(ids, bindparam("from_nrs", type_=ARRAY(BigInteger)))
            .table_valued("entity_id", "from_nr", with_ordinality="k")
            .render_derived()
        )
        self._load_events_batch = self._events_of_keys(
            pairs, pairs.c.k, pairs.c.entity_id, pairs.c.from_nr
        )
        singles = func.unnest(ids).table_valued("entity_id", with_ordinality="k").render_derived()
        self._load_snapshots_batch = self._snapshots_of_keys(
            singles, singles.c.k, singles.c.entity_id
        )

    _ordinal_base = 1

    async def _fetch_events_batch(
        self, keys: Sequence[tuple[str, int]]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        entity_ids, from_nrs = zip(*keys, strict=True)
        async with self.connection() as conn:
            return await conn.fetch(  # type: ignore[no-any-return]
                self._load_events_batch, entity_ids, from_nrs, timeout=self._timeout
            )

    async def _fetch_snapshots_batch(
        self, entity_ids: Sequence[str]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        async with self.connection() as conn:
            return await conn.fetch(  # type: ignore[no-any-return]
                self._load_snapshots_batch, list(entity_ids), timeout=self._timeout
            )

    def usable(self, driver_connection: Any) -> bool:
        return not driver_connection.is_closed()

    async def ping(self, driver_connection: Any) -> None:
        # bounded on its own: the statement timeout is for real work, far longer than a
        # live server needs to answer SELECT 1
        await driver_connection.execute("SELECT 1", timeout=self.ping_timeout)

    def abort(self, driver_connection: Any) -> None:
        driver_connection.terminate()

    def is_disconnect(self, exc: BaseException) -> bool:
        import asyncpg

        if isinstance(exc, OSError | ConnectionLost | TimeoutError):
            return True
        if isinstance(
            exc,
            asyncpg.PostgresConnectionError | asyncpg.InterfaceError | asyncpg.InternalClientError,
        ):
            return True  # the last: the protocol was left mid-way, e.g. by a server's FATAL
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate.startswith(("08", "57P"))  # connection exception, operator intervention

    async def write(self, events: Sequence[Row], snapshots: Sequence[Row]) -> None:
        snapshots = _latest_per_entity(snapshots)  # ON CONFLICT may touch a row only once
        fairy = await self.take_writer()
        conn = fairy.driver_connection
        committing = False
        try:
            if events and snapshots:
                transaction = conn.transaction()
                await transaction.start()
                try:
                    await conn.execute(self._insert, *_columns(events), timeout=self._timeout)
                    await conn.execute(self._upsert, *_columns(snapshots), timeout=self._timeout)
                except BaseException:
                    await _quietly(transaction.rollback())
                    raise
                committing = True
                await transaction.commit()
            else:
                committing = True  # one statement in autocommit: it commits on its own
                if events:
                    await conn.execute(self._insert, *_columns(events), timeout=self._timeout)
                else:
                    await conn.execute(self._upsert, *_columns(snapshots), timeout=self._timeout)
        except BaseException as exc:
            await self.give_back_writer(fairy, exc)
            failure = classify_write_failure(exc, committing=committing, dialect="postgresql")
            if failure is exc:
                raise
            raise failure from exc
        await self.give_back_writer(fairy, None)

    async def fetch_events(self, entity_id: str, from_nr: int) -> list[Stored]:
        async with self.connection() as conn:
            return await conn.fetch(  # type: ignore[no-any-return]
                self._load_events, entity_id, from_nr, timeout=self._timeout
            )

    async def fetch_snapshot(self, entity_id: str) -> Stored | None:
        async with self.connection() as conn:
            return await conn.fetchrow(  # type: ignore[no-any-return]
                self._load_snapshot, entity_id, timeout=self._timeout
            )

    async def min_stored(self, entity_id: str, low: int, high: int) -> int | None:
        async with self.connection() as conn:
            return await conn.fetchval(  # type: ignore[no-any-return]
                self._min_stored, entity_id, low, high, timeout=self._timeout
            )


#: deadlock_detected, serialization_failure: the server rolled the whole transaction back
#: (a single autocommit statement, or the explicit transaction whose COMMIT failed)
_ROLLED_BACK = frozenset({"40P01", "40001"})

#: rows per multi-row statement: 4 parameters a row, within SQLite's variable limit
_SQLITE_MAX_ROWS = min(
    1000, sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 4
)
_ONE_ROW = "VALUES (?, ?, ?, ?)"


#: SQLite's default SQLITE_LIMIT_LENGTH, for a connection whose own limit cannot be read
_SQLITE_MAX_LENGTH = sqlite3.connect(":memory:").getlimit(sqlite3.SQLITE_LIMIT_LENGTH)


def _settled(ctime_ns: int) -> bool:
    """Whether a directory's next change is sure to move its ctime past ``ctime_ns``.

    File systems that keep sub-millisecond digits (ext4, xfs, btrfs, tmpfs) stamp
    times at a clock tick of a few milliseconds: a change within the same tick
    leaves the time where it was, so it is trusted only once the tick is over.
    Coarser stamps (whole milliseconds, seconds, FAT's two seconds, and FAT's
    root directory, which it never stamps at all) are never trusted: there the
    journal looks at both files every time.
    """
    return ctime_ns % 1_000_000 != 0 and time.time_ns() - ctime_ns > 50_000_000


#: key of a pooled SQLite connection's info: (device, inode) of the file it opened
_FILE = "casty_sa_file"
#: key of a pooled SQLite connection's info: (device, inode) of the -wal it opened
_WAL_FILE = "casty_sa_wal"

#: How the file at the journal's path changed when it is another file now.
_REPLACED = "was replaced by another file"
#: How it changed when its -wal file was deleted or replaced under the journal's connections.
_WAL_LOST = (
    "lost its write-ahead log (the -wal file beside it was deleted or replaced by another file)"
)
_RESTART = (
    "Every call of this journal fails from now on: restart the node, so it opens the file "
    "now at the path (events written into the old file after it was removed are not there)"
)


def _run_and_look(
    connection: sqlite3.Connection,
    sql: str,
    params: Sequence[Any],
    look: Callable[[tuple[int, int] | None], str | None],
    wal: tuple[int, int] | None,
) -> str | None:
    """On the driver's thread: run ``sql`` (which commits), then ``look`` at the file."""
    connection.execute(sql, params).close()
    return look(wal)


def _stat(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; None when there is none."""
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (found.st_dev, found.st_ino)


def _sqlite_path(database: str | None) -> str | None:
    """The absolute path of a SQLite URL's file (``file:`` URIs included), if it has one."""
    if not database:
        return None
    if database.startswith("file:"):
        # the query and the fragment are not part of the name
        database = database[len("file:") :].partition("?")[0].partition("#")[0]
        if database.startswith("//"):  # file:///abs/path, file://localhost/abs/path
            authority, slash, rest = database[2:].partition("/")
            database = slash + rest if authority.lower() in ("", "localhost") else database
    return os.path.abspath(database) if database else None


def _length_limit(driver_connection: Any) -> int:
    """SQLITE_LIMIT_LENGTH of the connection (aiosqlite's sqlite3 connection), in bytes."""
    try:  # aiosqlite's _conn raises ValueError once the connection is closed
        return int(driver_connection._conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH))
    except (AttributeError, sqlite3.Error, TypeError, ValueError):
        return _SQLITE_MAX_LENGTH


def _too_large(what: str, limit: int | None, detail: str = "") -> WriteRefused:
    """The refusal of a value over SQLite's length limit (nothing stored; the caller's alone)."""
    on_connection = f" ({limit:,} bytes on this connection)" if limit else ""
    message = f"{what} is over SQLite's length limit SQLITE_LIMIT_LENGTH{on_connection}"
    return WriteRefused(
        PayloadTooLarge(f"{message}: {detail}" if detail else message), duplicate=False
    )


def _sqlite_has_json() -> bool:
    """Whether this SQLite has ``json_each`` (built in since 3.38, an extension before)."""
    try:
        sqlite3.connect(":memory:").execute("SELECT key FROM json_each('[1]')")
    except sqlite3.OperationalError:
        return False
    return True


_SQLITE_HAS_JSON = _sqlite_has_json()


def _split(
    rows: Sequence[tuple[int, int, bytes, float]], keys: int, base: int
) -> list[list[Stored]]:
    """Rows of a batched event read, ordered by key number, as one list per key."""
    found: list[list[Stored]] = [[] for _ in range(keys)]
    for k, seq, payload, ts in rows:
        found[k - base].append((seq, payload, ts))
    return found


@functools.lru_cache(maxsize=256)
def _multi_row(statement: str, rows: int) -> str:
    """``statement`` (one row of ``VALUES``) rewritten for ``rows`` rows."""
    head, sep, tail = statement.partition(_ONE_ROW)
    if not sep or _ONE_ROW in tail:
        raise AssertionError(f"unexpected statement shape: {statement}")
    return head + "VALUES " + ", ".join(["(?, ?, ?, ?)"] * rows) + tail


_TIMESTAMP = operator.itemgetter(2)


def _keep_negative_zero(rows: Sequence[Row]) -> Sequence[Row]:
    """``rows`` with a ``-0.0`` timestamp as SQLite keeps it (rare: a copy only then)."""
    if 0.0 not in map(_TIMESTAMP, rows):  # -0.0 == 0.0; a scan in C, no copy
        return rows
    return [
        (row[0], row[1], SQLITE_NEGATIVE_ZERO, row[3]) if is_negative_zero(row[2]) else row  # type: ignore[misc]
        for row in rows
    ]


def _flat(rows: Sequence[Row]) -> list[Any]:
    return [value for row in rows for value in row]


def _pool_capacity(engine: AsyncEngine) -> int:
    """How many connections the engine's pool can hand out at once (at least 1)."""
    pool: Any = engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", 0)
    if not callable(size):
        return 64  # a pool without a size (NullPool and the like): a generous bound
    return max(1, int(size()) + max(0, int(overflow)))


class PayloadTooLarge(Exception):
    """A value or row over the database's length limit (the caller's refusal, nothing sent)."""


#: SQLite primary result codes: SQLITE_NOMEM, SQLITE_IOERR. Raised by a statement that
#: commits, they may come after the commit frame reached the WAL (its fsync failed, the
#: wal-index could not be updated): the commit may be on disk, so the outcome is unknown.
_SQLITE_MAYBE_COMMITTED = frozenset({7, 10})
_SQLITE_TOOBIG = 18


def classify_write_failure(
    exc: BaseException, *, committing: bool, dialect: str, max_length: int | None = None
) -> BaseException:
    """What a failed write means for what was stored: the one place that decides.

    Parameters
    ----------
    exc : BaseException
        What the driver raised.
    committing : bool
        Whether the statement that commits had been sent: a single autocommit
        statement, or the ``COMMIT`` of an explicit transaction. Before that,
        the database rolls the transaction back (or never saw it).
    dialect : str
        ``sqlite`` or ``postgresql``.
    max_length : int | None
        SQLite's length limit on the connection, for the message of a refusal.

    Returns
    -------
    BaseException
        :class:`WriteRefused` when the database refused the rows themselves
        (nothing stored; the journal isolates the caller), :class:`Contended` when
        it rolled the transaction back to break a deadlock (nothing stored; safe to
        send again), :class:`ConnectionLost`
        when nothing was sent (``during_commit=False``) or when the commit was
        sent and the database did not answer with a refusal (``during_commit=True``:
        it may be stored), or ``exc`` itself: nothing stored.
    """
    if not isinstance(exc, Exception):
        return exc  # a cancelled caller sees its cancellation
    if dialect == "postgresql":
        import asyncpg

        if isinstance(exc, asyncpg.UniqueViolationError):
            return WriteRefused(exc, duplicate=True)
        if isinstance(exc, asyncpg.DataError):  # a value refused, by asyncpg or the server
            return WriteRefused(exc, duplicate=False)
        if getattr(exc, "sqlstate", None) in _ROLLED_BACK:
            return Contended(exc)  # the server rolled the transaction back whole
        if _never_sent(exc):
            return ConnectionLost(exc, during_commit=False)
        sqlstate = getattr(exc, "sqlstate", None) or ""
        # an error the server answered the statement with (a timeout, a cancel, a failed
        # deferred check) means it rolled the transaction back; a broken connection, a
        # client-side timeout or a protocol error leaves the commit's outcome open
        answered = isinstance(exc, asyncpg.PostgresError) and not (
            isinstance(exc, asyncpg.PostgresConnectionError) or sqlstate.startswith(("08", "57P"))
        )
    else:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if code is not None else None
        if isinstance(exc, sqlite3.IntegrityError):
            return WriteRefused(exc, duplicate=code in _SQLITE_DUPLICATE)
        if isinstance(exc, sqlite3.DataError) or primary == _SQLITE_TOOBIG:
            return _too_large("a payload (or its row)", max_length, str(exc))
        # pysqlite's own errors (no result code) come before SQLite ran anything
        answered = isinstance(exc, sqlite3.Error) and primary not in _SQLITE_MAYBE_COMMITTED
    if committing and not answered:
        return ConnectionLost(exc, during_commit=True)
    return exc


def _never_sent(exc: BaseException) -> bool:
    """Whether asyncpg refused an operation before sending anything to the server.

    It checks its protocol state first: a connection the server has just ended (its
    FATAL message read, the protocol left consuming it) or one already closed fails
    there, so the statement (and any COMMIT) never left the client.
    """
    import asyncpg

    text = str(exc)
    if isinstance(exc, asyncpg.InternalClientError):
        return text.startswith("cannot switch to state")
    if isinstance(exc, asyncpg.InterfaceError):
        return text.startswith("cannot perform operation") or text == "connection is closed"
    return False


def _columns(rows: Sequence[Row]) -> list[list[Any]]:
    """Rows to the four column arrays ``unnest`` takes."""
    return [list(column) for column in zip(*rows, strict=True)]


def _latest_per_entity(snapshots: Sequence[Row]) -> Sequence[Row]:
    if len(snapshots) < 2:
        return snapshots
    latest: dict[str, Row] = {}
    for row in snapshots:
        kept = latest.get(row[0])
        if kept is None or row[1] >= kept[1]:
            latest[row[0]] = row
    return list(latest.values())


async def _quietly(awaitable: Any) -> None:
    """Await a clean-up step whose own failure must not hide the original error."""
    with contextlib.suppress(Exception):
        await awaitable


def backend_for(engine: AsyncEngine, schema: str | None, timeouts: Timeouts | None) -> Backend:
    """The backend for an engine's dialect; ``timeouts`` bound PostgreSQL's calls."""
    if engine.dialect.name == "postgresql":
        return PostgresBackend(engine, schema, timeouts or Timeouts())
    return SqliteBackend(engine, schema)
