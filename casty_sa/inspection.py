"""Look inside a casty-sa journal: what ``casty-sa inspect`` shows.

:func:`summarize` counts entities, events and snapshots and pages through
entities with their highest sequence number and snapshot position;
:func:`entity_detail` pages through one entity's events, decoded by the
journal's deserializer (pickle by default) or left as bytes. The ``render_*``
functions turn either into an aligned text table (coloured when asked), and
``as_dict`` into what ``--json`` prints.

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
>>> print(render_entity(asyncio.run(entity_detail(url, "acct-1")), Style()))
entity    acct-1
events    1 (highest sequence number 1)
snapshot  none
<BLANKLINE>
SEQ  TIMESTAMP (UTC)                   BYTES  EVENT
  1  1970-01-01T00:00:00.000000+00:00     21  'opened'
"""

from __future__ import annotations

import base64
import pickle
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, union
from sqlalchemy import text as sql_text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from casty_sa import migrate
from casty_sa.engine import bind_schema, read_only
from casty_sa.models import journal_tables
from casty_sa.transfer import require_existing_database
from casty_sa.urls import UrlLike, safe_url

__all__ = [
    "EntityDetail",
    "EntitySummary",
    "JournalSummary",
    "Payload",
    "Style",
    "as_dict",
    "entity_detail",
    "printable",
    "render_entity",
    "render_summary",
    "summarize",
]

_events, _snapshots = journal_tables()

Decoder = Callable[[bytes], Any]


# -- what inspect finds ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EntitySummary:
    """One entity's line in the summary.

    Parameters
    ----------
    entity_id : str
        The entity.
    events : int
        Number of stored events.
    highest_sequence_nr : int | None
        Its highest stored sequence number (``None`` without events).
    snapshot_sequence_nr : int | None
        The sequence number its snapshot covers (``None`` without one).
    """

    entity_id: str
    events: int
    highest_sequence_nr: int | None
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


