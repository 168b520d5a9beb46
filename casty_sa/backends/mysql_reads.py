"""MySQL's and MariaDB's reads: an entity's events, batches of them, and the read side.

Writers take their positions from a one-row counter whose lock they hold until
they commit (:func:`casty_sa.ordering.take_positions`), so rows commit in position
order: once a row is committed, every row below it is. As on SQLite, the newest
stored place is the horizon: a page reads it and the events up to it, in one
packet of two statements (one round trip); the rows at or below a place seen once
stay as they are, so the two need no shared snapshot. Live readers poll.

Every call is bounded on the client (:meth:`MySQLReading._bounded`): a statement
without an answer in time fails with ``TimeoutError``, and its connection, left
half-way through the protocol, is closed at the socket and discarded, never reset
over the wire (a server that does not answer would not answer the ``ROLLBACK``
either); so is one whose caller was cancelled mid-call.

Batched reads ask for many entities in one statement: ``(entity_id = %s AND
sequence_nr >= %s) OR …`` (ranges of the primary key) and ``entity_id IN (…)``;
the rows go back to their keys by entity id, which the key columns compare
exactly.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import String, bindparam, func, literal_column
from sqlalchemy.ext.asyncio import AsyncEngine

from casty_sa.backends.base import BackendSettings
from casty_sa.backends.failures import ConnectionLost
from casty_sa.backends.pooled import PooledBackend
from casty_sa.backends.read_statements import (
    EventPage,
    Place,
    Prepared,
    event_backlog,
    event_page,
    highest_sequence_nr,
    page_values,
    prepare,
)
from casty_sa.codec import Stored
from casty_sa.ordering import newest_place

__all__ = ["LEFT_CLEAN", "MySQLReading", "error_code", "is_mysql_disconnect"]

#: In a pooled connection's ``info``: its last user ended with ``COMMIT`` and no error, so
#: it goes back to the pool without the reset's ``ROLLBACK`` round trip (see
#: :func:`casty_sa.backends.mysql.mysql_engine`; an error leaves the mark off).
LEFT_CLEAN = "casty_sa_left_clean"

#: below every place a row can have
BOTTOM: Place = (0, 0, -(2**63))

#: Client errors of a connection gone (CR_SERVER_GONE_ERROR, CR_SERVER_LOST, …) and the
#: server's words for a session it ends (shutdown, killed, idle too long).
_DISCONNECTS = frozenset({2002, 2003, 2006, 2013, 2014, 2045, 2055, 1053, 1077, 1152, 1153})
_ENDED = frozenset({1927, 4031})
#: the collations in which ids with a prefix are contiguous (code point order, no padding)
_BYTEWISE = frozenset({"utf8mb4_nopad_bin", "utf8mb4_0900_bin", "binary"})


def error_code(exc: BaseException) -> int | None:
    """The MySQL error number of a driver error (``None``: not one)."""
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def is_mysql_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection is gone (or left unusable half-way)."""
    if isinstance(exc, OSError | ConnectionLost | TimeoutError):
        return True
    code = error_code(exc)
    if code in _DISCONNECTS or code in _ENDED:
        return True
    # the drivers' own: "(0, 'Not connected')", a cancelled read, a closed stream
    name = type(exc).__name__
    return name == "InterfaceError" or (code == 0 and name in ("OperationalError", "Error"))


