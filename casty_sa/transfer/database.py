"""casty-sa's tables in a database as one side of a copy, read and written with Core statements.

Reads take no write lock on SQLite and stop a batch at a byte budget summed in the database,
so a copy never holds up the application's writer nor reads a payload past the budget.
Writes skip what the target holds: ``ON CONFLICT DO NOTHING`` (PostgreSQL, SQLite), and on
MySQL/MariaDB, which has neither that nor ``RETURNING``, a look-up of the keys under the
position counter's lock (every writer of events takes it first, so none can slip in).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Insert,
    Select,
    Table,
    and_,
    bindparam,
    func,
    insert,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from casty_sa.batching import ROW_OVERHEAD
from casty_sa.engine import bind_schema, read_only
from casty_sa.errors import SchemaError
from casty_sa.migrate import checked_engine
from casty_sa.models import EventCounterRecord, journal_tables, newer_snapshot_wins
from casty_sa.ordering import (
    current_era,
    current_transaction_id,
    next_position,
)
from casty_sa.transfer.endpoint import LOOKUP_CHUNK, chunks
from casty_sa.transfer.sqlite_paths import require_existing_database
from casty_sa.transfer.values import EntityStats, JournalStats, Row
from casty_sa.urls import UrlLike, safe_url

__all__ = ["JournalDatabase"]

_events, _snapshots = journal_tables()
_counter = cast(Table, EventCounterRecord.__table__)


class JournalDatabase:
    """casty-sa's tables in a database, read and written with Core statements.

    Parameters
    ----------
    engine : AsyncEngine
        An engine whose database is at casty-sa's head revision; use
        :meth:`open` to get one checked (and, for SQLite, migrated).
    schema : str | None
        PostgreSQL schema holding the tables.
    """

    def __init__(self, engine: AsyncEngine, *, schema: str | None = None) -> None:
        self._engine = bind_schema(engine, schema)
        # reads (stats, the source side of a copy, the verification) take no write lock on
        # SQLite: an export never waits for, nor holds up, the application's writer
        self._reader = read_only(self._engine)
        self._name = safe_url(engine.url)
        self._mysql = engine.dialect.name in ("mysql", "mariadb")
        self._insert_events: Insert | None = None
        self._upsert_snapshots: Insert
        if self._mysql:  # no RETURNING, no ON CONFLICT: see write_events, write_snapshots
            self._upsert_snapshots = newer_snapshot_wins(
                mysql.insert(_snapshots), _snapshots, replace_equal=False
            )
            return
        postgres = engine.dialect.name == "postgresql"
        insert = postgresql.insert if postgres else sqlite.insert
        events = _in_global_order(insert(_events), postgresql=postgres)
        self._insert_events = events.on_conflict_do_nothing(
            index_elements=[_events.c.entity_id, _events.c.sequence_nr]
        ).returning(_events.c.sequence_nr)
        self._upsert_snapshots = newer_snapshot_wins(
            insert(_snapshots), _snapshots, replace_equal=False
        ).returning(_snapshots.c.entity_id)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        target: UrlLike | AsyncEngine,
        *,
        migrate: bool | None = None,
        schema: str | None = None,
        must_exist: bool = False,
        **engine_options: Any,
    ) -> AsyncIterator[JournalDatabase]:
        """Open a database, checking its schema as ``SAJournal`` does (async context manager).

        Parameters
        ----------
        target : str | URL | AsyncEngine
            The database (an engine passed in is left open).
        migrate : bool | None
            As for :class:`~casty_sa.SAJournal`: ``None`` migrates a SQLite
            database and requires a server database to be at head.
        schema : str | None
            PostgreSQL schema holding the tables.
        must_exist : bool
            Refuse a SQLite file that does not exist instead of creating it.
        **engine_options
            As :class:`~casty_sa.SAJournal` takes them (``connect_timeout``, …).

        Raises
        ------
        SchemaError
            The database is not at head and may not be migrated.
        DatabaseUnavailable
            The database cannot be reached, or (``must_exist``) is a missing file.
        """
        if must_exist:
            require_existing_database(target)
        async with checked_engine(
            target, migrate=migrate, schema=schema, **engine_options
        ) as engine:
            yield cls(engine, schema=schema)

    @property
    def name(self) -> str:
        """The database URL, password masked."""
        return self._name

    @property
    def keeps_zero_sign(self) -> bool:
        """Whether the timestamp columns keep ``-0.0``: all but MySQL's and MariaDB's
        ``DOUBLE`` (the journal refuses ``-0.0`` there)."""
        return not self._mysql

    async def stats(self) -> JournalStats:
        """Per-entity event statistics and snapshot positions of the database."""
        c = _events.c
        events_query = select(
            c.entity_id, func.count(), func.min(c.sequence_nr), func.max(c.sequence_nr)
        ).group_by(c.entity_id)
        snapshot_query = select(_snapshots.c.entity_id, _snapshots.c.sequence_nr)
        async with self._reader.connect() as connection:
            events = {
                entity: EntityStats(count, first, last)
                for entity, count, first, last in await connection.execute(events_query)
            }
            snapshots = {entity: seq for entity, seq in await connection.execute(snapshot_query)}
        return JournalStats(events, snapshots)

    async def read_events(
        self, after: tuple[str, int] | None, limit: int, max_bytes: int
    ) -> list[Row]:
        """Up to ``limit`` events (and ``max_bytes``) in key order, after the key ``after``."""
        c = _events.c
        keys = (c.entity_id, c.sequence_nr)
        where = None if after is None else tuple_(*keys) > tuple_(*after)
        query = _within_bytes(_events, keys, where, limit, max_bytes)
        async with self._reader.connect() as connection:
            return [Row(*row) for row in await connection.execute(query)]

    async def read_snapshots(self, after: str | None, limit: int, max_bytes: int) -> list[Row]:
        """Up to ``limit`` snapshots (and ``max_bytes``) in entity order, after entity ``after``."""
        c = _snapshots.c
        where = None if after is None else c.entity_id > after
        query = _within_bytes(_snapshots, (c.entity_id,), where, limit, max_bytes)
        async with self._reader.connect() as connection:
            return [Row(*row) for row in await connection.execute(query)]

    async def fetch_events(self, keys: Sequence[tuple[str, int]]) -> list[Row]:
        """The events stored under ``keys``, looked up by primary key."""
        c = _events.c
        found: list[Row] = []
        async with self._reader.connect() as connection:
            for chunk in chunks(keys, LOOKUP_CHUNK):
                query = select(
                    c.entity_id, c.sequence_nr, c.timestamp, c.payload, c.event_type
                ).where(tuple_(c.entity_id, c.sequence_nr).in_(chunk))
                found += [Row(*row) for row in await connection.execute(query)]
        return found

    async def fetch_snapshots(self, entities: Sequence[str]) -> list[Row]:
        """The snapshots of ``entities``."""
        c = _snapshots.c
        found: list[Row] = []
        async with self._reader.connect() as connection:
            for chunk in chunks(entities, LOOKUP_CHUNK):
                query = select(c.entity_id, c.sequence_nr, c.timestamp, c.payload).where(
                    c.entity_id.in_(chunk)
                )
                found += [Row(*row) for row in await connection.execute(query)]
        return found

    async def count_events(self, bounds: Sequence[tuple[str, int]]) -> list[int]:
        """Per ``(entity id, bound)``, how many events of the entity are at or below ``bound``."""
        c = _events.c
        counts: list[int] = []
        async with self._reader.connect() as connection:
            for entity, bound in bounds:
                query = select(func.count()).where(c.entity_id == entity, c.sequence_nr <= bound)
                counts.append(int((await connection.execute(query)).scalar_one()))
        return counts

    async def write_events(self, rows: Sequence[Row]) -> int:
        """Insert the events the database lacks, in one transaction; return how many.

        Each gets its place in this database's global order, as the journal's writes
        do (see :func:`_in_global_order`), and keeps the source's ``event_type``.
        """
        async with self._engine.begin() as connection:
            if self._insert_events is None:
                return await _write_events_mysql(connection, rows)
            params = [
                {**_params(row), "event_type": row.event_type, "step": step}
                for step, row in enumerate(rows, 1)
            ]
            result = await connection.execute(self._insert_events, params)
            return len(result.all())

    async def write_snapshots(self, rows: Sequence[Row]) -> int:
        """Insert snapshots, or advance those with a lower sequence number; return how many."""
        async with self._engine.begin() as connection:
            if self._mysql:  # no RETURNING: the rows that win, found first
                rows = await _newer_snapshots(connection, rows)
                if rows:
                    await connection.execute(self._upsert_snapshots, [_params(r) for r in rows])
                return len(rows)
            result = await connection.execute(self._upsert_snapshots, [_params(r) for r in rows])
            return len(result.all())


async def _write_events_mysql(connection: AsyncConnection, rows: Sequence[Row]) -> int:
    """MySQL/MariaDB: the events the target lacks, numbered from the position counter.

    The counter goes first (as in every writer of events there, see
    :func:`casty_sa.ordering.take_positions`): its row stays locked until the commit,
    so the rows commit in position order and no writer stores one of these keys between
    the look-up and the insert. A key the target holds leaves its position unused.
    """
    taken = await connection.execute(
        update(_counter)
        .where(_counter.c.id == 1)
        .values(position=func.last_insert_id(_counter.c.position + len(rows)))
    )
    if int(taken.rowcount) != 1:
        raise SchemaError(
            "casty_sa_event_counter has no row: run `casty-sa upgrade` (migration 0004 makes it)"
        )
    top = int((await connection.execute(select(func.last_insert_id()))).scalar_one())
    held: set[tuple[str, int]] = set()
    c = _events.c
    for chunk in chunks([(row.entity_id, row.sequence_nr) for row in rows], LOOKUP_CHUNK):
        found = select(c.entity_id, c.sequence_nr).where(
            tuple_(c.entity_id, c.sequence_nr).in_(chunk)
        )
        held.update((entity, seq) for entity, seq in await connection.execute(found))
    first = top - len(rows)
    params = [
        {**_params(row), "event_type": row.event_type, "era": 0, "transaction_id": 0,
         "position": first + step}
        for step, row in enumerate(rows, 1)
        if (row.entity_id, row.sequence_nr) not in held
    ]  # fmt: skip
    if params:
        await connection.execute(insert(_events), params)
    return len(params)


async def _newer_snapshots(connection: AsyncConnection, rows: Sequence[Row]) -> list[Row]:
    """The snapshots of ``rows`` that the target lacks or holds at a lower sequence number."""
    stored: dict[str, int] = {}
    c = _snapshots.c
    for chunk in chunks([row.entity_id for row in rows], LOOKUP_CHUNK):
        found = select(c.entity_id, c.sequence_nr).where(c.entity_id.in_(chunk))
        stored.update({entity: seq for entity, seq in await connection.execute(found)})
    return [row for row in rows if stored.get(row.entity_id, -1) < row.sequence_nr]


def _in_global_order(
    insert: postgresql.Insert | sqlite.Insert, *, postgresql: bool
) -> postgresql.Insert | sqlite.Insert:
    """``insert`` into the events with each row's place in the target's global order.

    PostgreSQL: the target's era (worked out by each statement, as the journal's
    writes do), the writing
    transaction's id and the identity's next position; SQLite: one more than the
    highest position, the ``step``-th row of the statement (see
    :mod:`casty_sa.ordering`). A source's positions are never copied: they order
    the source's rows only.
    """
    if postgresql:
        values: dict[str, Any] = {
            "era": select(current_era(_events)).scalar_subquery(),
            "transaction_id": current_transaction_id(),
        }
    else:
        values = {
            "era": literal_column("0"),
            "transaction_id": literal_column("0"),
            "position": next_position(_events, bindparam("step")),
        }
    statement: Insert = insert.values(**values)
    return statement  # type: ignore[return-value]


def _within_bytes(
    table: Table,
    keys: tuple[ColumnElement[Any], ...],
    where: ColumnElement[bool] | None,
    limit: int,
    max_bytes: int,
) -> Select[Any]:
    """The first ``limit`` rows of ``table`` in ``keys`` order, stopping at ``max_bytes``.

    The sizes (:func:`casty_sa.batching.row_bytes`) are summed in key order
    before any payload is read, so rows past the cap are never sent; the
    first row always comes, whatever its size.
    """
    c = table.c
    size = func.length(c.entity_id) + func.length(c.payload) + ROW_OVERHEAD
    first = select(*keys, size.label("size"))
    if where is not None:
        first = first.where(where)
    page = first.order_by(*keys).limit(limit).subquery()
    page_keys = [page.c[key.name] for key in keys]
    running = select(
        *page_keys,
        page.c.size,
        func.sum(page.c.size).over(order_by=page_keys).label("total"),
    ).subquery()
    columns = [c.entity_id, c.sequence_nr, c.timestamp, c.payload]
    if "event_type" in c:  # the events' (a snapshot has none)
        columns.append(c.event_type)
    return (
        select(*columns)
        .join(running, and_(*(c[key.name] == running.c[key.name] for key in keys)))
        .where(or_(running.c.total <= max_bytes, running.c.total == running.c.size))
        .order_by(*keys)
    )


def _params(row: Row) -> dict[str, Any]:
    """A row as the bind parameters of casty-sa's insert statements."""
    return {
        "entity_id": row.entity_id,
        "sequence_nr": row.sequence_nr,
        "timestamp": row.timestamp,
        "payload": row.payload,
    }