@dataclass(frozen=True, slots=True)
class Payload:
    """A stored event or snapshot, with its payload decoded when asked.

    Parameters
    ----------
    sequence_nr : int
        Its sequence number.
    timestamp : float
        casty's ``time.time()`` when it was written.
    raw : bytes
        The stored bytes.
    decoded : str | None
        ``repr`` of the decoded object; ``None`` when not decoded or on failure.
    error : str | None
        Why decoding failed, if it did.
    """

    sequence_nr: int
    timestamp: float
    raw: bytes
    decoded: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class EntityDetail:
    """One entity: its counts, snapshot and a page of events.

    Parameters
    ----------
    database : str
        The URL, password masked.
    entity_id : str
        The entity.
    events : int
        Number of stored events.
    highest_sequence_nr : int | None
        Highest stored sequence number.
    snapshot : Payload | None
        Its snapshot.
    page : tuple[Payload, ...]
        Events from the ``from_sequence_nr`` asked for, ascending.
    next_from : int | None
        Pass as ``from_sequence_nr`` for the next page; ``None`` on the last.
    """

    database: str
    entity_id: str
    events: int
    highest_sequence_nr: int | None
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
        Passed on to :class:`~casty_sa.SAJournal` (``connect_timeout``, …).

    Raises
    ------
    SchemaError, DatabaseUnavailable
        The database is not at head, or cannot be reached.
    """
    ids = union(select(_events.c.entity_id), select(_snapshots.c.entity_id)).subquery()
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
    page_query = select(paged.c.entity_id).order_by(paged.c.entity_id).limit(limit + 1)
    async with _reading(target, schema, engine_options) as engine, engine.connect() as conn:
        revision = await conn.run_sync(migrate.current_revision, schema)
        totals = None if exact else await _estimates(conn, schema)
        if totals is None:
            entities = (await conn.execute(select(func.count()).select_from(ids))).scalar_one()
            events = (await conn.execute(select(func.count()).select_from(_events))).scalar_one()
            snapshots = (
                await conn.execute(select(func.count()).select_from(_snapshots))
            ).scalar_one()
        else:
            entities, events, snapshots = totals
        page_ids = [entity for (entity,) in await conn.execute(page_query)]
        more = len(page_ids) > limit
        page_ids = page_ids[:limit]
        counts = {
            entity: (count, highest)
            for entity, count, highest in await conn.execute(
                select(_events.c.entity_id, func.count(), func.max(_events.c.sequence_nr))
                .where(_events.c.entity_id.in_(page_ids))
                .group_by(_events.c.entity_id)
            )
        }
        snapshot_query = select(_snapshots.c.entity_id, _snapshots.c.sequence_nr).where(
            _snapshots.c.entity_id.in_(page_ids)
        )
        snapshot_at = {entity: seq for entity, seq in await conn.execute(snapshot_query)}
        url = engine.url
    page = tuple(
        EntitySummary(
            entity,
            counts.get(entity, (0, None))[0],
            counts.get(entity, (0, None))[1],
            snapshot_at.get(entity),
        )
        for entity in page_ids
    )
    return JournalSummary(
        database=safe_url(url),
        revision=revision,
        head=migrate.head_revision(),
        entities=entities,
        events=events,
        snapshots=snapshots,
        page=page,
        next_after=page_ids[-1] if more and page_ids else None,
        estimated=totals is not None,
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
        Passed on to :class:`~casty_sa.SAJournal`.

    Raises
    ------
    SchemaError, DatabaseUnavailable
        The database is not at head, or cannot be reached.
    """
    c = _events.c
    async with _reading(target, schema, engine_options) as engine, engine.connect() as conn:
        count, highest = (
            await conn.execute(
                select(func.count(), func.max(c.sequence_nr)).where(c.entity_id == entity_id)
            )
        ).one()
        snapshot_row = (
            await conn.execute(
                select(
                    _snapshots.c.sequence_nr, _snapshots.c.timestamp, _snapshots.c.payload
                ).where(_snapshots.c.entity_id == entity_id)
            )
        ).first()
        rows = (
            await conn.execute(
                select(c.sequence_nr, c.timestamp, c.payload)
                .where(c.entity_id == entity_id, c.sequence_nr >= from_sequence_nr)
                .order_by(c.sequence_nr)
                .limit(limit + 1)
            )
        ).all()
        url = engine.url
    page = tuple(_payload(seq, ts, raw, decode) for seq, ts, raw in rows[:limit])
    return EntityDetail(
        database=safe_url(url),
        entity_id=entity_id,
        events=count,
        highest_sequence_nr=highest,
        snapshot=None if snapshot_row is None else _payload(*snapshot_row, decode),
        page=page,
        next_from=rows[limit][0] if len(rows) > limit else None,
    )


def _payload(seq: int, timestamp: float, raw: bytes, decode: Decoder | None) -> Payload:
    """A stored row, decoded when a decoder is given; a decoder failure is recorded."""
    if decode is None:
        return Payload(seq, timestamp, raw, None, None)
    try:
        return Payload(seq, timestamp, raw, repr(decode(raw)), None)
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises is shown, not raised
        return Payload(seq, timestamp, raw, None, _cannot_decode(exc))


def _cannot_decode(exc: Exception) -> str:
    """Why a payload did not decode, with what to do when its class cannot be found.

    Examples
    --------
    >>> error = AttributeError("Can't get attribute 'Deposited' on <module '__main__'>")
    >>> "--decoder MODULE:FUNCTION" in _cannot_decode(error)
    True
    """
    text = f"cannot decode: {type(exc).__name__}: {exc}"
    if "__main__" in str(exc):
        return text + (
            " (the event's class was defined in the writing script's __main__, which this "
            "process is not: move the classes into a module this process can import, or pass "
            "--decoder MODULE:FUNCTION, or --raw)"
        )
    if isinstance(exc, ImportError | AttributeError):  # pickle looks classes up by module
        return text + (
            " (the payload names a class this process cannot import: run inspect where the "
            "application's modules are importable, or pass --decoder MODULE:FUNCTION, or --raw)"
        )
    return text


# -- output ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Style:
    """How text output looks.

    Parameters
    ----------
    color : bool
        Use ANSI colours (bold headers, dim placeholders, red errors).
    width : int | None
        Terminal width to fit tables into by shortening their widest column;
        ``None`` (piped output) never shortens anything.
    """

    color: bool = False
    width: int | None = None

    def paint(self, text: str, code: str) -> str:
        """``text`` wrapped in the ANSI SGR ``code`` when colours are on."""
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text


