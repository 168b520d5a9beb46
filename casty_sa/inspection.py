"""Look inside a casty-sa journal: the queries behind ``casty-sa inspect``.

:func:`summarize` counts entities, events and snapshots and pages through
entities with their highest sequence number and snapshot position;
:func:`entity_detail` pages through one entity's events, decoded by the
journal's deserializer (pickle by default) or left as bytes. The command
renders them (:mod:`casty_sa.cli.inspect`).

Decoding with pickle runs code chosen by whoever wrote the table: inspect only
databases you trust, or pass ``decode=None`` (``--raw``).

Examples
--------
>>> import asyncio, pathlib, tempfile
>>> from casty import PersistedEvent
>>> from casty_sa import SAJournal
>>> url = f"sqlite:///{pathlib.Path(tempfile.mkdtemp()) / 'journal.db'}"
>>> async def fill() -> None:
...     async with SAJournal(url) as journal:
...         await journal.persist("acct-1", [PersistedEvent(1, "opened", 0.0)])
>>> asyncio.run(fill())
>>> summary = asyncio.run(summarize(url))
>>> (summary.entities, summary.events, summary.page[0].highest_sequence_nr)
(1, 1, 1)
>>> detail = asyncio.run(entity_detail(url, "acct-1"))
>>> (detail.events, detail.snapshot, detail.page[0].decoded, len(detail.page[0].raw))
(1, None, "'opened'", 21)
"""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select, union
from sqlalchemy import text as sql_text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from casty_sa import migrate
from casty_sa.engine import bind_schema, read_only
from casty_sa.models import journal_tables
from casty_sa.payloads import Decoder, Payload, stored_payload
from casty_sa.revisions import current_revision, head_revision
from casty_sa.transfer import require_existing_database
from casty_sa.urls import UrlLike, safe_url

__all__ = [
    "EntityCounts",
    "EntityDetail",
    "EntitySummary",
    "JournalSummary",
    "Payload",
    "entity_detail",
    "summarize",
]

_events, _snapshots = journal_tables()
#: an event's type and place in the global order, as :func:`stored_payload` takes them
PLACE = (_events.c.event_type, _events.c.era, _events.c.transaction_id, _events.c.position)


# -- what inspect finds ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EntityCounts:
    """Where one entity stands in the events table (its subclasses take keywords only).

    Parameters
    ----------
    entity_id : str
        The entity.
    events : int
        Number of stored events.
    highest_sequence_nr : int | None
        Its highest stored sequence number (``None`` without events).
    """

    entity_id: str
    events: int
    highest_sequence_nr: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class EntitySummary(EntityCounts):
    """One entity's line in the summary: its :class:`EntityCounts` and snapshot position.

    Parameters
    ----------
    snapshot_sequence_nr : int | None
        The sequence number its snapshot covers (``None`` without one).
    """

    snapshot_sequence_nr: int | None


@dataclass(frozen=True, slots=True)
class JournalSummary:
    """Totals of a journal database and one page of its entities.

    Parameters
    ----------
    database : str
        The URL, password masked.
    revision : str | None
        casty-sa schema revision (``None`` when the application's own
        migrations made the tables).
    head : str
        The newest revision this casty-sa knows.
    entities, events, snapshots : int
        Totals: exact, or PostgreSQL's estimates when ``estimated``.
    page : tuple[EntitySummary, ...]
        Entities in id order, starting after the ``after`` asked for.
    next_after : str | None
        Pass as ``after`` for the next page; ``None`` on the last page.
    estimated : bool
        The totals are the planner's statistics, not counts (PostgreSQL, big
        tables, unless ``exact``); the page's numbers are always exact.
    """

    database: str
    revision: str | None
    head: str
    entities: int
    events: int
    snapshots: int
    page: tuple[EntitySummary, ...]
    next_after: str | None
    estimated: bool = False


#: On PostgreSQL, tables estimated to hold at least this many events get estimated totals
#: (counting them means reading them whole); smaller ones are counted, which costs little.
ESTIMATE_FROM_EVENTS = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class EntityDetail(EntityCounts):
    """One entity: its :class:`EntityCounts`, snapshot and a page of events.

    Parameters
    ----------
    database : str
        The URL (password masked) of the database holding it.
    snapshot : Payload | None
        Its snapshot.
    page : tuple[Payload, ...]
        Events from the ``from_sequence_nr`` asked for, ascending.
    next_from : int | None
        Pass as ``from_sequence_nr`` for the next page; ``None`` on the last.
    """

    database: str
    snapshot: Payload | None
    page: tuple[Payload, ...]
    next_from: int | None

    @property
    def exists(self) -> bool:
        """True when the entity has events or a snapshot."""
        return self.events > 0 or self.snapshot is not None


