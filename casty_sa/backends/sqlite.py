"""SQLite through ``aiosqlite``: files, and memory databases (a backend of one connection).

The whole SQLite dialect (see :mod:`casty_sa.dialects`): the URLs it accepts
(``sqlite:///path``, ``sqlite://`` for memory), the engine and the backend.

The engine: WAL mode, ``synchronous=FULL`` by default (an acknowledged commit
survives power loss; ``NORMAL`` is faster and may lose the last commits on
power loss, never corrupting the file; ``OFF`` trusts the OS entirely), a busy
timeout so writers from other processes wait instead of failing, and ``BEGIN
IMMEDIATE`` for every write transaction so a transaction never has to upgrade
a read lock (the source of "database is locked" deadlocks). An in-memory
database uses one connection for the journal's lifetime, so all calls see one
database.

The backend: on engines casty-sa creates, the driver runs in autocommit mode and a write
group is one multi-row ``INSERT`` (or snapshot upsert) that SQLite commits on
its own: one trip to the driver's thread. Larger or mixed groups use ``BEGIN
IMMEDIATE`` … ``COMMIT``. Reads of a file go to one reader connection the
backend keeps; a batch of reads is one query joining the keys of a JSON
parameter (``json_each``). A memory database is a single connection: its
backend has a capacity of 1, so its users (writes, reads, the schema check
holding :meth:`~casty_sa.backends.pooled.PooledBackend.turn`) take turns on it.
After every write, the file's path is checked to still name the file the
connections opened (:mod:`casty_sa.backends.sqlite_file`).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from casty import JournalKind
from sqlalchemy import URL, Table, bindparam, case, event, func, literal_column
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool
from sqlalchemy.util import greenlet_spawn

from casty_sa.backends.base import BackendSettings, latest_per_entity, quietly
from casty_sa.backends.failures import ConnectionLost, classify_write_failure
from casty_sa.backends.sqlite_file import (
    DatabaseFile,
    FileId,
    insert_numbered_and_look,
    run_and_look,
)
from casty_sa.backends.sqlite_reads import SqliteReading
from casty_sa.backends.sqlite_rows import (
    MAX_ROWS,
    flat,
    flat_events,
    keep_negative_zero,
    length_limit,
    multi_row,
    write_failure,
)
from casty_sa.calls import SharedAttempt
from casty_sa.codec import EventRow, Row, Stored
from casty_sa.dialects import Dialect, EngineRequest, Timeouts, register
from casty_sa.engine import AUTOCOMMIT_ENGINES, READ_ONLY
from casty_sa.errors import JournalClosed, UnsupportedDatabase
from casty_sa.ordering import highest_position, numbered_insert, positioned_insert
from casty_sa.urls import is_memory_sqlite, safe_url

__all__ = ["SQLITE_SYNCHRONOUS", "SqliteBackend", "sqlite_engine"]

SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

#: SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_CANTOPEN: do not reuse the connection
_STALE_SQLITE_CODES = frozenset({8, 10, 11, 14})


def _sqlite_has_json() -> bool:
    """Whether this SQLite has ``json_each`` (built in since 3.38, an extension before)."""
    try:
        sqlite3.connect(":memory:").execute("SELECT key FROM json_each('[1]')")
    except sqlite3.OperationalError:
        return False
    return True


_SQLITE_HAS_JSON = _sqlite_has_json()


class SqliteBackend(SqliteReading):
    """aiosqlite: a write group is one multi-row statement when it can be.

    On engines casty-sa creates, the driver runs in autocommit mode (no
    implicit transactions), so a group of events (or of snapshots) is a
    single ``INSERT … VALUES (…), (…)`` that SQLite commits atomically on its
    own: one trip to the driver's thread instead of three. Larger or mixed
    groups use an explicit ``BEGIN IMMEDIATE`` … ``COMMIT``. On an
    application's engine, whose driver opens transactions implicitly, each
    group is ``executemany`` and ``COMMIT``.
    """

    def __init__(self, engine: AsyncEngine, schema: str | None, settings: BackendSettings) -> None:
        memory = is_memory_sqlite(engine.url)
        self._autocommit = engine.sync_engine in AUTOCOMMIT_ENGINES
        # a memory database is the one connection of its pool: every user takes turns on it;
        # one casty-sa made has no user but the journal
        super().__init__(
            engine,
            schema,
            settings,
            capacity=1 if memory else None,
            exclusive=memory and self._autocommit,
        )
        self._memory = memory
        # casty-sa's own file engines read on one connection the journal keeps (out of the
        # pool): aiosqlite's thread serves it several times faster than pooled threads on
        # the GIL; a read a cancelled caller abandons finishes there (no shield needed)
        self._share_reader = self._autocommit and not memory
        self.cancel_safe = self._share_reader
        self._reader: Any = None
        # every read that needs the reader while it is being opened shares that attempt (a
        # failure fails them all together, instead of each read retrying the open after the
        # previous one failed); a caller cancelled half-way leaves the connection to the
        # attempt, which keeps it as the reader (close() waits for it, then closes it)
        self._reader_opening = SharedAttempt(self._open_reader_once, "casty_sa-open-reader")
        self._closed = False
        self._file = DatabaseFile(
            None if memory else engine.url.database, track_wal=self._share_reader
        )
        self._file.watch(engine.sync_engine)
        # era and transaction id given (0), not left to the migration's defaults: tables an
        # application created from the models have none
        self._insert = numbered_insert(self.events, engine.dialect)
        # the hot path: positions numbered from the highest, read in the same transaction
        self._top = highest_position(self.events, engine.dialect)
        self._insert_bound = positioned_insert(self.events, engine.dialect)
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
            self._has_json = False

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

    def is_disconnect(self, exc: BaseException) -> bool:
        if isinstance(exc, OSError | ConnectionLost | sqlite3.InterfaceError):
            return True
        # a connection opened while the file was read-only (or unreadable) stays that way:
        # let the pool replace it, except the one connection that *is* a memory database
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _STALE_SQLITE_CODES and not self._memory

    # -- writes --------------------------------------------------------------------------------

    async def write(self, events: Sequence[EventRow], snapshots: Sequence[Row]) -> None:
        self._file.check_kept()
        events = keep_negative_zero(events)
        snapshots = keep_negative_zero(latest_per_entity(snapshots))
        fairy = await self.take_writer()
        if self._file.on_other_file(fairy):  # opened after the file was replaced: do not use it
            await self.give_back_writer(fairy, ConnectionLost(OSError(), during_commit=False))
            raise self._file.unsent(len(events), len(snapshots))
        conn = fairy.driver_connection
        # the -wal this connection has held open since it connected (see DatabaseFile)
        wal = self._file.wal_of(fairy)
        autocommit = self._autocommit
        committing = False
        try:
            if autocommit and not snapshots and len(events) <= MAX_ROWS:
                sent = [False]  # the COMMIT (see insert_numbered_and_look)
                try:
                    sql = multi_row(self._insert_bound, len(events))
                    args = (sql, self._top, events, sent)
                    how = await self._commit(conn, insert_numbered_and_look, args, wal)
                finally:
                    committing = sent[0]
            elif autocommit and not events and len(snapshots) <= MAX_ROWS:
                committing = True  # one statement in autocommit: it commits on its own
                sql = multi_row(self._upsert, len(snapshots))
                how = await self._commit(conn, run_and_look, (sql, flat(snapshots)), wal)
            else:
                await self._write_transaction(conn, events, snapshots)
                committing = True
                try:
                    if autocommit:
                        how = await self._commit(conn, run_and_look, ("COMMIT", ()), wal)
                    else:
                        await conn.commit()
                        how = self._file.changed(wal)
                except BaseException:
                    # a COMMIT that failed before committing leaves the transaction open
                    await quietly(conn.execute("ROLLBACK") if autocommit else conn.rollback())
                    raise
        except BaseException as exc:
            # a payload over SQLite's length limit fails its binding, before anything runs;
            # the limit, for the message, is read only then (and before the connection goes)
            max_length = length_limit(conn)
            await self.give_back_writer(fairy, exc)
            if isinstance(exc, Exception):
                self._file.check(exc, (len(events), len(snapshots)))
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
            self._file.check(None, (len(events), len(snapshots)), how)

    async def _commit(
        self, conn: Any, run: Callable[..., str | None], args: tuple[Any, ...], wal: FileId | None
    ) -> str | None:
        """``run`` what commits, then look at the file: both on the driver's thread.

        Returns how the path stopped naming the journal's file, if it did (see
        :meth:`DatabaseFile.changed <casty_sa.backends.sqlite_file.DatabaseFile.changed>`:
        two ``stat`` calls). Looked at from the loop's thread
        instead, right after the driver's thread finished, each ``stat`` hands the
        GIL back and forth between the two threads: about 30 µs a write at
        ``synchronous=FULL``, against a few µs here. (aiosqlite's ``_execute`` runs
        a function on its thread; ``execute`` is the same call with a cursor.) ``wal``:
        the ``-wal`` the connection opened, if recorded.
        """
        return await conn._execute(  # type: ignore[no-any-return]
            run, conn._conn, *args, self._file.changed, wal
        )

    async def _keep_wal(self) -> None:
        """Open the shared reader after the first write, if no read opened it yet.

        While it is open SQLite never deletes the ``-wal``, which makes the ``-wal``
        checkable (see :class:`~casty_sa.backends.sqlite_file.DatabaseFile`). Not at
        start: a file system that is read-only then would leave the reader unable to
        see a writable file later. The write is committed: failing to open the reader
        only leaves this to the next read.
        """
        with contextlib.suppress(Exception):
            await self._open_reader()

    async def _write_transaction(
        self, conn: Any, events: Sequence[EventRow], snapshots: Sequence[Row]
    ) -> None:
        """The rows of a transaction, up to (not including) its COMMIT; rolled back on failure."""
        try:
            if not self._autocommit:  # the driver begins the transaction on its own
                if events:
                    await conn.executemany(self._insert, [(*row, 1) for row in events])
                if snapshots:
                    await conn.executemany(self._upsert, snapshots)
                return
            # inside the try: a caller cancelled while BEGIN is queued on the driver's thread
            # must still queue the ROLLBACK behind it, or the connection stays in a transaction
            await conn.execute("BEGIN IMMEDIATE")
            for start in range(0, len(events), MAX_ROWS):
                chunk = events[start : start + MAX_ROWS]
                await conn.execute(multi_row(self._insert, len(chunk)), flat_events(chunk))
            for start in range(0, len(snapshots), MAX_ROWS):
                upserts = snapshots[start : start + MAX_ROWS]
                await conn.execute(multi_row(self._upsert, len(upserts)), flat(upserts))
        except BaseException:
            await quietly(conn.execute("ROLLBACK") if self._autocommit else conn.rollback())
            raise

    # -- reads ---------------------------------------------------------------------------------

    async def fetch_events(self, entity_id: str, from_nr: int) -> list[Stored]:
        return await self._read(self._load_events, (entity_id, from_nr))

    async def fetch_snapshot(self, entity_id: str) -> Stored | None:
        rows = await self._read(self._load_snapshot, (entity_id,))
        return tuple(rows[0]) if rows else None

    async def min_stored(self, entity_id: str, low: int, high: int) -> int | None:
        rows = await self._read(self._min_stored, (entity_id, low, high))
        return rows[0][0] if rows else None

    async def _fetch_events_batch(
        self, keys: Sequence[tuple[str, int]]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        return await self._read(self._load_events_batch, (json.dumps(keys, ensure_ascii=False),))

    async def _fetch_snapshots_batch(
        self, entity_ids: Sequence[str]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        ids = json.dumps(entity_ids, ensure_ascii=False)
        return await self._read(self._load_snapshots_batch, (ids,))

    def _file_kept(self) -> None:
        self._file.check(None, None)

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """Rows of one query, on the shared reader (or a pooled connection elsewhere)."""
        self._file.check_kept()
        try:
            return await self._query(sql, params)
        except Exception as exc:
            # a read that failed may have met a file recreated at the path; a read that
            # worked answered from the file the journal wrote, so it needs no stat (one
            # costs ~10 µs on the loop, as the driver's thread takes the GIL meanwhile)
            self._file.check(exc, None)
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
                self._file.forget_wal()  # which records the -wal's identity anew
                await quietly(self._uncut(greenlet_spawn(reader[0].close)))
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
        self._file.note_wal()
        return self._reader  # type: ignore[no-any-return]

    async def close(self) -> None:
        self._closed = True
        self._file.unwatch(self._engine.sync_engine)
        await super().close()
        await self._reader_opening.settled()  # a reader being opened is the pool's until then
        reader, self._reader = self._reader, None
        self._file.forget_wal()
        if reader is not None:
            await quietly(greenlet_spawn(reader[0].close))


def sqlite_engine(url: URL, request: EngineRequest) -> tuple[AsyncEngine, Timeouts | None]:
    """A SQLite engine: WAL, ``synchronous``, busy timeout, ``BEGIN IMMEDIATE`` writes."""
    synchronous = request.sqlite_synchronous.upper()
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(
            f"sqlite_synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}, "
            f"not {request.sqlite_synchronous!r}"
        )
    memory = is_memory_sqlite(url)
    # autocommit at the driver: pysqlite opens no transaction behind our back; writes
    # are single statements or explicit BEGIN IMMEDIATE transactions (never a read
    # lock upgraded to a write lock, the source of "database is locked" deadlocks)
    connect_args: dict[str, Any] = {"isolation_level": None, "timeout": request.busy_timeout}
    # A fixed set of connections: SQLite allows one writer at a time anyway, and
    # opening and closing overflow connections (a thread and pragmas each) costs more
    # than waiting for a pooled one.
    defaults: dict[str, Any] = {}
    if memory:
        # no reset ROLLBACK: it would end what another checkout of the one connection has open
        defaults.update(poolclass=StaticPool, pool_reset_on_return=None)
    else:
        defaults.update(pool_size=5, max_overflow=0)
    final_connect_args = {**connect_args, **request.connect_args}
    engine = create_async_engine(
        url, connect_args=final_connect_args, **{**defaults, **request.options}
    )
    if final_connect_args.get("isolation_level", "") is None:
        AUTOCOMMIT_ENGINES.add(engine.sync_engine)

        @event.listens_for(engine.sync_engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            # SQLAlchemy-level transactions (sessions, migrations) are real ones; those
            # that only read take no write lock (WAL readers never wait for writers)
            if connection.get_execution_options().get(READ_ONLY):
                connection.exec_driver_sql("BEGIN DEFERRED")
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

    busy_ms = int(request.busy_timeout * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        finally:
            cursor.close()

    return engine, None


def _check_url(url: URL) -> None:
    """Refuse a SQLite URL with a host, user or port."""
    if url.host or url.port or url.username:
        # sqlite://j.db parses with j.db as a host name, which SQLite has no use for
        name = (url.database or url.host or "journal.db").lstrip("/")
        raise UnsupportedDatabase(
            f"{safe_url(url)} is not a SQLite URL casty-sa can open: a SQLite URL has no "
            f"host, user or port. For a file use three slashes, 'sqlite:///{name}' (relative "
            f"to the working directory) or four for an absolute path, 'sqlite:////path/{name}'"
        )


register(
    Dialect(
        name="sqlite",
        label="SQLite",
        example="sqlite:///journal.db",
        driver="aiosqlite",
        check_url=_check_url,
        kind=JournalKind.local,
        engine=sqlite_engine,
        backend=SqliteBackend,
        write_failure=write_failure,
    )
)
