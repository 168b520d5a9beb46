"""What an operator does to projections without running them: list, measure the lag, reset.

``casty-sa projections`` is built on these functions; an application can call
them too (a health check, an admin page). The offsets are read and reset through
:class:`~casty_sa.projections.offsets.OffsetTable` in the read model's database
(``offsets_url``, by default the journal's), and the lag is measured on the
journal's read side (:meth:`SAJournal.events <casty_sa.SAJournal.events>`), so
both work when the read model lives in another database than the journal.

A slice's lag is what :meth:`Projection.status
<casty_sa.projections.projection.Projection.status>` reports: the events stored after
its offset (counted up to :data:`~casty_sa.projections.status.LAG_LIMIT`) and the age
of the oldest. The projection's ``entity_prefix`` and ``event_types`` are the
application's code, not stored: for a projection that filters, the lag counts the
events it will skip too (an upper bound), and drops to 0 as it catches up.

Examples
--------
>>> print(reset_script("sqlite://", "balances", ["DELETE FROM balances"]))  # doctest: +ELLIPSIS
-- Reset projection 'balances': every slice starts over from the first event.
BEGIN;
DELETE FROM balances;
UPDATE casty_sa_projection_offsets SET last_offset=NULL, handled=0, fence=...
COMMIT;
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from casty_sa.diagnosis import database_error
from casty_sa.engine import bind_schema, open_engine
from casty_sa.journal import SAJournal
from casty_sa.projections.offsets import OffsetRow, OffsetTable
from casty_sa.projections.status import slices_status
from casty_sa.urls import UrlLike, engine_secrets, to_async_url

__all__ = ["SliceReport", "reset_projection", "reset_script", "slice_reports"]


@dataclass(frozen=True, slots=True)
class SliceReport:
    """Where one slice of a projection stands, as ``casty-sa projections`` shows it.

    Parameters
    ----------
    projection, slice, slice_count
        The slice (``slice`` of ``slice_count``).
    offset : str | None
        The offset of the last event handled; ``None`` before the first.
    handled : int
        Events the slice handled since it was made or last reset.
    owner : str | None
        The worker that holds or last held the lease (``host:pid:tag``).
    held : bool
        The lease is live: ``owner`` applies the slice's events now.
    lease_left : float | None
        Seconds left of a live lease (the owner renews it while it runs).
    updated : float
        When the row last changed (seconds since 1970, the database's clock).
    last_error, last_error_at
        The failure that holds the slice back, and when (cleared by the next batch).
    lag_events : int | None
        Events stored after ``offset``, counted up to
        :data:`~casty_sa.projections.status.LAG_LIMIT` (``None``: not measured).
    lag_seconds : float | None
        Age of the oldest of them (0 when there are none).
    """

    projection: str
    slice: int
    slice_count: int
    offset: str | None
    handled: int
    owner: str | None
    held: bool
    lease_left: float | None
    updated: float
    last_error: str | None
    last_error_at: float | None
    lag_events: int | None = None
    lag_seconds: float | None = None


async def slice_reports(
    journal_url: UrlLike | None,
    *,
    offsets_url: UrlLike | None = None,
    schema: str | None = None,
    offsets_schema: str | None = None,
    name: str | None = None,
    connect_timeout: float | None = None,
) -> list[SliceReport]:
    """Every slice of every projection (or of projection ``name``), with its lag.

    Parameters
    ----------
    journal_url : str | URL | None
        The journal, to measure the lag on; ``None``: no lag (``offsets_url`` is needed).
    offsets_url : str | URL | None
        The read model's database, holding ``casty_sa_projection_offsets``
        (default: the journal's).
    schema, offsets_schema : str | None
        PostgreSQL schemas of the journal's tables and of the offsets table
        (``offsets_schema`` defaults to ``schema`` when ``offsets_url`` is ``None``).
    """
    if journal_url is None:
        if offsets_url is None:
            raise ValueError("slice_reports needs a journal_url or an offsets_url")
        rows = await _rows(offsets_url, offsets_schema, name, connect_timeout)
        return [_report(row) for row in rows]
    journal = SAJournal(
        journal_url,
        schema=schema,
        migrate=False,
        connect_timeout=connect_timeout,
        deserialize=bytes,  # the lag needs no event: never unpickle what a table holds
    )
    async with journal:
        if offsets_url is None:
            target: UrlLike | AsyncEngine = journal.engine
            offsets_schema = schema if offsets_schema is None else offsets_schema
        else:
            target = offsets_url
        rows = await _rows(target, offsets_schema, name, connect_timeout)
        return await _with_lag(journal, rows)


async def reset_projection(
    offsets_url: UrlLike,
    name: str,
    *,
    clear: Sequence[str] = (),
    schema: str | None = None,
    connect_timeout: float | None = None,
) -> tuple[int, list[int]]:
    """Start projection ``name`` over, running the ``clear`` statements (SQL that empties
    its read model) in the same transaction; how many slices it had (0: no such
    projection, and nothing was run) and how many rows each statement changed."""

    async def work(session: AsyncSession, table: OffsetTable) -> tuple[int, list[int]]:
        slices = await table.reset(session, name)
        if not slices:
            return 0, []
        changed = [_rowcount(await session.execute(text(sql))) for sql in clear]
        return slices, changed

    return await _on_offsets(offsets_url, schema, connect_timeout, "reset", work)


def reset_script(
    url: UrlLike, name: str, clear: Sequence[str] = (), *, schema: str | None = None
) -> str:
    """The reset of ``name`` as a SQL script for ``url``'s dialect (connects to nothing):
    one transaction with the ``clear`` statements (or a line that asks for them)."""
    dialect = to_async_url(url).get_dialect()()
    statement = OffsetTable(schema).restart(name)
    update = str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    lines = [f"-- Reset projection {name!r}: every slice starts over from the first event."]
    if not clear:
        lines += [
            "-- Clear the read model in this same transaction (replace the next line), or the",
            "-- projection applies every event again over the rows it already wrote.",
        ]
    lines += ["BEGIN;", *[f"{sql.rstrip().rstrip(';')};" for sql in clear]]
    if not clear:
        lines.append("-- DELETE FROM <the read model's tables>;")
    lines += [" ".join(update.split()) + ";", "COMMIT;"]
    return "\n".join(lines)


# -- reading -----------------------------------------------------------------------------------


async def _rows(
    target: UrlLike | AsyncEngine,
    schema: str | None,
    name: str | None,
    connect_timeout: float | None,
) -> list[OffsetRow]:
    async def read(session: AsyncSession, table: OffsetTable) -> list[OffsetRow]:
        return await table.rows(session, name)

    return await _on_offsets(target, schema, connect_timeout, "read the projections' offsets", read)


async def _on_offsets[T](
    target: UrlLike | AsyncEngine,
    schema: str | None,
    connect_timeout: float | None,
    what: str,
    work: Callable[[AsyncSession, OffsetTable], Awaitable[T]],
) -> T:
    """``work(session, table)`` in one transaction on the offsets' database, failures in
    casty-sa's words (the password masked)."""
    engine, owned = open_engine(target, connect_timeout=connect_timeout)
    try:
        async with AsyncSession(bind_schema(engine, schema)) as session, session.begin():
            return await work(session, OffsetTable())
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        raise database_error(
            exc, engine.url, what, secrets=engine_secrets(engine.url, target), schema=schema
        ) from exc
    finally:
        if owned:
            await engine.dispose()


def _report(
    row: OffsetRow, lag_events: int | None = None, lag_seconds: float | None = None
) -> SliceReport:
    return SliceReport(
        projection=row.projection,
        slice=row.slice,
        slice_count=row.slice_count,
        offset=row.last_offset,
        handled=row.handled,
        owner=row.owner,
        held=row.held,
        lease_left=(row.lease_expires_ms - row.now_ms) / 1000
        if row.held and row.lease_expires_ms is not None
        else None,
        updated=row.updated_ms / 1000,
        last_error=row.last_error,
        last_error_at=None if row.last_error_ms is None else row.last_error_ms / 1000,
        lag_events=lag_events,
        lag_seconds=lag_seconds,
    )


async def _with_lag(journal: SAJournal, rows: list[OffsetRow]) -> list[SliceReport]:
    """The rows with their lag, measured as :meth:`Projection.status
    <casty_sa.projections.projection.Projection.status>` measures it."""
    found = await slices_status(journal, rows, (), None, None)
    return [
        _report(row, status.lag_events, status.lag_seconds)
        for row, status in zip(rows, found, strict=True)
    ]


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", -1))
