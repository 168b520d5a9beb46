"""Every statement on ``casty_sa_projection_offsets``: offsets, leases, fences, resets.

A projection's slice is one row (:class:`casty_sa.models.ProjectionOffsetRecord`).
Each method runs one or two Core statements on the session it is given and
leaves the transaction to the caller, so a batch's read-model writes, its
:meth:`OffsetTable.advance` and its commit are one transaction. Times are
milliseconds on the database's clock (:class:`database_ms`), so the nodes'
own clocks never decide who holds a lease.

The rules this module keeps:

- a worker takes a slice only when nobody holds it or its lease expired
  (:meth:`~OffsetTable.acquire`), and every take-over adds one to ``fence``;
- :meth:`~OffsetTable.advance` moves the offset only if the row still has the
  worker's owner, fence and the offset the batch started from; otherwise it
  raises :class:`~casty_sa.errors.ProjectionLeaseLost` and the caller rolls back.
  It runs first in the batch's transaction, so the row stays locked until the
  commit: a take-over or a reset waits for the batch instead of racing it;
- a reset adds one to ``fence`` too, so a worker that was running cannot commit
  a batch of the old run over the new one.

Examples
--------
>>> from sqlalchemy.dialects import postgresql, sqlite
>>> str(database_ms().compile(dialect=sqlite.dialect()))
"CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
>>> str(database_ms().compile(dialect=postgresql.dialect()))
'CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)'
>>> from sqlalchemy.dialects import mysql
>>> str(database_ms().compile(dialect=mysql.dialect()))
"TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000"
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Insert,
    MetaData,
    Table,
    Update,
    and_,
    delete,
    or_,
    select,
    update,
)
from sqlalchemy import insert as generic_insert
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.schema import SchemaConst

from casty_sa.errors import ProjectionError, ProjectionLeaseLost
from casty_sa.models import NAMING_CONVENTION, ProjectionOffsetRecord
from casty_sa.projections.bounds import end_if_frozen

__all__ = ["Lease", "OffsetRow", "OffsetTable", "SliceCountChanged", "database_ms"]


class database_ms(FunctionElement[int]):
    """The database's clock in whole milliseconds since 1970 (``clock_timestamp()`` on
    PostgreSQL: the time of the statement, not of its transaction's start)."""

    type = BigInteger()
    inherit_cache = True
    name = "casty_sa_database_ms"


