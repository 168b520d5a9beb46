"""PostgreSQL's read side: pages of committed events, entity ids, and LISTEN for commits.

A page of events is one statement: a CTE takes the horizon (the current era and
the oldest transaction still running, :mod:`casty_sa.ordering`) in the statement's
own snapshot, and a ``LATERAL`` subquery reads the events below it through the
global-order index, so every row it returns was committed before the statement
began and nothing a running transaction may still commit is passed. The horizon
row comes back even when there is no event, so a reader learns how far it has
looked.

Live readers of a journal share one ``LISTEN`` connection of their own, outside
the pool's count (:class:`PostgresReading.open_listener`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import (
    ARRAY,
    String,
    Table,
    any_,
    bindparam,
    select,
    true,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from casty_sa.backends.base import BackendSettings, Listener, quietly
from casty_sa.backends.pooled import PooledBackend
from casty_sa.backends.postgresql_drivers import PgDriver, driver_for
from casty_sa.backends.read_statements import (
    TOP,
    EventPage,
    Place,
    Prepared,
    entity_id_walk,
    event_backlog,
    event_page,
    global_order,
    highest_sequence_nr,
    page_values,
    prepare,
)
from casty_sa.ordering import (
    current_era,
    newest_place,
    next_transaction_id,
    notify_channel,
    read_horizon,
)

__all__ = ["PostgresReading"]


class PostgresReading(PooledBackend):
    """The read side of :class:`~casty_sa.backends.postgresql.PostgresBackend`."""

    #: LISTEN/NOTIFY wakes live readers at once; polling is the guarantee when a
    #: notification is lost (or the listening connection is)
    live_poll = 1.0

    def __init__(self, engine: AsyncEngine, schema: str | None, settings: BackendSettings) -> None:
        #: what differs between asyncpg and psycopg (set first: the base compiles statements)
        self._driver = driver_for(engine.dialect.driver)
        #: the dialect statements are compiled for: the engine's, with positional parameters
        self._dialect = self._driver.statement_dialect(engine.dialect)
        super().__init__(engine, schema, settings)
        # every statement carries the journal's statement timeout, so it is bounded on an
        # application's engine too (whose connections may have no command_timeout)
        self._timeout = settings.timeouts.statement
        #: the channel writers NOTIFY on commit
        self.channel = notify_channel(schema)
        self._event_pages: dict[tuple[bool, bool], Prepared] = {}
        self._highest = prepare(highest_sequence_nr(self.events), self._dialect)
        self._bytewise_ids: bool | None = None
        self._backlogs: dict[tuple[bool, bool], Prepared] = {}

    def _compile(self, statement: Any) -> str:
        return str(statement.compile(dialect=self._dialect))

    def usable(self, driver_connection: Any) -> bool:
        return self._driver.usable(driver_connection)

    async def ping(self, driver_connection: Any) -> None:
        # bounded on its own: the statement timeout is for real work, far longer than a
        # live server needs to answer SELECT 1
        await self._driver.ping(driver_connection, self.ping_timeout)

    def abort(self, driver_connection: Any) -> None:
        self._driver.abort(driver_connection)

    async def lend(self, driver_connection: Any) -> None:
        await self._driver.lend(driver_connection)

    async def reclaim(self, driver_connection: Any) -> None:
        await self._driver.reclaim(driver_connection)

    async def event_page(
        self, after: Place, stop: Place, limit: int, prefix: str | None, types: list[str] | None
    ) -> EventPage:
        variant = (prefix is not None, types is not None)
        statement = self._event_pages.get(variant)
        if statement is None:
            statement = prepare(_event_page(self.events, *variant), self._dialect)
            self._event_pages[variant] = statement
        values = page_values(after, stop, limit) | {"prefix": prefix, "types": types}
        async with self.connection() as conn:
            found = await self._driver.fetch(
                conn, statement.sql, statement.args(values), self._timeout
            )
        era, below, writing_era, following, newest_era, newest_transaction_id = found[0][:6]
        return EventPage(
            [tuple(row[6:]) for row in found if row[6] is not None],
            horizon=(era, below - 1, TOP[2]),
            ceiling=(writing_era, following - 1, TOP[2]),
            blocked=newest_era is not None and (newest_era, newest_transaction_id) >= (era, below),
        )

    async def event_backlog(
        self, after: Place, limit: int, prefix: str | None, types: list[str] | None
    ) -> tuple[int, float | None]:
        variant = (prefix is not None, types is not None)
        statement = self._backlogs.get(variant)
        if statement is None:
            built = event_backlog(
                self.events,
                self.events.c.timestamp,
                prefix=variant[0],
                types_in=_types_in(variant[1]),
            )
            statement = self._backlogs[variant] = prepare(built, self._dialect)
        values = page_values(after, after, limit) | {"prefix": prefix, "types": types}
        async with self.connection() as conn:
            found = await self._driver.fetchrow(
                conn, statement.sql, statement.args(values), self._timeout
            )
        return int(found[0]), None if found[1] is None else float(found[1])

    async def entity_id_page(self, after: str, limit: int, prefix: str | None) -> list[str]:
        contiguous = prefix is not None and await self._ids_sort_bytewise()
        statement = self._entity_walks[contiguous]
        values = {"after": after, "limit": limit, "prefix": prefix}
        async with self.connection() as conn:
            found = await self._driver.fetch(
                conn, statement.sql, statement.args(values), self._timeout
            )
        return [row[0] for row in found]

    async def highest_sequence_nr(self, entity_id: str) -> int:
        async with self.connection() as conn:
            found = await self._driver.fetchval(
                conn, self._highest.sql, (entity_id, entity_id), self._timeout
            )
        return 0 if found is None else int(found)

    async def open_listener(self, woken: Callable[[], None]) -> Listener:
        # a connection of its own, detached from the pool (which may open another in its
        # place), so live readers waiting never hold one the journal's calls need
        async with self.turn():
            fairy = await self._engine.raw_connection()
            conn: Any = fairy.driver_connection  # a detached one no longer names it
            await greenlet_spawn(fairy.detach)
        try:
            stop = await self._driver.listen(conn, self.channel, woken)
        except BaseException:
            await quietly(greenlet_spawn(fairy.close))
            raise
        return _Listener(fairy, conn, self._driver, stop)

    async def _ids_sort_bytewise(self) -> bool:
        """Whether ``entity_id`` sorts by bytes here (``C``): then the ids with a prefix are
        contiguous, and a walk by prefix may start at it and stop after it."""
        if self._bytewise_ids is None:
            table = self._engine.dialect.identifier_preparer.format_table(self.events)
            async with self.connection() as conn:
                sql = _COLLATION.replace("$1", self._driver.placeholder(1))
                found = await self._driver.fetchrow(conn, sql, (table,), self._timeout)
            self._bytewise_ids = found is not None and _bytewise(*found)
        return self._bytewise_ids

    @functools.cached_property
    def _entity_walks(self) -> dict[bool, Prepared]:
        return {
            contiguous: prepare(
                entity_id_walk(self.events, contiguous_prefix=contiguous), self._dialect
            )
            for contiguous in (False, True)
        }


def _types_in(typed: bool) -> Callable[[Any], Any] | None:
    """The filter by event types (bound as one array), when the read has one."""
    return (
        (lambda column: column == any_(bindparam("types", type_=ARRAY(String)))) if typed else None
    )


def _event_page(events: Table, prefix: bool, types: bool) -> Any:
    """A page of events and, in the same statement, the horizon it stopped at."""
    era, below = read_horizon(events)
    # the newest row's era and transaction id: committed rows wait above the horizon when
    # they are at or above it (a look at the index's last entry)
    newest = newest_place(events)
    horizon = select(
        era.label("h_era"),
        below.label("h_below"),
        current_era(events).label("h_writing_era"),
        next_transaction_id().label("h_next"),
        newest.with_only_columns(events.c.era).scalar_subquery().label("h_newest_era"),
        newest.with_only_columns(events.c.transaction_id)
        .scalar_subquery()
        .label("h_newest_transaction_id"),
    ).cte("horizon")
    page = event_page(
        events,
        events.c.timestamp,
        prefix=prefix,
        types_in=_types_in(types),
        below=tuple_(horizon.c.h_era, horizon.c.h_below),
    ).lateral("page")
    return (
        select(*horizon.c, *page.c)
        .select_from(horizon)
        .outerjoin(page, true())
        .order_by(*(page.c[column.name] for column in global_order(events)))
    )


#: The collation of ``entity_id``, and the database's (``to_jsonb``: the locale provider
#: columns exist from PostgreSQL 15 on)
_COLLATION = """
SELECT c.collname, d.datcollate, to_jsonb(d) ->> 'datlocprovider', to_jsonb(d) ->> 'datlocale'
FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation, pg_database d
WHERE a.attrelid = to_regclass($1) AND a.attname = 'entity_id' AND d.datname = current_database()
"""
_BYTEWISE = frozenset({"C", "POSIX", "ucs_basic"})


def _bytewise(collation: str, database: str, provider: str | None, locale: str | None) -> bool:
    """Whether a column of ``collation``, in a database of libc collation ``database``,
    ``provider`` and ``locale``, sorts text by bytes (code points)."""
    if collation != "default":
        return collation in _BYTEWISE
    if provider == "b":  # PostgreSQL 17's builtin provider: C and C.UTF-8 sort by code point
        return locale in ("C", "C.UTF-8")
    return provider in (None, "c") and database in ("C", "POSIX")


class _Listener:
    """The connection a journal's live readers LISTEN on (see :mod:`casty_sa.live`)."""

    def __init__(
        self, fairy: Any, conn: Any, driver: PgDriver, stop: Callable[[], Awaitable[None]]
    ) -> None:
        self._fairy = fairy
        self._conn = conn
        self._driver = driver
        self._stop = stop

    def alive(self) -> bool:
        return self._driver.usable(self._conn)

    async def close(self) -> None:
        await quietly(self._stop())
        if self.alive():
            await quietly(greenlet_spawn(self._fairy.close))
        else:
            # ended (by the server, the network): the pool's close would first reset it (a
            # ROLLBACK psycopg cannot send), and log that failure as an error
            self._driver.abort(self._conn)
            await quietly(self._driver.close(self._conn))
