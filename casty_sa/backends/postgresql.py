"""PostgreSQL through asyncpg or psycopg 3: a whole write group in one round trip.

The whole PostgreSQL dialect (see :mod:`casty_sa.dialects`): the URLs it
accepts (``postgresql://``, ``postgres://``, which take asyncpg, and
``postgresql+psycopg://``), the engine (:mod:`casty_sa.backends.postgresql_engines`)
and the backend. The two drivers differ in one place,
:mod:`casty_sa.backends.postgresql_drivers`; the statements and the rules are the same.

The backend: one statement per write group in autocommit: the rows travel as four arrays
and are inserted from ``unnest(...)``, so a group of any size costs one round
trip and is atomic. A group that also carries snapshots uses an explicit
transaction. A batch of reads joins ``unnest(...) WITH ORDINALITY`` of the
keys' arrays. Every statement carries the journal's statement timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from casty import JournalKind
from sqlalchemy import (
    ARRAY,
    BigInteger,
    String,
    Table,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.backends.base import BackendSettings, latest_per_entity, quietly
from casty_sa.backends.failures import (
    ConnectionLost,
    Contended,
    WriteRefused,
    classify_write_failure,
)
from casty_sa.backends.postgresql_drivers import driver_of_error
from casty_sa.backends.postgresql_engines import postgresql_engine
from casty_sa.backends.postgresql_reads import PostgresReading
from casty_sa.codec import ROW_COLUMNS, EventRow, Row, Stored
from casty_sa.dialects import Dialect, register
from casty_sa.models import EVENTS_PRIMARY_KEY, tombstone_table
from casty_sa.ordering import current_era, current_transaction_id, unless_deleted

__all__ = ["PostgresBackend", "postgresql_engine"]


#: Seconds between two NOTIFYs of one journal's writes (see :class:`_Announcer`).
NOTIFY_EVERY = 0.005
#: Seconds close() lets the last announcement go out before cutting it off.
NOTIFY_CLOSE_GRACE = 1.0


class _Announcer:
    """Tells other processes' live readers (``NOTIFY``) that a journal's writes committed.

    PostgreSQL commits the transactions that ``NOTIFY`` one at a time: each holds a lock
    on the notification queue until its commit is flushed. A ``NOTIFY`` in each write
    group would queue the commits of groups in flight behind each other (a tenth of W2's
    rate), so it goes alone, in a transaction that does not wait for its flush (it is
    only a hint: readers poll anyway), at most one every :data:`NOTIFY_EVERY` seconds,
    and always one after the last commit of a burst. The journal's own readers are woken
    directly (:mod:`casty_sa.live`).
    """

    def __init__(self, send: Callable[[], Awaitable[None]]) -> None:
        self._send = send
        self._pending = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def committed(self) -> None:
        """Events were committed (or may have been): announce them soon."""
        self._pending = True
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._announce(), name="casty_sa-notify"
            )

    async def _announce(self) -> None:
        try:
            while self._pending:
                self._pending = False
                await quietly(self._send())  # a lost one leaves readers to their polling
                if not self._closed:
                    await asyncio.sleep(NOTIFY_EVERY)
        finally:
            self._task = None

    async def close(self) -> None:
        """Stop; commits not yet announced are announced first (for at most a grace period:
        a server that does not answer must not hold close() for a connect timeout)."""
        self._closed = True
        task = self._task
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=NOTIFY_CLOSE_GRACE)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class PostgresBackend(PostgresReading):
    """A whole group in one ``INSERT … SELECT FROM unnest(…)`` round trip."""

    # the server commits transactions of several connections in parallel (and groups their
    # WAL flushes), so a second group in flight overlaps the client's work with the server's
    write_pipeline = 2
    _ordinal_base = 1

    def __init__(self, engine: AsyncEngine, schema: str | None, settings: BackendSettings) -> None:
        super().__init__(engine, schema, settings)  # the statement timeout, the read side
        events = self.events

        def from_arrays(table: Table, columns: Sequence[str]) -> Any:
            arrays = [bindparam(name, type_=ARRAY(table.c[name].type)) for name in columns]
            return func.unnest(*arrays).table_valued(*columns).render_derived()

        event_columns = [*ROW_COLUMNS, "event_type"]
        # the arrays through a subquery the planner keeps (OFFSET 0): it estimates as many
        # rows for a custom plan as for the generic one, so the statement, prepared, keeps
        # its generic plan instead of being planned anew at each write (the check's cost
        # per row would otherwise make a one-row custom plan look far cheaper)
        given = (
            select(*(bindparam(n, type_=ARRAY(events.c[n].type)).label(n) for n in event_columns))
            .offset(literal_column("0"))
            .subquery("given")
        )
        rows = func.unnest(*given.c).table_valued(*event_columns).render_derived()
        placed = select(
            *(_checked(rows, schema) if n == "sequence_nr" else rows.c[n] for n in event_columns),
            # once per statement (an InitPlan), so a journal that runs on across a restore
            # of its database writes in the era the table needs (casty_sa.ordering)
            select(current_era(events)).scalar_subquery(),
            current_transaction_id(),
        ).select_from(given, rows)
        insert_events = insert(events).from_select(
            [*event_columns, "era", "transaction_id"], placed
        )
        self._insert = self._compile(insert_events)
        # a hint for other processes' live readers, in a transaction of its own that does not
        # wait for its flush (see _Announcer)
        channel = self.channel.replace("'", "''")
        self._notify = (
            f"SELECT set_config('synchronous_commit', 'off', true), pg_notify('{channel}', '')"
        )
        self._announcer = _Announcer(self._notify_alone)
        self._upsert = self._newer_snapshot_wins(
            postgresql.insert(self.snapshots).from_select(
                ROW_COLUMNS, select(from_arrays(self.snapshots, ROW_COLUMNS))
            )
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

    def is_disconnect(self, exc: BaseException) -> bool:
        if isinstance(exc, OSError | ConnectionLost | TimeoutError):
            return True
        driver = driver_of_error(exc)
        if driver is not None and driver.broken(exc):
            return True
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate.startswith(("08", "57P"))  # connection exception, operator intervention

    async def write(self, events: Sequence[EventRow], snapshots: Sequence[Row]) -> None:
        snapshots = latest_per_entity(snapshots)  # ON CONFLICT may touch a row only once
        fairy = await self.take_writer()
        conn = fairy.driver_connection
        driver, timeout = self._driver, self._timeout
        committing = False
        try:
            if events and snapshots:
                await driver.command(conn, "BEGIN", timeout)
                try:
                    await driver.execute(conn, self._insert, self._events(events), timeout)
                    await driver.execute(conn, self._upsert, self._snapshots(snapshots), timeout)
                except BaseException:
                    await quietly(driver.command(conn, "ROLLBACK", timeout))
                    raise
                committing = True
                await driver.command(conn, "COMMIT", timeout)
            else:
                committing = True  # one statement in autocommit: it commits on its own
                if events:
                    await driver.execute(conn, self._insert, self._events(events), timeout)
                else:
                    await driver.execute(conn, self._upsert, self._snapshots(snapshots), timeout)
        except BaseException as exc:
            if events and committing:
                self._announcer.committed()  # it may have committed
            await self.give_back_writer(fairy, exc)
            failure = classify_write_failure(exc, committing=committing, dialect="postgresql")
            if failure is exc:
                raise
            raise failure from exc
        if events:
            self._announcer.committed()
        await self.give_back_writer(fairy, None)

    def _events(self, rows: Sequence[EventRow]) -> Sequence[Any]:
        """The arrays of the events' insert."""
        return self._driver.arrays(_columns(rows), _EVENT_TYPES)

    def _snapshots(self, rows: Sequence[Row]) -> Sequence[Any]:
        """The arrays of the snapshots' upsert."""
        return self._driver.arrays(_columns(rows), _EVENT_TYPES[:4])

    async def _notify_alone(self) -> None:
        async with self.connection() as conn:
            await self._driver.command(conn, self._notify, self._timeout)

    async def close(self) -> None:
        await self._announcer.close()
        await super().close()

    async def fetch_events(self, entity_id: str, from_nr: int) -> list[Stored]:
        async with self.connection() as conn:
            return await self._driver.fetch(
                conn, self._load_events, (entity_id, from_nr), self._timeout
            )

    async def fetch_snapshot(self, entity_id: str) -> Stored | None:
        async with self.connection() as conn:
            return await self._driver.fetchrow(  # type: ignore[no-any-return]
                conn, self._load_snapshot, (entity_id,), self._timeout
            )

    async def min_stored(self, entity_id: str, low: int, high: int) -> int | None:
        async with self.connection() as conn:
            return await self._driver.fetchval(  # type: ignore[no-any-return]
                conn, self._min_stored, (entity_id, low, high), self._timeout
            )

    async def _fetch_events_batch(
        self, keys: Sequence[tuple[str, int]]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        entity_ids, from_nrs = zip(*keys, strict=True)
        async with self.connection() as conn:
            return await self._driver.fetch(
                conn,
                self._load_events_batch,
                self._driver.arrays([list(entity_ids), list(from_nrs)], ("text", "int8")),
                self._timeout,
            )

    async def _fetch_snapshots_batch(
        self, entity_ids: Sequence[str]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        async with self.connection() as conn:
            return await self._driver.fetch(
                conn,
                self._load_snapshots_batch,
                self._driver.arrays([list(entity_ids)], ("text",)),
                self._timeout,
            )


def _checked(rows: Any, schema: str | None) -> Any:
    """The rows' ``sequence_nr``, ``NULL`` when deleted (see ``unless_deleted``): refused by
    ``NOT NULL`` in the statement that inserts it. A subquery per row (one probe of the
    key), never a join, whose plan could change the order of the rows and so of their
    positions; skipped while the table holds no tombstone at all (one look a statement)."""
    tombstones = tombstone_table(schema)
    tombstone = (
        select(tombstones.c.sequence_nr)
        .where(tombstones.c.entity_id == rows.c.entity_id)
        .scalar_subquery()
    )
    return unless_deleted(rows.c.sequence_nr, tombstone, only_if=exists(tombstones.select()))


def _columns(rows: Sequence[Row] | Sequence[EventRow]) -> list[list[Any]]:
    """Rows to the column arrays ``unnest`` takes."""
    return [list(column) for column in zip(*rows, strict=True)]


#: the element types of an event row's columns (a snapshot row: the first four)
_EVENT_TYPES = ("text", "int8", "float8", "bytea", "text")


#: deadlock_detected, serialization_failure: the server rolled the whole transaction back
#: (a single autocommit statement, or the explicit transaction whose COMMIT failed)
_ROLLED_BACK = frozenset({"40P01", "40001"})


def _write_failure(exc: Exception, _max_length: int | None) -> BaseException | bool:
    """asyncpg's or psycopg's error of a failed write (see ``WriteFailureRule``)."""
    driver = driver_of_error(exc)
    if driver is None:
        return False  # a client-side bound, a socket error: no answer from the server
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate == "23505":  # unique_violation
        # only the primary key's is a sequence number already stored; the global order's
        # index (or an application's) refused the rows for another reason: nothing stored
        return WriteRefused(exc, duplicate=driver.constraint(exc) == EVENTS_PRIMARY_KEY)
    if sqlstate == "23502":  # not_null_violation: a deleted sequence number (unless_deleted)
        deleted = driver.column(exc) == ("casty_sa_events", "sequence_nr")
        return WriteRefused(exc, duplicate=deleted)
    # a value refused (by the driver or the server), another constraint, or an application's
    # trigger raising (RAISE EXCEPTION): these rows, not the database, are the trouble
    if driver.bad_value(exc) or sqlstate.startswith("23") or sqlstate == "P0001":
        return WriteRefused(exc, duplicate=False)
    if sqlstate in _ROLLED_BACK:
        return Contended(exc)  # the server rolled the transaction back whole
    if driver.never_sent(exc):
        return ConnectionLost(exc, during_commit=False)
    # an error the server answered the statement with (a timeout, a cancel, a failed
    # deferred check) means it rolled the transaction back; a broken connection, a
    # client-side timeout or a protocol error leaves the commit's outcome open
    return driver.server_error(exc) and not sqlstate.startswith(("08", "57P"))


register(
    Dialect(
        name="postgresql",
        aliases=frozenset({"postgres"}),
        label="PostgreSQL",
        example="postgresql://…",
        driver="asyncpg",
        drivers=frozenset({"psycopg", "psycopg_async"}),
        extras={"psycopg": ("psycopg", "psycopg"), "psycopg_async": ("psycopg", "psycopg")},
        kind=JournalKind.centralized,
        timed=True,
        engine=postgresql_engine,
        backend=PostgresBackend,
        write_failure=_write_failure,
    )
)