_BOLD, _DIM, _RED, _CYAN = "1", "2", "31", "36"


def render_summary(summary: JournalSummary, style: Style) -> str:
    """The summary as text: totals, then an aligned table of the page of entities.

    Parameters
    ----------
    summary : JournalSummary
        What :func:`summarize` returned.
    style : Style
        Colours and width.
    """
    revision = summary.revision or "none (tables made by the application's migrations)"
    if summary.revision == summary.head:
        revision += " (head)"
    lines = _fields(
        [
            ("database", summary.database),
            ("revision", revision),
            ("entities", f"{'~' * summary.estimated}{summary.entities:,}"),
            ("events", f"{'~' * summary.estimated}{summary.events:,}"),
            ("snapshots", f"{'~' * summary.estimated}{summary.snapshots:,}"),
        ],
        style,
    )
    if summary.estimated:
        lines.append(
            "(totals are PostgreSQL's estimates, from its statistics; --exact counts them, "
            "reading the tables whole)"
        )
    if summary.page:
        lines.append("")
        lines += _table(
            ["ENTITY", "EVENTS", "HIGHEST SEQ", "SNAPSHOT AT"],
            [
                [
                    printable(entity.entity_id),
                    f"{entity.events:,}",
                    _or_dash(entity.highest_sequence_nr),
                    _or_dash(entity.snapshot_sequence_nr),
                ]
                for entity in summary.page
            ],
            right={1, 2, 3},
            flex=0,
            style=style,
        )
    if summary.next_after is not None:
        lines.append("")
        lines.append(
            style.paint(
                f"(first {len(summary.page)} entities shown; next page: "
                f"--after {_shell_quote(summary.next_after)})",
                _DIM,
            )
        )
    return "\n".join(lines)


def render_entity(detail: EntityDetail, style: Style) -> str:
    """One entity as text: counts, snapshot, then an aligned table of its events.

    Parameters
    ----------
    detail : EntityDetail
        What :func:`entity_detail` returned.
    style : Style
        Colours and width.
    """
    highest = detail.highest_sequence_nr
    events = f"{detail.events:,}" + (
        "" if highest is None else f" (highest sequence number {highest})"
    )
    snapshot = (
        style.paint("none", _DIM)
        if detail.snapshot is None
        else f"at {detail.snapshot.sequence_nr}, {_when(detail.snapshot.timestamp)}, "
        f"{len(detail.snapshot.raw):,} bytes: {_painted(_shown(detail.snapshot), style)}"
    )
    lines = _fields(
        [("entity", printable(detail.entity_id)), ("events", events), ("snapshot", snapshot)],
        style,
    )
    if detail.page:
        lines.append("")
        lines += _table(
            ["SEQ", "TIMESTAMP (UTC)", "BYTES", "EVENT"],
            [
                [str(e.sequence_nr), _when(e.timestamp), f"{len(e.raw):,}", _shown(e)]
                for e in detail.page
            ],
            right={0, 2},
            flex=3,
            style=style,
        )
    if detail.next_from is not None:
        lines.append("")
        lines.append(style.paint(f"(more events; next page: --from {detail.next_from})", _DIM))
    return "\n".join(lines)


def as_dict(found: JournalSummary | EntityDetail) -> dict[str, Any]:
    """What ``--json`` prints: plain JSON types, payloads as text or base64.

    Parameters
    ----------
    found : JournalSummary | EntityDetail
        What :func:`summarize` or :func:`entity_detail` returned.
    """
    if isinstance(found, JournalSummary):
        return {
            "database": found.database,
            "revision": found.revision,
            "head": found.head,
            "entities": found.entities,
            "events": found.events,
            "snapshots": found.snapshots,
            "estimated": found.estimated,
            "page": [
                {
                    "entity_id": e.entity_id,
                    "events": e.events,
                    "highest_sequence_nr": e.highest_sequence_nr,
                    "snapshot_sequence_nr": e.snapshot_sequence_nr,
                }
                for e in found.page
            ],
            "next_after": found.next_after,
        }
    return {
        "database": found.database,
        "entity_id": found.entity_id,
        "events": found.events,
        "highest_sequence_nr": found.highest_sequence_nr,
        "snapshot": None if found.snapshot is None else _payload_dict(found.snapshot, "state"),
        "page": [_payload_dict(e, "event") for e in found.page],
        "next_from": found.next_from,
    }