# -- queries -----------------------------------------------------------------------------------


@asynccontextmanager
async def _reading(
    target: UrlLike | AsyncEngine, schema: str | None, engine_options: dict[str, Any]
) -> AsyncIterator[AsyncEngine]:
    """An engine on a database at head, never created or migrated by looking at it."""
    require_existing_database(target)
    async with migrate.checked_engine(
        target, migrate=False, schema=schema, **engine_options
    ) as engine:
        # inspect only reads: on SQLite it neither waits for nor blocks the application's writer
        yield read_only(bind_schema(engine, schema))


async def summarize(
    target: UrlLike | AsyncEngine,
    *,
    after: str | None = None,
    limit: int = 20,
    schema: str | None = None,
    exact: bool = False,
    **engine_options: Any,
) -> JournalSummary:
    """Count a journal's entities, events and snapshots, with one page of entities.

    Counting reads a table whole (seconds at millions of events), so on
    PostgreSQL the totals of big tables are the planner's statistics
    (``pg_class.reltuples``, ``pg_stats.n_distinct``, kept by ANALYZE and
    autovacuum) unless ``exact``; ``summary.estimated`` says which.

    Parameters
    ----------
    target : str | URL | os.PathLike | AsyncEngine
        The database; it must be at head (it is never migrated, and a missing
        SQLite file is not created).
    after : str | None
        Start the page after this entity id.
    limit : int
        Entities per page.
    schema : str | None
        PostgreSQL schema of the tables.
    exact : bool
        Count the totals even where that reads whole tables.
    **engine_options
        As :class:`~casty_sa.SAJournal` takes them (``connect_timeout``, …).

    Raises
    ------
    SchemaError, DatabaseUnavailable
        The database is not at head, or cannot be reached.
    """
    async with _reading(target, schema, engine_options) as engine, engine.connect() as conn:
        revision = await conn.run_sync(current_revision, schema)
        totals = None if exact else await _estimates(conn, schema)
        entities, events, snapshots = totals or await _counts(conn)
        page_ids = list((await conn.execute(_page_query(after, limit))).scalars())
        more = len(page_ids) > limit
        page = await _entity_summaries(conn, page_ids[:limit])
        url = engine.url
    return JournalSummary(
        database=safe_url(url),
        revision=revision,
        head=head_revision(),
        entities=entities,
        events=events,
        snapshots=snapshots,
        page=page,
        next_after=page[-1].entity_id if more and page else None,
        estimated=totals is not None,
    )


def _page_query(after: str | None, limit: int) -> Select[str]:
    """The ids of a page of entities, one more than ``limit`` (to tell whether more follow)."""
    # the page from each table's primary key, in order, as far as the page goes: never the
    # union of every id
    pages = []
    for table in (_events, _snapshots):
        query = select(table.c.entity_id).distinct().order_by(table.c.entity_id).limit(limit + 1)
        if after is not None:
            query = query.where(table.c.entity_id > after)
        part = query.subquery()  # SQLite takes no ORDER BY/LIMIT in a UNION's members
        pages.append(select(part.c.entity_id))
    paged = union(*pages).subquery()
    return select(paged.c.entity_id).order_by(paged.c.entity_id).limit(limit + 1)


async def _counts(conn: AsyncConnection) -> tuple[int, int, int]:
    """The exact totals of (entities, events, snapshots)."""
    ids = union(select(_events.c.entity_id), select(_snapshots.c.entity_id)).subquery()
    counts = [select(func.count()).select_from(table) for table in (ids, _events, _snapshots)]
    entities, events, snapshots = [(await conn.execute(count)).scalar_one() for count in counts]
    return entities, events, snapshots


async def _event_counts(
    conn: AsyncConnection, entity_ids: list[str]
) -> dict[str, tuple[int, int | None]]:
    """Number of events and highest sequence number of those ``entity_ids`` that have events."""
    rows = await conn.execute(
        select(_events.c.entity_id, func.count(), func.max(_events.c.sequence_nr))
        .where(_events.c.entity_id.in_(entity_ids))
        .group_by(_events.c.entity_id)
    )
    return {entity: (count, highest) for entity, count, highest in rows}