@compiles(database_ms, "postgresql")
def _postgresql_ms(element: database_ms, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"


@compiles(database_ms, "sqlite")
def _sqlite_ms(element: database_ms, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"


@compiles(database_ms, "mysql")
@compiles(database_ms, "mariadb")
def _mysql_ms(element: database_ms, compiler: SQLCompiler, **kw: Any) -> str:
    # UTC arithmetic: UNIX_TIMESTAMP(NOW()) goes through the session's time zone, and in a
    # zone with daylight saving time the hour that repeats in autumn would turn it back
    return "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000"


class SliceCountChanged(ProjectionError):
    """The projection's rows were made with another number of slices than asked for.

    Offsets of one slicing mean nothing in another: reset the projection (with its
    read model) to change the number of slices.
    """


@dataclass(frozen=True, slots=True)
class Lease:
    """The right of one worker (``owner``) to move one slice, taken with ``fence``."""

    projection: str
    slice: int
    owner: str
    fence: int


@dataclass(frozen=True, slots=True)
class OffsetRow:
    """One slice's row as read, with the database's clock at the read (``now_ms``)."""

    projection: str
    slice: int
    slice_count: int
    last_offset: str | None
    handled: int
    fence: int
    owner: str | None
    lease_expires_ms: int | None
    updated_ms: int
    last_error: str | None
    last_error_ms: int | None
    now_ms: int

    @property
    def held(self) -> bool:
        """Whether a worker holds the slice's lease (an unexpired one) at the read."""
        return (
            self.owner is not None
            and self.lease_expires_ms is not None
            and self.lease_expires_ms > self.now_ms
        )

    @classmethod
    def unstarted(cls, projection: str, index: int, slice_count: int) -> OffsetRow:
        """The row a slice of a projection that never ran would have: no offset, no owner."""
        return cls(projection, index, slice_count, None, 0, 0, None, None, 0, None, None, 0)

    def lease(self) -> Lease:
        """The lease this row gives its owner (only for a row read after taking it)."""
        if self.owner is None:
            raise ProjectionLeaseLost(f"slice {self.slice} of {self.projection!r} has no owner")
        return Lease(self.projection, self.slice, self.owner, self.fence)


class OffsetTable:
    """The offsets table (in ``schema``, when given) and the statements on it.

    Examples
    --------
    >>> OffsetTable("readmodel").table.fullname
    'readmodel.casty_sa_projection_offsets'
    """

    def __init__(self, schema: str | None = None) -> None:
        self.table = _offsets_table(schema)

    async def install(self, session: AsyncSession, name: str, slice_count: int) -> None:
        """Make the projection's rows if it has none; refuse another slice count."""
        table = self.table
        counts = (
            await session.execute(
                select(table.c.slice_count).where(table.c.projection == name).distinct()
            )
        ).scalars()
        stored = set(counts)
        if not stored:
            rows = [self._new_row(name, index, slice_count, 0) for index in range(slice_count)]
            await session.execute(self._insert(_insert_ignoring_duplicates(session, table)), rows)
        elif stored != {slice_count}:
            raise SliceCountChanged(
                f"projection {name!r} is stored with {_slices(stored)}, not {slice_count}: "
                "reset it (and its read model) to change the number of slices"
            )

    async def acquire(
        self, session: AsyncSession, name: str, index: int, owner: str, lease_ms: int
    ) -> OffsetRow | None:
        """Take slice ``index`` for ``owner`` if nobody holds it; the row taken, or ``None``."""
        table = self.table
        free = or_(
            table.c.owner.is_(None),
            table.c.lease_expires_ms.is_(None),
            table.c.lease_expires_ms <= database_ms(),
        )
        await end_if_frozen(session, lease_ms)
        taken = await session.execute(
            update(table)
            .where(table.c.projection == name, table.c.slice == index, free)
            .values(
                owner=owner,
                fence=table.c.fence + 1,
                lease_expires_ms=database_ms() + lease_ms,
                updated_ms=database_ms(),
            )
        )
        if _rowcount(taken) != 1:
            return None
        [row] = await self.rows(session, name, index)
        return row

    async def renew(self, session: AsyncSession, lease: Lease, lease_ms: int) -> bool:
        """Extend ``lease`` by ``lease_ms`` from now; ``False`` if it was lost."""
        await end_if_frozen(session, lease_ms)
        renewed = await session.execute(
            update(self.table)
            .where(self._held_by(lease))
            .values(lease_expires_ms=database_ms() + lease_ms)
        )
        return _rowcount(renewed) == 1

    async def advance(
        self,
        session: AsyncSession,
        lease: Lease,
        after: str | None,
        to: str,
        handled: int,
        lease_ms: int,
    ) -> None:
        """Move the slice from offset ``after`` to ``to`` (``handled`` more events), renewing
        the lease; :class:`ProjectionLeaseLost` if the row is no longer ``lease``'s at
        ``after``. Run it first in the batch's transaction (it locks the row)."""
        table = self.table
        await end_if_frozen(session, lease_ms)
        moved = await session.execute(
            update(table)
            .where(self._held_by(lease), table.c.last_offset.is_not_distinct_from(after))
            .values(
                last_offset=to,
                handled=table.c.handled + handled,
                lease_expires_ms=database_ms() + lease_ms,
                updated_ms=database_ms(),
                last_error=None,
                last_error_ms=None,
            )
        )
        if _rowcount(moved) != 1:
            raise ProjectionLeaseLost(
                f"slice {lease.slice} of projection {lease.projection!r} was taken over or "
                "reset while this worker held it: the batch was rolled back"
            )

    async def release(self, session: AsyncSession, lease: Lease) -> None:
        """Give the slice up (a stopping worker), so another takes it at once."""
        await session.execute(
            update(self.table)
            .where(self._held_by(lease))
            .values(owner=None, lease_expires_ms=None, updated_ms=database_ms())
        )

    async def record_error(self, session: AsyncSession, lease: Lease, text: str) -> None:
        """Note the failure that holds the slice back (cleared by the next advance)."""
        await session.execute(
            update(self.table)
            .where(self._held_by(lease))
            .values(last_error=text, last_error_ms=database_ms())
        )

    async def reset(self, session: AsyncSession, name: str, slice_count: int | None = None) -> int:
        """Start the projection over: no offset, no owner, a higher fence on every slice.

        ``slice_count``: make that many slices (``None``: as many as stored). Returns
        how many rows the projection had (0: it was unknown, and nothing was made).
        """
        table = self.table
        stored = (
            await session.execute(
                select(table.c.fence, table.c.slice_count)
                .where(table.c.projection == name)
                .with_for_update()
            )
        ).all()
        if not stored:
            return 0
        fence = max(row.fence for row in stored) + 1
        slices = slice_count or stored[0].slice_count
        await session.execute(delete(table).where(table.c.projection == name))
        rows = [self._new_row(name, index, slices, fence) for index in range(slices)]
        await session.execute(self._insert(generic_insert(table)), rows)
        return len(stored)

    def restart(self, name: str) -> Update:
        """:meth:`reset` as one ``UPDATE`` that keeps the slice count: for a script a DBA
        runs in their own transaction, beside the ``DELETE`` that clears the read model.
        Every slice's fence goes up by one, so no worker of the old run commits again."""
        table = self.table
        return (
            update(table)
            .where(table.c.projection == name)
            .values(
                last_offset=None,
                handled=0,
                fence=table.c.fence + 1,
                owner=None,
                lease_expires_ms=None,
                updated_ms=database_ms(),
                last_error=None,
                last_error_ms=None,
            )
        )

    async def rows(
        self, session: AsyncSession, name: str | None = None, index: int | None = None
    ) -> list[OffsetRow]:
        """The rows of projection ``name`` (every projection's when ``None``), or of one slice."""
        table = self.table
        query = select(*table.c, database_ms().label("now_ms")).order_by(
            table.c.projection, table.c.slice
        )
        if name is not None:
            query = query.where(table.c.projection == name)
        if index is not None:
            query = query.where(table.c.slice == index)
        return [OffsetRow(**row._asdict()) for row in await session.execute(query)]

    def _held_by(self, lease: Lease) -> ColumnElement[bool]:
        table = self.table
        return and_(
            table.c.projection == lease.projection,
            table.c.slice == lease.slice,
            table.c.owner == lease.owner,
            table.c.fence == lease.fence,
        )

    @staticmethod
    def _insert(insert: Insert) -> Insert:
        return insert.values(updated_ms=database_ms())

    @staticmethod
    def _new_row(name: str, index: int, slice_count: int, fence: int) -> dict[str, Any]:
        return {
            "projection": name,
            "slice": index,
            "slice_count": slice_count,
            "last_offset": None,
            "handled": 0,
            "fence": fence,
            "owner": None,
            "lease_expires_ms": None,
            "last_error": None,
            "last_error_ms": None,
        }


@functools.cache
def _offsets_table(schema: str | None) -> Table:
    return cast(Table, ProjectionOffsetRecord.__table__).to_metadata(
        MetaData(naming_convention=NAMING_CONVENTION),
        schema=schema if schema is not None else SchemaConst.RETAIN_SCHEMA,
    )


def _insert_ignoring_duplicates(session: AsyncSession, table: Table) -> Insert:
    """``INSERT`` that skips rows another process made first (two nodes starting at once)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    # not INSERT IGNORE, which would also turn a value that does not fit into a warning
    upsert = mysql.insert(table)
    return upsert.on_duplicate_key_update(projection=table.c.projection)


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


def _slices(counts: set[int]) -> str:
    return " and ".join(f"{count} slices" for count in sorted(counts))
