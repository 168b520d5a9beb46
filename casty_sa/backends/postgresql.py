"""PostgreSQL through ``asyncpg``: a whole write group in one round trip.

The whole PostgreSQL dialect (see :mod:`casty_sa.dialects`): the URLs it
accepts (``postgresql://``, ``postgres://``), the engine and the backend.

The engine: a fixed pool of ten connections, each checked on checkout
(asyncpg knows when the server or the network closed it, so no round trip is
spent; pass ``pool_pre_ping=True`` for SQLAlchemy's full ping), a connect
timeout and a statement timeout, so a call during an outage fails promptly
instead of hanging. The statement timeout is also the server's
``statement_timeout``, and connections are named ``casty-sa`` in
``pg_stat_activity`` (the URL's ``application_name`` overrides it). The URL's
libpq parameters (``sslmode``, ``connect_timeout``, ``options=-c …``) are
translated for asyncpg (:mod:`casty_sa.libpq`); one it cannot honour is refused.

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
    URL,
    BigInteger,
    String,
    Table,
    bindparam,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from casty_sa.backends.base import BackendSettings, latest_per_entity, quietly
from casty_sa.backends.failures import (
    ConnectionLost,
    Contended,
    WriteRefused,
    classify_write_failure,
)
from casty_sa.backends.postgresql_reads import PostgresReading
from casty_sa.codec import ROW_COLUMNS, EventRow, Row, Stored
from casty_sa.dialects import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT,
    Dialect,
    EngineRequest,
    Timeouts,
    register,
)
from casty_sa.libpq import DEFAULT_APPLICATION_NAME, postgres_options
from casty_sa.models import EVENTS_PRIMARY_KEY
from casty_sa.ordering import (
    current_era,
    current_transaction_id,
)

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
    """asyncpg: a whole group in one ``INSERT … SELECT FROM unnest(…)`` round trip."""

    # the server commits transactions of several connections in parallel (and groups their
    # WAL flushes), so a second group in flight overlaps the client's work with the server's
    write_pipeline = 2
    _ordinal_base = 1

    def __init__(self, engine: AsyncEngine, schema: str | None, settings: BackendSettings) -> None:
        super().__init__(engine, schema, settings)  # the statement timeout, the read side
        events = self.events

        def from_arrays(table: Table, columns: Sequence[str], *more: Any) -> Any:
            arrays = [bindparam(name, type_=ARRAY(table.c[name].type)) for name in columns]
            rows = func.unnest(*arrays).table_valued(*columns).render_derived()
            return select(*(rows.c[name] for name in columns), *more)

        event_columns = [*ROW_COLUMNS, "event_type"]
        placed = from_arrays(
            events,
            event_columns,
            # once per statement (an InitPlan), so a journal that runs on across a restore
            # of its database writes in the era the table needs (casty_sa.ordering)
            select(current_era(events)).scalar_subquery(),
            current_transaction_id(),
        )
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
                ROW_COLUMNS, from_arrays(self.snapshots, ROW_COLUMNS)
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

    async def write(self, events: Sequence[EventRow], snapshots: Sequence[Row]) -> None:
        snapshots = latest_per_entity(snapshots)  # ON CONFLICT may touch a row only once
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
                    await quietly(transaction.rollback())
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

    async def _notify_alone(self) -> None:
        async with self.connection() as conn:
            await conn.execute(self._notify, timeout=self._timeout)

    async def close(self) -> None:
        await self._announcer.close()
        await super().close()

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


def _columns(rows: Sequence[Row] | Sequence[EventRow]) -> list[list[Any]]:
    """Rows to the column arrays ``unnest`` takes."""
    return [list(column) for column in zip(*rows, strict=True)]


def postgresql_engine(url: URL, request: EngineRequest) -> tuple[AsyncEngine, Timeouts | None]:
    """An asyncpg engine: the URL's libpq parameters translated, timeouts, a fixed pool."""
    # libpq parameters of the URL (sslmode=, application_name=, …), in asyncpg's terms
    libpq = postgres_options(url)
    # an explicit argument wins over the URL, which wins over the defaults
    connect_timeout = request.connect_timeout
    if connect_timeout is None:
        connect_timeout = libpq.connect_timeout or DEFAULT_CONNECT_TIMEOUT
    statement_timeout = request.statement_timeout
    if statement_timeout is None:
        statement_timeout = libpq.statement_timeout or DEFAULT_STATEMENT_TIMEOUT
    user_connect_args = dict(request.connect_args)
    # The server enforces the statement timeout too, so a statement whose client is cut
    # off (a network partition, a frozen process) does not run on, holding its locks;
    # and connections carry a name a DBA sees in pg_stat_activity.
    server_settings = {
        "application_name": DEFAULT_APPLICATION_NAME,
        **libpq.server_settings,
        "statement_timeout": str(max(1, round(statement_timeout * 1000))),
        **user_connect_args.pop("server_settings", {}),
    }
    connect_args = {
        **libpq.connect_args,
        "timeout": connect_timeout,
        "command_timeout": statement_timeout,
        "server_settings": server_settings,
    }
    # A fixed pool (no overflow connections opened and closed in bursts), checked on
    # checkout without a round trip: SQLAlchemy's pre-ping costs three on asyncpg
    # (BEGIN, SELECT, ROLLBACK), more than the journal's own statement.
    defaults = {"pool_size": 10, "max_overflow": 0}
    final_connect_args = {**connect_args, **user_connect_args}
    engine = create_async_engine(
        libpq.url, connect_args=final_connect_args, **{**defaults, **request.options}
    )
    timeouts = Timeouts(
        float(final_connect_args["timeout"]), float(final_connect_args["command_timeout"])
    )
    if not request.options.get("pool_pre_ping"):

        @event.listens_for(engine.sync_engine, "checkout")
        def _check_alive(_dbapi: Any, record: Any, _proxy: Any) -> None:
            driver = record.driver_connection
            if driver is not None and driver.is_closed():
                # the pool discards it and hands out (or opens) another
                raise DisconnectionError("connection closed by the server or the network")

    return engine, timeouts


#: deadlock_detected, serialization_failure: the server rolled the whole transaction back
#: (a single autocommit statement, or the explicit transaction whose COMMIT failed)
_ROLLED_BACK = frozenset({"40P01", "40001"})


def _write_failure(exc: Exception, _max_length: int | None) -> BaseException | bool:
    """asyncpg's error of a failed write (see ``WriteFailureRule``)."""
    import asyncpg

    if isinstance(exc, asyncpg.UniqueViolationError):
        # only the primary key's is a sequence number already stored; the global order's
        # index (or an application's) refused the rows for another reason: nothing stored
        return WriteRefused(exc, duplicate=exc.constraint_name == EVENTS_PRIMARY_KEY)
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
    return isinstance(exc, asyncpg.PostgresError) and not (
        isinstance(exc, asyncpg.PostgresConnectionError) or sqlstate.startswith(("08", "57P"))
    )


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
