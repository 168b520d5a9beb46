"""Projection rows made straight through ``OffsetTable``: stored offsets without a Projection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncSession

from casty_sa.engine import bind_schema, open_engine
from casty_sa.projections.offsets import Lease, OffsetTable


async def on_offsets(
    url: URL | str,
    work: Callable[[AsyncSession, OffsetTable], Awaitable[object]],
    *,
    schema: str | None = None,
) -> None:
    """Run ``work(session, table)`` in one committed transaction on a short-lived engine."""
    engine, _ = open_engine(url)
    try:
        async with AsyncSession(bind_schema(engine, schema)) as session, session.begin():
            await work(session, OffsetTable())
    finally:
        await engine.dispose()


async def install(url: URL | str, *projections: tuple[str, int], schema: str | None = None) -> None:
    """Make the rows of each ``(name, slice count)``, nothing handled yet."""

    async def make(session: AsyncSession, table: OffsetTable) -> None:
        for name, slices in projections:
            await table.install(session, name, slices)

    await on_offsets(url, make, schema=schema)


async def advance(
    url: URL | str,
    name: str,
    index: int,
    to: str,
    handled: int,
    *,
    owner: str = "test:1:x",
    release: bool = True,
    error: str | None = None,
) -> Lease:
    """Take slice ``index`` as ``owner``, move it to offset ``to`` (``handled`` events), note
    ``error`` if given, and give it up unless ``release`` is false; the lease it was moved
    under."""
    taken: list[Lease] = []

    async def move(session: AsyncSession, table: OffsetTable) -> None:
        row = await table.acquire(session, name, index, owner, 60_000)
        assert row is not None, f"slice {index} of {name!r} is held"
        lease = row.lease()
        await table.advance(session, lease, row.last_offset, to, handled, 60_000)
        if error is not None:
            await table.record_error(session, lease, error)
        if release:
            await table.release(session, lease)
        taken.append(lease)

    await on_offsets(url, move)
    return taken[0]
