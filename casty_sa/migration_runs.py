"""A migration as ``casty-sa upgrade`` and ``downgrade`` run it, never losing data unasked.

:func:`migrate_between` moves a database from where it stands to a revision and
says where it went. Two steps of casty-sa's history drop data: going down to
base drops the events and snapshots, and undoing 0003 drops
``casty_sa_projection_offsets``, after which every projection would rebuild its
read model from the first event. :func:`data_dropped` counts what a downgrade
would drop, and :func:`migrate_between` refuses it (:class:`DataWouldBeDropped`)
unless told to go ahead. (Apart from :mod:`casty_sa.migrate`, which the journal
uses, because the projections' offsets are :mod:`casty_sa.projections`' and
projections use the journal.)

Examples
--------
>>> from casty_sa.revisions import head_revision
>>> lands_on_base("0001", "-1"), lands_on_base(head_revision(), "-1")
(True, False)
>>> undoes("0003", "0002", PROJECTION_OFFSETS_REVISION), undoes("0003", "-1", "0002")
(True, False)
>>> str(DataWouldBeDropped(events=3, projections=2))
'downgrading would drop 3 events and the offsets of 2 projections'
"""

from __future__ import annotations

import re
from typing import Any

from alembic.script import Script
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from casty_sa.engine import bind_schema, open_engine, read_connection
from casty_sa.migrate import current, downgrade, migration_engine_options, upgrade
from casty_sa.models import journal_tables
from casty_sa.projections.offsets import OffsetTable
from casty_sa.revisions import revision_ids, schema_state, script_directory, unknown_revision
from casty_sa.urls import UrlLike, safe_url, to_async_url

__all__ = [
    "PROJECTION_OFFSETS_REVISION",
    "DataWouldBeDropped",
    "data_dropped",
    "landing",
    "lands_on_base",
    "migrate_between",
    "undoes",
]

#: The revision that creates ``casty_sa_projection_offsets`` (its downgrade drops it).
PROJECTION_OFFSETS_REVISION = "0003"


class DataWouldBeDropped(Exception):
    """A downgrade refused because it would drop stored data.

    Parameters
    ----------
    events : int
        How many events it would drop (it ends at base).
    projections : int
        How many projections' offsets it would drop (it undoes 0003).
    """

    def __init__(self, events: int = 0, projections: int = 0) -> None:
        super().__init__(events, projections)
        self.events = events
        self.projections = projections

    def __str__(self) -> str:
        lost = []
        if self.events:
            lost.append(f"{self.events:,} events")
        if self.projections:
            lost.append(f"the offsets of {self.projections:,} projections")
        return "downgrading would drop " + " and ".join(lost)

    def __bool__(self) -> bool:
        return bool(self.events or self.projections)


def landing(current: str | None, revision: str) -> str | None:
    """The revision a downgrade from ``current`` to ``revision`` ends at (``None``: base).

    ``revision`` is ``base``, ``-N``, ``head`` or a revision id (or a prefix of one);
    anything else is taken to go nowhere (Alembic refuses it).
    """
    script = script_directory()
    if revision == "base":
        return None
    relative = re.fullmatch(r"-(\d+)", revision)
    if relative is None:
        if revision in ("head", "heads"):
            return current
        found = script.get_revision(revision)
        return found.revision if isinstance(found, Script) else current
    steps = int(relative.group(1))
    at: Script | None = script.get_revision(current) if current is not None else None
    while steps and at is not None:
        down = at.down_revision
        at = script.get_revision(down) if isinstance(down, str) else None
        steps -= 1
    return at.revision if at is not None else None


def lands_on_base(current: str | None, revision: str) -> bool:
    """True when downgrading from ``current`` to ``revision`` ends with no revision at all."""
    return landing(current, revision) is None


def undoes(current: str | None, revision: str, undone: str) -> bool:
    """True when downgrading from ``current`` to ``revision`` runs ``undone``'s downgrade."""
    order = list(reversed(revision_ids()))  # one line of history, oldest first
    if current not in order:
        return False
    end = landing(current, revision)
    below = -1 if end is None else order.index(end)
    return below < order.index(undone) <= order.index(current)


async def data_dropped(
    engine: AsyncEngine,
    schema: str | None,
    current: str | None,
    revision: str,
    *,
    app_managed: bool = False,
) -> DataWouldBeDropped:
    """What downgrading ``engine``'s database from ``current`` to ``revision`` would drop
    (false when nothing). ``app_managed``: the tables are there without a revision."""
    events = projections = 0
    async with read_connection(bind_schema(engine, schema)) as connection:
        if (current is not None or app_managed) and lands_on_base(current, revision):
            table, _snapshots = journal_tables()
            counted = await connection.execute(select(func.count()).select_from(table))
            events = counted.scalar_one()
        if undoes(current, revision, PROJECTION_OFFSETS_REVISION):
            async with AsyncSession(connection) as session:
                rows = await OffsetTable().rows(session)
            projections = len({row.projection for row in rows})
    return DataWouldBeDropped(events, projections)


async def migrate_between(
    target: UrlLike,
    revision: str,
    *,
    down: bool = False,
    schema: str | None = None,
    keep_data: bool = False,
    **engine_options: Any,
) -> tuple[str | None, str | None]:
    """Upgrade (or with ``down``, downgrade) a database to ``revision``; what ``casty-sa``
    ``upgrade``/``downgrade`` run.

    ``engine_options`` configure the engine opened for the run (``connect_timeout``, …);
    its ``statement_timeout`` is :data:`casty_sa.migrate.MIGRATION_STATEMENT_TIMEOUT` unless given.

    Returns
    -------
    tuple[str | None, str | None]
        The revisions before and after.

    Raises
    ------
    SchemaError
        A newer casty-sa migrated the database (nothing is changed).
    DataWouldBeDropped
        With ``keep_data``: the downgrade would drop events (it ends at base) or
        projections' offsets (it undoes 0003); nothing is changed.
    """
    engine, _owned = open_engine(target, **migration_engine_options(target, engine_options))
    try:
        state = await schema_state(engine, schema)
        if state.unknown:
            raise unknown_revision(safe_url(to_async_url(target)), str(state.revision))
        if down and keep_data:
            dropped = await data_dropped(
                engine, schema, state.revision, revision, app_managed=state.app_managed
            )
            if dropped:
                raise dropped
        await (downgrade if down else upgrade)(engine, revision, schema=schema)
        after = await current(engine, schema=schema)
    finally:
        await engine.dispose()
    return state.revision, after