class MySQLReading(PooledBackend):
    """The reads of :class:`~casty_sa.backends.mysql.MySQLBackend`."""

    #: another process's commits are seen by polling: a look at the index's last entry
    live_poll = 0.05
    # a cancelled call leaves the rest of its answer on the wire, where the pool's ROLLBACK
    # would read it as its own (and wait, without a bound, for a server that froze)
    cut_breaks = True

    def __init__(self, engine: AsyncEngine, schema: str | None, settings: BackendSettings) -> None:
        super().__init__(engine, schema, settings)
        # every call is bounded on the client, on an application's engine too
        self._timeout = settings.timeouts.statement
        events, dialect = self.events, engine.dialect
        preparer = dialect.identifier_preparer
        self._events_table = preparer.format_table(events)
        self._snapshots_table = preparer.format_table(self.snapshots)
        self._newest = prepare(newest_place(events), dialect)
        types = bindparam("types", type_=String)

        def types_in(typed: bool) -> Callable[[Any], Any] | None:
            # the list travels as JSON and is compared as JSON strings, exactly
            if not typed:
                return None
            return lambda column: (
                func.json_contains(types, func.json_quote(column)) == literal_column("1")
            )

        def per_filter(build: Callable[..., Any]) -> dict[tuple[bool, bool], Prepared]:
            # spelled: a range of the index (see read_statements._beyond)
            return {
                (prefix, typed): prepare(
                    build(
                        events,
                        events.c.timestamp,
                        prefix=prefix,
                        types_in=types_in(typed),
                        spelled=True,
                    ),
                    dialect,
                )
                for prefix in (False, True)
                for typed in (False, True)
            }

        self._event_pages = per_filter(event_page)
        self._backlogs = per_filter(event_backlog)
        self._highest = prepare(highest_sequence_nr(events), dialect)
        self._bytewise_ids: bool | None = None

    # -- connections -------------------------------------------------------------------------

    def usable(self, driver_connection: Any) -> bool:
        closed = getattr(driver_connection, "closed", None)  # aiomysql
        if closed is not None and not callable(closed):
            return not closed
        return bool(getattr(driver_connection, "connected", True)) and not getattr(
            driver_connection, "_stream_broken", False
        )

    async def ping(self, driver_connection: Any) -> None:
        # COM_PING: one round trip, bounded on its own (far shorter than a statement's)
        await asyncio.wait_for(driver_connection.ping(False), self.ping_timeout)

    def abort(self, driver_connection: Any) -> None:
        driver_connection.close()  # closes the socket, without a word to the server

    def is_disconnect(self, exc: BaseException) -> bool:
        return is_mysql_disconnect(exc)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """:meth:`PooledBackend.connection`, the connection marked :data:`LEFT_CLEAN` when
        its user is done without an error: every user of it ends its work with ``COMMIT``
        (the reads here, the counter's seed)."""
        fairy = await self._acquire(take_held=self.capacity == 1)
        fairy.info.pop(LEFT_CLEAN, None)
        try:
            yield fairy.driver_connection
        except BaseException as exc:
            await self._give_back(fairy, exc if self.broken(exc) else None)
            raise
        fairy.info[LEFT_CLEAN] = True
        await self._give_back(fairy, None)

    async def _bounded[T](self, work: Awaitable[T]) -> T:
        """``work`` within the statement timeout (``TimeoutError`` after it)."""
        return await asyncio.wait_for(work, self._timeout)

    async def _query(self, sql: str, args: Sequence[Any]) -> list[Any]:
        """The rows of one statement on a pooled connection."""
        async with self.connection() as conn:
            return await self._bounded(_fetch_all(conn, sql, args))

    # -- an entity's events and snapshot ---------------------------------------------------

    async def fetch_events(self, entity_id: str, from_nr: int) -> list[Stored]:
        return await self._query(self._load_events, (entity_id, from_nr))

    async def fetch_snapshot(self, entity_id: str) -> Stored | None:
        rows = await self._query(self._load_snapshot, (entity_id,))
        return rows[0] if rows else None

    async def min_stored(self, entity_id: str, low: int, high: int) -> int | None:
        rows = await self._query(self._min_stored, (entity_id, low, high))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    async def _fetch_events_batch(
        self, keys: Sequence[tuple[str, int]]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        numbers: dict[str, list[tuple[int, int]]] = {}
        args: list[Any] = []
        for number, (entity_id, from_nr) in enumerate(keys):
            numbers.setdefault(entity_id, []).append((number, from_nr))
            args += (entity_id, from_nr)
        found = await self._query(self._events_of(len(keys)), args)
        return [
            (number, seq, payload, ts)
            for entity_id, seq, payload, ts in found
            for number, from_nr in numbers[entity_id]
            if seq >= from_nr
        ]

    async def _fetch_snapshots_batch(
        self, entity_ids: Sequence[str]
    ) -> Sequence[tuple[int, int, bytes, float]]:
        numbers: dict[str, list[int]] = {}
        for number, entity_id in enumerate(entity_ids):
            numbers.setdefault(entity_id, []).append(number)
        found = await self._query(self._snapshots_of(len(entity_ids)), entity_ids)
        return [
            (number, seq, payload, ts)
            for entity_id, seq, payload, ts in found
            for number in numbers[entity_id]
        ]

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one backend per journal
    def _events_of(self, count: int) -> str:
        ranges = " OR ".join(["(entity_id = %s AND sequence_nr >= %s)"] * count)
        return (
            f"SELECT entity_id, sequence_nr, payload, timestamp FROM {self._events_table} "
            f"WHERE {ranges} ORDER BY entity_id, sequence_nr"
        )

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one backend per journal
    def _snapshots_of(self, count: int) -> str:
        return (
            f"SELECT entity_id, sequence_nr, payload, timestamp FROM {self._snapshots_table} "
            f"WHERE entity_id IN ({', '.join(['%s'] * count)})"
        )

    # -- the read side -----------------------------------------------------------------------

    async def event_page(
        self, after: Place, stop: Place, limit: int, prefix: str | None, types: list[str] | None
    ) -> EventPage:
        statement = self._event_pages[(prefix is not None, types is not None)]
        values = page_values(after, stop, limit) | _filters(prefix, types)
        async with self.connection() as conn:
            newest, rows = await self._bounded(
                _fetch_both(conn, self._newest, statement, statement.args(values))
            )
        if not newest:
            return EventPage([], horizon=BOTTOM, ceiling=None)
        era, transaction_id, position = newest[0]
        horizon: Place = (era, transaction_id, position)
        # read after the horizon, the page may hold rows above it (on READ COMMITTED): they
        # are committed too, but left for the next page, which sees the ones below them
        page = [tuple(row) for row in rows if tuple(row[:3]) <= horizon]
        return EventPage(page, horizon=horizon, ceiling=horizon)

    async def event_backlog(
        self, after: Place, limit: int, prefix: str | None, types: list[str] | None
    ) -> tuple[int, float | None]:
        statement = self._backlogs[(prefix is not None, types is not None)]
        values = page_values(after, after, limit) | _filters(prefix, types)
        [(count, oldest)] = await self._query(statement.sql, statement.args(values))
        return int(count), None if oldest is None else float(oldest)

    async def entity_id_page(self, after: str, limit: int, prefix: str | None) -> list[str]:
        # the ids of a page in one loose index scan of the primary key: one probe per id
        # ("using index for group-by"), where a recursive walk's correlated MIN(entity_id)
        # makes MariaDB read a whole index per step
        walk = f"SELECT DISTINCT entity_id FROM {self._events_table} WHERE entity_id > %s"
        args: list[Any] = [after]
        if prefix is not None and await self._ids_sort_bytewise():
            # ids with the prefix are contiguous: LIKE 'prefix%' is a range of the key
            walk += " AND entity_id LIKE %s ESCAPE '!'"
            args.append(_like_prefix(prefix))
        walk += " ORDER BY entity_id LIMIT %s"
        return [row[0] for row in await self._query(walk, [*args, limit])]

    async def highest_sequence_nr(self, entity_id: str) -> int:
        rows = await self._query(self._highest.sql, (entity_id, entity_id))
        return 0 if not rows or rows[0][0] is None else int(rows[0][0])

    async def _ids_sort_bytewise(self) -> bool:
        """Whether ``entity_id`` sorts by code point without padding (casty-sa's migrations
        make it so; an application's own tables may not): then ids with a prefix are
        contiguous, and a walk by prefix may start at it and stop after it."""
        if self._bytewise_ids is None:
            found = await self._query(
                "SELECT collation_name FROM information_schema.columns WHERE table_schema = "
                "COALESCE(%s, DATABASE()) AND table_name = %s AND column_name = 'entity_id'",
                (self.events.schema, self.events.name),
            )
            self._bytewise_ids = bool(found) and found[0][0] in _BYTEWISE
        return self._bytewise_ids


def _like_prefix(prefix: str) -> str:
    """A ``LIKE … ESCAPE '!'`` pattern matching the ids that start with ``prefix``.

    >>> _like_prefix("50%_off!")
    '50!%!_off!!%'
    """
    escaped = prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped + "%"


def _filters(prefix: str | None, types: list[str] | None) -> dict[str, Any]:
    return {
        "prefix": prefix,
        "types": None if types is None else json.dumps(types, ensure_ascii=False),
    }


async def _fetch_all(conn: Any, sql: str, args: Sequence[Any]) -> list[Any]:
    """The rows of one statement, its transaction ended in the same packet (``COMMIT``:
    the connection goes back to the pool with no transaction open, and no ``ROLLBACK``)."""
    async with conn.cursor() as cursor:
        await cursor.execute(f"{sql}; COMMIT", tuple(args) or None)
        rows = list(await cursor.fetchall())
        await cursor.nextset()
        return rows


async def _fetch_both(
    conn: Any, first: Prepared, second: Prepared, args: Sequence[Any]
) -> tuple[list[Any], list[Any]]:
    """The rows of two statements sent in one packet (one round trip, ``COMMIT`` in it
    too: see :func:`_fetch_all`)."""
    async with conn.cursor() as cursor:
        await cursor.execute(f"{first.sql}; {second.sql}; COMMIT", tuple(args))
        head = list(await cursor.fetchall())
        await cursor.nextset()
        rows = list(await cursor.fetchall())
        await cursor.nextset()
        return head, rows