def _payload_dict(payload: Payload, key: str) -> dict[str, Any]:
    """A payload for JSON: decoded text under ``key``, else base64 bytes."""
    item: dict[str, Any] = {
        "sequence_nr": payload.sequence_nr,
        "timestamp": payload.timestamp,
        "size": len(payload.raw),
    }
    if payload.decoded is not None:
        item[key] = payload.decoded
    else:
        item["payload_base64"] = base64.b64encode(payload.raw).decode("ascii")
        if payload.error is not None:
            item["error"] = payload.error
    return item


def _fields(pairs: Sequence[tuple[str, str]], style: Style) -> list[str]:
    """``name  value`` lines with the names aligned (and bold when colours are on)."""
    width = max(len(name) for name, _ in pairs) + 2
    return [style.paint(name.ljust(width), _BOLD) + value for name, value in pairs]


Cell = str | tuple[str, str]
"""A table cell: its text, or its text and an ANSI colour code."""


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    right: set[int],
    flex: int,
    style: Style,
) -> list[str]:
    """Aligned columns two spaces apart; column ``flex`` shrinks to fit ``style.width``."""
    texts = [[cell if isinstance(cell, str) else cell[0] for cell in row] for row in rows]
    paints = [[None if isinstance(cell, str) else cell[1] for cell in row] for row in rows]
    widths = [max([_cells(h)] + [_cells(row[i]) for row in texts]) for i, h in enumerate(headers)]
    if style.width is not None:
        spare = style.width - (sum(widths) + 2 * (len(widths) - 1))
        if spare < 0:
            widths[flex] = max(_cells(headers[flex]), widths[flex] + spare, 8)
            texts = [
                [_clip(text, widths[flex]) if i == flex else text for i, text in enumerate(row)]
                for row in texts
            ]

    def line(cells: Sequence[str], codes: Sequence[str | None]) -> str:
        """One table line: cells padded to their column, aligned left or right."""
        parts = []
        for i, (text, code) in enumerate(zip(cells, codes, strict=True)):
            pad = " " * (widths[i] - _cells(text))
            shown = text if code is None else style.paint(text, code)
            parts.append(pad + shown if i in right else shown + pad)
        return "  ".join(parts).rstrip()

    return [line(headers, [_BOLD] * len(headers))] + [
        line(row, codes) for row, codes in zip(texts, paints, strict=True)
    ]


def _shown(payload: Payload) -> Cell:
    """The table cell of a payload: decoded text, a red error, or the bytes."""
    if payload.decoded is not None:
        return printable(payload.decoded)
    if payload.error is not None:
        return (printable(payload.error), _RED)
    return (repr(payload.raw), _CYAN)


def _painted(cell: Cell, style: Style) -> str:
    """A cell as text, coloured when its style asks."""
    return cell if isinstance(cell, str) else style.paint(*cell)


def _when(timestamp: float) -> str:
    """A timestamp as ISO 8601 UTC (or as the number when it is out of range)."""
    try:
        return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")
    except (OverflowError, OSError, ValueError):
        return repr(timestamp)


def _or_dash(value: int | None) -> Cell:
    """A number, or a dim ``-`` for none."""
    return ("-", _DIM) if value is None else str(value)


def printable(text: str) -> str:
    """``text`` with control characters escaped, so no output can drive the terminal.

    Examples
    --------
    >>> printable("acct-1\\x1b[2J")
    'acct-1\\\\x1b[2J'
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _shell_quote(text: str) -> str:
    """Quote text for a shell command line the user may copy."""
    return "'" + printable(text).replace("'", "'\\''") + "'"


def _cells(text: str) -> int:
    """Terminal cells ``text`` takes: wide East Asian characters take two."""
    if text.isascii():
        return len(text)
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


def _clip(text: str, width: int) -> str:
    """Shorten text to ``width`` terminal cells, ending with an ellipsis."""
    if _cells(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        size = _cells(ch)
        if used + size > width - 1:
            break
        out.append(ch)
        used += size
    return "".join(out) + "…"