async def _entity_summaries(
    conn: AsyncConnection, page_ids: list[str]
) -> tuple[EntitySummary, ...]:
    """The summary lines of the entities ``page_ids``, in that order."""
    counts = await _event_counts(conn, page_ids)
    snapshots = select(_snapshots.c.entity_id, _snapshots.c.sequence_nr)
    found = await conn.execute(snapshots.where(_snapshots.c.entity_id.in_(page_ids)))
    snapshot_at = {entity: seq for entity, seq in found}
    return tuple(
        EntitySummary(
            entity_id=entity,
            events=counts.get(entity, (0, None))[0],
            highest_sequence_nr=counts.get(entity, (0, None))[1],
            snapshot_sequence_nr=snapshot_at.get(entity),
        )
        for entity in page_ids
    )


async def _estimates(conn: AsyncConnection, schema: str | None) -> tuple[int, int, int] | None:
    """PostgreSQL's estimates of (entities, events, snapshots), or ``None`` to count instead.

    ``None`` on other databases, for tables small enough to count cheaply, and
    for tables never analysed (no statistics to go by).
    """
    if conn.dialect.name != "postgresql":
        return None
    rows = await conn.execute(
        sql_text(
            "SELECT c.relname, c.reltuples, s.n_distinct FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = c.relname "
            "AND s.attname = 'entity_id' "
            "WHERE n.nspname = coalesce(:schema, current_schema()) "
            "AND c.relname IN ('casty_sa_events', 'casty_sa_snapshots')"
        ),
        {"schema": schema},
    )
    stats = {name: (tuples, distinct) for name, tuples, distinct in rows}
    if set(stats) != {"casty_sa_events", "casty_sa_snapshots"}:
        return None
    events, distinct = stats["casty_sa_events"]
    snapshots, _ = stats["casty_sa_snapshots"]
    if events < ESTIMATE_FROM_EVENTS or distinct is None or snapshots < 0:
        return None  # small (or never analysed, reltuples -1): counting is cheap or needed
    # n_distinct < 0 is a fraction of the rows; snapshots are at most one per entity
    with_events = -distinct * events if distinct < 0 else distinct
    return round(max(with_events, snapshots)), round(events), round(snapshots)


async def entity_detail(
    target: UrlLike | AsyncEngine,
    entity_id: str,
    *,
    from_sequence_nr: int = 0,
    limit: int = 50,
    decode: Decoder | None = pickle.loads,
    schema: str | None = None,
    **engine_options: Any,
) -> EntityDetail:
    """One entity's counts, snapshot and a page of its events.

    Parameters
    ----------
    target : str | URL | os.PathLike | AsyncEngine
        The database; it must be at head.
    entity_id : str
        The entity, matched exactly.
    from_sequence_nr : int
        First sequence number of the page.
    limit : int
        Events per page.
    decode : Callable[[bytes], Any] | None
        The journal's deserializer (pickle by default); ``None`` keeps the bytes.
        A payload it cannot decode is reported, not raised.
    schema : str | None
        PostgreSQL schema of the tables.
    **engine_options
        As :class:`~casty_sa.SAJournal` takes them.

    Raises
    ------
    SchemaError, DatabaseUnavailable
        The database is not at head, or cannot be reached.
    """
    c = _events.c
    async with _reading(target, schema, engine_options) as engine, engine.connect() as conn:
        counts = await _event_counts(conn, [entity_id])
        count, highest = counts.get(entity_id, (0, None))
        snapshot_row = (
            await conn.execute(
                select(
                    _snapshots.c.sequence_nr, _snapshots.c.timestamp, _snapshots.c.payload
                ).where(_snapshots.c.entity_id == entity_id)
            )
        ).first()
        rows = (
            await conn.execute(
                select(c.sequence_nr, c.timestamp, c.payload, *PLACE)
                .where(c.entity_id == entity_id, c.sequence_nr >= from_sequence_nr)
                .order_by(c.sequence_nr)
                .limit(limit + 1)
            )
        ).all()
        url = engine.url
    page = tuple(stored_payload(*row[:3], decode, *row[3:]) for row in rows[:limit])
    return EntityDetail(
        database=safe_url(url),
        entity_id=entity_id,
        events=count,
        highest_sequence_nr=highest,
        snapshot=None if snapshot_row is None else stored_payload(*snapshot_row, decode),
        page=page,
        next_from=rows[limit][0] if len(rows) > limit else None,
    )
